"""Compile every Triton kernel of ``vtprune.triton_kernels`` for real GPU targets, without a GPU.

The Triton tests run the kernels under ``TRITON_INTERPRET=1`` when there is no GPU, and the
interpreter accepts programs the compiler rejects (``tl.dot`` shape and dtype rules, layouts,
shared-memory limits, type promotion). This module closes that gap in two subprocesses:

1. **record** (``TRITON_INTERPRET=1``): every public wrapper of the package runs on small CPU inputs
   (:func:`cases`) that reach every dtype and every constexpr branch the wrappers can choose, with
   the interpreter's launch entry point (``InterpretedFunction.run``) wrapped to record each
   launch: the kernel, every argument (tensors as dtype and 16-byte alignment of their address,
   scalars as values) and the launch options (``num_warps``, ...). The wrappers pick a few tile
   sizes and dot paths differently under the interpreter; while recording, each kernel module's
   ``_is_interpreted()`` answers False except in its input checks (:func:`_gpu_decisions`), so
   the recorded launches are the ones a GPU would get. The kernels still run (their results are
   not checked here, and are wrong where the interpreter cannot do what the GPU path asks, e.g.
   a bf16 ``tl.dot``), so the wrappers' torch code between and after launches runs too.
2. **compile** (``TRITON_INTERPRET`` unset, so ``@triton.jit`` gives real ``JITFunction`` s): each
   recorded launch goes through the JIT's own binder, built for the target's backend, on
   stand-ins that carry the recorded dtypes and addresses. That applies exactly the launcher's
   specialization rules: i32 or i64 by value, the divisible-by-16 attribute on ints and pointers,
   ints equal to 1 turned into constexprs, ``do_not_specialize``. Launches that specialize alike
   are compiled once per target with ``triton.compile(ASTSource(...), target=GPUTarget("cuda",
   arch, 32))``. Registers and spills come from the ``ptxas -v`` log of Triton's own ptxas call
   (``knobs.nvidia.dump_ptxas_log``), shared memory from the compiled kernel's metadata.

The package's kernels are found by walking its modules: a ``@triton.jit`` function that no other
one calls is a kernel. A kernel that no case launched makes :func:`run_check` report it, so a new
kernel cannot go unchecked silently.

The compile step uses private parts of triton's JIT (``create_function_from_signature``,
``JITFunction._pack_args``) as they are in triton 3.9; :func:`api_problem` says what is missing
on other versions.

Run as a script with ``record`` or ``compile`` it is one of the two subprocesses (JSON on stdin
and stdout); :func:`run_check` drives both.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

PACKAGE = "vtprune.triton_kernels"

#: Targets compiled for: name -> (compute capability, shared memory one block may use in bytes,
#: i.e. the opt-in maximum: 227 KiB on sm_90 (H100), 163 KiB on sm_80 (A100)).
TARGETS: dict[str, tuple[int, int]] = {
    "sm_90": (90, 227 * 1024),
    "sm_80": (80, 163 * 1024),
}
#: 32-bit registers of one SM, the most one block can use.
REGISTER_FILE = 65536

_HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- encoding


def _encode(value: Any) -> dict:
    """A launch argument as JSON: tensors by dtype and address alignment, scalars by value."""
    import torch

    if isinstance(value, torch.Tensor):
        return {"kind": "tensor", "dtype": str(value.dtype).removeprefix("torch."), "align16": value.data_ptr() % 16 == 0}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value}
    if isinstance(value, float):
        return {"kind": "float", "value": value}
    if value is None:
        return {"kind": "none"}
    if isinstance(value, str):
        return {"kind": "str", "value": value}
    raise TypeError(f"cannot record a launch argument of type {type(value).__name__}: {value!r}")


class _PointerStandIn:
    """What the JIT's binder reads of a tensor argument: its dtype and its address."""

    def __init__(self, dtype: Any, align16: bool) -> None:
        self.dtype = dtype
        # any address works; only its alignment decides the specialization
        self._ptr = 1 << 20 if align16 else (1 << 20) + 4

    def data_ptr(self) -> int:
        return self._ptr


