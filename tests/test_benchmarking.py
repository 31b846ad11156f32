"""The benchmark harness (``vtprune.bench``), the official-style HoloV loop it times, and ``vtprune bench``.

Everything here runs on tiny CPU shapes: what is checked is that providers are compared and
recorded correctly (agreement, OOM and error rows, ratios, JSON, markdown, plot), not speed.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from dataclasses import fields, replace
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import _dispatch, reference
from vtprune.bench import OPS, SCHEMA, Provider, Report, Row, markdown, median_ms, peak_extra_mib, run_op
from vtprune.bench import attention as bench_attention
from vtprune.bench import holov as bench_holov
from vtprune.bench import scope as bench_scope
from vtprune.bench.progress import Progress
from vtprune.bench.shapes import Shape
from vtprune.bench.timing import environment

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the official-style HoloV loop


@pytest.mark.parametrize(("b", "n", "d", "k"), [(1, 97, 64, 8), (3, 577, 33, 64), (2, 576, 128, 192), (1, 2881, 16, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_holov_reference_loop_matches_spec(b, n, d, k, dtype):
    g = torch.Generator().manual_seed(n + k)
    x = torch.randn(b, n, d, generator=g).to(dtype)
    # distinct attention values (a permutation) so that no tie can reorder the picks
    attn = torch.stack([torch.randperm(n, generator=g) for _ in range(b)]).to(torch.float64).div(n).add(0.5).to(torch.float32)
    crops = reference.default_num_crops(n, k)
    loop = reference.holov_reference_loop(x, attn, crops, k)
    want = vtprune.holov_select(x, attn, k, sorted=False, backend="reference")
    assert loop.dtype == torch.int64 and loop.shape == (b, k)
    assert torch.equal(loop, want)
    assert torch.equal(reference.holov_reference_loop(x[0], attn[0], crops, k), want[0])  # unbatched


def test_holov_reference_loop_keeps_a_full_crop_and_marks_padding():
    # Crop 1 has zero attention, so its score is 0 and crop 0 (2 tokens) gets the whole budget
    # of 3: the official code keeps crop 0 whole and pads one zero token, here index -1.
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    attn = torch.tensor([0.2, 0.7, 0.0, 0.0])
    assert reference.holov_reference_loop(x, attn, 2, 3).tolist() == [0, 1, -1]
    # The spec's capacity rule instead moves the surplus to crop 1.
    assert sorted(vtprune.holov_select(x, attn, 3, num_crops=2, sorted=False).tolist()[:2]) == [0, 1]


# ----------------------------------------------------------------------------- timing


def test_median_ms_counts_runs_and_stops_at_the_time_budget():
    calls = []
    ms, runs = median_ms(lambda: calls.append(1), CPU, repeat=4, warmup=2)
    assert runs == 4 and len(calls) == 6 and ms >= 0.0
    ms, runs = median_ms(lambda: torch.randn(64, 64) @ torch.randn(64, 64), CPU, repeat=1000, warmup=0, max_seconds=1e-9)
    assert runs == 1 and ms > 0.0
    with pytest.raises(ValueError, match="repeat"):
        median_ms(lambda: None, CPU, repeat=0)


def test_peak_memory_is_none_on_the_cpu_and_environment_names_the_device():
    assert peak_extra_mib(lambda: torch.zeros(1000), CPU) is None
    env = environment(CPU)
    for key in ("date", "device", "python", "torch", "triton", "vtprune"):
        assert env.get(key), key
    assert env["torch"] == torch.__version__ and "CPU" in env["device"]


# ----------------------------------------------------------------------------- the runner


@pytest.mark.parametrize("op_name", list(OPS))
def test_providers_agree_on_quick_shapes(op_name):
    op = OPS[op_name]
    provs = [p for p in op.provider_names if isinstance(op.providers(CPU, torch.float32).get(p), Provider)]
    # torch.compile compiles for long on a CPU; Triton under the interpreter: the test below
    provs = [p for p in provs if p not in ("torch.compile", "triton")]
    report = run_op(op, list(op.quick_shapes), CPU, torch.float32, repeat=1, providers=provs, warmup=0, log=None)
    assert len(report.rows) == len(op.quick_shapes) * len(provs)
    for row in report.rows:
        assert row.status == "ok", row
        assert row.same_as_reference is True, row
        assert row.median_ms is not None and row.median_ms > 0 and row.runs == 1
        assert row.peak_extra_mib is None and row.mem_ratio_vs_baseline is None  # CPU: no memory counter
        if row.provider == op.baseline:
            assert row.ratio_vs_baseline == pytest.approx(1.0)
        else:
            base = next(r for r in report.rows if r.case == row.case and r.provider == op.baseline)
            assert row.ratio_vs_baseline == pytest.approx(base.median_ms / row.median_ms)
    assert report.failed() == []
    assert report.baseline == op.baseline and report.dtype == "float32" and report.environment["device"]


def test_triton_interpreter_runs_only_when_named():
    if not _dispatch.triton_interpret() or not _dispatch.implements("triton", "attention_importance"):
        pytest.skip("needs the Triton interpreter (CPU-only machine) and the Triton attention kernel")
    op = OPS["attention"]
    default = run_op(op, ["quick-exact-L96"], CPU, torch.float32, repeat=1, warmup=0, log=None)
    assert "triton" not in {r.provider for r in default.rows}
    named = run_op(op, ["quick-exact-L96"], CPU, torch.float32, repeat=1, warmup=0, providers=["materialized", "triton"], log=None)
    row = next(r for r in named.rows if r.provider == "triton")
    assert row.same_as_reference is True and "interpreter" in row.note


def _tiny_scope(**provider_overrides) -> tuple:
    """SCOPE's bench with one tiny shape and the given extra providers."""
    shape = Shape("tiny", 1, 17, 8, 3)
    base = OPS["scope"]

    def providers(device, dtype):
        out = dict(base.providers(device, dtype))
        out.update(provider_overrides)
        return out

    names = base.provider_names + tuple(provider_overrides)
    op = replace(base, shapes={"tiny": shape, "tiny-gpu": replace(shape, name="tiny-gpu", gpu_only=True)},
                 providers=providers, provider_names=names)
    return op, ["reference_loop", "torch", *provider_overrides]


