"""Build script for vtprune.

Project metadata lives in pyproject.toml. This file adds what cannot be static there: the package
layout (``vtprune`` is ``python/vtprune``, ``vtprune.triton_kernels`` is ``triton_kernels``) and
the two optional extensions, which CMake builds (one build tree each, same CMakeLists.txt):

* ``vtprune._cpu`` from ``csrc/cpu/``: the C++ CPU engine of the torch backend's SCOPE loop. Needs
  only a C++17 compiler and CMake; without it the torch backend uses its NumPy engine.
* ``vtprune._C`` from ``csrc/``: the CUDA kernels. Needs nvcc.

Environment:

* ``VTPRUNE_BUILD_CPU``: unset = build ``vtprune._cpu`` if a C++ compiler and cmake are found (a
  failed build is then reported and skipped, not fatal); ``0`` = never build it; ``1`` = build it,
  and fail if that is not possible.
* ``VTPRUNE_BUILD_CUDA``: unset = build ``vtprune._C`` if nvcc is found, otherwise skip it with a
  notice; ``0`` = never build it; ``1`` = build it, and fail if nvcc is missing.
* ``VTPRUNE_CUDA_ARCHS``: ``CMAKE_CUDA_ARCHITECTURES`` (default ``80;90``; ``,`` or spaces may
  separate entries too).
* ``CUDACXX`` / ``CUDA_HOME`` / ``CUDA_PATH``: where to look for nvcc besides ``PATH``.
* ``CXX``: the C++ compiler (CMake honours it too); otherwise ``c++``, ``g++`` or ``clang++`` on PATH.
* ``CMAKE_BUILD_PARALLEL_LEVEL``: build jobs (default: the CPUs this process may use).

The build needs no torch: the extensions take raw pointers, so torch is not a build requirement.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

ROOT = Path(__file__).resolve().parent
MIN_CMAKE = (3, 18)  # FindPython Development.Module, CUDA_RUNTIME_LIBRARY, CMAKE_CUDA_ARCHITECTURES
DEFAULT_ARCHS = "80;90"


def _log(msg: str) -> None:
    # stderr, because pip shows a failing build's stderr, and with -v everything.
    print(f"vtprune setup: {msg}", file=sys.stderr, flush=True)


def _build_mode(var: str) -> str:
    """'auto', 'on' or 'off' from the environment variable ``var`` (VTPRUNE_BUILD_CUDA/CPU)."""
    raw = os.environ.get(var, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("1", "true", "yes", "on"):
        return "on"
    if raw in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"vtprune setup: {var} must be 0 or 1 (or unset for auto-detection), got {os.environ[var]!r}")


def _find_cxx() -> str | None:
    """The C++ compiler CMake will pick: $CXX (a path or a name on PATH), else c++, g++, clang++."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        first = cxx.split()[0]
        found = shutil.which(first)
        return os.path.realpath(found) if found else None
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return os.path.realpath(found)
    return None


def _find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin (in that order).

    $CUDACXX comes first because it is the explicit choice (and CMake itself honours it).
    """
    candidates: list[str | None] = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for cand in candidates:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return os.path.realpath(cand)
    return None


def _cmake_version(cmake: str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"version\s+(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _find_cmake() -> str | None:
    """A cmake >= MIN_CMAKE: from PATH, else from the `cmake` PyPI package if it is installed."""
    candidates = [shutil.which("cmake")]
    try:
        import cmake as _cmake_pkg  # type: ignore[import-not-found]

        candidates.append(os.path.join(_cmake_pkg.CMAKE_BIN_DIR, "cmake"))
    except Exception:  # noqa: BLE001 - any failure just means "not available this way"
        pass
    for cand in candidates:
        if cand and (_cmake_version(cand) or (0,)) >= MIN_CMAKE:
            return cand
    return None


def _cuda_archs() -> str:
    raw = os.environ.get("VTPRUNE_CUDA_ARCHS", "").strip() or DEFAULT_ARCHS
    archs = [a for a in re.split(r"[;,\s]+", raw) if a]
    if not archs:
        raise SystemExit(f"vtprune setup: VTPRUNE_CUDA_ARCHS is empty or malformed: {raw!r}")
    return ";".join(archs)


def _parallel_jobs(requested: int | None) -> int:
    if requested:
        return int(requested)
    if os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "").isdigit():
        return int(os.environ["CMAKE_BUILD_PARALLEL_LEVEL"])
    try:
        return max(1, len(os.sched_getaffinity(0)))  # respects container CPU limits
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles; setuptools only names and places the result.

    ``nvcc`` is set for the CUDA module (``_C``) and None for the CPU one (``_cpu``). An
    ``optional`` extension whose build fails is reported and skipped (setuptools' own
    mechanism), and the install goes on without it.
    """

    def __init__(self, name: str, source_dir: Path, nvcc: str | None = None, optional: bool = False) -> None:
        super().__init__(name, sources=[], optional=optional)
        self.source_dir = str(source_dir)
        self.nvcc = nvcc

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[-1]