def _decode(arg: dict) -> Any:
    import torch

    kind = arg["kind"]
    if kind == "tensor":
        return _PointerStandIn(getattr(torch, arg["dtype"]), arg["align16"])
    if kind == "none":
        return None
    return arg["value"]


# ----------------------------------------------------------------------------- the package's kernels


def _is_jit(obj: Any) -> bool:
    return type(obj).__name__ in ("JITFunction", "InterpretedFunction")


def _called_names(fn: Callable) -> set[str]:
    """Names of the functions ``fn``'s body calls (``f(...)`` and ``mod.f(...)``)."""
    tree = ast.parse(_dedented_source(fn))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                names.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                names.add(node.func.attr)
    return names


def _dedented_source(fn: Callable) -> str:
    import textwrap

    return textwrap.dedent(inspect.getsource(fn))


def package_kernels() -> dict[str, Any]:
    """``"module:name" -> jit object`` of every kernel of the package.

    Every module of the package is imported; its ``@triton.jit`` functions that no ``@triton.jit``
    function of the package calls are the kernels (the others are device helpers).
    """
    package = importlib.import_module(PACKAGE)
    jitted: dict[str, tuple[str, Any]] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{PACKAGE}.{info.name}")
        for name, obj in vars(module).items():
            if _is_jit(obj) and obj.fn.__module__ == module.__name__:
                jitted[f"{info.name}:{name}"] = (name, obj)
    called: set[str] = set()
    for _, obj in jitted.values():
        called |= _called_names(obj.fn)
    return {key: obj for key, (name, obj) in jitted.items() if name not in called}


# ----------------------------------------------------------------------------- recording


@dataclass
class Launch:
    """One recorded kernel launch."""

    kernel: str  # "module:name" inside the package
    args: list[dict]
    kwargs: dict[str, dict]  # constexprs and launch options (num_warps, ...) as the wrapper passed them
    case: str  # the input case that launched it


@contextlib.contextmanager
def _recording(kernels: dict[str, Any], sink: list[Launch], case: list[str]) -> Iterator[None]:
    """Wrap the interpreter's launch entry point so every launch of ``kernels`` lands in ``sink``."""
    from triton.runtime.interpreter import InterpretedFunction

    names = {id(obj): key for key, obj in kernels.items()}
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        key = names.get(id(self))
        if key is not None and not warmup:
            sink.append(
                Launch(
                    kernel=key,
                    args=[_encode(a) for a in args],
                    kwargs={k: _encode(v) for k, v in kwargs.items()},
                    case=case[0],
                )
            )
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield
    finally:
        InterpretedFunction.run = original


@contextlib.contextmanager
def _gpu_decisions(modules: list[Any]) -> Iterator[None]:
    """Make each module's wrappers choose as on a GPU while its kernels still run interpreted.

    ``_is_interpreted()`` answers False, except inside the module's own ``_check*`` functions,
    and the shared device checks it imported (``check_device``, ``check_float``) are told that
    the kernels are interpreted: the CPU tensors pass the input checks, every other decision
    (tiles, dot paths, grids) is the GPU's. A wrapper checking the device some other way fails
    loudly here rather than recording interpreter choices.
    """
    from vtprune.triton_kernels import _common

    depth = [0]
    saved: list[tuple[Any, str, Any]] = []

    def checking(fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            depth[0] += 1
            try:
                return fn(*args, **kwargs)
            finally:
                depth[0] -= 1

        return wrapper

    def interpreting_check(fn: Callable) -> Callable:
        def wrapper(*args):
            return fn(*args[:-1], True)  # the last argument: whether the kernels are interpreted

        return wrapper

    for module in modules:
        if not hasattr(module, "_is_interpreted"):
            raise RuntimeError(f"{module.__name__} has no _is_interpreted(); the recorder cannot steer its wrappers")
        patches = {"_is_interpreted": lambda: depth[0] > 0}
        for name, fn in vars(module).items():
            if name.startswith("_check") and inspect.isfunction(fn) and fn.__module__ == module.__name__:
                patches[name] = checking(fn)
            elif fn is _common.check_device or fn is _common.check_float:
                patches[name] = interpreting_check(fn)
        for name, new in patches.items():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, new)
    try:
        yield
    finally:
        for module, name, old in reversed(saved):
            setattr(module, name, old)


