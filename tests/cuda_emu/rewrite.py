"""Source rewrite that lets g++ compile a CUDA translation unit for the emulator.

Only the two constructs that no header can express are rewritten; everything else (keywords,
builtins, intrinsics, WMMA) comes from the shim headers in ``include/``:

* ``kernel<<<grid, block, smem, stream>>>(args);`` becomes
  ``::emu::launch("kernel", &kernel, ::emu::LaunchConfig(grid, block, smem, stream), args);``
* ``__shared__ [__align__(n)] T name[dims];`` (a static shared variable inside a kernel) becomes a
  reference to per-block storage, ``T (&name)[dims] = *::emu::block_shared<T[dims]>(&key, n, "name");``
  with ``key`` a function-local static, so each declaration of each template instantiation has its
  own storage, shared by the threads of the running block and fresh (poisoned) for every block.
* ``extern __shared__ [__align__(n)] T name[];`` becomes ``T* name = (T*)::emu::dynamic_shared();``.

Line numbers are preserved (a rewritten construct keeps its newlines), so diagnostics and
``__LINE__`` point into the original .cu file, which a ``#line 1`` directive names. Anything the
rewrite does not understand (an unbalanced launch, a ``__shared__`` it cannot parse, a
``__shared__``/``<<<`` left over) raises :class:`RewriteError`.
"""

from __future__ import annotations

import re
from pathlib import Path

__all__ = ["RewriteError", "rewrite_source", "rewrite_file"]


class RewriteError(ValueError):
    """The source uses a construct the rewrite cannot translate faithfully."""


_DYNAMIC_SHARED = re.compile(
    r"extern\s+__shared__\s+(?:__align__\s*\(\s*(?P<align>\d+)\s*\)\s+)?"
    r"(?P<type>[A-Za-z_][\w:]*(?:\s+[A-Za-z_][\w:]*)*?)\s+(?P<name>[A-Za-z_]\w*)\s*\[\s*\]\s*;"
)
_STATIC_SHARED = re.compile(
    r"(?<![\w])__shared__\s+(?:__align__\s*\(\s*(?P<align>\d+)\s*\)\s+)?"
    r"(?P<type>[A-Za-z_][\w:<>,]*(?:\s+[A-Za-z_][\w:<>,]*)*?)\s+(?P<name>[A-Za-z_]\w*)\s*"
    r"(?P<dims>(?:\[[^\[\];]+\]\s*)*);"
)


def _keep_lines(original: str, replacement: str) -> str:
    """``replacement`` followed by as many newlines as ``original`` spans, so lines stay put."""
    if "\n" in replacement:
        raise RewriteError(f"internal: multi-line replacement {replacement!r}")
    return replacement + "\n" * original.count("\n")


def _rewrite_shared(src: str, path: str) -> str:
    def dynamic(m: re.Match) -> str:
        t, name = m["type"], m["name"]
        return _keep_lines(m[0], f"{t}* {name} = static_cast<{t}*>(::emu::dynamic_shared());")

    def static(m: re.Match) -> str:
        t, name, dims = m["type"], m["name"], re.sub(r"\s+", "", m["dims"] or "")
        align = m["align"] or "0"
        key = f"emu_shared_key_{name}"
        return _keep_lines(
            m[0],
            f'static char {key}; {t} (&{name}){dims} = *::emu::block_shared<{t}{dims}>(&{key}, {align}, "{name}");',
        )

    src = _DYNAMIC_SHARED.sub(dynamic, src)
    src = _STATIC_SHARED.sub(static, src)
    for m in re.finditer(r"\b__shared__\b", src):
        line = src.count("\n", 0, m.start()) + 1
        raise RewriteError(f"{path}:{line}: a __shared__ declaration the rewrite does not understand")
    return src


