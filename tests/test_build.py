"""The installed package: the optional modules vtprune._C (CUDA) and vtprune._cpu (C++ CPU
engine), and how their absence is reported.

vtprune._cpu may be missing only where no C++ compiler or no cmake was found (or
VTPRUNE_BUILD_CPU=0 in the environment of the test run, matching the install); with both
present a missing _cpu is a packaging bug and fails here.

vtprune._C may legitimately be missing only where it could not be built (no nvcc) or was not
wanted (VTPRUNE_BUILD_CUDA=0 in the environment of the test run, matching the install). On a
machine that has nvcc, a missing _C is a packaging bug and fails here.
"""

from __future__ import annotations

import importlib
import os
import shutil
from importlib import metadata

import pytest
import torch


def _find_nvcc() -> str | None:
    """Same search order as setup.py."""
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def _import_c():
    try:
        return importlib.import_module("vtprune._C"), None
    except ImportError as exc:
        return None, exc


C, C_IMPORT_ERROR = _import_c()
NVCC = _find_nvcc()
CUDA_BUILD_DISABLED = os.environ.get("VTPRUNE_BUILD_CUDA", "").strip().lower() in ("0", "false", "no", "off")


def _find_cxx() -> str | None:
    """Same search as setup.py: $CXX, else c++, g++, clang++ on PATH."""
    cxx = os.environ.get("CXX", "").strip()
    if cxx:
        return shutil.which(cxx.split()[0])
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def _import_cpu():
    try:
        return importlib.import_module("vtprune._cpu"), None
    except ImportError as exc:
        return None, exc


CPU, CPU_IMPORT_ERROR = _import_cpu()
CXX = _find_cxx()
CMAKE = shutil.which("cmake")
CPU_BUILD_DISABLED = os.environ.get("VTPRUNE_BUILD_CPU", "").strip().lower() in ("0", "false", "no", "off")


def _gpu_present() -> bool:
    return torch.cuda.is_available() or (C is not None and C.device_count() > 0)


def require_c():
    """vtprune._C, or a skip (cannot have been built) or a failure (should have been built)."""
    if C is not None:
        return C
    if NVCC is None:
        pytest.skip(f"vtprune._C not built: nvcc not found on this machine ({C_IMPORT_ERROR})")
    if CUDA_BUILD_DISABLED:
        pytest.skip(f"vtprune._C not built: VTPRUNE_BUILD_CUDA=0 ({C_IMPORT_ERROR})")
    pytest.fail(
        f"nvcc is present ({NVCC}) but vtprune._C does not import: {C_IMPORT_ERROR!r}. "
        "Reinstall with `pip install -e .` (add -v to see the CMake build)."
    )


def test_c_module_imports_and_reports_build_info():
    c_module = require_c()
    assert c_module.cuda_runtime_version() >= 12000
    archs = c_module.compiled_archs()
    assert archs and archs != "unknown"
    assert all(a.strip() for a in archs.split(";"))
    assert isinstance(c_module.cuda_driver_version(), int)


def test_device_queries_never_raise():
    c_module = require_c()
    count = c_module.device_count()
    reason = c_module.cuda_status()
    assert isinstance(count, int) and count >= 0
    assert isinstance(reason, str) and reason
    if count == 0:
        assert not reason.startswith("ok"), reason
    else:
        assert reason.startswith("ok"), reason


def test_c_rejects_bad_arguments_without_touching_memory():
    c_module = require_c()
    with pytest.raises(ValueError, match="dtype"):
        c_module.coverage_max_sim(0, 7, 1, 1, 1, 1, 1, 0, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="N must be >= 0"):
        c_module.coverage_max_sim(0, 0, 1, -1, 1, 1, 1, 0, 1, 0, 0, 0)
    with pytest.raises(ValueError, match="out_ptr"):
        c_module.coverage_max_sim(16, 0, 1, 1, 1, 1, 1, 16, 1, 16, 0, 0)
    # Non-null addresses that are not device memory: an error from CUDA, never a crash. Without a
    # GPU this is the driver/device error; with one, the host pointer is refused before launch.
    with pytest.raises(RuntimeError, match="CUDA"):
        c_module.coverage_max_sim(16, 0, 1, 1, 1, 1, 1, 16, 1, 16, 16, 0)