# ----------------------------------------------------------------------------- input cases
#
# Each case calls one public wrapper. Together they reach, with the GPU's choices: every input
# dtype, every value of every constexpr branch (causal, DOT_FP32, MUL, HAS_LEN, RANK_SCORE,
# SORTED, ...), the smallest and the largest tile sizes each wrapper picks (the largest decide
# registers and shared memory), index tensors of both int dtypes, ints equal to 1 (turned into
# constexprs by the launcher) and ints with and without the divisible-by-16 attribute.


def _scope_cases() -> list[tuple[str, Callable[[Any], Any]]]:
    import torch

    from vtprune.triton_kernels import scope

    def batched(dtype, b, n, d, k, combine="mul", lengths=None, sim=None):
        def run(g):
            x = torch.randn(b, n, d, generator=g).to(dtype)
            sal = torch.rand(b, n, generator=g)
            lens = None if lengths is None else torch.tensor(lengths)
            extra = {} if sim is None else {"similarity_dtype": sim}
            return scope.scope_select(x, sal, k, 1.0, combine, lens, True, **extra)

        return run

    def varlen(dtype, seqlens, ks):
        def run(g):
            total = sum(seqlens)
            x = torch.randn(total, 16, generator=g).to(dtype)
            sal = torch.rand(total, generator=g)
            cu = torch.tensor([0] + seqlens).cumsum(0)
            return scope.scope_select_varlen(x, sal, cu, torch.tensor(ks), 0.5, "add", False)

        return run

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    return [
        # fp32 S, the GPU's tiles (32 x 256), N not a multiple of 16
        ("scope fp32 N=289 mul", batched(f32, 2, 289, 32, 16)),
        ("scope fp32 N=288 add lengths", batched(f32, 2, 288, 16, 8, "add", [288, 200])),
        # fp16 S (SCOPE's storage above 4096 tokens, forced on a small N)
        ("scope fp16-S N=300 mul", batched(f16, 2, 300, 16, 8, "mul", [300, 123], torch.float16)),
        ("scope fp16-S N=160 add", batched(bf16, 1, 160, 16, 5, "add", None, torch.float16)),
        ("scope bf16 N=7", batched(bf16, 2, 7, 8, 3)),
        ("scope fp16 N=1 k=1", batched(f16, 3, 1, 4, 1)),
        ("scope varlen fp16", varlen(f16, [5, 9, 3], [2, 3, 1])),
    ]


def _coverage_cases() -> list[tuple[str, Callable[[Any], Any]]]:
    import torch

    from vtprune.triton_kernels import coverage

    def case(dtype, b, n, d, k, lengths=None, strided=False):
        def run(g):
            x = torch.randn(b, n, 2 * d if strided else d, generator=g).to(dtype)
            if strided:
                x = x[:, :, :d]  # row stride 2 * d, last stride 1: passed as is
            idx = torch.randint(0, n, (b, k), generator=g)
            lens = None if lengths is None else torch.tensor(lengths)
            return coverage.coverage_max_sim(x, idx, lens)

        return run

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    return [
        ("coverage fp32 D=8", case(f32, 2, 97, 8, 5)),
        ("coverage fp32 D=32", case(f32, 1, 70, 32, 16, [50])),
        ("coverage fp32 D=100", case(f32, 2, 65, 100, 7)),
        ("coverage fp32 D=128", case(f32, 1, 40, 128, 4)),
        ("coverage fp16 D=16 K=1", case(f16, 2, 33, 16, 1)),
        ("coverage fp16 D=64", case(f16, 1, 80, 64, 9, [80])),
        ("coverage bf16 D=24 strided", case(bf16, 2, 40, 24, 3, None, True)),
        ("coverage bf16 D=128", case(bf16, 1, 64, 128, 32)),
    ]


