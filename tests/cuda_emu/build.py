"""Build the CUDA emulator module: csrc/*.cu + csrc/module.cpp + the emulator, compiled by g++.

The result is a Python extension with exactly ``vtprune._C``'s interface (module.cpp is compiled
unchanged; the kernels are csrc/*.cu after :mod:`rewrite`), plus the emulator's control functions
and self-test kernels as C symbols for ctypes. It is cached under ``build/cuda_emu/`` in the
repository (git-ignored; ``VTPRUNE_EMU_BUILD_DIR`` overrides), in a directory named by a hash of
every input (sources, headers, this script, compiler version, flags, Python ABI), so an unchanged
tree reuses it and any edit rebuilds.

Floating point: ``-ffp-contract=off``. nvcc contracts ``a * b + c`` into an FMA by default; g++
would contract other expressions (or none, without FMA hardware), so neither setting reproduces
the GPU's rounding of plain expressions. Off makes the emulator's arithmetic follow the source
literally, and the kernels already use ``fmaf``/``__fmul_rn``/``__fadd_rn`` wherever the order
of roundings is part of their contract. ``fmaf`` itself is exact (hardware FMA with ``-mfma``
when the CPU has it, glibc's correctly rounded fmaf otherwise).

Kernel files are compiled with ``__CUDA_ARCH__=900`` (an sm_90 device pass: csrc/scope_cluster.cu's
cluster code exists only there). nvcc's host pass sees no ``__CUDA_ARCH__``; the launchers do not
test it, so defining it for the whole file changes nothing else.

Usage: ``python tests/cuda_emu/build.py [--asan] [--force]`` prints the module's path.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# VTPRUNE_EMU_CSRC: another copy of csrc/ (e.g. with a planted bug, to check that the tests catch it).
CSRC = Path(os.environ.get("VTPRUNE_EMU_CSRC") or ROOT / "csrc").resolve()
INCLUDE = HERE / "include"

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(HERE.parent))
    from cuda_emu.rewrite import rewrite_file  # noqa: E402
else:
    from .rewrite import rewrite_file

__all__ = ["BuildError", "ToolMissing", "build", "find_compiler", "MODULE_NAME"]

#: module.cpp's PYBIND11_MODULE name; the file is named after it so that PyInit__C is found.
MODULE_NAME = "_C"


class BuildError(RuntimeError):
    """The emulator module failed to compile or link (the message has the compiler output)."""


class ToolMissing(RuntimeError):
    """No C++ compiler or no pybind11: the emulator cannot be built here."""


def find_compiler() -> str:
    """$CXX, else g++, else c++."""
    cxx = os.environ.get("CXX", "").strip()
    candidates = [cxx.split()[0]] if cxx else ["g++", "c++"]
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise ToolMissing(f"no C++ compiler found (tried {', '.join(candidates)}; set CXX)")


def _pybind11_include() -> str:
    try:
        import pybind11
    except ImportError as exc:
        raise ToolMissing(f"pybind11 is not installed ({exc}); pip install 'pybind11>=2.12'") from exc
    return pybind11.get_include()


def _cpu_has_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " fma " in f" {line.split(':', 1)[1].strip()} "
    except OSError:
        pass
    return False


def _kernel_sources() -> list[Path]:
    return sorted(CSRC.glob("*.cu")) + [HERE / "selftest.cu"]


def _inputs() -> list[Path]:
    files = list(CSRC.glob("*.cu")) + list(CSRC.glob("*.cuh")) + list(CSRC.glob("*.h")) + [CSRC / "module.cpp"]
    files += list(INCLUDE.glob("*.h")) + [HERE / "emu.cpp", HERE / "selftest.cu", HERE / "rewrite.py", Path(__file__)]
    return sorted(set(files))


def _flags(asan: bool) -> list[str]:
    flags = ["-std=c++17", "-fPIC", "-fvisibility=hidden", "-pthread", "-ffp-contract=off", "-fno-strict-aliasing"]
    flags += ["-O1", "-g", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"] if asan else ["-O2"]
    if _cpu_has_fma() and os.uname().machine == "x86_64":
        flags.append("-mfma")
    return flags


def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else cxx


def _cache_root() -> Path:
    env = os.environ.get("VTPRUNE_EMU_BUILD_DIR", "").strip()
    return Path(env) if env else ROOT / "build" / "cuda_emu"


def _key(cxx: str, flags: list[str], pybind_inc: str) -> str:
    h = hashlib.sha256()
    for path in _inputs():
        h.update(str(path).encode())
        h.update(path.read_bytes())
    for part in (_compiler_id(cxx), " ".join(flags), sys.version, sysconfig.get_config_var("EXT_SUFFIX") or "", pybind_inc):
        h.update(part.encode())
    return h.hexdigest()[:16]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BuildError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")


@contextlib.contextmanager
def _locked(root: Path):
    """One build at a time per cache (pytest-xdist workers all ask at once): the others wait and
    then find the module built."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _prune(root: Path, variant: str, keep: Path, count: int = 3) -> None:
    """Drop all but the ``count`` newest builds of ``variant`` (each source edit makes one)."""
    old = sorted((d for d in root.glob(f"{variant}-*") if d.is_dir() and d != keep and "-tmp-" not in d.name),
                 key=lambda d: d.stat().st_mtime, reverse=True)
    for d in old[count - 1 :]:
        shutil.rmtree(d, ignore_errors=True)


