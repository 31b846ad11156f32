"""Shared test setup for vtprune.

* ``TRITON_INTERPRET=1`` on machines without a GPU, set here before any test module can
  import vtprune's Triton kernels (``@triton.jit`` reads it at import time), so the Triton
  kernels run in the interpreter on CPU tensors in CI and for real on a GPU machine.
* :func:`backends_to_test` lists the backends that can run an op on this machine.
* Independent float64 NumPy implementations of the SPEC formulas (cosine similarity,
  facility location, SCOPE gains) used by several test files to check the library without
  going through it.
* A Hypothesis profile that keeps the property tests fast on 2 cores.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

try:  # run from a checkout without `pip install -e .` (PYTHONPATH=python also works)
    import vtprune  # noqa: F401
except ImportError:  # pragma: no cover - depends on how the suite is launched
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))
    import vtprune  # noqa: F401

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

from vtprune import _dispatch

settings.register_profile(
    "vtprune",
    deadline=None,
    max_examples=25,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "vtprune-long",
    parent=settings.get_profile("vtprune"),
    max_examples=300,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "vtprune"))

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
#: A device different from DEVICE, for mixed-device errors ("meta" on CPU-only machines).
OTHER_DEVICE = torch.device("cpu" if DEVICE.type == "cuda" else "meta")

#: Import problems of backends that say they are usable; reported by test_backend_modules_import.
BACKEND_IMPORT_ERRORS: dict[str, str] = {}


def triton_kernel_module(name: str):
    """``vtprune.triton_kernels.<name>``, its kernels decorated for this machine.

    Skips the calling test module when triton is missing. If the module was imported before
    ``TRITON_INTERPRET`` was set (it is read when ``@triton.jit`` decorates), it is reloaded; the
    backend glue holds the module object, so it sees the reloaded kernels too.
    """
    pytest.importorskip("triton", reason="triton is not installed (pip install 'vtprune[triton]')")
    module = importlib.import_module(f"vtprune.triton_kernels.{name}")
    if not torch.cuda.is_available() and not module._is_interpreted():
        module = importlib.reload(module)
    return module


def kernel_devices(module) -> list:
    """``parametrize`` values for a Triton kernel test: CPU under the interpreter, and CUDA."""
    return [
        pytest.param(
            "cpu",
            id="cpu-interpreter",
            marks=pytest.mark.skipif(
                not module._is_interpreted(), reason="CPU tensors run only under the Triton interpreter (a GPU is present)"
            ),
        ),
        pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
    ]


def _backend_runs_here(name: str, device: torch.device) -> bool:
    try:
        st = _dispatch.status(name)
    except Exception as exc:  # e.g. vtprune._cuda not importable: the backend cannot run
        BACKEND_IMPORT_ERRORS.setdefault(name, f"status({name!r}) raised {type(exc).__name__}: {exc}")
        return False
    if not st.usable:
        return False
    return _dispatch._device_ok(name, device) is None


def backends_to_test(op: str, device: torch.device | None = None) -> list[str]:
    """The backends usable here (for tensors on ``device``) that implement ``op``.

    On a CPU-only machine: reference, torch and, under the Triton interpreter, triton for
    the ops it implements; cuda only with a GPU. A usable backend whose module fails to
    import is left out here and reported by ``test_backend_modules_import``.
    """
    device = DEVICE if device is None else torch.device(device)
    names = []
    for name in _dispatch.BACKENDS:
        if not _backend_runs_here(name, device):
            continue
        try:
            if _dispatch.implements(name, op):
                names.append(name)
        except Exception as exc:  # module missing or broken
            BACKEND_IMPORT_ERRORS.setdefault(name, f"{type(exc).__name__}: {exc}")
    return names


def backend_params(op: str) -> list:
    """``pytest.mark.parametrize`` values: one ``pytest.param`` per backend, with an id."""
    return [pytest.param(name, id=name) for name in backends_to_test(op)]


@pytest.fixture
def device() -> torch.device:
    return DEVICE


# ----------------------------------------------------------------------------- float64 NumPy models of SPEC §1


def np_cosine(x) -> np.ndarray:
    """SPEC §1 similarity in float64: <x_u, x_v> / (max(|x_u|, 1e-6) max(|x_v|, 1e-6))."""
    x = np.asarray(x.detach().cpu().double() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    norms = np.maximum(np.linalg.norm(x, axis=-1), 1e-6)
    xn = x / norms[:, None]
    return xn @ xn.T


def np_facility_location(sim: np.ndarray, picks) -> float:
    """sum_u max(0, max_{s in S} sim(u, s)), straight from the definition."""
    picks = list(picks)
    if not picks:
        return 0.0
    return float(np.maximum(sim[:, picks].max(axis=1), 0.0).sum())


def np_weights(sal, alpha: float) -> np.ndarray:
    s = np.maximum(np.asarray(sal.detach().cpu().double() if isinstance(sal, torch.Tensor) else sal, dtype=np.float64), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where((s == 0) & (alpha == 0), 1.0, s**alpha)


def np_scope_scores(sim: np.ndarray, w: np.ndarray, picks, combine: str) -> np.ndarray:
    """SCOPE scores of every token given the earlier picks, recomputed from scratch."""
    n = sim.shape[0]
    cover = np.zeros(n)
    for t in picks:
        cover = np.maximum(cover, sim[:, t])
    gain = np.maximum(sim - cover[:, None], 0.0).sum(axis=0)
    return gain * w if combine == "mul" else gain + w


def check_greedy_picks(tokens, saliency, picks, alpha: float, combine: str, rel: float = 1e-5) -> None:
    """Assert each pick (in pick order) maximizes the SCOPE score given the earlier picks.

    A pick is accepted when its float64 score is within ``rel`` (relative) of the best
    unselected score, plus a tiny absolute slack for scores that are mathematically 0.
    """
    sim = np_cosine(tokens)
    w = np_weights(saliency, alpha)
    n = sim.shape[0]
    picks = [int(p) for p in picks]
    assert len(set(picks)) == len(picks), f"repeated picks {picks}"
    assert all(0 <= p < n for p in picks), f"picks out of range {picks} (N = {n})"
    for i, t in enumerate(picks):
        score = np_scope_scores(sim, w, picks[:i], combine)
        score[picks[:i]] = -np.inf
        arg = int(score.argmax())
        best = float(score[arg])
        # fp32 gains carry an absolute error of up to ~1e-7 per summed term (n terms); a
        # "mul" score scales that by its weight.
        slack = 1e-6 * n * ((w[t] + w[arg]) if combine == "mul" else 2.0)
        tol = rel * abs(best) + slack
        assert score[t] >= best - tol, (
            f"step {i}: picked {t} with score {score[t]!r}, but the best unselected score is {best!r} "
            f"(token {int(score.argmax())}); picks so far {picks[:i]}"
        )


def check_fl_greedy_picks(tokens, picks, rel: float = 1e-5) -> None:
    """Assert each pick maximizes the facility-location gain FL(S + v) - FL(S)."""
    sim = np_cosine(tokens)
    n = sim.shape[0]
    picks = [int(p) for p in picks]
    for i, t in enumerate(picks):
        base = np_facility_location(sim, picks[:i])
        gains = np.array(
            [-np.inf if v in picks[:i] else np_facility_location(sim, picks[:i] + [v]) - base for v in range(n)]
        )
        best = float(gains.max())
        assert gains[t] >= best - (rel * abs(best) + 1e-6 * n), (
            f"step {i}: picked {t} with FL gain {gains[t]!r}, best {best!r} (token {int(gains.argmax())})"
        )


def assert_valid_selection(idx: torch.Tensor, k: int, limits) -> None:
    """``idx [B, k]``: int64, k distinct indices per row, each in [0, limits[b])."""
    assert idx.dtype == torch.int64
    assert idx.dim() == 2 and idx.shape[1] == k, tuple(idx.shape)
    for b, row in enumerate(idx.tolist()):
        lim = limits[b] if not isinstance(limits, int) else limits
        assert len(set(row)) == k, f"row {b} has repeated indices: {row}"
        assert all(0 <= v < lim for v in row), f"row {b} has indices out of [0, {lim}): {row}"


def assert_same_greedy(got, want, tokens, saliency, alpha: float, combine: str, rel: float = 1e-5) -> None:
    """Two SCOPE runs (pick order) on the same image must agree, except after a near-tie.

    Different but valid computations (padded vs alone, packed vs per sequence, two backends)
    may round a mathematically exact tie differently (e.g. two tokens that only cover each
    other have equal gains at alpha = 0). So: equal, or at the first step where they differ
    the two picks' float64 scores are within ``rel`` of each other and both runs are valid
    greedy runs.
    """
    got, want = [int(v) for v in got], [int(v) for v in want]
    assert len(got) == len(want)
    if got == want:
        return
    i = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    sim = np_cosine(tokens)
    w = np_weights(saliency, alpha)
    score = np_scope_scores(sim, w, got[:i], combine)
    a, b = score[got[i]], score[want[i]]
    slack = 1e-6 * sim.shape[0] * ((w[got[i]] + w[want[i]]) if combine == "mul" else 2.0)
    assert abs(a - b) <= rel * max(abs(a), abs(b)) + slack, (
        f"picks differ at step {i} without a tie: {got} vs {want}; scores {a!r} vs {b!r}"
    )
    check_greedy_picks(tokens, saliency, got, alpha, combine, rel)
    check_greedy_picks(tokens, saliency, want, alpha, combine, rel)


def examples_for(backend: str, base: int) -> int:
    """Hypothesis examples for one backend: a fifth for Triton in the (slow) interpreter."""
    if backend == "triton" and _dispatch.triton_interpret():
        return max(4, base // 5)
    return base


def given_per_backend(max_examples: int | None = None, **strategies):
    """``@given(**strategies)`` with a number of examples that depends on the ``backend`` argument.

    The decorated test keeps its pytest parameters (``backend`` and any other parameter not
    drawn by Hypothesis); Hypothesis draws the rest. Triton in the interpreter gets fewer
    examples (see :func:`examples_for`) so the suite stays fast on CPU-only CI.
    """
    import inspect

    from hypothesis import given

    def deco(body):
        names = [p for p in inspect.signature(body).parameters if p not in strategies]

        def test(**params):
            base = max_examples if max_examples is not None else settings().max_examples

            @settings(max_examples=examples_for(params["backend"], base))
            @given(**strategies)
            def run(**drawn):
                body(**params, **drawn)

            run.__qualname__ = f"{body.__qualname__}[{params['backend']}]"
            run()

        test.__name__, test.__qualname__ = body.__name__, body.__qualname__
        test.__doc__, test.__module__ = body.__doc__, body.__module__
        test.__signature__ = inspect.Signature(
            [inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY) for p in names]
        )
        return test

    return deco
