"""Shared test setup for vtprune.

* ``TRITON_INTERPRET=1`` on machines without a GPU, set here before any test module can
  import vtprune's Triton kernels (``@triton.jit`` reads it at import time), so the Triton
  kernels run in the interpreter on CPU tensors in CI and for real on a GPU machine.
* :func:`backends_to_test` lists the backends that can run an op on this machine.
* Independent float64 NumPy implementations of the SPEC formulas (cosine similarity,
  facility location, SCOPE gains) and the greedy-validity checks built on them, used by
  several test files to check the library without going through it. They live in
  ``vtprune._verify`` (shared with ``vtprune check``) and are re-exported here.
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


def require_c_entry(entry: str, source: str):
    """vtprune._C with the entry point ``entry`` (bound from ``source``); skips only where _C cannot
    have been built, fails where it was built before ``source`` existed."""
    from test_build import require_c

    c_module = require_c()
    if not hasattr(c_module, entry):
        pytest.fail(
            f"{c_module.__file__} has no {entry}: it was built before {source}. Rebuild with `pip install -e .`."
        )
    return c_module


def random_budget_case(g: torch.Generator, kind: int, batch: int = 3, max_crops: int = 10):
    """Random ``crop_budgets`` inputs ``(weights [B, C], k, capacity [B, C])`` of weight family
    ``kind`` (0 to 6, see the branches); every row can hold ``k`` (crop 0 always has room)."""
    crops = int(torch.randint(1, max_crops, (1,), generator=g))
    cap = torch.randint(0, 6, (batch, crops), generator=g)
    cap[:, 0] += 1
    k = int(torch.randint(1, int(cap.sum(1).min()) + 1, (1,), generator=g))
    w = torch.rand(batch, crops, generator=g)
    if kind == 0:  # normalized, like HoloV's
        w = w / (w.sum(1, keepdim=True) + 1e-6)
    elif kind == 1:  # small: a leftover larger than the crop count, cycling
        w = w * 0.05
    elif kind == 2:  # NaN weights: 0, ordered last
        w = w / (w.sum(1, keepdim=True) + 1e-6)
        w[torch.rand(batch, crops, generator=g) < 0.4] = float("nan")
    elif kind == 3:  # all zero
        w = torch.zeros(batch, crops)
    elif kind == 4:  # exact ties and negative weights
        w = torch.randint(-1, 3, (batch, crops), generator=g).float()
        w = w / (w.clamp_min(0).sum(1, keepdim=True) + 1e-6)
    elif kind == 5:  # all weight on one crop that cannot hold it: the cut cycles over the others
        w = torch.zeros(batch, crops)
        w[:, 0] = 1.0
    else:  # summing above 1: rescaled
        w = w * 3
    return w, k, cap


def random_crop_topk_case(g: torch.Generator, batch: int = 3):
    """Random ``crop_topk`` inputs ``(scores [B, n], sizes [B, C], budgets [B, C], k)``, or None when
    some row's crops hold no token (k would be 0).

    Sizes (zeros allowed) sum to at most ``n < 60`` per row; every row gets the same ``k`` (the
    smallest row total), split into budgets within the sizes in a random crop order. Scores are
    small integers (many ties) with about 10% NaN.
    """
    n = int(torch.randint(1, 60, (1,), generator=g))
    crops = int(torch.randint(1, 8, (1,), generator=g))
    cuts = torch.sort(torch.randint(0, n + 1, (batch, crops), generator=g), dim=1).values
    sizes = torch.diff(cuts, dim=1, prepend=torch.zeros(batch, 1, dtype=torch.int64))
    k = int(sizes.sum(1).min())
    if k == 0:
        return None
    budgets = torch.zeros_like(sizes)
    for b in range(batch):
        left = k
        for c in torch.randperm(crops, generator=g).tolist():
            take = min(left, int(sizes[b, c]))
            budgets[b, c] = take
            left -= take
    scores = torch.randint(0, 5, (batch, n), generator=g).float()
    scores[torch.rand(batch, n, generator=g) < 0.1] = float("nan")
    return scores, sizes, budgets, k


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

# The acceptance criteria live in the package so that `vtprune check` applies the same rules as
# this suite; they are re-exported here for the test modules that import them from conftest.
from vtprune._verify import (  # noqa: E402
    assert_same_greedy,
    assert_valid_selection,
    check_fl_greedy_picks,
    check_greedy_picks,
    np_cosine,
    np_facility_location,
    np_scope_scores,
    np_weights,
)


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


# ----------------------------------------------------------------------------- fused SCOPE similarity

#: ``parametrize`` rows ``(override, message)`` for the B/N checks of module.cpp's
#: ``check_scope_sizes``, which every binding sized like SCOPE's similarity makes (scope_greedy,
#: scope_similarity): one list, so the bindings are held to the same checks.
SCOPE_SIZE_ERRORS = [
    (dict(B=-1), "B must be >= 0"),
    (dict(N=-1), "N must be >= 0"),
    (dict(N=2**24 + 1), "N must be <="),
    (dict(B=2**40, N=2**12), "overflows int64"),
]


def similarity_tokens(batch: int, n: int, d: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Tokens ``[B, N, D]`` for the fused similarity kernels (Triton and CUDA): Gaussian rows
    scaled by up to 4, so the norms the kernels divide by differ from row to row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g) * torch.rand(batch, n, 1, generator=g) * 4
    return x.to(device=device, dtype=dtype)


def assert_similarity_like_torch_path(got: torch.Tensor, x: torch.Tensor, storage: torch.dtype) -> None:
    """``got``, a fused kernel's similarity of ``x`` stored as ``storage``, is finite and within
    FlashAttention's tolerance rule: its error against the float64 similarity is at most twice the
    torch path's (``vtprune.similarity.scope_similarity``, the reference's own formula in fp32) on
    the same inputs, plus 8 fp32 ulps for entries the torch path happens to get exact; with float16
    storage both are rounded once more, so one fp16 rounding is added."""
    from vtprune.similarity import SCOPE_EPS, scope_similarity

    assert torch.isfinite(got).all()
    x64 = x.cpu().double()
    xn = x64 / torch.linalg.vector_norm(x64, dim=-1, keepdim=True).clamp_min(SCOPE_EPS)
    exact = xn @ xn.mT
    ours = (got.cpu().double() - exact).abs().max().item()
    torch_err = (scope_similarity(x, storage).cpu().double() - exact).abs().max().item()
    slack = 8 * 2.0**-23  # fp32 ulps at 1, the entries' largest magnitude
    if storage == torch.float16:
        slack += 2.0**-11  # one more fp16 rounding of an entry of magnitude <= 1
    assert ours <= 2 * torch_err + slack, (ours, torch_err)


def assert_similarity_rejects(scope_similarity, device) -> None:
    """The input errors that both fused similarity wrappers (Triton's and CUDA's, each with its
    own checks) promise, raised by ``scope_similarity`` on ``device``."""
    with pytest.raises(TypeError, match="tokens must be float16 or bfloat16"):
        scope_similarity(torch.zeros(1, 3, 8, device=device))
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, D\]"):
        scope_similarity(torch.zeros(3, 8, dtype=torch.float16, device=device))
    with pytest.raises(ValueError, match="storage must be"):
        scope_similarity(torch.zeros(1, 3, 8, dtype=torch.float16, device=device), torch.bfloat16)


# ----------------------------------------------------------------------------- SCOPE weights


def assert_weights_read_in_kernel(select, device, dtype: torch.dtype) -> None:
    """The GPU SCOPE kernels read w = max(s, 0) from the saliency itself (alpha = 1) and use 1 for
    alpha = 0, instead of a precomputed fp32 copy (see vtprune._dispatch.kernel_weights). Their
    picks must be those of the same call on the precomputed weights, bit for bit: the similarity
    is the same, and max(s, 0) of a 16-bit value is exact in fp32. The saliency has negative and
    NaN entries and a row stride other than N. ``select(tokens, saliency, k, alpha, combine)``
    returns ``[B, k]`` picks in pick order."""
    from vtprune.similarity import saliency_weights

    g = torch.Generator().manual_seed(29)
    n, k = 41, 12
    tokens = torch.randn(3, n, 16, generator=g).to(device=device, dtype=dtype)
    wide = (torch.rand(3, n + 7, generator=g) - 0.3).to(device=device, dtype=dtype)
    wide[1, 5] = float("nan")
    saliency = wide[:, :n]  # rows n + 7 apart
    for alpha in (1.0, 0.0, 0.5):
        w32 = saliency_weights(saliency, alpha).float()
        for combine in ("mul", "add"):
            got = select(tokens, saliency, k, alpha, combine)
            want = select(tokens, w32, k, 1.0, combine)  # max(w32, 0) = w32: the precomputed path
            assert torch.equal(got, want), (dtype, alpha, combine)
    if dtype == torch.float32:  # a float64 saliency is rounded to float32 once (docs/semantics.md)
        for alpha in (1.0, 0.0, 0.5):  # 0: unit weights, the float64 tensor is never read
            want = select(tokens, saliency, k, alpha, "mul")
            assert torch.equal(select(tokens, saliency.double(), k, alpha, "mul"), want), alpha


def assert_covered_ties_go_to_lowest_index(select, device) -> None:
    """SPEC §1's tie rule where the gains are exactly 0. Tokens are exact duplicates of a few
    vectors, so once one copy of each is picked every unselected token is fully covered: each of
    its gain terms ``max(0, S[u, v] - c(u))`` is exactly 0, every score is 0 (``combine="mul"``),
    and the picks must go on in index order. The incremental kernels' float gains keep rounding
    residue there instead of 0 (the reference recomputes them); their exact count of open terms
    is what makes the picks right. Decided exactly, by comparisons, on the similarity the kernel
    reads (``scope_similarity`` of the same fp32 tokens, bitwise its input). ``select(tokens,
    saliency, k)`` returns ``[B, k]`` picks in pick order (alpha = 1, "mul")."""
    import numpy as np

    from vtprune.similarity import scope_similarity

    checked = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        n, d, clusters = 24 + 37 * (seed % 2), 8, 3 + seed
        x = torch.randn(clusters, d, generator=g)[torch.randint(0, clusters, (2, n), generator=g)]
        tokens = x.to(device)
        saliency = torch.rand(2, n, generator=g).to(device)
        picks = select(tokens, saliency, n).cpu()
        sim = scope_similarity(tokens).double().cpu().numpy()
        for b in range(2):
            s, cover, taken = sim[b], np.zeros(n), np.zeros(n, dtype=bool)
            assert sorted(picks[b].tolist()) == list(range(n)), (seed, b, picks[b])
            for i, t in enumerate(picks[b].tolist()):
                free = np.flatnonzero(~taken)
                if not (s[:, free] > cover[:, None]).any():  # every unselected gain is exactly 0
                    assert t == free[0], (
                        f"seed {seed} image {b} step {i}: every unselected token is fully covered, so "
                        f"the lowest unselected index {free[0]} must be picked, got {t}; picks {picks[b].tolist()}"
                    )
                    checked += 1
                taken[t] = True
                cover = np.maximum(cover, s[:, t])
    assert checked > 50, checked  # the covered phase was reached and checked