def build(asan: bool = False, force: bool = False, jobs: int | None = None, verbose: bool = False) -> Path:
    """Path of the emulator module, built if no up-to-date one is cached."""
    cxx = find_compiler()
    pybind_inc = _pybind11_include()
    flags = _flags(asan)
    variant = "asan" if asan else "release"
    root = _cache_root()
    out_dir = root / f"{variant}-{_key(cxx, flags, pybind_inc)}"
    ext = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = out_dir / f"{MODULE_NAME}{ext}"
    if target.exists() and not force:
        return target
    with _locked(root):
        if target.exists() and not force:  # built by another process while we waited
            return target
        _compile(cxx, flags, pybind_inc, variant, out_dir, target, jobs, verbose)
        _prune(root, variant, keep=out_dir)
    return target


def _compile(cxx: str, flags: list[str], pybind_inc: str, variant: str, out_dir: Path, target: Path,
             jobs: int | None, verbose: bool) -> None:
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f"{variant}-tmp-", dir=out_dir.parent))
    try:
        common = flags + [f"-I{INCLUDE}", f"-I{CSRC}"]
        kernel_flags = common + ["-D__CUDACC__", "-D__CUDA_ARCH__=900", "-include", "emu_device.h", "-Wno-unknown-pragmas"]
        py_inc = sysconfig.get_paths()["include"]
        host_flags = common + [f"-I{py_inc}", f"-I{pybind_inc}", '-DVTPRUNE_CUDA_ARCHS="cuda_emu"']
        jobs_list: list[list[str]] = []
        objects: list[Path] = []
        for src in _kernel_sources():
            cpp = work / f"{src.stem}.cu.cpp"
            rewrite_file(src, cpp, display=str(src))
            obj = work / f"{src.stem}.cu.o"
            jobs_list.append([cxx, *kernel_flags, "-c", str(cpp), "-o", str(obj)])
            objects.append(obj)
        for src, extra in ((CSRC / "module.cpp", host_flags), (HERE / "emu.cpp", common)):
            obj = work / f"{src.stem}.o"
            jobs_list.append([cxx, *extra, "-c", str(src), "-o", str(obj)])
            objects.append(obj)
        # The slowest (pybind11's module.cpp) first, so two jobs finish together.
        jobs_list.sort(key=lambda cmd: "module.cpp" not in " ".join(cmd))
        workers = jobs or max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(_run, cmd, work) for cmd in jobs_list]:
                fut.result()
        tmp_target = work / target.name
        _run([cxx, *flags, "-shared", "-o", str(tmp_target), *map(str, objects)], work)
        out_dir.mkdir(exist_ok=True)
        os.replace(tmp_target, target)  # atomic: a reader sees no module or a whole one
        for cpp in work.glob("*.cpp"):  # kept for reading compiler messages and gdb sessions
            shutil.copy(cpp, out_dir / cpp.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if verbose:
        print(f"cuda_emu: built {target} in {time.monotonic() - start:.1f} s", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--asan", action="store_true", help="AddressSanitizer + UBSan build (run with LD_PRELOAD=$(g++ -print-file-name=libasan.so))")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args(argv)
    print(build(asan=args.asan, force=args.force, jobs=args.jobs, verbose=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