def _attention_cases() -> list[tuple[str, Callable[[Any], Any]]]:
    import torch

    from vtprune.triton_kernels import attention

    def case(dtype, b, hq, hk, length, d, groups, causal, key_range=None):
        def run(g):
            q = torch.randn(b, hq, length, d, generator=g).to(dtype)
            k = torch.randn(b, hk, length, d, generator=g).to(dtype)
            qg = torch.randint(-1, groups, (b, length), generator=g)
            start, end = key_range or (0, length)
            return attention.attention_importance(q, k, qg, groups, causal, d**-0.5, start, end)

        return run

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    # every (BLOCK_M, BLOCK_N, BLOCK_D) the wrapper picks for each dtype family (fp32: d <= 64,
    # <= 128, 256; 16-bit: <= 128, 256), small and full head dims, both causal values per dtype,
    # groups per program 1, 2, 4 and 8, GQA (Hq // Hk = 2), single heads (HQ = REP = 1 become
    # constexprs) and a key range
    specs = [
        (f32, 8, False, 1, (1, 1), None),
        (f32, 64, True, 3, (2, 1), (3, 17)),
        (f32, 128, False, 8, (1, 1), None),
        (f32, 200, True, 20, (2, 1), None),
        (f16, 32, True, 2, (2, 2), (3, 17)),
        (f16, 128, True, 1, (2, 1), None),
        (f16, 256, False, 8, (1, 1), None),
        (bf16, 16, True, 1, (1, 1), None),
        (bf16, 64, False, 4, (2, 1), None),
        (bf16, 256, True, 3, (1, 1), (5, 20)),
    ]
    cases = []
    for dtype, d, causal, groups, (hq, hk), key_range in specs:
        name = f"attention {str(dtype).removeprefix('torch.')} d={d} causal={causal} G={groups} Hq={hq} Hk={hk}"
        cases.append((name, case(dtype, 1, hq, hk, 20, d, groups, causal, key_range)))
    return cases


def _holov_cases() -> list[tuple[str, Callable[[Any], Any]]]:
    import torch

    from vtprune.triton_kernels import holov

    def select(dtype, b, n, d, k, crops, rank_by, lengths=None, sorted_=True):
        def run(g):
            x = torch.randn(b, n, d, generator=g).to(dtype)
            a = torch.rand(b, n, generator=g).to(dtype)
            lens = None if lengths is None else torch.tensor(lengths)
            return holov.holov_select(x, a, k, crops, 0.09, rank_by, lens, sorted_)

        return run

    def budgets(dtype, index_dtype, b, c, k):
        def run(g):
            w = torch.rand(b, c, generator=g)
            w = (w / w.sum(1, keepdim=True)).to(dtype)
            cap = torch.randint(0, 4, (b, c), generator=g).to(index_dtype)
            cap[:, 0] = k
            return holov.crop_budgets(w, k, cap)

        return run

    def topk(dtype, index_dtype, sizes, k, sorted_):
        def run(g):
            size_t = torch.tensor(sizes)
            budget_t = torch.zeros_like(size_t)
            for row in range(size_t.shape[0]):
                left = k
                for c in range(size_t.shape[1]):
                    budget_t[row, c] = min(left, int(size_t[row, c]))
                    left -= int(budget_t[row, c])
            n = int(size_t.sum(1).max()) + 3
            scores = torch.randn(size_t.shape[0], n, generator=g).to(dtype)
            return holov.crop_topk(scores, size_t.to(index_dtype), budget_t.to(index_dtype), k, sorted_)

        return run

    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    i32, i64 = torch.int32, torch.int64
    return [
        # crop sizes from 1 (BLOCK_J = 2) to > 128 (BLOCK_J = 256, Gram tiles 64 x 64), crop
        # counts up to > 32 (BLOCK_C = 64); lengths, rank_by and sorted take turns
        ("holov fp32 N=577 default crops", select(f32, 1, 577, 40, 64, None, "attn")),
        ("holov fp32 N=300 2 crops score lengths unsorted", select(f32, 2, 300, 24, 100, 2, "score", [300, 250], False)),
        ("holov fp16 N=97 40 crops score", select(f16, 1, 97, 64, 40, 40, "score")),
        ("holov fp16 N=300 1 crop lengths", select(f16, 2, 300, 100, 30, 1, "attn", [300, 17])),
        ("holov bf16 N=40 40 crops unsorted", select(bf16, 1, 40, 16, 20, None, "attn", None, False)),
        ("holov bf16 N=160 3 crops score lengths", select(bf16, 2, 160, 48, 12, 3, "score", [160, 100])),
        ("holov fp32 N=1", select(f32, 2, 1, 8, 1, None, "attn")),
        ("crop_budgets fp32 int64 C=5", budgets(f32, i64, 3, 5, 7)),
        ("crop_budgets fp16 int32 C=40", budgets(f16, i32, 2, 40, 30)),
        ("crop_budgets bf16 int64 C=1", budgets(bf16, i64, 1, 1, 1)),
        ("crop_topk fp32 int64 sorted", topk(f32, i64, [[3, 4, 0, 5], [1, 1, 6, 2]], 5, True)),
        ("crop_topk fp16 int32 unsorted C=20", topk(f16, i32, [[2] * 20, [1] * 10 + [3] * 10], 16, False)),
        ("crop_topk bf16 int32 sorted C=40", topk(bf16, i32, [[1] * 40], 32, True)),
        ("crop_topk fp32 int32 C=1 k=1", topk(f32, i32, [[4]], 1, False)),
    ]