def test_out_of_memory_is_a_row_not_a_failure():
    def oom(inputs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    op, provs = _tiny_scope(hungry=Provider("hungry", oom))
    logged = []
    report = run_op(op, ["tiny"], CPU, torch.float32, repeat=1, warmup=0, providers=provs, log=logged.append)
    row = next(r for r in report.rows if r.provider == "hungry")
    assert row.status == "OOM" and row.median_ms is None and row.ratio_vs_baseline is None
    assert row.same_as_reference is None and "memory" in row.note
    assert all(r.status == "ok" for r in report.rows if r.provider != "hungry")  # the others still ran
    assert report.failed() == []
    assert "OOM" in logged[-1]
    table = markdown(report)
    assert "| tiny B=1 N=17 D=8 k=3 | hungry | OOM |" in table


def test_errors_and_disagreements_fail_the_run():
    def broken(inputs):
        raise ValueError("kernel exploded")

    def wrong(inputs):
        return torch.arange(inputs.k).expand(inputs.x.shape[0], -1)

    op, provs = _tiny_scope(
        broken=Provider("broken", broken),
        wrong=Provider("wrong", wrong),
        wrong_16bit=Provider("wrong_16bit", wrong, exact=False),
    )
    report = run_op(op, ["tiny"], CPU, torch.float32, repeat=1, warmup=0, providers=provs, log=None)
    rows = {r.provider: r for r in report.rows}
    assert rows["broken"].status == "error" and "ValueError: kernel exploded" in rows["broken"].note
    assert rows["wrong"].same_as_reference is False
    assert rows["wrong_16bit"].same_as_reference is False and "not a failure" in rows["wrong_16bit"].note
    assert {r.provider for r in report.failed()} == {"broken", "wrong"}


def test_gpu_only_shapes_are_skipped_on_the_cpu_with_a_note():
    op, provs = _tiny_scope()
    report = run_op(op, ["tiny-gpu", "tiny"], CPU, torch.float32, repeat=1, warmup=0, providers=provs, log=None)
    skipped = report.rows[0]
    assert skipped.status == "skipped" and skipped.provider == "all" and "GPU-only" in skipped.note
    assert [r.status for r in report.rows[1:]] == ["ok", "ok"]


def test_unknown_or_unusable_providers_are_errors():
    op = OPS["scope"]
    with pytest.raises(ValueError, match="no provider 'fastest'"):
        run_op(op, ["quick-n97-k8"], CPU, torch.float32, repeat=1, providers=["fastest"], log=None)
    with pytest.raises(RuntimeError, match="provider 'cuda' cannot run here"):
        run_op(op, ["quick-n97-k8"], CPU, torch.float32, repeat=1, providers=["cuda"], log=None)


def test_checks_reject_wrong_outputs():
    i = bench_holov.make_inputs(bench_holov.SHAPES["quick-n97-k8"], CPU, torch.float32)
    truth = bench_holov.check(i)
    assert bench_holov.agrees(truth.clone(), truth, i)
    assert not bench_holov.agrees(truth.flip(-1), truth, i)  # same set, another order
    dup = truth.clone()
    dup[0, 1] = dup[0, 0]
    assert not bench_holov.agrees(dup, truth, i)
    a = bench_attention.make_inputs(bench_attention.SHAPES["quick-exact-L96"], CPU, torch.float32)
    want = bench_attention.check(a)
    assert want.shape == (1, 2, bench_attention.SHAPES["quick-exact-L96"].n_visual)
    assert bench_attention.agrees(want * (1 + 1e-5), want, a)
    assert not bench_attention.agrees(want * 1.01, want, a)
    s = bench_scope.make_inputs(bench_scope.SHAPES["quick-n97-k8"], CPU, torch.float32)
    picks = bench_scope.check(s)
    assert bench_scope.agrees(picks.clone(), picks, s) is True
    # Same set in another order (what a near-tie does): accepted by the objective, with a note.
    same, note = bench_scope.agrees(picks.flip(-1), picks, s)
    assert same and "facility location differs by 0.0e+00" in note
    # Another token in place of the first pick: the objective drops, the check fails.
    other = picks.clone()
    other[0, 0] = next(t for t in range(97) if t not in picks[0].tolist())
    same, note = bench_scope.agrees(other, picks, s)
    assert not same and "facility location" in note
    assert bench_scope.agrees(torch.zeros_like(picks), picks, s) is False  # repeated indices


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialized_attention_is_the_reference_formula(dtype):
    shape = bench_attention.SHAPES["quick-exact-L96"]
    a = bench_attention.make_inputs(shape, CPU, dtype)
    got = bench_attention.materialized_attention_importance(a.q, a.k, a.groups, 2, True, a.scale, *a.keys)
    want = vtprune.attention_importance(a.q, a.k, a.groups, num_groups=2, scale=a.scale, key_range=a.keys, backend="reference")
    tol = bench_attention.tolerance(dtype)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * float(want.abs().max()))


