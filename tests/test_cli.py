"""The ``vtprune`` command line: ``info``, ``check`` and ``demo`` (run as ``python -m vtprune``), the
demo's selections and figure, and the acceptance rules ``vtprune check`` shares with this suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import _dispatch, demo, reference

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_cli(*args: str, timeout: float = 120, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m vtprune ARGS`` with this checkout's vtprune importable, whatever the install state."""
    env = {k: v for k, v in os.environ.items() if k not in unset}
    pkg_root = str(Path(vtprune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "vtprune", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def _synthetic_image() -> torch.Tensor:
    """A deterministic 150x200 RGB test card: gradients, a disc, stripes and a bright square."""
    h, w = 150, 200
    y = torch.linspace(0, 1, h)[:, None].expand(h, w)
    x = torch.linspace(0, 1, w)[None, :].expand(h, w)
    r, g, b = x.clone(), y.clone(), 0.5 * (1 - x) + 0.25 * torch.sin(25 * x) * (y > 0.6)
    disc = ((x - 0.3) ** 2 + (y - 0.4) ** 2) < 0.03
    r[disc], g[disc], b[disc] = 0.9, 0.1, 0.2
    square = (x > 0.7) & (x < 0.85) & (y > 0.15) & (y < 0.35)
    r[square], g[square], b[square] = 1.0, 1.0, 1.0
    img = torch.stack([r, g, b], dim=-1).clamp(0, 1)
    return (img * 255).round().to(torch.uint8)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory) -> Path:
    pil = pytest.importorskip("PIL.Image")
    path = tmp_path_factory.mktemp("img") / "card.png"
    pil.fromarray(_synthetic_image().numpy()).save(path)
    return path


def test_info_names_every_backend():
    proc = _run_cli("info", timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for name in _dispatch.BACKENDS:
        assert any(line.split()[:1] == [name] for line in out.splitlines()), f"backend {name!r} missing:\n{out}"
    for key in ("vtprune", "torch", "triton", "python", "GPU", "vtprune._C"):
        assert any(line.startswith(key) for line in out.splitlines()), f"{key!r} missing:\n{out}"
    assert vtprune.__version__ in out


def test_no_command_prints_usage():
    from vtprune import cli

    assert cli.main([]) == 2


@pytest.mark.parametrize("bad", ["0", "577", "x"])
def test_demo_rejects_bad_keep(bad):
    from vtprune import cli

    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--keep", bad])
    assert exc.value.code == 2


def test_demo_end_to_end(image_file, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "figs" / "demo.png"
    proc = _run_cli("demo", "--image", str(image_file), "--out", str(out), "--keep", "16", "--repeat", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    for label in ("SCOPE", "HoloV", "saliency top-k", "cov@0.5", "cov@0.7", "cov@0.9", "facility", "reference_loop"):
        assert label in proc.stdout, proc.stdout
    assert " NO" not in proc.stdout, proc.stdout  # every backend picked what the reported one picked


def test_demo_unreadable_image_is_a_clean_error(tmp_path):
    bad = tmp_path / "not_an_image.png"
    bad.write_bytes(b"definitely not a PNG")
    proc = _run_cli("demo", "--image", str(bad), "--out", str(tmp_path / "x.png"), timeout=60)
    assert proc.returncode == 1
    assert "cannot read image" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("keep", [1, 40])
def test_run_demo_selections(keep):
    res = demo.run_demo(_synthetic_image(), keep, "all", time_backends=False, device="cpu")
    assert res.tokens.shape[0] == demo.NUM_TOKENS and 20 <= res.tokens.shape[1] <= 64
    assert torch.isfinite(res.tokens).all()
    assert res.saliency.shape == (demo.NUM_TOKENS,) and (res.saliency >= 0).all()
    assert abs(float(res.saliency.sum()) - 1.0) < 1e-5
    assert set(res.methods) == {"scope", "holov", "topk"}
    for method, r in res.methods.items():
        idx = r.indices
        assert idx.dtype == torch.int64 and idx.shape == (keep,), method
        assert idx.unique().numel() == keep, method
        assert 0 <= int(idx.min()) and int(idx.max()) < demo.NUM_TOKENS, method
        assert torch.equal(idx, idx.sort().values), method
        assert all(0.0 <= c <= 1.0 for c in r.theta_coverage.values()), method
        assert r.theta_coverage[0.5] >= r.theta_coverage[0.7] >= r.theta_coverage[0.9], method
        assert keep - 1e-3 <= r.facility_location <= demo.NUM_TOKENS + 1e-3, method  # each pick covers itself
    # Top-k keeps exactly the most salient tokens (ties to the lowest index).
    top = torch.sort(res.saliency, descending=True, stable=True).indices[:keep].sort().values
    assert torch.equal(res.methods["topk"].indices, top)


def test_run_demo_is_deterministic_and_checks_backends():
    img = _synthetic_image()
    a = demo.run_demo(img, 12, ["scope", "holov"], repeat=1, device="cpu")
    b = demo.run_demo(img, 12, "scope", time_backends=False, device="cpu")
    assert torch.equal(a.methods["scope"].indices, b.methods["scope"].indices)
    scope = a.methods["scope"]
    assert "reference_loop" in scope.timings_ms and "reference" in scope.timings_ms
    assert all(scope.agrees.values()), scope.agrees
    assert all(a.methods["holov"].agrees.values()), a.methods["holov"].agrees
    table = demo.format_table(a)
    assert "SCOPE" in table and "HoloV" in table and "saliency top-k" not in table


def test_run_demo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="keep"):
        demo.run_demo(_synthetic_image(), 0, time_backends=False)
    with pytest.raises(ValueError, match="methods"):
        demo.run_demo(_synthetic_image(), 4, "fastv", time_backends=False)
    with pytest.raises(ValueError, match="HxWx3"):
        demo.run_demo(torch.zeros(10, 10), 4, time_backends=False)


def test_import_vtprune_stays_light():
    code = "import sys, vtprune; bad = [m for m in ('matplotlib', 'PIL', 'skimage', 'vtprune.demo', 'vtprune.cli') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(vtprune.__file__).resolve().parents[1]), env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- vtprune info


def test_info_lists_versions_and_every_backends_ops():
    from vtprune import cli

    proc = _run_cli("info", timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for key in ("CUDA", "transformers", "TRITON_INTERPRET"):
        assert any(line.startswith(key) for line in lines), f"{key!r} missing:\n{proc.stdout}"
    ops_at = next(i for i, line in enumerate(lines) if line.startswith("ops each backend implements"))
    listed = {line.split()[0]: line for line in lines[ops_at + 1 :] if line.startswith("  ")}
    assert set(listed) == set(_dispatch.BACKENDS), proc.stdout
    for name in _dispatch.BACKENDS:
        for op in _dispatch._ops(name):
            assert op in listed[name], (name, op, listed[name])
    assert cli._cuda_version(12080) == "12.8" and cli._cuda_version(0) == "none"


# ----------------------------------------------------------------------------- vtprune check


def _check(capsys, *args: str) -> tuple[int, str]:
    """``vtprune check ARGS`` in this process (CPU tensors, so it runs the same with or without a GPU)."""
    from vtprune import cli

    code = cli.main(["check", "--device", "cpu", *args])
    return code, capsys.readouterr().out


def _rows(out: str) -> dict[tuple[str, str, str], str]:
    """The check table as {(op, backend, dtype): result}."""
    rows = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[4] in ("pass", "FAIL") and parts[3].isdigit():
            rows[(parts[0], parts[1], parts[2])] = parts[4]
    return rows


def test_check_quick_passes_on_cpu():
    """What a CPU-only user gets: the torch backend, every op, every dtype, exit 0."""
    # a user who did not ask for the Triton interpreter (conftest sets it for this process)
    proc = _run_cli("check", "--quick", "--device", "cpu", timeout=300, unset=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(proc.stdout)
    for op in _dispatch._ops("torch"):
        for dtype in ("float32", "float16", "bfloat16", "float64"):
            assert rows.get((op, "torch", dtype)) == "pass", (op, dtype, proc.stdout)
    assert not any(backend == "triton" for _, backend, _ in rows), proc.stdout
    assert "not checked: triton" in proc.stdout or torch.cuda.is_available()
    assert "all " in proc.stdout and " rows passed" in proc.stdout


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU backends cannot be checked here")
def test_check_quick_passes_on_the_gpu():
    """What a user runs after installing on their GPU: every usable backend on CUDA tensors."""
    proc = _run_cli("check", "--quick", "--device", "cuda", timeout=600, unset=("TRITON_INTERPRET",))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = _rows(proc.stdout)
    for name in ("torch", "triton", "cuda"):
        if _dispatch.status(name).usable:
            for op in _dispatch._ops(name):
                assert rows.get((op, name, "float32")) == "pass", (name, op, proc.stdout)


def _wrong_last_pick(real):
    """A SCOPE impl whose picks stay valid (distinct, in range) but whose last pick is not greedy."""

    def broken(tokens, saliency, k, alpha, combine, lengths, sorted_):
        out = real(tokens, saliency, k, alpha, combine, lengths, sorted_).clone()
        n = tokens.shape[1]
        for b in range(out.shape[0]):
            nb = n if lengths is None else int(lengths[b])
            unused = sorted(set(range(nb)) - set(out[b].tolist()))
            if unused:
                out[b, -1] = unused[0]
        return out

    return broken


def test_check_catches_wrong_indices(capsys, monkeypatch):
    table = _dispatch._ops("torch")
    monkeypatch.setitem(table, "scope_select", _wrong_last_pick(table["scope_select"]))
    code, out = _check(capsys, "--quick", "--backends", "torch", "--ops", "scope_select,crop_topk", "--dtypes", "float32")
    assert code == 1, out
    rows = _rows(out)
    assert rows[("scope_select", "torch", "float32")] == "FAIL", out
    assert rows[("crop_topk", "torch", "float32")] == "pass", out  # the others are not dragged down
    line = next(line for line in out.splitlines() if line.startswith("scope_select "))
    assert "failed; first: [" in line and "step" in line, line
    assert "FAILED: 1 of 2 rows (scope_select/torch/float32)" in out


@pytest.mark.parametrize("op", ["coverage_max_sim", "attention_importance"])
def test_check_catches_perturbed_values(op, capsys, monkeypatch):
    table = _dispatch._ops("torch")
    real = table[op]
    monkeypatch.setitem(table, op, lambda *args: real(*args) * (1 + 1e-4))
    code, out = _check(capsys, "--quick", "--backends", "torch", "--ops", op, "--dtypes", "float32,bfloat16")
    assert code == 1, out
    assert _rows(out) == {(op, "torch", "float32"): "FAIL", (op, "torch", "bfloat16"): "FAIL"}, out
    assert "above 2 x PyTorch's" in out


def test_check_catches_a_crashing_and_an_unchecked_op(capsys, monkeypatch):
    table = _dispatch._ops("torch")

    def crash(*args):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(table, "crop_budgets", crash)
    monkeypatch.setitem(table, "mystery_op", lambda *args: None)  # e.g. added to a backend, no rule yet
    code, out = _check(capsys, "--quick", "--backends", "torch", "--ops", "crop_budgets,mystery_op", "--dtypes", "float32")
    assert code == 1, out
    assert _rows(out) == {("crop_budgets", "torch", "float32"): "FAIL", ("mystery_op", "torch", "float32"): "FAIL"}
    assert "RuntimeError: kernel exploded" in out and "no check is defined for 'mystery_op'" in out


def test_check_json_schema(capsys, tmp_path):
    path = tmp_path / "out" / "check.json"
    code, out = _check(
        capsys, "--quick", "--backends", "torch", "--ops", "crop_budgets,coverage_max_sim,scope_select",
        "--dtypes", "float32,float64", "--seed", "3", "--json", str(path),
    )
    assert code == 0, out
    report = json.loads(path.read_text())
    assert {"vtprune", "python", "torch", "device", "device_name", "triton_interpret", "dtypes", "seed", "trials",
            "quick", "passed", "seconds", "results", "not_checked", "not_applicable"} <= set(report)
    assert report["passed"] is True and report["seed"] == 3 and report["device"] == "cpu"
    assert report["dtypes"] == ["float32", "float64"] and report["quick"] is True
    assert len(report["results"]) == 6
    keys = {"op", "backend", "dtype", "rule", "cases", "failed", "passed", "worst_error", "worst_bound",
            "near_tie_notes", "first_failure", "seconds"}
    for row in report["results"]:
        assert set(row) == keys, row
        assert row["backend"] == "torch" and row["passed"] and row["failed"] == 0 and row["cases"] >= 1
        assert row["first_failure"] is None and isinstance(row["near_tie_notes"], list)
        numeric = row["op"] == "coverage_max_sim"
        assert (row["worst_error"] is not None) == numeric, row
        if numeric:
            assert 0 <= row["worst_error"] <= row["worst_bound"]


def test_check_is_deterministic_per_seed(capsys, tmp_path):
    args = ("--quick", "--backends", "torch", "--ops", "scope_select,holov_select", "--dtypes", "bfloat16", "--seed", "7")
    reports = []
    for i in range(2):
        _check(capsys, *args, "--json", str(tmp_path / f"{i}.json"))
        rows = json.loads((tmp_path / f"{i}.json").read_text())["results"]
        reports.append([{k: v for k, v in row.items() if k != "seconds"} for row in rows])
    assert reports[0] == reports[1]


def test_check_nothing_to_check_and_bad_arguments(capsys):
    code, out = _check(capsys, "--backends", "cuda", "--dtypes", "float32")  # cuda never takes CPU tensors
    assert code == 1 and "FAILED: nothing was checked" in out
    from vtprune import cli

    assert cli.main(["check", "--device", "cpu", "--dtypes", "float8"]) == 2
    assert "dtypes must be drawn from" in capsys.readouterr().err
    assert cli.main(["check", "--device", "cpu", "--backends", "reference"]) == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["check", "--trials", "0"])
    assert exc.value.code == 2


def test_check_triton_in_the_interpreter(capsys):
    """The Triton kernels through `vtprune check` on CPU tensors (TRITON_INTERPRET=1, set by conftest)."""
    if not _dispatch.triton_interpret():
        pytest.skip("TRITON_INTERPRET is not set (a GPU is present: the Triton kernels are checked on it instead)")
    pytest.importorskip("triton")
    code, out = _check(capsys, "--quick", "--backends", "triton", "--ops", "coverage_max_sim,scope_select", "--dtypes", "float32")
    assert code == 0, out
    assert _rows(out) == {("coverage_max_sim", "triton", "float32"): "pass", ("scope_select", "triton", "float32"): "pass"}
    assert "not applicable" not in out and "TRITON_INTERPRET=1" in out


# ----------------------------------------------------------------------------- the shared acceptance rules


def test_verify_scope_rule_accepts_ties_and_rejects_wrong_picks():
    from vtprune._verify import VerificationError, check_scope_picks

    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=g, dtype=torch.float64)
    sal = torch.rand(30, generator=g, dtype=torch.float64)
    want = reference.scope_select(x[None], sal[None], 10, 1.0, "mul", None, False)[0]
    assert check_scope_picks(want, want, x, sal, 1.0, "mul") is None
    wrong = want.clone()
    wrong[3] = next(v for v in range(30) if v not in want.tolist())
    with pytest.raises(VerificationError, match="diverge from the reference at step 3"):
        check_scope_picks(wrong, want, x, sal, 1.0, "mul")
    # identical tokens at alpha = 0: every step is an exact tie, so any order of valid picks passes
    same = torch.ones(6, 4, dtype=torch.float64)
    note = check_scope_picks(torch.tensor([5, 4, 3]), torch.tensor([0, 1, 2]), same, torch.ones(6), 0.0, "mul")
    assert note is not None and "near-tie at step 0" in note
    # an infinite saliency: its token wins step 0 alone (no tie there), and the duplicates 1 and 2
    # tie next; equal infinite scores must not turn the check's arithmetic into NaN
    x2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    sal2 = torch.tensor([float("inf"), 1.0, 1.0, 0.1])
    assert "near-tie at step 1" in check_scope_picks([0, 2], [0, 1], x2, sal2, 1.0, "mul")
    with pytest.raises(VerificationError, match="step 0"):
        check_scope_picks([1, 0], [0, 1], x2, sal2, 1.0, "mul")
    # scores far below the first ones differ by fp32 rounding alone: within the absolute slack of
    # N-term fp32 sums (1e-6 N per unit of weight) they are near-ties, as assert_same_greedy has it
    from vtprune._verify import first_near_tie

    tiny = torch.tensor([[1.0, 0.0], [1.0, 1e-4], [1.0, 4e-4], [0.0, 1.0]], dtype=torch.float64)  # step 2: 4e-8 vs 8e-8
    assert first_near_tie(tiny, torch.ones(4, dtype=torch.float64), [0, 3, 2], 1.0, "mul") == 2


def test_verify_holov_near_tie_and_error_rule():
    from vtprune._verify import VerificationError, check_error_vs_torch, holov_near_tie

    g = torch.Generator().manual_seed(1)
    x = torch.randn(97, 16, generator=g, dtype=torch.float64)
    attn = torch.rand(97, generator=g, dtype=torch.float64)
    assert holov_near_tie(x, attn, 20, None, 0.09, "score") is None
    # two identical crops: equal weights, and the odd leftover token goes to the first by the tie rule
    half = torch.randn(10, 16, generator=g, dtype=torch.float64)
    why = holov_near_tie(torch.cat([half, half]), torch.rand(10, generator=g, dtype=torch.float64).repeat(2), 5, 2, 0.09, "attn")
    assert why is not None and "crop" in why
    want = torch.tensor([1.0, 2.0], dtype=torch.float64)
    same = want + torch.tensor([1e-7, 0.0], dtype=torch.float64)
    assert check_error_vs_torch(want + 1e-7, want, same, floor=0.0) == pytest.approx((1e-7, 1e-7))
    with pytest.raises(VerificationError, match="above 2 x"):
        check_error_vs_torch(want + 3e-7, want, same, floor=0.0)


# ----------------------------------------------------------------------------- the demo figure


def test_demo_figure_has_maps_side_by_side_and_one_curve_panel():
    pytest.importorskip("matplotlib")
    res = demo.run_demo(_synthetic_image(), 20, "scope,topk", time_backends=False, device="cpu")
    assert list(res.methods) == ["scope", "topk"]
    fig = demo.make_figure(res)
    axes = fig.axes
    assert len(axes) == 2 + len(res.methods)  # saliency, one map per method, the curves
    assert "saliency" in axes[0].get_title()
    for ax, method in zip(axes[1:-1], res.methods):
        assert ax.get_title().startswith(f"{demo.LABELS[method]}: keep 20/576") and len(ax.get_images()) == 1
    curves = axes[-1]
    assert "θ-coverage vs θ" in curves.get_title() and "θ" in curves.get_xlabel()
    lines = {line.get_label(): line for line in curves.get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {demo.LABELS[m] for m in res.methods}
    for method, r in res.methods.items():
        xs, ys = lines[demo.LABELS[method]].get_data()
        assert list(xs) == list(demo.THETA_GRID) and list(ys) == r.theta_curve
        assert all(a >= b for a, b in zip(r.theta_curve, r.theta_curve[1:])), "coverage cannot grow with θ"
        for th in demo.THETAS:  # the table's numbers sit on the curve
            assert r.theta_curve[demo.THETA_GRID.index(th)] == r.theta_coverage[th]
    assert res.methods["scope"].theta_curve[demo.THETA_GRID.index(0.7)] > res.methods["topk"].theta_curve[demo.THETA_GRID.index(0.7)]


def test_demo_method_list_parsing():
    from vtprune import cli

    parser = cli.build_parser()
    assert parser.parse_args(["demo", "--method", "holov,scope"]).method == "holov,scope"
    with pytest.raises(SystemExit):
        parser.parse_args(["demo", "--method", "scope,fastv"])
    assert list(demo.run_demo(_synthetic_image(), 5, "holov,scope", time_backends=False, device="cpu").methods) == ["holov", "scope"]