def cases() -> list[tuple[str, Callable[[Any], Any]]]:
    """``(label, run(generator))`` of every input case, all wrappers of the package."""
    return _scope_cases() + _coverage_cases() + _attention_cases() + _holov_cases()


def _record_main() -> dict:
    """The record subprocess: every case under the interpreter, with the GPU's choices."""
    import torch

    kernels = package_kernels()
    bad = [key for key, obj in kernels.items() if type(obj).__name__ != "InterpretedFunction"]
    if bad:
        raise RuntimeError(f"TRITON_INTERPRET was not in effect when these kernels were decorated: {bad}")
    modules = sorted({importlib.import_module(f"{PACKAGE}.{key.split(':')[0]}") for key in kernels}, key=lambda m: m.__name__)
    launches: list[Launch] = []
    current = [""]
    timings = {}
    with _recording(kernels, launches, current), _gpu_decisions(modules):
        for label, run in cases():
            current[0] = label
            start = time.perf_counter()
            run(torch.Generator().manual_seed(0))
            timings[label] = time.perf_counter() - start
    return {
        "kernels": sorted(kernels),
        "launches": [vars(launch) for launch in launches],
        "case_seconds": timings,
    }


# ----------------------------------------------------------------------------- compiling


def api_problem() -> str | None:
    """Why this triton cannot run the compile check (None when it can)."""
    try:
        import triton
        from triton import knobs
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime import jit
    except Exception as exc:  # noqa: BLE001 - any import problem means "no API"
        return f"triton's compiler API is not importable ({type(exc).__name__}: {exc})"
    version = getattr(triton, "__version__", "?")
    missing = []
    if not hasattr(jit, "create_function_from_signature"):
        missing.append("triton.runtime.jit.create_function_from_signature")
    if not hasattr(jit.JITFunction, "_pack_args"):
        missing.append("JITFunction._pack_args")
    if not hasattr(getattr(knobs, "nvidia", None), "dump_ptxas_log"):
        missing.append("knobs.nvidia.dump_ptxas_log")
    if missing:
        return f"triton {version} lacks {', '.join(missing)} (the compile check follows triton 3.9's JIT)"
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        ptxas = get_ptxas(90).path
    except Exception as exc:  # noqa: BLE001
        return f"triton {version}: no ptxas for sm_90 ({type(exc).__name__}: {exc})"
    if not (os.path.isfile(ptxas) and os.access(ptxas, os.X_OK)):
        return f"triton {version}: ptxas not found at {ptxas}"
    return None


_PTXAS_PATTERNS = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def _parse_ptxas(log: str) -> dict[str, int]:
    found = {}
    for name, pattern in _PTXAS_PATTERNS.items():
        match = pattern.search(log)
        if match is None:
            raise RuntimeError(f"no '{name}' in the ptxas -v log:\n{log}")
        found[name] = int(match.group(1))
    return found