def test_attention_shapes_follow_the_alvts_layout():
    for name in ("lowrank-r128-L640", "exact-gqa-L2944", "exact-L32768"):
        assert name in bench_attention.SHAPES
    s = bench_attention.SHAPES["lowrank-r256-L640"]
    assert (s.n_visual, s.prefix, s.heads, s.d) == (576, 35, 1, 256)
    assert bench_attention.SHAPES["exact-gqa-L8192"].kv_heads == 8
    assert {"serving-b32", "qwen-n16384"} <= set(bench_scope.SHAPES) and bench_scope.SHAPES["qwen-n16384"].gpu_only
    assert {"llava15-k64", "llava15-k128", "llava15-k192", "llavanext-crops", "serving-b32", "n2880-k320"} <= set(bench_holov.SHAPES)


# ----------------------------------------------------------------------------- JSON and markdown


def _report() -> Report:
    rows = [
        Row("c1 N=8", "base", "float32", {"B": 1, "N": 8, "k": 2}, median_ms=2.0, runs=3, ratio_vs_baseline=1.0,
            peak_extra_mib=4.0, mem_ratio_vs_baseline=1.0, same_as_reference=True),
        Row("c1 N=8", "fast", "float32", {"B": 1, "N": 8, "k": 2}, median_ms=0.5, runs=3, ratio_vs_baseline=4.0,
            peak_extra_mib=1.0, mem_ratio_vs_baseline=4.0, same_as_reference=True),
        Row("c1 N=8", "big", "float32", {"B": 1, "N": 8, "k": 2}, status="OOM", note="out of GPU memory"),
    ]
    return Report("scope", "cuda", "float32", "base", "picks equal", {"device": "GPU X", "date": "2026-01-01"}, rows)


def test_json_schema_round_trips():
    report = _report()
    data = json.loads(json.dumps(report.to_dict()))
    assert data["schema"] == SCHEMA
    assert set(data) == {"schema", "op", "device", "dtype", "baseline", "check", "environment", "rows"}
    assert all(set(r) == {f.name for f in fields(Row)} for r in data["rows"])
    assert data["rows"][2]["status"] == "OOM" and data["rows"][2]["median_ms"] is None
    back = Report.from_dict(data)
    assert back == report
    with pytest.raises(ValueError, match="schema"):
        Report.from_dict({**data, "schema": "other/0"})