@pytest.mark.skipif(_gpu_present(), reason="checks the GPU-less behaviour; a GPU is present")
def test_status_without_gpu_names_the_reason():
    from vtprune import _cuda

    usable, reason = _cuda.status()
    assert usable is False
    if C is None:
        assert reason.startswith("not built"), reason
    else:
        assert reason.startswith("no GPU: "), reason
        assert C.cuda_status() in reason


@pytest.mark.skipif(_gpu_present(), reason="checks the GPU-less behaviour; a GPU is present")
def test_coverage_max_sim_without_gpu_raises_runtime_error():
    from vtprune import _cuda

    _, reason = _cuda.status()
    tokens = torch.randn(1, 4, 8)
    indices = torch.tensor([[0, 1]])
    lengths = torch.tensor([4])
    with pytest.raises(RuntimeError, match=r"backend='cuda' is not available: ") as info:
        _cuda.coverage_max_sim(tokens, indices, lengths)
    assert reason in str(info.value)


@pytest.mark.skipif(not _gpu_present(), reason="no GPU on this machine")
def test_status_with_gpu_is_usable():
    require_c()
    from vtprune import _cuda

    assert torch.cuda.is_available(), "vtprune._C sees a GPU but torch does not (CPU-only torch?)"
    assert _cuda.status() == (True, "ok")


def test_triton_package_is_installed_and_lazy():
    pkg = importlib.import_module("vtprune.triton_kernels")
    usable, reason = pkg.status()
    assert isinstance(usable, bool) and reason
    assert "coverage_max_sim" in dir(pkg)


def test_distribution_metadata():
    dist = metadata.distribution("vtprune")
    assert dist.version == "0.1.0"
    scripts = {ep.name: ep.value for ep in dist.entry_points if ep.group == "console_scripts"}
    assert scripts.get("vtprune") == "vtprune.cli:main"
    requires = " ".join(dist.requires or [])
    assert "torch>=2.11" in requires.replace(" ", "")


def test_cpu_module_is_built_where_a_compiler_is():
    if CPU is None:
        if CPU_BUILD_DISABLED:
            pytest.skip(f"vtprune._cpu not built: VTPRUNE_BUILD_CPU=0 ({CPU_IMPORT_ERROR})")
        if CXX is None or CMAKE is None:
            pytest.skip(f"vtprune._cpu not built: C++ compiler {CXX}, cmake {CMAKE} ({CPU_IMPORT_ERROR})")
        pytest.fail(
            f"a C++ compiler ({CXX}) and cmake ({CMAKE}) are present but vtprune._cpu does not import: "
            f"{CPU_IMPORT_ERROR!r}. Reinstall with `pip install -e .` (add -v to see the CMake build)."
        )
    assert callable(CPU.scope_greedy_f32) and callable(CPU.scope_greedy_f64)
    from vtprune.torch_backend import scope

    assert scope.cpu_engine_status() == (True, "ok")


def test_cpu_module_runs_on_raw_pointers():
    if CPU is None:
        pytest.skip(f"vtprune._cpu not built ({CPU_IMPORT_ERROR})")
    # three tokens: 0 and 1 identical, 2 orthogonal; weights favour 1 then 2
    s = torch.tensor([[[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])
    w = torch.tensor([[0.5, 1.0, 0.8]], dtype=torch.float64)
    out = torch.full((1, 3), -7, dtype=torch.int64)
    CPU.scope_greedy_f32(s.data_ptr(), w.data_ptr(), 0, 1, 3, 3, True, 1e-6, out.data_ptr())
    assert out.tolist() == [[1, 2, 0]]
    lengths = torch.tensor([2])
    CPU.scope_greedy_f64(s.double().data_ptr(), w.data_ptr(), lengths.data_ptr(), 1, 3, 3, True, 1e-6, out.data_ptr())
    assert out.tolist() == [[1, 0, 0]]  # past the two valid tokens: 0