def _specialize(fn: Any, launch: dict, backend: Any) -> tuple[str, dict, dict, dict, Any]:
    """The launcher's view of ``launch``: ``(key, signature, constexprs, attrs, options)``."""
    from triton import knobs
    from triton.runtime.jit import create_function_from_signature

    args = [_decode(a) for a in launch["args"]]
    kwargs = {k: _decode(v) for k, v in launch["kwargs"].items()}
    # the option defaults JITFunction.run adds before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    if hasattr(knobs.compilation, "fpsan_homomorphic_casts"):  # added after triton 3.6
        kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    key = repr((tuple(specialization), sorted(options.items())))
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return key, signature, constexprs, attrs, options


def _describe_spec(fn: Any, signature: dict, constexprs: dict, attrs: dict, options: Any) -> str:
    """Short text of a specialization: pointer dtypes, int kinds, constexprs, warps and stages."""
    parts = []
    names = fn.arg_names
    for i, name in enumerate(names):
        ty = signature[name]
        if ty == "constexpr":
            value = constexprs.get((i,))
            parts.append(f"{name}={value}")
        elif ty.startswith("*"):
            parts.append(f"{name}:{ty[1:]}")
        else:
            div = any(a == ["tt.divisibility", 16] for a in attrs.get((i,), []))
            parts.append(f"{name}:{ty}{'/16' if div else ''}")
    parts.append(f"warps={options.num_warps}")
    parts.append(f"stages={options.num_stages}")
    return " ".join(parts)


