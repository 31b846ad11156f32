"""The case type of the token-selection benchmarks (SCOPE, HoloV)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """One benchmark case: ``B`` images of ``N`` tokens of width ``D``, keep ``k``."""

    name: str
    b: int
    n: int
    d: int
    k: int
    #: Run only on a GPU (on the CPU the table gets a "skipped" row saying so).
    gpu_only: bool = False

    def label(self) -> str:
        return f"{self.name} B={self.b} N={self.n} D={self.d} k={self.k}"

    def params(self) -> dict[str, int]:
        return {"B": self.b, "N": self.n, "D": self.d, "k": self.k}
