"""Every Triton kernel of the package compiles for sm_90 and sm_80, and fits them, without a GPU.

The other Triton tests run the kernels under the interpreter when there is no GPU, which accepts
programs the compiler rejects. Here ``triton_aot`` records the launches the wrappers make (with
the GPU's tile and dot-path choices) on inputs reaching every dtype and constexpr branch, and
compiles each distinct specialization with Triton's real compiler for both targets (bundled
ptxas). Checks per (specialization, target):

* it compiles;
* its shared memory fits one block's opt-in maximum (227 KiB on sm_90, 163 KiB on sm_80);
* its registers fit the 64K-register file for its ``num_warps``;
* it spills at most :data:`SPILL_LIMIT` bytes per thread, except the groups in
  :data:`KNOWN_SPILLS`, each bounded by its own measured size (and reported as stale once it no
  longer spills, so the list only shrinks).

Skipped only where triton lacks the compile API this follows (triton 3.9's) or has no ptxas.
``VTPRUNE_AOT_COMPILE_PYTHON=/path/to/python`` compiles with another Python's triton (the
launches are still recorded here): with a venv holding triton 3.6, the GPU machines' version,
every specialization compiled for both targets too.
One run: about 60 s on 2 otherwise idle cores (record ~8 s; compile ~50 s: 61 specializations x
2 targets, two compiles at a time).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install 'vtprune[triton]')")

import triton_aot  # noqa: E402 - after the importorskip

PROBLEM = triton_aot.api_problem()
pytestmark = pytest.mark.skipif(PROBLEM is not None, reason=f"cannot compile ahead of time: {PROBLEM}")

TARGETS = list(triton_aot.TARGETS)

#: Spilled bytes per thread (the larger of stores and loads) tolerated anywhere: a few spilled
#: values around a loop are harmless; more is local-memory traffic in the inner loop.
SPILL_LIMIT = 256

#: Specialization groups known to spill more, each with the most it may spill (ptxas of triton
#: 3.9 measured, plus margin) and why: ``dict(kernel="module:kernel", match=[regex, ...],
#: bound=bytes, why="...")``, where all of ``match`` must match the spec text. Empty: the fp32
#: attention and coverage dots and the unaligned-row similarity chunks that spilled 0.4 to 11 KB
#: per thread now walk their reduction dim in 16/32-wide slices; nothing spills more than 32 bytes.
KNOWN_SPILLS: list[dict] = []


@pytest.fixture(scope="module")
def report() -> triton_aot.Report:
    return triton_aot.run_check()


def _spilled(result: dict) -> int:
    return max(result["spill_stores"], result["spill_loads"])


def _known(result: dict) -> dict | None:
    for entry in KNOWN_SPILLS:
        if result["kernel"] == entry["kernel"] and all(re.search(p, result["spec"]) for p in entry["match"]):
            return entry
    return None


def _where(result: dict) -> str:
    return f"{result['kernel']} [{result['target']}] {result.get('spec', '?')}\n    from: {result.get('cases')}"


def test_every_kernel_is_launched(report):
    """Every kernel of the package was launched by some case (so it was compiled below)."""
    assert not report.unrecorded, (
        f"kernels no case of tests/triton_aot.py launched: {report.unrecorded}; add a case that reaches them"
    )
    # the enumeration itself: every kernel module's file has kernels in the list
    root = Path(__file__).resolve().parents[1] / "triton_kernels"
    decorated = re.compile(r"^@triton\.jit\b", re.MULTILINE)
    modules = {path.stem for path in root.glob("*.py") if decorated.search(path.read_text())}
    found = {kernel.split(":")[0] for kernel in report.kernels}
    assert modules and modules <= found, f"modules with @triton.jit but no kernel found: {sorted(modules - found)}"


@pytest.mark.parametrize("target", TARGETS)
def test_compiles(report, target):
    results = [r for r in report.results if r["target"] == target]
    assert {r["kernel"] for r in results} == set(report.kernels)
    failed = [r for r in results if not r["ok"]]
    assert not failed, "\n\n".join(f"{_where(r)}\n{r['error']}" for r in failed)


@pytest.mark.parametrize("target", TARGETS)
def test_shared_memory_fits(report, target):
    limit = triton_aot.TARGETS[target][1]
    over = [r for r in report.results if r["target"] == target and r["ok"] and r["shared"] > limit]
    assert not over, "\n".join(f"{r['shared']} > {limit} bytes: {_where(r)}" for r in over)


@pytest.mark.parametrize("target", TARGETS)
def test_registers_fit(report, target):
    over = [
        r for r in report.results
        if r["target"] == target and r["ok"] and r["registers"] * 32 * r["num_warps"] > triton_aot.REGISTER_FILE
    ]
    assert not over, "\n".join(f"{r['registers']} registers x {32 * r['num_warps']} threads: {_where(r)}" for r in over)


@pytest.mark.parametrize("target", TARGETS)
def test_spills(report, target):
    bad = []
    for r in report.results:
        if r["target"] != target or not r["ok"] or _spilled(r) <= SPILL_LIMIT:
            continue
        entry = _known(r)
        if entry is None:
            bad.append(f"spills {_spilled(r)} > {SPILL_LIMIT} bytes: {_where(r)}")
        elif _spilled(r) > entry["bound"]:
            bad.append(f"spills {_spilled(r)} > {entry['bound']} bytes (its KNOWN_SPILLS bound): {_where(r)}")
    assert not bad, "\n".join(bad)


def test_known_spills_still_spill(report):
    """A KNOWN_SPILLS entry nothing matches above the limit any more is stale: delete it."""
    if any(not r["ok"] for r in report.results):
        pytest.fail("some specializations did not compile (see test_compiles); spills are unknown")
    stale = []
    for entry in KNOWN_SPILLS:
        hits = [r for r in report.results if _known(r) is entry and _spilled(r) > SPILL_LIMIT]
        if not hits:
            stale.append(f"{entry['kernel']} {entry['match']}")
    assert not stale, f"KNOWN_SPILLS entries that no longer spill above {SPILL_LIMIT} bytes: {stale}"
