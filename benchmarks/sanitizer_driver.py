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


def run(backend: str) -> int:
    failures = 0
    for n in SIZES:
        for dtype in DTYPES:
            x, s, lengths = _inputs(3, n, 33, dtype, seed=n)
            k = max(1, min(n, int(lengths.min())) // 2)
            checks = []
            if implements(backend, "scope_select"):
                got = vtprune.fused_scope_select(x, s, k, lengths=lengths, backend=backend)
                checks.append(("scope_select", got.shape == (3, k) and bool((got >= 0).all())))
                cu = torch.tensor([0, n, 2 * n], dtype=torch.int32)
                idx, cu_k = vtprune.scope_select_varlen(x[:2].reshape(2 * n, -1), s[:2].reshape(-1), cu, k, backend=backend)
                checks.append(("scope_select_varlen", idx.numel() == 2 * k))
            if implements(backend, "coverage_max_sim"):
                idx = torch.randint(0, int(lengths.min()), (3, k), generator=torch.Generator().manual_seed(n)).cuda()
                got = vtprune.facility_location(x, idx, lengths=lengths, backend=backend)
                want = vtprune.facility_location(x, idx, lengths=lengths, backend="torch")
                checks.append(("facility_location", bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3))))
            for op, ok in checks:
                if not ok:
                    failures += 1
                    print(f"FAIL {backend} {op} N={n} {dtype}", file=sys.stderr)
    torch.cuda.synchronize()
    return failures


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triton", action="store_true", help="also run the Triton kernels (slow under the sanitizer)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("sanitizer_driver: no GPU", file=sys.stderr)
        return 2
    backends = ["cuda"] + (["triton"] if args.triton else [])
    failures = sum(run(b) for b in backends if vtprune.backends()[b].usable)
    print(f"sanitizer_driver: {failures} failures over backends {backends}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