def _compile_one(task: tuple[str, dict, str]) -> dict:
    """Compile one specialization for one target; never raises (the error is the result)."""
    import warnings

    from triton import compile as triton_compile
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    kernel, launch, target_name = task
    arch, _ = TARGETS[target_name]
    module_name, name = kernel.split(":")
    fn = getattr(importlib.import_module(f"{PACKAGE}.{module_name}"), name)
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    result: dict[str, Any] = {"kernel": kernel, "target": target_name}
    print(f"compiling {kernel} for {target_name}: {launch['kwargs']}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        _, signature, constexprs, attrs, options = _specialize(fn, launch, backend)
        result["spec"] = _describe_spec(fn, signature, constexprs, attrs, options)
        result["num_warps"] = options.num_warps
        knobs.nvidia.dump_ptxas_log = True
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            compiled = triton_compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
        result.update(_parse_ptxas(log.getvalue()))
        result["shared"] = int(compiled.metadata.shared)
        result["ok"] = True
    except Exception as exc:  # noqa: BLE001 - a compile error is the result we report
        text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        result["ok"] = False
        result["error"] = text[-6000:]
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _compile_main(payload: dict) -> dict:
    """The compile subprocess: dedupe the launches exactly, compile each for every target."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    backend = make_backend(GPUTarget("cuda", 90, 32))
    unique: dict[str, dict] = {}
    cases_of: dict[str, list[str]] = {}
    for launch in payload["launches"]:
        module_name, name = launch["kernel"].split(":")
        fn = getattr(importlib.import_module(f"{PACKAGE}.{module_name}"), name)
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{launch['kernel']} is a {type(fn).__name__}: TRITON_INTERPRET must be unset here")
        key = launch["kernel"] + _specialize(fn, launch, backend)[0]
        unique.setdefault(key, launch)
        cases_of.setdefault(key, []).append(launch["case"])
    tasks = [(launch["kernel"], launch, target) for launch in unique.values() for target in payload["targets"]]
    # big kernels first, so the pool's last tasks are short ones
    tasks.sort(key=lambda t: -len(_dedented_source(_kernel_fn(t[0]).fn)))
    jobs = max(1, min(payload["jobs"], len(tasks)))
    if jobs == 1:
        results = [_compile_one(t) for t in tasks]
    else:
        with ProcessPoolExecutor(jobs, mp_context=get_context("fork")) as pool:
            results = list(pool.map(_compile_one, tasks))
    keys = {id(launch): key for key, launch in unique.items()}
    for (kernel, launch, _), result in zip(tasks, results):
        result["cases"] = sorted(set(cases_of[keys[id(launch)]]))
    return {"results": results}


def _kernel_fn(kernel: str) -> Any:
    module_name, name = kernel.split(":")
    return getattr(importlib.import_module(f"{PACKAGE}.{module_name}"), name)


# ----------------------------------------------------------------------------- driver


@dataclass
class Report:
    """Everything :func:`run_check` found."""

    kernels: list[str]  # every kernel of the package
    launches: int  # launches recorded
    results: list[dict]  # one per (specialization, target)
    unrecorded: list[str]  # kernels no case launched
    record_seconds: float
    compile_seconds: float
    case_seconds: dict[str, float] = field(default_factory=dict)

    def failures(self) -> list[dict]:
        return [r for r in self.results if not r["ok"]]


#: Another Python (e.g. a venv with another triton) to compile with; recording stays in this one,
#: whose interpreter runs the wrappers. How triton 3.6 (the GPU machines' version) was checked.
COMPILE_PYTHON_ENV = "VTPRUNE_AOT_COMPILE_PYTHON"


def _subprocess(mode: str, payload: dict | None, interpret: bool, timeout: float) -> dict:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    # the child imports vtprune the way this process did (a checkout on sys.path, or the install)
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    python = os.environ.get(COMPILE_PYTHON_ENV) if mode == "compile" else None
    if python:  # its own packages (triton above all) must not be shadowed by this Python's
        paths = [p for p in paths if not p.endswith(("site-packages", "dist-packages"))]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    with tempfile.TemporaryDirectory(prefix="vtprune-aot-") as cache:
        # a fresh cache: every specialization is really compiled, so ptxas reports on it
        env["TRITON_CACHE_DIR"] = cache
        # its own process group, so a timeout also ends the compile pool's workers
        proc = subprocess.Popen(
            [python or sys.executable, str(_HERE), mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(json.dumps(payload or {}), timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            raise RuntimeError(f"the {mode} subprocess ran past {timeout} s; its last words:\n{stderr[-4000:]}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"the {mode} subprocess failed (exit {proc.returncode}):\n{stderr[-8000:]}")
    return json.loads(stdout)


def record_launches(timeout: float = 600) -> dict:
    """Run the record subprocess: ``{"kernels", "launches", "case_seconds"}``."""
    return _subprocess("record", None, interpret=True, timeout=timeout)


def compile_launches(launches: list[dict], targets: list[str] | None = None, jobs: int | None = None,
                     timeout: float = 600) -> list[dict]:
    """Compile ``launches`` for ``targets`` (default all of :data:`TARGETS`) in a subprocess."""
    payload = {
        "launches": launches,
        "targets": list(targets or TARGETS),
        "jobs": jobs or min(2, os.cpu_count() or 1),
    }
    return _subprocess("compile", payload, interpret=False, timeout=timeout)["results"]


def run_check(targets: list[str] | None = None, jobs: int | None = None) -> Report:
    """Record every launch, compile every distinct specialization, and report."""
    start = time.perf_counter()
    recorded = record_launches()
    mid = time.perf_counter()
    results = compile_launches(recorded["launches"], targets, jobs)
    end = time.perf_counter()
    seen = {launch["kernel"] for launch in recorded["launches"]}
    return Report(
        kernels=recorded["kernels"],
        launches=len(recorded["launches"]),
        results=results,
        unrecorded=[k for k in recorded["kernels"] if k not in seen],
        record_seconds=mid - start,
        compile_seconds=end - mid,
        case_seconds=recorded["case_seconds"],
    )


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ("record", "compile"):
        print("usage: triton_aot.py record|compile  (JSON on stdin and stdout; see run_check)", file=sys.stderr)
        return 2
    import warnings

    # triton 3.9 warns once per process that its fp-fusion default will change; the launches
    # compiled here take the default, as the wrappers' launches do
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION")
    payload = json.loads(sys.stdin.read() or "{}")
    result_stream = sys.stdout
    sys.stdout = sys.stderr  # stdout carries the JSON result only
    out = _record_main() if argv[0] == "record" else _compile_main(payload)
    json.dump(out, result_stream)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
