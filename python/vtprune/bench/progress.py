"""A progress bar on stderr for long benchmark runs, off when stderr is not a terminal.

Drawn by tqdm when it is installed, else by a small bar of our own; either way the result
lines go to stdout through :meth:`Progress.write`, which keeps them from tearing the bar.
"""

from __future__ import annotations

import shutil
import sys
from typing import TextIO


class Progress:
    """``total`` steps; :meth:`step` advances one with a label, :meth:`write` prints a line."""

    def __init__(
        self,
        total: int,
        desc: str = "",
        stream: TextIO | None = None,
        enabled: bool | None = None,
        use_tqdm: bool | None = None,
        out: TextIO | None = None,
    ) -> None:
        self.total, self.done, self.desc = total, 0, desc
        self.stream = stream if stream is not None else sys.stderr
        self.out = out if out is not None else sys.stdout
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self._tqdm = None
        if self.enabled and use_tqdm is not False:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self._tqdm = tqdm(total=total, desc=desc, file=self.stream, leave=False, dynamic_ncols=True)
        self._label = ""

    def step(self, label: str = "") -> None:
        """Count one step as started (the label names what is running now)."""
        if self.done < self.total:
            self.done += 1
        self._label = label
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(label, refresh=False)
            self._tqdm.update(1)
        else:
            self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = shutil.get_terminal_size((80, 20)).columns
        frac = self.done / self.total if self.total else 1.0
        bar_w = 24
        filled = int(round(bar_w * frac))
        text = f"{self.desc} [{'#' * filled}{'.' * (bar_w - filled)}] {self.done}/{self.total} {self._label}"
        self.stream.write("\r" + text[: width - 1].ljust(width - 1))
        self.stream.flush()

    def _clear(self) -> None:
        if self.enabled and self._tqdm is None:
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def write(self, line: str) -> None:
        """Print ``line`` to stdout, above the bar."""
        if self._tqdm is not None:
            self._tqdm.write(line, file=self.out)
            return
        self._clear()
        print(line, file=self.out, flush=True)
        self._draw()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            self._clear()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