def _match(src: str, at: int, open_ch: str, close_ch: str, step: int) -> int:
    """Index of the bracket matching the one at ``at``: scanning forwards from an ``open_ch``
    (``step=1``) or backwards from a ``close_ch`` (``step=-1``)."""
    depth = 0
    stop = len(src) if step > 0 else -1
    for i in range(at, stop, step):
        if src[i] == open_ch:
            depth += step
        elif src[i] == close_ch:
            depth -= step
        if depth == 0:
            return i
    raise RewriteError(f"unbalanced {open_ch}{close_ch} around a kernel launch")


def _split_top_level(text: str) -> list[str]:
    """Comma-separated parts of ``text`` outside (), [], {} (template angle brackets are not
    tracked; a launch configuration with a top-level ``<`` comparison is rejected by the caller)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _rewrite_launches(src: str, path: str) -> str:
    out = []
    pos = 0
    while True:
        at = src.find("<<<", pos)
        if at < 0:
            out.append(src[pos:])
            break
        line = src.count("\n", 0, at) + 1
        # The kernel expression: an identifier (with ::) optionally followed by <template args>.
        i = at - 1
        while i >= 0 and src[i].isspace():
            i -= 1
        name_end = i + 1
        if src[i] == ">":
            i = _match(src, i, "<", ">", -1) - 1
            while i >= 0 and src[i].isspace():
                i -= 1
        j = i
        while j >= 0 and (src[j].isalnum() or src[j] in "_:"):
            j -= 1
        name_start = j + 1
        kernel = src[name_start:name_end]
        if not re.fullmatch(r"[A-Za-z_][\w:]*\s*(<.*>)?", kernel, flags=re.S):
            raise RewriteError(f"{path}:{line}: cannot parse the kernel of a <<< launch: {kernel!r}")
        close = src.find(">>>", at + 3)
        if close < 0:
            raise RewriteError(f"{path}:{line}: <<< without >>>")
        config = src[at + 3 : close]
        if config.count("(") != config.count(")") or "<<<" in config:
            raise RewriteError(f"{path}:{line}: cannot parse the launch configuration {config!r}")
        parts = _split_top_level(config)
        if not 2 <= len(parts) <= 4 or any(not p for p in parts):
            raise RewriteError(f"{path}:{line}: a launch configuration needs 2 to 4 parts, got {config!r}")
        k = close + 3
        while k < len(src) and src[k].isspace():
            k += 1
        if k >= len(src) or src[k] != "(":
            raise RewriteError(f"{path}:{line}: no argument list after >>>")
        args_end = _match(src, k, "(", ")", 1)
        args = src[k + 1 : args_end].strip()
        semi = args_end + 1
        while semi < len(src) and src[semi].isspace():
            semi += 1
        if semi >= len(src) or src[semi] != ";":
            raise RewriteError(f"{path}:{line}: a kernel launch must be a statement of its own")
        original = src[name_start : semi + 1]
        flat_kernel = re.sub(r"\s+", " ", kernel)
        flat_args = re.sub(r"\s+", " ", args)
        flat_config = re.sub(r"\s+", " ", config.strip())
        call = f'::emu::launch("{flat_kernel}", &{flat_kernel}, ::emu::LaunchConfig({flat_config})'
        call += f", {flat_args});" if flat_args else ");"
        out.append(src[pos:name_start])
        out.append(_keep_lines(original, call))
        pos = semi + 1
    result = "".join(out)
    if ">>>" in result:
        line = result.count("\n", 0, result.find(">>>")) + 1
        raise RewriteError(f"{path}:{line}: a >>> the rewrite did not consume")
    return result


def rewrite_source(src: str, path: str) -> str:
    """The emulator form of the CUDA source ``src`` (read from ``path``, named in diagnostics)."""
    body = _rewrite_launches(_rewrite_shared(src, path), path)
    if body.count("\n") != src.count("\n"):
        raise RewriteError(f"{path}: internal: the rewrite moved lines")
    return f'#line 1 "{path}"\n' + body


def rewrite_file(source: Path, dest: Path, display: str | None = None) -> None:
    """Rewrite ``source`` into ``dest`` (a .cpp for g++)."""
    text = source.read_text()
    dest.write_text(rewrite_source(text, display or str(source)))