class CMakeBuild(build_ext):
    """build_ext that configures and builds CMakeLists.txt for each CMakeExtension."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return

        cmake = _find_cmake()
        if cmake is None:
            off = "VTPRUNE_BUILD_CUDA=0" if ext.nvcc else "VTPRUNE_BUILD_CPU=0"
            msg = (
                f"building {ext.name} needs cmake >= {'.'.join(map(str, MIN_CMAKE))} (install it "
                f"with `pip install cmake`), or set {off} to install without it."
            )
            if ext.optional:
                raise CompileError(msg)
            raise SystemExit(f"vtprune setup: {msg}")
        try:
            self._cmake_build(ext, cmake)
        except subprocess.CalledProcessError as exc:
            if not ext.optional:
                raise
            # setuptools reports the failure of an optional extension and goes on without it
            raise CompileError(
                f"CMake failed ({exc}); installing without {ext.name} (the torch backend then uses "
                "its NumPy engine; set VTPRUNE_BUILD_CPU=1 to make this an error)"
            ) from exc

    def _cmake_build(self, ext: CMakeExtension, cmake: str) -> None:

        # get_ext_fullpath honours --inplace/editable mode, which puts the module next to the
        # sources in python/vtprune/ so that `import vtprune._C` works from an editable install.
        ext_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        ext_dir = ext_path.parent
        ext_dir.mkdir(parents=True, exist_ok=True)
        suffix = ext_path.name[len(ext.module) :]  # e.g. ".cpython-312-x86_64-linux-gnu.so"

        import pybind11  # build requirement (pyproject.toml), only needed here

        configure_args = [
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={ext_dir}",
            f"-DVTPRUNE_EXT_SUFFIX={suffix}",
        ]
        if ext.nvcc:
            archs = _cuda_archs()
            configure_args += [
                "-DVTPRUNE_BUILD_CPU_EXT=OFF",
                "-DVTPRUNE_BUILD_CUDA_EXT=ON",
                f"-DCMAKE_CUDA_COMPILER={ext.nvcc}",
                f"-DCMAKE_CUDA_ARCHITECTURES={archs}",
            ]
            what = f"with {ext.nvcc} for CUDA archs {archs}"
        else:
            configure_args += ["-DVTPRUNE_BUILD_CPU_EXT=ON", "-DVTPRUNE_BUILD_CUDA_EXT=OFF"]
            what = f"with {_find_cxx() or 'the default C++ compiler'}"

        # one build tree per extension: the CPU module never needs the CUDA toolchain
        build_dir = Path(self.build_temp).resolve() / f"cmake{ext.module}"
        # CMake refuses (or silently misbehaves) when the compilers or generator of an existing
        # build tree change; start from scratch then instead of failing.
        stamp = {
            "cmake": cmake,
            "nvcc": ext.nvcc,
            "cxx": os.environ.get("CXX", ""),
            "generator": os.environ.get("CMAKE_GENERATOR", ""),
        }
        stamp_file = build_dir / "vtprune-build-stamp.json"
        if build_dir.exists():
            try:
                old = json.loads(stamp_file.read_text())
            except (OSError, ValueError):
                old = None
            if old != stamp:
                shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)
        stamp_file.write_text(json.dumps(stamp))

        jobs = _parallel_jobs(self.parallel)
        _log(f"building {ext.name} {what} ({jobs} jobs)")
        start = time.perf_counter()
        subprocess.run([cmake, "-S", ext.source_dir, "-B", str(build_dir), *configure_args], check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--config", "Debug" if self.debug else "Release",
             "-j", str(jobs)],
            check=True,
        )
        if not ext_path.exists():
            raise SystemExit(f"vtprune setup: CMake finished but {ext_path} was not produced")
        _log(f"built {ext_path} in {time.perf_counter() - start:.1f} s")


def _extensions() -> tuple[list[Extension], list[str]]:
    """(ext_modules, setup_requires) for this build, decided from the environment."""
    cuda = _cuda_extension()
    exts: list[Extension] = [cuda] if cuda is not None else []
    cpu = _cpu_extension(cmake_coming=bool(exts))
    if cpu is not None:
        exts.insert(0, cpu)  # the quick one first
    # Only ask pip for a cmake wheel when the system has no usable cmake; as a setup_requires the
    # setuptools PEP 517 backend turns it into a dynamic build requirement.
    needs_cmake = cuda is not None or (cpu is not None and not cpu.optional)
    setup_requires = ["cmake>=3.24"] if needs_cmake and not _find_cmake() else []
    return exts, setup_requires


def _cpu_extension(cmake_coming: bool) -> CMakeExtension | None:
    """vtprune._cpu, or None (with a notice) when it is not wanted or cannot be built here."""
    mode = _build_mode("VTPRUNE_BUILD_CPU")
    if mode == "off":
        _log("VTPRUNE_BUILD_CPU=0: installing without the C++ CPU engine vtprune._cpu")
        _warn_stale_inplace_module("_cpu")
        return None
    cxx = _find_cxx()
    cmake = _find_cmake()
    if mode == "on":
        if cxx is None:
            raise SystemExit(
                "vtprune setup: VTPRUNE_BUILD_CPU=1 but no C++ compiler was found ($CXX, c++, g++, "
                "clang++). Install one, or unset VTPRUNE_BUILD_CPU to install without vtprune._cpu."
            )
        return CMakeExtension("vtprune._cpu", ROOT)  # cmake is fetched if missing
    missing = [what for what, found in (("C++ compiler", cxx), ("cmake", cmake or cmake_coming)) if not found]
    if missing:
        _log(
            f"no {' and no '.join(missing)} found: installing without the C++ CPU engine "
            "vtprune._cpu (the torch backend uses its NumPy engine; set VTPRUNE_BUILD_CPU=1 to make "
            "this an error)"
        )
        _warn_stale_inplace_module("_cpu")
        return None
    return CMakeExtension("vtprune._cpu", ROOT, optional=True)


def _cuda_extension() -> CMakeExtension | None:
    """vtprune._C, or None (with a notice) when it is not wanted or nvcc is missing."""
    mode = _build_mode("VTPRUNE_BUILD_CUDA")
    if mode == "off":
        _log("VTPRUNE_BUILD_CUDA=0: installing without the CUDA extension vtprune._C")
        _warn_stale_inplace_module()
        return None
    nvcc = _find_nvcc()
    if nvcc is None:
        where = "$CUDACXX, PATH, $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin"
        if mode == "on":
            raise SystemExit(
                f"vtprune setup: VTPRUNE_BUILD_CUDA=1 but nvcc was not found (looked in {where}). "
                "Install the CUDA toolkit, point CUDACXX or CUDA_HOME at it, or unset "
                "VTPRUNE_BUILD_CUDA to install without the CUDA extension."
            )
        _log(
            f"nvcc not found (looked in {where}): installing without the CUDA extension vtprune._C "
            "(Triton and torch backends still work; set VTPRUNE_BUILD_CUDA=1 to make this an error)"
        )
        _warn_stale_inplace_module()
        return None
    return CMakeExtension("vtprune._C", ROOT, nvcc)


def _warn_stale_inplace_module(module: str = "_C") -> None:
    stale = sorted((ROOT / "python" / "vtprune").glob(f"{module}.*"))
    if stale:
        _log(
            f"note: {', '.join(str(p) for p in stale)} from an earlier build is still there and "
            "an editable install will keep importing it; delete it if that is not wanted"
        )


def _packages() -> list[str]:
    # find_packages picks up subpackages added later under python/vtprune (e.g. integrations);
    # "vtprune" is listed explicitly so a half-written tree without __init__.py still installs.
    found = find_packages(where="python", include=["vtprune", "vtprune.*"])
    return sorted({"vtprune", "vtprune.triton_kernels", *found})


EXT_MODULES, SETUP_REQUIRES = _extensions()

setup(
    packages=_packages(),
    package_dir={"vtprune": "python/vtprune", "vtprune.triton_kernels": "triton_kernels"},
    ext_modules=EXT_MODULES,
    cmdclass={"build_ext": CMakeBuild},
    setup_requires=SETUP_REQUIRES,
    zip_safe=False,
)
