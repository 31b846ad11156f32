"""The ``vtprune`` command: ``vtprune info``, ``vtprune check``, ``vtprune demo`` and ``vtprune bench``.

Installed as a console script (``vtprune = vtprune.cli:main``) and reachable as
``python -m vtprune``. Subcommands import what they need when they run, so ``vtprune info``
works on a machine without the demo extras and ``import vtprune`` never imports this module.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys
from typing import Sequence


def _cuda_version(v: int) -> str:
    """12080 -> '12.8' (the CUDA runtime/driver API encoding)."""
    return f"{v // 1000}.{(v % 1000) // 10}" if v > 0 else "none"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    except Exception as exc:  # noqa: BLE001 - a broken install is worth reporting, not crashing on
        return f"import failed: {type(exc).__name__}: {exc}"
    return str(getattr(triton, "__version__", "unknown version"))


def _extension_info() -> str:
    """What vtprune._C (the CUDA kernels) reports, or why it is absent."""
    try:
        ext = importlib.import_module("vtprune._C")
    except ImportError as exc:
        return f"not built ({exc}); see README 'Building the CUDA kernels'"
    except Exception as exc:  # noqa: BLE001
        return f"import failed: {type(exc).__name__}: {exc}"
    parts = []
    for label, fn, fmt in (
        ("CUDA runtime", "cuda_runtime_version", _cuda_version),
        ("compiled archs", "compiled_archs", str),
        ("driver CUDA", "cuda_driver_version", _cuda_version),
        ("status", "cuda_status", str),
    ):
        try:
            parts.append(f"{label} {fmt(getattr(ext, fn)())}")
        except Exception as exc:  # noqa: BLE001
            parts.append(f"{label} unknown ({exc})")
    return "built: " + ", ".join(parts)


def _cpu_engine_info() -> str:
    """Whether vtprune._cpu (the C++ CPU engines of the torch backend's SCOPE loop and HoloV
    selection) is built, and which engines the environment selects."""
    try:
        from .torch_backend import holov, scope

        built, reason = scope.cpu_engine_status()
        holov_built, holov_reason = holov.cpu_engine_status()
        isas = scope._cpu_module.holov_isas() if holov_built else []
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__}: {exc})"
    engines = f"VTPRUNE_SCOPE_CPU_ENGINE={scope._ENGINE}, VTPRUNE_HOLOV_CPU_ENGINE={holov._ENGINE}"
    if not built:
        return f"{reason}; the torch backend uses its NumPy SCOPE loop and torch HoloV code ({engines})"
    if not holov_built:
        return f"built, SCOPE loop only: {holov_reason} ({engines})"
    return f"built (SCOPE loop; HoloV with the {isas[0]} Gram kernel) ({engines})"


def _gpu_info() -> list[str]:
    import torch

    try:
        if not torch.cuda.is_available():
            return ["none"]
        out = []
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append(f"cuda:{i} {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB)")
        return out or ["none"]
    except Exception as exc:  # noqa: BLE001
        return [f"unknown ({type(exc).__name__}: {exc})"]


def _backend_rows() -> list[tuple[str, str, str, str]]:
    """(name, usable, reason, ops) for every backend; one failing backend does not hide the rest."""
    from . import _dispatch

    rows = []
    for name in _dispatch.BACKENDS:
        try:
            st = _dispatch.status(name)
            usable, reason = st.usable, st.reason
        except Exception as exc:  # noqa: BLE001
            usable, reason = False, f"status check failed: {type(exc).__name__}: {exc}"
        # Listed for unusable backends too: what a GPU machine would add is worth knowing here.
        try:
            ops = ", ".join(sorted(_dispatch._ops(name))) or "none yet"
        except Exception as exc:  # noqa: BLE001
            ops = f"import failed: {type(exc).__name__}: {exc}"
        rows.append((name, "yes" if usable else "no", reason, ops))
    return rows


def _driver_cuda() -> str:
    """The CUDA version the NVIDIA driver supports, asked of libcuda directly (no torch, no vtprune._C)."""
    import ctypes

    names = ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so")
    for name in names:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            rc = lib.cuDriverGetVersion(ctypes.byref(version))
        except AttributeError:
            return f"{name} has no cuDriverGetVersion"
        return f"supports CUDA {_cuda_version(version.value)}" if rc == 0 else f"cuDriverGetVersion failed (CUresult {rc})"
    return "none (no NVIDIA driver: libcuda not found)"


def _package_version(name: str) -> str:
    """An installed distribution's version, read from its metadata (the package is not imported)."""
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import vtprune

    lines = [
        ("vtprune", f"{vtprune.__version__} ({os.path.dirname(vtprune.__file__)})"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("torch", f"{torch.__version__} (built with CUDA {torch.version.cuda or 'none'})"),
        ("CUDA", f"torch runtime {torch.version.cuda or 'none (a CPU build of torch)'}; driver {_driver_cuda()}"),
        ("triton", _triton_version()),
        ("transformers", _package_version("transformers")),
        ("vtprune._C", _extension_info()),
        ("vtprune._cpu", _cpu_engine_info()),
        ("GPU", "; ".join(_gpu_info())),
        ("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "unset")),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"{key.ljust(width)}  {value}")
    print()
    rows = _backend_rows()
    head = ("backend", "usable", "reason")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(2)]
    print(f"{head[0].ljust(widths[0])}  {head[1].ljust(widths[1])}  {head[2]}")
    for name, usable, reason, _ in rows:
        print(f"{name.ljust(widths[0])}  {usable.ljust(widths[1])}  {reason}")
    print()
    print("ops each backend implements (backend='auto' takes cuda > triton > torch for CUDA tensors, torch for CPU tensors):")
    for name, usable, _, ops in rows:
        print(f"  {name.ljust(widths[0])}  {ops}" + ("" if usable == "yes" else "  (not usable here)"))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from . import check

    return check.main(args)


def _keep(text: str) -> int:
    from .demo import NUM_TOKENS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= NUM_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {NUM_TOKENS} (the 24x24 token grid), got {value}")
    return value


def _methods(text: str) -> str:
    """``--method``: ``all`` or a comma-separated list of demo methods (checked here, used as given)."""
    from .demo import METHODS

    names = [t.strip() for t in text.split(",")]
    bad = [n for n in names if n not in METHODS] if text != "all" else []
    if bad or not any(names):
        raise argparse.ArgumentTypeError(f"expected 'all' or a comma-separated list of {', '.join(METHODS)}; got {text!r}")
    return text


def positive_int(text: str) -> int:
    """argparse ``type`` of a count option (``--repeat``, ``--trials``): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.main(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtprune",
        description="Fused kernels for pruning the visual tokens of multimodal LLMs (SCOPE, HoloV, ALVTS).",
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vtprune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    info = sub.add_parser("info", help="versions, GPU, and which backends can run here (and why not)")
    info.set_defaults(func=cmd_info)

    from . import check

    chk = sub.add_parser(
        "check",
        help="verify every backend usable here against the reference on random inputs; exit 1 on a failure",
        description=check.DESCRIPTION,
    )
    check.add_arguments(chk)
    chk.set_defaults(func=cmd_check)

    demo = sub.add_parser(
        "demo",
        help="SCOPE vs HoloV vs saliency top-k on the 576 patch tokens of a photo; prints a table, writes a PNG",
        description=(
            "Cut a photo into CLIP-336's 24x24 grid of 14-px patches, describe each patch by colour, "
            "gradient and texture statistics, score it with a spectral-residual saliency map, keep "
            "--keep tokens with SCOPE, HoloV and plain saliency top-k, and compare their coverage and speed. "
            "The PNG shows the kept-token maps side by side and, in one panel, each method's θ-coverage "
            "against θ (the share of tokens with a kept token at cosine similarity >= θ)."
        ),
    )
    demo.add_argument("--image", metavar="PATH", help="any image file Pillow reads (default: scikit-image's astronaut)")
    demo.add_argument("--keep", type=_keep, default=64, metavar="K", help="tokens to keep of 576 (default 64)")
    demo.add_argument(
        "--method",
        type=_methods,
        default="all",
        metavar="LIST",
        help="methods to compare side by side: scope, holov, topk, comma-separated, or all (default all)",
    )
    demo.add_argument("--out", default="vtprune_demo.png", metavar="PNG", help="figure path (default vtprune_demo.png)")
    demo.add_argument("--repeat", type=positive_int, default=5, metavar="R", help="timed runs per backend, median reported (default 5)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    demo.add_argument("--no-timing", action="store_true", help="run each method once, with the backend 'auto' picks")
    demo.set_defaults(func=cmd_demo)

    from .bench import add_bench_arguments

    bench = sub.add_parser(
        "bench",
        help="benchmark table of SCOPE, HoloV and attention importance per provider (JSON, markdown, PNG)",
        description=(
            "Time every provider usable here (official-style loops, reference, torch, Triton, CUDA) on named "
            "shapes, check their outputs agree, and print median latency, ratio to the baseline and peak GPU memory."
        ),
    )
    add_bench_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if getattr(args, "device", None) == "cuda":
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # e.g. `vtprune info | head`: stop quietly, like other CLI tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
