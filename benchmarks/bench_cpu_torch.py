"""CPU timings of the torch backend against the official algorithms' loops.

    python benchmarks/bench_cpu_torch.py            # both ops, default shapes
    python benchmarks/bench_cpu_torch.py --repeat 7 --only scope

SCOPE: ``vtprune.reference.reference_loop`` (the official code's dense ``N x N`` work per
greedy step) against ``torch_backend`` ``scope_select`` at B=1, D=1024, (N, k) = (576, 64)
and (2880, 160). The similarity matrix is computed inside both timings. HoloV: a per-image,
per-crop Python loop written the way the official ``HoloV()`` is (one small matmul, eye
mask, mean/variance and ``.item()`` reads per crop, the leftover handed out index by index)
but returning indices (the official code gathers the kept tokens and pads; skipping that only
makes the baseline faster), against ``torch_backend`` ``holov_select``, at B=1, N=576, D=4096,
k=64 (16 crops), once per CPU engine of the torch backend: ``cpp`` (the C++ engine of
``vtprune._cpu``, what ``auto`` runs when it is built) and ``torch`` (its vectorized torch code);
``--holov-engine`` picks one. Both pairs are checked to select the same tokens before any timing.

Timings: after one warm-up each, the baseline runs ``--repeat`` times, then the torch
backend (``--interleave`` alternates them, for a machine other processes load), with
torch's default thread count (``--threads`` sets it for both; the C++ engines use at most
that many threads); the median and the minimum of each are printed with ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vtprune import reference
from vtprune.torch_backend import OPS
from vtprune.torch_backend import holov as holov_mod


def _time_pair(baseline, ours, repeat: int, interleave: bool) -> tuple[float, float, float, float]:
    """``(median baseline, median ours, min baseline, min ours)`` in ms.

    By default each runs ``repeat`` times in a row after a warm-up. ``interleave`` alternates
    them instead, so that load from other processes on a shared machine hits both alike
    (each then also starts with the other's caches and freed memory, which costs the
    shorter run more). The minimum is the better estimate of the unloaded time.
    """
    baseline()  # warm-up: allocator, thread pool, lazy init
    ours()
    tb, to = [], []
    if interleave:
        for _ in range(repeat):
            t0 = time.perf_counter()
            baseline()
            t1 = time.perf_counter()
            ours()
            t2 = time.perf_counter()
            tb.append(t1 - t0)
            to.append(t2 - t1)
    else:
        for fn, out in ((baseline, tb), (ours, to)):
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(tb), 1e3 * statistics.median(to), 1e3 * min(tb), 1e3 * min(to)


# ----------------------------------------------------------------------------- SCOPE


def bench_scope(repeat: int, interleave: bool) -> list[tuple[str, float, float, bool]]:
    rows = []
    for n, k in ((576, 64), (2880, 160)):
        g = torch.Generator().manual_seed(n)
        tokens = torch.randn(1, n, 1024, generator=g)
        saliency = torch.rand(1, n, generator=g)
        base = reference.reference_loop(tokens, saliency, k, 1.0)
        ours = OPS["scope_select"](tokens, saliency, k, 1.0, "mul", None, False)
        same = torch.equal(base, ours)
        # the official loop costs k dense N x N passes (seconds at N = 2880): fewer repeats there
        reps = repeat if n < 1000 else max(1, min(repeat, 3))
        times = _time_pair(
            lambda: reference.reference_loop(tokens, saliency, k, 1.0),
            lambda: OPS["scope_select"](tokens, saliency, k, 1.0, "mul", None, True),
            reps,
            interleave,
        )
        rows.append((f"scope  B=1 N={n} D=1024 k={k}", *times, same))
    return rows


# ----------------------------------------------------------------------------- HoloV


def holov_official_loop(image_tokens: torch.Tensor, attention: torch.Tensor, num_patches: int, k: int) -> torch.Tensor:
    """HoloV as the official code runs it (per image, per crop), returning indices in its order.

    Same steps as ``HoloV()`` of obananas/HoloV: crop list, per-crop normalize / matmul /
    eye mask / mean / variance / scaling, budgets with ``floor`` and a top-k of the weights
    for the leftover (incremented one index at a time), then a ``topk`` by attention inside
    each crop. The only change: it returns the chosen indices instead of gathering the tokens.
    """
    eps = 1e-6
    alpha = 0.09
    batch, n, _ = image_tokens.shape
    out = []
    for b in range(batch):
        image_token = image_tokens[b]
        image_attention = attention[b]
        patch_size = n // num_patches
        remainder = n % num_patches
        token_patches, attn_patches, starts = [], [], []
        start = 0
        for p in range(num_patches):
            size = patch_size + (1 if p < remainder else 0)
            if size > 0:
                token_patches.append(image_token[start : start + size])
                attn_patches.append(image_attention[start : start + size])
                starts.append(start)
            start += size
        patch_scores = []
        for p in range(len(token_patches)):
            pt, pa = token_patches[p], attn_patches[p]
            size = len(pt)
            if size <= 1:
                patch_scores.append(pa.mean())
                continue
            f = pt / (pt.norm(dim=1, keepdim=True) + eps)
            s = torch.mm(f, f.transpose(0, 1))
            s = s * (1 - torch.eye(size))
            mean_sim = s.sum(dim=1) / (size - 1)
            var_sim = ((s - mean_sim.unsqueeze(1)) ** 2).sum(dim=1) / (size - 1)
            scaled = pa * 1e3
            var_scaling = torch.mean(torch.abs(scaled)) / (torch.mean(torch.abs(var_sim)) + eps)
            token_scores = scaled + alpha * (var_sim * var_scaling)
            patch_scores.append(token_scores.mean())
        scores = torch.stack(patch_scores)
        weights = scores / (scores.sum() + eps)
        allocated = (weights * k).floor().long()
        remaining = k - allocated.sum()
        if remaining > 0:
            _, top = torch.topk(weights, k=min(remaining.item(), len(weights)))
            for idx in top[:remaining]:
                allocated[idx] += 1
        picks = []
        for i, (pt, alloc) in enumerate(zip(token_patches, allocated)):
            if alloc <= 0:
                continue
            _, top = torch.topk(attn_patches[i], k=min(alloc.item(), len(pt)))
            picks.append(top + starts[i])
        out.append(torch.cat(picks))
    return torch.stack(out)


def bench_holov(repeat: int, interleave: bool, engines: list[str]) -> list[tuple[str, float, float, bool]]:
    n, d, k = 576, 4096, 64
    crops = reference.default_num_crops(n, k)
    g = torch.Generator().manual_seed(4096)
    tokens = torch.randn(1, n, d, generator=g)
    attn = torch.rand(1, n, generator=g)
    base = holov_official_loop(tokens, attn, crops, k)
    rows = []
    saved = holov_mod._ENGINE
    try:
        for engine in engines:
            holov_mod._ENGINE = engine  # "cpp" raises here if vtprune._cpu is not built
            ours = OPS["holov_select"](tokens, attn, k, None, 0.09, "attn", None, False)
            same = torch.equal(base, ours)
            times = _time_pair(
                lambda: holov_official_loop(tokens, attn, crops, k),
                lambda: OPS["holov_select"](tokens, attn, k, None, 0.09, "attn", None, True),
                repeat,
                interleave,
            )
            rows.append((f"holov  B=1 N={n} D={d} k={k} C={crops} {engine}", *times, same))
    finally:
        holov_mod._ENGINE = saved
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median reported)")
    parser.add_argument("--only", choices=("scope", "holov"), default=None)
    parser.add_argument("--interleave", action="store_true", help="alternate baseline and torch runs (busy machines)")
    parser.add_argument(
        "--holov-engine",
        choices=("cpp", "torch", "both"),
        default=None,
        help="CPU engine(s) of the torch backend's HoloV to time (default: both when vtprune._cpu has it, else torch)",
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads for both sides (default: torch's)"
    )
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.holov_engine is None:
        args.holov_engine = "both" if holov_mod.cpu_engine_status()[0] else "torch"
    holov_engines = ["cpp", "torch"] if args.holov_engine == "both" else [args.holov_engine]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    if args.only in (None, "scope"):
        rows += bench_scope(args.repeat, args.interleave)
    if args.only in (None, "holov"):
        rows += bench_holov(args.repeat, args.interleave, holov_engines)
    print(f"{'':44s} {'median of ' + str(args.repeat) + ' (ms)':>32s}   {'minimum (ms)':>29s}")
    cols = f"{'baseline':>10s} {'torch':>10s} {'ratio':>10s}   {'baseline':>9s} {'torch':>9s} {'ratio':>9s}"
    print(f"{'case':44s} {cols}  same picks")
    for name, med_ref, med_ours, min_ref, min_ours, same in rows:
        print(
            f"{name:44s} {med_ref:10.2f} {med_ours:10.2f} {med_ref / med_ours:9.1f}x"
            f"   {min_ref:9.2f} {min_ours:9.2f} {min_ref / min_ours:8.1f}x  {same}"
        )


if __name__ == "__main__":
    main()