def test_markdown_table():
    text = markdown(_report())
    lines = text.splitlines()
    assert lines[0] == "# vtprune benchmark: scope"
    assert any("GPU X" in line for line in lines) and any("`base`" in line for line in lines)
    header = lines.index("| case | provider | median ms | runs | vs baseline | peak extra MiB | mem vs baseline | same | note |")
    table = lines[header + 2:]
    assert len(table) == 3 and all(line.startswith("| c1 N=8 |") and line.count("|") == 10 for line in table)
    assert table[1] == "| c1 N=8 | fast | 0.500 | 3 | 4.0x | 1.0 | 4.0x | yes |  |"
    assert table[2] == "| c1 N=8 | big | OOM |  |  |  |  |  | out of GPU memory |"


def test_plot_draws_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from vtprune.bench.plot import plot_reports

    out = plot_reports([_report()], tmp_path / "sub" / "p.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- progress bar


def test_progress_bar_draws_only_on_a_terminal():
    err, out = io.StringIO(), io.StringIO()
    with Progress(3, "bench", stream=err, enabled=True, use_tqdm=False, out=out) as bar:
        bar.step("a")
        bar.write("row 1")
        bar.step("b")
        bar.step("c")
    assert "[" in err.getvalue() and "3/3" in err.getvalue() and "row 1" not in err.getvalue()
    assert out.getvalue() == "row 1\n"
    err, out = io.StringIO(), io.StringIO()  # a StringIO is not a TTY: no bar
    with Progress(2, "bench", stream=err, out=out) as bar:
        bar.step("a")
        bar.write("row")
    assert err.getvalue() == "" and out.getvalue() == "row\n"


# ----------------------------------------------------------------------------- vtprune bench


def _run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    pkg_root = str(Path(vtprune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run([sys.executable, "-m", "vtprune", *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_bench_quick_end_to_end(tmp_path):
    try:
        import matplotlib  # noqa: F401

        plot = ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        plot = []  # the table and JSON are still checked
    proc = _run_cli("bench", "--quick", "--device", "cpu", "--repeat", "1", "--json", str(tmp_path / "b.json"),
                    "--out", str(tmp_path / "tables"), *plot)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["schema"] == SCHEMA and [r["op"] for r in data["reports"]] == ["scope", "holov", "attention"]
    for rep in data["reports"]:
        report = Report.from_dict(rep)
        assert report.rows and all(r.status == "ok" and r.same_as_reference for r in report.rows)
        assert (tmp_path / "tables" / f"{report.op}.md").read_text() == markdown(report)
    for line in ("== scope: baseline reference_loop", "== holov: baseline reference_loop", "== attention: baseline materialized"):
        assert line in proc.stdout
    assert "quick B=1 N=97 D=64 k=8" in proc.stdout and " NO" not in proc.stdout
    if plot:
        assert (tmp_path / "bench.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--op", "scope", "--shapes", "nope"], "--shapes: unknown nope"),
        (["--op", "holov", "--providers", "materialized"], "--providers: unknown materialized"),
        (["--op", "scope", "--providers", "cuda"], "cannot run here"),
        (["--quick", "--shapes", "llava15-k64"], "not both"),
    ],
)
def test_bench_rejects_bad_options(args, message, capsys):
    from vtprune import cli

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("cuda can run here")
    assert cli.main(["bench", "--device", "cpu", *args]) == 2
    assert message in capsys.readouterr().err


def test_bench_list(capsys):
    from vtprune import cli

    assert cli.main(["bench", "--list", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for text in ("scope (baseline reference_loop", "holov (baseline reference_loop", "attention (baseline materialized",
                 "qwen-n16384", "exact-gqa-L32768", "provider materialized"):
        assert text in out


# ----------------------------------------------------------------------------- benchmarks/gpu_suite.sh

GPU_SUITE = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_suite.sh"


def _gpu_suite(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_SUITE), *args], capture_output=True, text=True, timeout=120)


def test_gpu_suite_rejects_unknown_steps(tmp_path):
    result = _gpu_suite(str(tmp_path), "tests", "bench-nothing")
    assert result.returncode == 2
    assert "unknown step 'bench-nothing'" in result.stderr
    assert not (tmp_path / "tests.log").exists()  # nothing ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU-less exit; a GPU is present")
def test_gpu_suite_without_gpu_says_so(tmp_path):
    result = _gpu_suite(str(tmp_path), "info")
    assert result.returncode == 2
    assert "no usable GPU" in result.stderr


def test_gpu_suite_command_lines(tmp_path):
    """The tests and sanitizer steps' commands, run against a stand-in python (which answers the
    GPU probe and logs every call) and compute-sanitizer, so no GPU is needed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fake_python = bin_dir / "fakepy"
    fake_python.write_text(
        "#!/usr/bin/env bash\n"
        f'{{ printf python; printf " [%s]" "$@"; echo; }} >> {log}\n'
        'case "$*" in *get_device_capability*) echo 90 ;; esac\n'
    )
    sanitizer = bin_dir / "compute-sanitizer"
    sanitizer.write_text(f'#!/usr/bin/env bash\necho "sanitizer caching_off=$PYTORCH_NO_CUDA_MEMORY_CACHING $*" >> {log}\n')
    for f in (fake_python, sanitizer):
        f.chmod(0o755)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake_python), "PATH": f"{bin_dir}:{os.environ['PATH']}",
           "PYTEST_WORKERS": "3", "PYTEST_ARGS": '-k "not emu" -x'}
    steps = ["build", "tests", "sanitizer-memcheck", "sanitizer-racecheck", "bench-scope", "bench-host"]
    result = subprocess.run(["bash", str(GPU_SUITE), str(out), *steps],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert "python [-m] [pytest] [-q] [-n] [3] [-k] [not emu] [-x] [tests]" in calls, calls  # words kept whole
    assert f"sanitizer caching_off=1 --tool memcheck --error-exitcode 1 {fake_python} benchmarks/sanitizer_driver.py --triton" in calls
    assert f"sanitizer caching_off=1 --tool racecheck --error-exitcode 1 {fake_python} benchmarks/sanitizer_driver.py" in calls
    assert "python [-m] [pip] [install] [--no-build-isolation] [--no-deps] [-e] [.] [-v]" in calls
    assert f"python [benchmarks/run.py] [--op] [scope] [--out] [{out}] [--plot] [{out}/scope.png]" in calls
    assert "python [benchmarks/host_overhead.py] [--mode] [gpu]" in calls
    table = (out / "steps.md").read_text()
    assert all(f"| {step} | pass |" in table for step in steps), table


def test_gpu_suite_summary_merges_the_steps_of_several_calls(tmp_path):
    # What two time-limited calls leave in one folder once copied together.
    (tmp_path / "env.md").write_text("- device: NVIDIA Test GPU, 1.0\n")
    (tmp_path / "steps.md").write_text("| tests | pass | 100s |\n| bench-scope | pass | 60s |\n")
    (tmp_path / "tests.log").write_text("...\n12 passed in 100.00s\n")
    (tmp_path / "scope.md").write_text("# title\n| shape | provider |\n|---|---|\n| a | cuda |\n")
    (tmp_path / "bench-holov.log").write_text("Traceback ...\n")
    (tmp_path / "bench-host.log").write_text("op | backend | event us | graph us\n")
    result = _gpu_suite(str(tmp_path), "summary")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "NVIDIA Test GPU" in summary
    assert "| bench-scope | pass | 60s |" in summary
    assert "Test summary: 12 passed in 100.00s" in summary
    assert "## scope" in summary and "| a | cuda |" in summary and "# title" not in summary
    assert "## holov: no table (see bench-holov.log)" in summary
    assert "## host overhead" in summary and "op | backend | event us | graph us" in summary
    assert "attention" not in summary  # a step that never ran is not reported
    assert "Issue targets" not in summary  # no JSON table to judge them on


def test_gpu_suite_summary_judges_the_targets(tmp_path):
    rows = _target_rows("llava15", {"B": 1, "N": 576, "D": 1024, "k": 64}, reference_loop=3.0, cuda=0.03)
    (tmp_path / "scope.json").write_text(json.dumps(_targets_report("scope", "reference_loop", rows).to_dict()))
    result = _gpu_suite(str(tmp_path), "summary")
    assert result.returncode == 0, result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "## Issue targets" in summary and "| 3 | B=1, N=576, k=64 ≤ 40 µs | llava15 | cuda | 30.0 µs | yes |" in summary


# ----------------------------------------------------------------------------- issue targets


def _target_rows(case: str, params: dict, **ms: float) -> list[Row]:
    """One row per provider with the given median ms; the first provider is the baseline."""
    base = next(iter(ms.values()))
    return [Row(case, p, "bfloat16", params, median_ms=t, runs=5, ratio_vs_baseline=base / t, same_as_reference=True)
            for p, t in ms.items()]


def _targets_report(op: str, baseline: str, rows: list[Row], dtype: str = "bfloat16") -> Report:
    return Report(op, "cuda", dtype, baseline, "picks equal", {"device": "NVIDIA Test GPU", "date": "2026-01-01"}, rows)


def _verdict(text: str, reports: dict):
    from vtprune.bench import targets

    target = next(t for t in targets.TARGETS if t.text == text)
    return targets.evaluate(target, reports.get(target.op))


def test_targets_take_the_fastest_eager_kernel_that_agrees():
    params = {"B": 1, "N": 576, "D": 1024, "k": 64}
    rows = _target_rows("llava15", params, reference_loop=3.0, **{"torch.compile": 0.5}, triton=0.06, cuda=0.035,
                        cuda_graph=0.01)
    reports = {"scope": _targets_report("scope", "reference_loop", rows)}
    latency = _verdict("B=1, N=576, k=64 ≤ 40 µs", reports)
    assert (latency.provider, latency.met, latency.measured) == ("cuda", True, "35.0 µs")  # the graph row does not count
    assert _verdict("B=1, N=576, k=64 ≥ 50× reference_loop", reports).met is True  # 85.7x
    over = _verdict("B=1, N=576, k=64 ≥ 10× torch.compile", reports)
    assert over.met is True and over.measured.startswith("14.3×")
    # a kernel that disagrees with the check is not "ours": triton's 60 us misses the target
    rows[3].same_as_reference = False
    latency = _verdict("B=1, N=576, k=64 ≤ 40 µs", reports)
    assert (latency.provider, latency.met) == ("triton", False)
    assert _verdict("B=1, N=576, k=64 ≥ 10× torch.compile", reports).met is False  # 0.5 / 0.06 = 8.3x
    # no row for the case, or no report for the op: not measured, not judged
    assert _verdict("N=2880, k=640 ≤ 1 ms", reports).met is None
    assert _verdict("B=32, N=576, k=64 ≤ 100 µs", reports).measured == "not measured"


def test_targets_memory_bound_runs_and_dtype():
    params = {"B": 1, "N": 16384, "D": 1280, "k": 1024}
    fits = "N=16384, k=1024 completes within 2·N² + O(N·D) bytes"
    rows = [Row("qwen", "cuda", "bfloat16", params, median_ms=40.0, runs=3, peak_extra_mib=800.0, same_as_reference=True)]
    reports = {"scope": _targets_report("scope", "reference_loop", rows)}
    assert _verdict(fits, reports).met is True  # bound: 512 + 320 MiB
    rows[0].peak_extra_mib = 900.0
    assert _verdict(fits, reports).met is False
    rows[0].status, rows[0].median_ms = "OOM", None
    v = _verdict(fits, reports)
    assert v.met is False and v.notes == ["cuda: OOM"]
    # attention at L=32768: ours runs where the materialized baseline does not
    att = {"B": 1, "L": 32768, "H": 32, "Hkv": 32, "d": 128, "N": 32704}
    rows = [Row("exact", "materialized", "float16", att, status="OOM"),
            Row("exact", "triton", "float16", att, median_ms=12.0, runs=3, same_as_reference=True)]
    v = _verdict("L=32768 exact H=32: runs (materialized may not)", {"attention": _targets_report("attention", "materialized", rows, "float16")})
    assert v.met is True and "materialized: OOM" in v.notes
    assert any("target is for bfloat16" in n for n in v.notes)


def test_targets_markdown_from_a_folder(tmp_path):
    from vtprune.bench import targets

    params = {"B": 32, "N": 576, "D": 4096, "k": 64}
    rows = _target_rows("serving", params, reference_loop=9.0, cuda=0.2)
    (tmp_path / "holov.json").write_text(json.dumps(_targets_report("holov", "reference_loop", rows).to_dict()))
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        assert targets.main([str(tmp_path)]) == 0
    text = out.getvalue()
    assert "NVIDIA Test GPU (bfloat16)" in text
    assert "| 4 | B=32, N=576, k=64 ≤ 100 µs | serving | cuda | 200.0 µs | **NO** |" in text
    assert text.count("| – |") == len(targets.TARGETS) - 1  # every other target: not measured
    assert targets.main([]) == 2
