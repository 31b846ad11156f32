"""The ``vtprune`` command: ``vtprune info`` and ``vtprune demo``.

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
    """Whether vtprune._cpu (the C++ CPU engine of the torch backend's SCOPE loop) is built."""
    try:
        from .torch_backend import scope

        built, reason = scope.cpu_engine_status()
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__}: {exc})"
    if built:
        return "built (torch backend SCOPE on CPU uses the C++ loop)"
    return f"{reason}; the torch backend uses its NumPy loop"


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
        ops = "-"
        if usable:
            try:
                ops = ", ".join(sorted(_dispatch._ops(name))) or "none yet"
            except Exception as exc:  # noqa: BLE001
                ops = f"import failed: {type(exc).__name__}: {exc}"
        rows.append((name, "yes" if usable else "no", reason, ops))
    return rows


def cmd_info(args: argparse.Namespace) -> int:
    import torch

    import vtprune

    lines = [
        ("vtprune", f"{vtprune.__version__} ({os.path.dirname(vtprune.__file__)})"),
        ("python", f"{platform.python_version()} ({platform.python_implementation()}, {sys.executable})"),
        ("torch", f"{torch.__version__} (built with CUDA {torch.version.cuda or 'none'})"),
        ("triton", _triton_version()),
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
    print("ops per usable backend (backend='auto' takes cuda > triton > torch for CUDA tensors, torch for CPU tensors):")
    for name, usable, _, ops in rows:
        if usable == "yes":
            print(f"  {name.ljust(widths[0])}  {ops}")
    return 0


def _keep(text: str) -> int:
    from .demo import NUM_TOKENS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= NUM_TOKENS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {NUM_TOKENS} (the 24x24 token grid), got {value}")
    return value


def _positive(text: str) -> int:
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

    demo = sub.add_parser(
        "demo",
        help="SCOPE vs HoloV vs saliency top-k on the 576 patch tokens of a photo; prints a table, writes a PNG",
        description=(
            "Cut a photo into CLIP-336's 24x24 grid of 14-px patches, describe each patch by colour, "
            "gradient and texture statistics, score it with a spectral-residual saliency map, keep "
            "--keep tokens with SCOPE, HoloV and plain saliency top-k, and compare their coverage and speed."
        ),
    )
    demo.add_argument("--image", metavar="PATH", help="any image file Pillow reads (default: scikit-image's astronaut)")
    demo.add_argument("--keep", type=_keep, default=64, metavar="K", help="tokens to keep of 576 (default 64)")
    demo.add_argument("--method", choices=("scope", "holov", "topk", "all"), default="all", help="default all")
    demo.add_argument("--out", default="vtprune_demo.png", metavar="PNG", help="figure path (default vtprune_demo.png)")
    demo.add_argument("--repeat", type=_positive, default=5, metavar="R", help="timed runs per backend, median reported (default 5)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default: cuda if available")
    demo.add_argument("--no-timing", action="store_true", help="run each method once, with the backend 'auto' picks")
    demo.set_defaults(func=cmd_demo)
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
