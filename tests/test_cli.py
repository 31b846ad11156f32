"""The ``vtprune`` command line: ``info`` and ``demo`` (run as ``python -m vtprune``), and the demo's selections."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vtprune
from vtprune import _dispatch, demo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m vtprune ARGS`` with this checkout's vtprune importable, whatever the install state."""
    env = dict(os.environ)
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
