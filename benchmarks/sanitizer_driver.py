"""Call every GPU kernel of vtprune once per odd size, for compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 benchmarks/sanitizer_driver.py

Covers the ``cuda`` backend's kernels and (``--triton``) the Triton kernels, on sizes that
do not divide any tile (N = 1, 7, 97, 577), with padding (``lengths``) and each input
dtype. Each result is checked against the torch backend so a kernel that writes nothing,
or garbage, fails here too; the exit code is non-zero on any mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch

import vtprune
from vtprune._dispatch import implements

SIZES = (1, 7, 97, 577)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _inputs(b: int, n: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g).to("cuda", dtype)
    s = torch.rand(b, n, generator=g).to("cuda", dtype)
    lengths = torch.tensor([n] + [max(1, n - 3 * i) for i in range(1, b)], dtype=torch.int64)
    return x, s, lengths


def _valid_selection(idx: torch.Tensor, k: int, limits: list[int]) -> bool:
    """``idx [B, k]``: k distinct indices per row, row b inside [0, limits[b])."""
    if idx.shape != (len(limits), k):
        return False
    return all(len(set(row)) == k and all(0 <= v < lim for v in row) for row, lim in zip(idx.tolist(), limits))


def run_cuda_scope_paths() -> int:
    """The CUDA SCOPE kernel's other paths: S in fp16 (N > 4096), the per-image state in the global
    workspace, a changed-row list applied several times per step, and (sm_90) the cluster kernel
    csrc/scope_cluster.cu at every cluster size, with its column slices in shared and global memory.

    On an H100 the state leaves shared memory only above ~18K tokens (S alone would be ~650 MiB per
    image, very slow under the sanitizer), so that instantiation is forced with the kernel's test
    knob at the odd sizes instead; it is the same code as the natural large-N path.
    """
    from vtprune import _cuda

    checks = []
    clusters = torch.cuda.get_device_capability()[0] >= 9  # the cluster kernel needs sm_90
    if not clusters:
        print("note: no thread-block clusters on this GPU; the cluster kernel is not exercised", file=sys.stderr)
    for n in SIZES + (1500,):
        x, s, lengths = _inputs(3, n, 33, torch.float32, seed=n + 1)
        k = max(1, int(lengths.min()) // 2)
        limits = lengths.tolist()
        base = _cuda.scope_select(x, s, k, 1.0, "mul", lengths, False)
        ascending = base.sort(dim=1).values  # what the kernels' own sorted output must be
        checks.append((f"scope sorted N={n}", torch.equal(_cuda.scope_select(x, s, k, 1.0, "mul", lengths, True), ascending)))
        # the weights read in the kernel: 16-bit saliency rows with a stride other than N; unit weights
        wide = torch.cat([s, s[:, :5]], dim=1).to(torch.bfloat16)
        for alpha in (1.0, 0.0):
            got = _cuda.scope_select(x, wide[:, :n], k, alpha, "add", lengths, False)
            checks.append((f"scope bf16-saliency alpha={alpha} N={n}", _valid_selection(got, k, limits)))
        for name, opts in (
            ("global-state", dict(force_global_state=True)),
            ("fp16-S", dict(similarity_dtype=torch.float16)),
            ("fp16-S-global-state", dict(similarity_dtype=torch.float16, force_global_state=True)),
            ("list-1024", dict(max_list=1024)),
            ("list-1024-global-state", dict(max_list=1024, force_global_state=True)),
        ):
            got = _cuda.scope_select(x, s, k, 1.0, "add" if "fp16" in name else "mul", lengths, False, **opts)
            ok = _valid_selection(got, k, limits)
            if name == "global-state":
                ok = ok and torch.equal(got, base)  # the same arithmetic, only elsewhere
            checks.append((f"scope {name} N={n}", ok))
        if clusters:
            # the cluster kernel: every size, slices in shared memory (where they fit) and streamed;
            # its picks are the single-CTA kernel's bit for bit (same arithmetic, same order)
            for size in _cuda.CLUSTER_SIZES:
                for force in (False, True):
                    got = _cuda.scope_select(x, s, k, 1.0, "mul", lengths, False, cluster_size=size, force_global_state=force)
                    checks.append((f"scope cluster C={size} stream={force} N={n}", torch.equal(got, base)))
                    # sorted: every CTA of the cluster writes its own part of each row
                    got = _cuda.scope_select(x, s, k, 1.0, "mul", lengths, True, cluster_size=size, force_global_state=force)
                    checks.append((f"scope cluster sorted C={size} stream={force} N={n}", torch.equal(got, ascending)))
    # N > 4096: S stored in fp16 by the default path (one image padded, one mixed-storage batch)
    for lens in ([4099, 4097], [4099, 1000]):
        x, s, _ = _inputs(2, 4099, 8, torch.float16, seed=4099)
        got = vtprune.fused_scope_select(x, s, 16, lengths=torch.tensor(lens), backend="cuda")
        checks.append((f"scope fp16-S N=4099 lengths={lens}", _valid_selection(got, 16, lens)))
    return _report("cuda", checks)


def run_cuda_similarity() -> int:
    """The fused SCOPE similarity (csrc/similarity.cu) at odd sizes: fp16/bf16 tokens, D = 33 (scalar
    loads, a partial feature chunk) and D = 160 (16-byte loads, three chunks), contiguous and with
    strided rows, fp32 and fp16 storage. Each S must match the torch path's to within a few fp32
    ulps (one fp16 rounding more for fp16 storage)."""
    from vtprune import _cuda
    from vtprune.similarity import scope_similarity

    checks = []
    for n in SIZES + (1500,):
        for dtype in (torch.float16, torch.bfloat16):
            for d in (33, 160):
                x, _, _ = _inputs(2, 2 * n, d, dtype, seed=3 * n + d)
                for name, tokens in (("contiguous", x[:, :n]), ("strided", x[:, ::2])):
                    for storage, tol in ((torch.float32, 1e-5), (torch.float16, 2.0**-10)):
                        got = _cuda.scope_similarity(tokens, storage)
                        want = scope_similarity(tokens, storage)
                        ok = got.dtype == storage and bool(((got.float() - want.float()).abs().max() <= tol).item())
                        checks.append((f"scope_similarity N={n} D={d} {dtype} {name} -> {storage}", ok))
    return _report("cuda", checks)


def _report(label: str, checks: list[tuple[str, bool]]) -> int:
    """Print each failed check to stderr and return how many failed."""
    failures = 0
    for op, ok in checks:
        if not ok:
            failures += 1
            print(f"FAIL {label} {op}", file=sys.stderr)
    torch.cuda.synchronize()
    return failures


# Per-backend seed factor and output-order parity of the HoloV sweep: the two backends see
# different inputs and opposite `sorted` flags per crop count, so together they cover more cases.
_HOLOV_SWEEP = {"cuda": (7, 0, 0), "triton": (11, 1, 1)}


def run_holov(backend: str) -> int:
    """The HoloV kernels of ``backend`` at odd sizes with padding (``lengths``), every dtype,
    D = 33 (scalar loads, one partial feature chunk) and D = 160 (16-byte loads, several chunks),
    crop counts default / 1 / a middle one / N (one-token crops, budgets overflowing their crops),
    both rank keys and both output orders; then crop_budgets (with NaN and negative weights) and
    crop_topk alone. Every result must be a valid selection; fp32 picks and all budgets and top-k
    results must equal the torch backend's.
    """
    seed_factor, sorted_parity, w_seed_offset = _HOLOV_SWEEP[backend]
    checks = []
    for n in SIZES:
        for dtype in DTYPES:
            for d in (33, 160):
                x, s, lengths = _inputs(3, n, d, dtype, seed=seed_factor * n + d)
                limits = lengths.tolist()
                n_min = min(limits)
                k = max(1, n_min // 2)
                counts = list(dict.fromkeys([None, 1, max(1, n_min // 3), n_min]))
                for i, crops in enumerate(counts):
                    for rank_by in ("attn", "score"):
                        kwargs = dict(num_crops=crops, rank_by=rank_by, lengths=lengths, sorted=i % 2 == sorted_parity)
                        got = vtprune.holov_select(x, s, k, backend=backend, **kwargs)
                        ok = _valid_selection(got, k, limits)
                        if dtype == torch.float32:
                            ok = ok and torch.equal(got, vtprune.holov_select(x, s, k, backend="torch", **kwargs))
                        checks.append((f"holov_select N={n} D={d} {dtype} C={crops} {kwargs}", ok))
            # the two building blocks alone, on the crops of each image
            crops = max(1, n_min // 3)
            sizes = torch.tensor([[length // crops + (c < length % crops) for c in range(crops)] for length in limits])
            w = torch.rand(3, crops, generator=torch.Generator().manual_seed(n + w_seed_offset)).to("cuda", dtype)
            w[2, ::2] = float("nan")
            w[1, ::3] = -0.5
            budgets = vtprune.crop_budgets(w, k, sizes.cuda(), backend=backend)
            want = vtprune.crop_budgets(w, k, sizes.cuda(), backend="torch")
            checks.append((f"crop_budgets N={n} C={crops} {dtype}", torch.equal(budgets, want)))
            for srt in (True, False):
                got = vtprune.crop_topk(s, sizes.cuda(), want, k=k, sorted=srt, backend=backend)
                ref = vtprune.crop_topk(s, sizes.cuda(), want, k=k, sorted=srt, backend="torch")
                checks.append((f"crop_topk N={n} C={crops} {dtype} sorted={srt}", torch.equal(got, ref)))
    return _report(backend, checks)


def run(backend: str) -> int:
    results = []
    for n in SIZES:
        for dtype in DTYPES:
            x, s, lengths = _inputs(3, n, 33, dtype, seed=n)
            k = max(1, min(n, int(lengths.min())) // 2)
            checks = []
            if implements(backend, "scope_select"):
                got = vtprune.fused_scope_select(x, s, k, lengths=lengths, backend=backend)
                checks.append(("scope_select", _valid_selection(got, k, lengths.tolist())))
                cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
                idx, cu_k = vtprune.scope_select_varlen(x[:2].reshape(2 * n, -1), s[:2].reshape(-1), cu, k, backend=backend)
                ok = idx.numel() == 2 * k and _valid_selection((idx.view(2, k) - idx.new_tensor([[0], [n]])), k, [n, n])
                checks.append(("scope_select_varlen", ok))
            if implements(backend, "coverage_max_sim"):
                idx = torch.randint(0, int(lengths.min()), (3, k), generator=torch.Generator().manual_seed(n)).cuda()
                got = vtprune.facility_location(x, idx, lengths=lengths, backend=backend)
                want = vtprune.facility_location(x, idx, lengths=lengths, backend="torch")
                checks.append(("facility_location", bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))))
            results += [(f"{op} N={n} {dtype}", ok) for op, ok in checks]
    return _report(backend, results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton", action="store_true", help="also run the Triton kernels (slow under the sanitizer)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("sanitizer_driver: no GPU", file=sys.stderr)
        return 2
    backends = ["cuda"] + (["triton"] if args.triton else [])
    failures = sum(run(b) for b in backends if vtprune.backends()[b].usable)
    if vtprune.backends()["cuda"].usable:
        failures += run_cuda_scope_paths()
        failures += run_cuda_similarity()
        failures += run_holov("cuda")
    if args.triton and vtprune.backends()["triton"].usable:
        failures += run_holov("triton")
    print(f"sanitizer_driver: {failures} failures over backends {backends}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
