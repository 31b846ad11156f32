"""``vtprune demo``: SCOPE, HoloV and saliency top-k on the patch tokens of a real photo.

The photo is resized and centre-cropped to 336x336 and cut into 14-px patches, the 24x24 = 576
token grid of CLIP ViT-L/14-336 (the vision tower of LLaVA-1.5). Instead of CLIP features, each
patch gets a few dozen hand-made ones (colour, gradient and texture statistics, standardized
over the image), and instead of CLS attention a spectral-residual saliency map (Hou & Zhang,
CVPR 2007) averaged per patch. That keeps the demo free of model weights while giving the
selection ops the same shapes and the same kind of signal they see in a multimodal LLM.

:func:`run_demo` does the work and returns plain data; :func:`main` (``vtprune demo``) prints the
table and writes the figure (:func:`make_figure`): the saliency map, the kept-token map of every
chosen method side by side, and one panel with the methods' θ-coverage curves.

The curves plot θ-coverage against θ at the chosen budget (``--keep``): for each θ on
:data:`THETA_GRID`, the share of all tokens whose cosine similarity to some kept token is at least
θ (SPEC §1 ``theta_coverage``, SCOPE's Definition 1). θ is the one free parameter of that
definition, so sweeping it shows the whole measure instead of the three thresholds of the table;
a curve that stays high to larger θ means fewer tokens are left without a close kept stand-in.

Nothing here is imported by ``import vtprune``, and the heavy dependencies (Pillow, scikit-image,
matplotlib) are imported only where they are needed.
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SIZE = 336
PATCH = 14
GRID = IMAGE_SIZE // PATCH  # 24
NUM_TOKENS = GRID * GRID  # 576
THETAS = (0.5, 0.7, 0.9)
#: θ values of the coverage curves: 0 to 1 in steps of 0.025 (the table's THETAS are on it).
THETA_GRID = tuple(i / 40 for i in range(41))
METHODS = ("scope", "holov", "topk")
LABELS = {"scope": "SCOPE", "holov": "HoloV", "topk": "saliency top-k"}
_OPS = {"scope": "scope_select", "holov": "holov_select"}
_INSTALL_HINT = "pip install -e '.[demo]'"


class DemoError(RuntimeError):
    """A problem the user can fix (a missing extra, an unreadable image); printed without a traceback."""


# ----------------------------------------------------------------------------- image


_PIP_NAMES = {"skimage": "scikit-image", "PIL": "pillow", "matplotlib": "matplotlib"}


def _need(module: str, what: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as exc:
        top = module.split(".")[0]
        raise DemoError(
            f"{what} needs {_PIP_NAMES.get(top, top)}, which is not installed ({exc}); "
            f"install the demo extras: {_INSTALL_HINT}"
        ) from exc


def _square(rgb: Tensor) -> Tensor:
    """``HxWx3`` (uint8, or float in [0, 1]) -> float ``[3, 336, 336]``: shorter side to 336, centre crop.

    Resized with antialiased bicubic interpolation in torch, so only decoding a file needs Pillow.
    """
    x = rgb.permute(2, 0, 1).float()
    if rgb.dtype == torch.uint8:
        x = x / 255.0
    height, width = x.shape[1:]
    scale = IMAGE_SIZE / min(width, height)
    new_h, new_w = max(IMAGE_SIZE, round(height * scale)), max(IMAGE_SIZE, round(width * scale))
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (new_h - IMAGE_SIZE) // 2, (new_w - IMAGE_SIZE) // 2
    return x[:, top : top + IMAGE_SIZE, left : left + IMAGE_SIZE].clamp(0, 1).contiguous()


def load_image(image=None) -> tuple[Tensor, str]:
    """The photo as float ``[3, 336, 336]`` in ``[0, 1]`` and a one-line description of it.

    ``image`` is ``None`` (scikit-image's ``astronaut`` sample), a path to any image file Pillow
    reads, a PIL image, or an ``HxWx3`` uint8 (or float in ``[0, 1]``) array or tensor. The
    shorter side is resized to 336 and the centre 336x336 is cropped, as CLIP's preprocessing does.
    """
    if image is None:
        data = _need("skimage.data", "the default photo (scikit-image's astronaut; or pass --image PATH)")
        try:
            image = data.astronaut()
        except Exception as exc:  # noqa: BLE001 - a broken install, not a demo bug
            raise DemoError(f"could not load scikit-image's astronaut sample ({exc}); pass --image PATH") from exc
        source = "astronaut (scikit-image sample)"
    elif isinstance(image, (str, os.PathLike)):
        image_mod = _need("PIL.Image", "reading an image file")
        source = str(image)
        try:
            with image_mod.open(image) as f:
                image = f.convert("RGB")
        except (OSError, ValueError) as exc:
            raise DemoError(f"cannot read image {source!r}: {exc}") from exc
    else:
        source = "image"
    if hasattr(image, "convert") and hasattr(image, "tobytes"):  # a PIL image
        rgb = image.convert("RGB")
        w, h = rgb.size
        arr = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    else:
        arr = torch.as_tensor(image)
    if arr.dim() != 3 or arr.shape[-1] != 3 or min(arr.shape[:2]) < 1:
        raise ValueError(f"image must be a path, a PIL image or an HxWx3 array; got shape {tuple(arr.shape)}")
    height, width = arr.shape[:2]
    return _square(arr), f"{source}, {width}x{height}"


# ----------------------------------------------------------------------------- features


def _patches(x: Tensor) -> Tensor:
    """``[C, 336, 336]`` -> ``[576, C, 196]``, patches in raster order."""
    c = x.shape[0]
    p = x.unfold(1, PATCH, PATCH).unfold(2, PATCH, PATCH)  # [C, 24, 24, 14, 14]
    return p.permute(1, 2, 0, 3, 4).reshape(NUM_TOKENS, c, PATCH * PATCH)


def _conv(gray: Tensor, kernel: list[list[float]]) -> Tensor:
    w = torch.tensor(kernel, dtype=gray.dtype)[None, None]
    return F.conv2d(F.pad(gray[None, None], (1, 1, 1, 1), mode="replicate"), w)[0, 0]


def patch_features(img: Tensor) -> tuple[Tensor, list[str]]:
    """``[576, 30]`` features per patch, standardized per feature over the image, and their names.

    Colour: mean and std of R, G, B; saturation-weighted hue (cos, sin), mean saturation and
    value, saturation std; opponent channels R-G and (R+G)/2-B (mean, std). Structure: Sobel
    gradient magnitude (mean, std), an 8-bin unsigned orientation histogram weighted by
    magnitude, mean |Laplacian|, and the 2x2 layout of brightness inside the patch.
    """
    r, g, b = img[0], img[1], img[2]
    names: list[str] = []
    feats: list[Tensor] = []

    def add(name: str, value: Tensor) -> None:
        names.append(name)
        feats.append(value)

    rgb = _patches(img)  # [576, 3, 196]
    for i, ch in enumerate("RGB"):
        add(f"mean_{ch}", rgb[:, i].mean(-1))
    for i, ch in enumerate("RGB"):
        add(f"std_{ch}", rgb[:, i].std(-1))

    maxc, minc = img.max(0).values, img.min(0).values
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp_min(1e-6), torch.zeros_like(maxc))
    safe = delta.clamp_min(1e-6)
    hue = torch.where(
        maxc == r, ((g - b) / safe) % 6, torch.where(maxc == g, (b - r) / safe + 2, (r - g) / safe + 4)
    ) * (math.pi / 3)
    hsv = _patches(torch.stack([sat * torch.cos(hue), sat * torch.sin(hue), sat, maxc]))
    add("hue_cos", hsv[:, 0].mean(-1))
    add("hue_sin", hsv[:, 1].mean(-1))
    add("mean_sat", hsv[:, 2].mean(-1))
    add("mean_val", hsv[:, 3].mean(-1))
    add("std_sat", hsv[:, 2].std(-1))
    opp = _patches(torch.stack([r - g, (r + g) / 2 - b]))
    add("mean_rg", opp[:, 0].mean(-1))
    add("std_rg", opp[:, 0].std(-1))
    add("mean_yb", opp[:, 1].mean(-1))
    add("std_yb", opp[:, 1].std(-1))

    gray = 0.299 * r + 0.587 * g + 0.114 * b
    gx = _conv(gray, [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gy = _conv(gray, [[-1, -2, -1], [0, 0, 0], [1, 2, 1]])
    mag = torch.sqrt(gx * gx + gy * gy)
    lap = _conv(gray, [[0, 1, 0], [1, -4, 1], [0, 1, 0]]).abs()
    bins = 8
    ori = torch.atan2(gy, gx) % math.pi  # unsigned orientation in [0, pi)
    which = (ori / math.pi * bins).long().clamp_max(bins - 1)
    hist = F.one_hot(which, bins).permute(2, 0, 1).to(mag.dtype) * mag  # [8, H, W]
    struct = _patches(torch.cat([mag[None], lap[None], hist]))  # [576, 10, 196]
    add("grad_mean", struct[:, 0].mean(-1))
    add("grad_std", struct[:, 0].std(-1))
    total = struct[:, 2:].sum(-1)  # [576, 8]
    # Soft normalization: a flat patch keeps a near-zero histogram instead of an amplified noise one.
    total = total / (total.sum(-1, keepdim=True) + 0.5)
    for i in range(bins):
        add(f"orient_{i * 180 // bins}deg", total[:, i])
    add("laplacian", struct[:, 1].mean(-1))
    q = _patches(gray[None])[:, 0].reshape(NUM_TOKENS, 2, PATCH // 2, 2, PATCH // 2).mean(dim=(2, 4))
    q = (q - q.mean(dim=(1, 2), keepdim=True)).reshape(NUM_TOKENS, 4)
    for i, where in enumerate(("top_left", "top_right", "bottom_left", "bottom_right")):
        add(f"layout_{where}", q[:, i])

    x = torch.stack(feats, dim=1)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    return x.contiguous(), names


def spectral_residual_saliency(img: Tensor, size: int = 96, sigma: float = 4.0) -> Tensor:
    """Patch saliency ``[576]`` summing to 1, from the spectral residual of the grey image.

    Hou & Zhang (CVPR 2007): at a coarse scale, the log-amplitude spectrum minus its local
    average is the "unexpected" part of the image; transforming it back with the original phase
    and squaring gives a map that is high on objects that stand out. Blurred, averaged per patch.
    """
    gray = (0.299 * img[0] + 0.587 * img[1] + 0.114 * img[2]).double()
    small = F.interpolate(gray[None, None], size=(size, size), mode="area")[0, 0]
    spec = torch.fft.fft2(small)
    log_amp = torch.log(spec.abs() + 1e-8)
    local = F.avg_pool2d(F.pad(log_amp[None, None], (1, 1, 1, 1), mode="replicate"), 3, stride=1)[0, 0]
    residual = torch.polar(torch.exp(log_amp - local), torch.angle(spec))
    sal = torch.fft.ifft2(residual).abs() ** 2
    radius = int(3 * sigma)
    t = torch.arange(-radius, radius + 1, dtype=sal.dtype)
    g1 = torch.exp(-0.5 * (t / sigma) ** 2)
    g1 = g1 / g1.sum()
    sal = F.pad(sal[None, None], (radius, radius, radius, radius), mode="reflect")
    sal = F.conv2d(F.conv2d(sal, g1.view(1, 1, 1, -1)), g1.view(1, 1, -1, 1))
    sal = F.adaptive_avg_pool2d(sal, GRID)[0, 0].reshape(NUM_TOKENS)
    sal = sal / sal.sum()
    return sal.float()


# ----------------------------------------------------------------------------- selection + timing


@dataclass
class MethodResult:
    """One method's selection, its coverage numbers and its timings."""

    indices: Tensor  # [k] int64, ascending
    backend: str  # what computed ``indices``: the backend "auto" picks ("reference" if auto cannot run the op)
    theta_coverage: dict[float, float]
    facility_location: float
    theta_curve: list[float] = field(default_factory=list)  # θ-coverage at each θ of THETA_GRID
    timings_ms: dict[str, float] = field(default_factory=dict)  # backend -> median ms
    agrees: dict[str, bool] = field(default_factory=dict)  # backend -> same picks as the main one
    skipped: dict[str, str] = field(default_factory=dict)  # backend -> why it was not timed


@dataclass
class DemoResult:
    source: str
    image: Tensor  # [3, 336, 336] in [0, 1]
    tokens: Tensor  # [576, D]
    feature_names: list[str]
    saliency: Tensor  # [576], sums to 1
    keep: int
    device: str
    metric_backend: str  # what computed the coverage numbers
    methods: dict[str, MethodResult]


def _auto_backend(op: str, device: torch.device, dtype: torch.dtype) -> str:
    """What ``backend="auto"`` runs for ``op`` here, or ``"reference"`` if auto cannot run it."""
    from . import _dispatch

    try:
        name, _ = _dispatch.resolve(op, "auto", device, dtype)
        return name
    except Exception:  # noqa: BLE001 - e.g. the torch backend not present in this checkout
        return "reference"


def timing_backends(op: str, device: torch.device, dtype: torch.dtype) -> tuple[list[str], dict[str, str]]:
    """Backends to time for ``op`` on ``device``, and the ones left out with the reason."""
    from . import _dispatch

    names: list[str] = []
    skipped: dict[str, str] = {}
    for name, st in _dispatch.backends().items():
        if not st.usable or _dispatch._device_ok(name, device, dtype) is not None:
            continue
        try:
            if not _dispatch.implements(name, op):
                continue
        except Exception as exc:  # noqa: BLE001 - a backend that fails to import is reported, not fatal
            skipped[name] = f"import failed: {exc}"
            continue
        if name == "triton" and device.type == "cpu":  # only possible under TRITON_INTERPRET=1
            skipped[name] = "runs in the Triton interpreter on CPU tensors, so its time means nothing"
            continue
        names.append(name)
    return names, skipped


def _median_ms(fn: Callable[[], object], device: torch.device, repeat: int) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up (allocations, kernel compilation)
    sync()
    times = []
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _select(method: str, tokens: Tensor, saliency: Tensor, keep: int, backend: str) -> Tensor:
    import vtprune

    if method == "scope":
        return vtprune.fused_scope_select(tokens, saliency, keep, backend=backend)
    if method == "holov":
        return vtprune.holov_select(tokens, saliency, keep, backend=backend)
    # Top-k by saliency; a stable sort breaks ties toward the lowest index, as every vtprune op does.
    order = torch.sort(saliency, descending=True, stable=True).indices[:keep]
    return order.sort().values


def _theta_curve(tokens: Tensor, idx: Tensor, backend: str) -> list[float]:
    """θ-coverage at every θ of :data:`THETA_GRID`, from one ``coverage_max_sim`` call.

    The same op and comparison (``max_sim >= θ``) as :func:`vtprune.theta_coverage`, which would
    recompute the similarities once per θ.
    """
    lengths = torch.tensor([tokens.shape[0]], dtype=torch.int64, device=tokens.device)
    best = torch.ops.vtprune.coverage_max_sim(tokens[None], idx[None], lengths, backend)[0]
    grid = torch.tensor(THETA_GRID, dtype=best.dtype, device=best.device)
    hits = (best[None, :] >= grid[:, None]).sum(dim=1).to(best.dtype)  # in theta_coverage's dtype
    return (hits / tokens.shape[0]).tolist()


def _check_methods(methods: Sequence[str] | str) -> list[str]:
    """``"all"``, one method, a comma-separated list or a sequence -> distinct methods, in order."""
    if isinstance(methods, str):
        methods = list(METHODS) if methods == "all" else [m.strip() for m in methods.split(",")]
    out = []
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods must be drawn from {METHODS} (or 'all'); got {m!r}")
        if m not in out:
            out.append(m)
    if not out:
        raise ValueError("methods must name at least one method")
    return out


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def run_demo(
    image=None,
    keep: int = 64,
    methods: Sequence[str] | str = "all",
    *,
    repeat: int = 5,
    time_backends: bool = True,
    device: str | torch.device | None = "auto",
) -> DemoResult:
    """Select ``keep`` of the 576 patch tokens of ``image`` with each method and measure them.

    Args:
        image: ``None`` (scikit-image's astronaut), a path, a PIL image or an ``HxWx3`` array.
        keep: tokens to keep, ``1 <= keep <= 576``.
        methods: any of ``"scope"``, ``"holov"``, ``"topk"`` (a sequence, or a comma-separated
            string), or ``"all"``.
        repeat: timed runs per backend (the median is reported); one warm-up run comes first.
        time_backends: time every usable backend implementing the op (and, for SCOPE, the
            official-style :func:`vtprune.reference.reference_loop`); otherwise run only the
            backend ``"auto"`` picks (``"reference"`` where auto cannot run the op).
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.

    Returns:
        A :class:`DemoResult`; each method's indices are ascending int64 ``[keep]`` on the CPU.
        Every backend's selection is compared with the reported one (``agrees``).
    """
    import vtprune
    from .reference import reference_loop

    methods = _check_methods(methods)
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= NUM_TOKENS:
        raise ValueError(f"keep must be an int in [1, {NUM_TOKENS}]; got {keep!r}")
    dev = _pick_device(device)
    img, source = load_image(image)
    feats, names = patch_features(img)
    sal = spectral_residual_saliency(img)
    tokens, saliency = feats.to(dev), sal.to(dev)
    dtype = tokens.dtype

    metric_backend = _auto_backend("coverage_max_sim", dev, dtype)
    results: dict[str, MethodResult] = {}
    for method in methods:
        op = _OPS.get(method)
        chosen = _auto_backend(op, dev, dtype) if op else "torch.sort"
        idx = _select(method, tokens, saliency, keep, chosen)
        cov = {
            th: float(vtprune.theta_coverage(tokens, idx, th, backend=metric_backend)) for th in THETAS
        }
        curve = _theta_curve(tokens, idx, metric_backend)
        fl = float(vtprune.facility_location(tokens, idx, backend=metric_backend))
        res = MethodResult(
            indices=idx.cpu(), backend=chosen, theta_coverage=cov, facility_location=fl, theta_curve=curve
        )
        if time_backends:
            if op is None:
                res.timings_ms["torch.sort"] = _median_ms(lambda: _select(method, tokens, saliency, keep, ""), dev, repeat)
            else:
                names_, skipped = timing_backends(op, dev, dtype)
                res.skipped.update(skipped)
                for name in names_:
                    out = _select(method, tokens, saliency, keep, name)
                    res.agrees[name] = bool(torch.equal(out.cpu(), res.indices))
                    res.timings_ms[name] = _median_ms(
                        lambda name=name: _select(method, tokens, saliency, keep, name), dev, repeat
                    )
                if method == "scope":
                    loop = reference_loop(tokens, saliency, keep)
                    res.agrees["reference_loop"] = bool(torch.equal(loop.sort().values.cpu(), res.indices))
                    res.timings_ms["reference_loop"] = _median_ms(
                        lambda: reference_loop(tokens, saliency, keep), dev, repeat
                    )
        results[method] = res
    return DemoResult(
        source=source,
        image=img,
        tokens=feats,
        feature_names=names,
        saliency=sal,
        keep=keep,
        device=str(dev),
        metric_backend=metric_backend,
        methods=results,
    )


# ----------------------------------------------------------------------------- report


def format_table(result: DemoResult) -> str:
    """The demo's table: coverage per method, then one line per timed backend."""
    head = ["method", *(f"cov@{th}" for th in THETAS), "facility", "backend", "median ms", "same picks"]
    rows: list[list[str]] = []
    for method, res in result.methods.items():
        quality = [f"{res.theta_coverage[th]:.3f}" for th in THETAS] + [f"{res.facility_location:.1f}"]
        timed = list(res.timings_ms.items()) or [(res.backend, float("nan"))]
        for i, (name, ms) in enumerate(timed):
            first = i == 0
            agree = res.agrees.get(name)
            rows.append(
                [
                    LABELS[method] if first else "",
                    *(quality if first else [""] * len(quality)),
                    name,
                    "-" if math.isnan(ms) else f"{ms:.2f}",
                    "-" if agree is None else ("yes" if agree else "NO"),
                ]
            )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    right = {1, 2, 3, 4, 6}

    def fmt(r: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    notes = sorted({f"{name}: {why}" for res in result.methods.values() for name, why in res.skipped.items()})
    if notes:
        lines.append("not timed: " + "; ".join(notes))
    return "\n".join(lines)


def header(result: DemoResult) -> str:
    d = result.tokens.shape[1]
    picked = ", ".join(f"{LABELS[m]} {r.backend}" for m, r in result.methods.items())
    return (
        f"image: {result.source} -> {IMAGE_SIZE}x{IMAGE_SIZE}, {PATCH}-px patches = {GRID}x{GRID} = {NUM_TOKENS} tokens, "
        f"D = {d} patch features; saliency: spectral residual\n"
        f"keep {result.keep} of {NUM_TOKENS} ({result.keep / NUM_TOKENS:.1%}) on {result.device}; "
        f"selections by ({picked}), coverage by {result.metric_backend}\n"
        f"cov@θ = θ-coverage (share of tokens with cosine similarity >= θ to a kept token); "
        f"facility = facility-location value (max {NUM_TOKENS}); "
        f"same picks = identical indices to the reported selection"
    )


#: Line colours of the methods in the curve panel, repeated on the titles of their map panels.
COLORS = {"scope": "#d62728", "holov": "#1f77b4", "topk": "#7f7f7f"}


def make_figure(result: DemoResult):
    """The demo figure as a matplotlib ``Figure`` (Agg canvas, no pyplot state).

    One row of square panels: the photo with its patch saliency, then the kept-token map of each
    method in ``result.methods`` (pruned patches dimmed), then the θ-coverage curves of all of them
    in one panel. ``fig.axes`` holds them in that order: ``len(result.methods) + 2`` axes.
    """
    _need("matplotlib", "writing the figure")
    import matplotlib.patches
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    photo = result.image.permute(1, 2, 0).clamp(0, 1)
    panels = len(result.methods) + 2
    fig = Figure(figsize=(3.6 * panels, 4.15), dpi=110)
    FigureCanvasAgg(fig)  # the Agg canvas directly: no pyplot, no global backend switch
    axes = fig.subplots(1, panels, squeeze=False)[0]
    sal = result.saliency.reshape(GRID, GRID)
    sal = (sal / torch.quantile(sal, 0.95)).clamp(max=1.0)  # display only: a few peaks would darken the rest
    sal = sal.repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)
    axes[0].imshow((photo * (0.12 + 0.88 * sal[..., None])).numpy())
    axes[0].set_title(f"patch saliency (spectral residual)\nbrighter = more salient, {GRID}x{GRID} tokens", fontsize=10)
    axes[0].set_axis_off()
    for ax, (method, res) in zip(axes[1:], result.methods.items()):
        mask = torch.zeros(NUM_TOKENS, dtype=torch.bool)
        mask[res.indices] = True
        pix = mask.reshape(GRID, GRID).repeat_interleave(PATCH, 0).repeat_interleave(PATCH, 1)
        shown = torch.where(pix[..., None], photo, 0.18 * photo + 0.1)
        ax.imshow(shown.numpy())
        # Hairline grid over the kept patches, so single kept patches are easy to see.
        for t in res.indices.tolist():
            y, x = divmod(t, GRID)
            ax.add_patch(
                matplotlib.patches.Rectangle(
                    (x * PATCH - 0.5, y * PATCH - 0.5), PATCH, PATCH, fill=False, lw=0.4, ec=(1, 1, 1, 0.45)
                )
            )
        cov = " / ".join(f"{res.theta_coverage[th]:.0%}" for th in THETAS)
        ax.set_title(
            f"{LABELS[method]}: keep {result.keep}/{NUM_TOKENS}\n"
            f"θ-cov@{'/'.join(str(t) for t in THETAS)}: {cov}",
            fontsize=10,
            color=COLORS[method],
        )
        ax.set_axis_off()
    curves = axes[-1]
    for method, res in result.methods.items():
        curves.plot(THETA_GRID, res.theta_curve, color=COLORS[method], lw=1.8, label=LABELS[method])
        curves.plot(THETAS, [res.theta_coverage[th] for th in THETAS], "o", color=COLORS[method], ms=3.5)
    for th in THETAS:  # the table's thresholds
        curves.axvline(th, color="0.85", lw=0.8, zorder=0)
    curves.set_xlim(0.0, 1.0)
    curves.set_ylim(0.0, 1.02)
    curves.set_box_aspect(1)
    curves.grid(alpha=0.3, lw=0.5)
    curves.set_xlabel("θ (cosine similarity threshold)", fontsize=9)
    curves.set_ylabel("θ-coverage (share of tokens with a kept token at sim ≥ θ)", fontsize=8)
    curves.tick_params(labelsize=8)
    curves.set_title(f"θ-coverage vs θ, keep {result.keep}/{NUM_TOKENS}\n(dots: the table's θ)", fontsize=10)
    curves.legend(loc="lower left", fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def save_figure(result: DemoResult, out: str | os.PathLike) -> Path:
    """Write :func:`make_figure` as a PNG at ``out`` (parent folders are created)."""
    fig = make_figure(result)
    out = Path(out)
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", bbox_inches="tight", pad_inches=0.08)
    return out


def main(args) -> int:
    """``vtprune demo`` with parsed ``args`` (see :mod:`vtprune.cli`)."""
    t0 = time.perf_counter()
    try:
        _need("matplotlib", "writing the figure")  # before the work, not after it
        result = run_demo(
            args.image,
            keep=args.keep,
            methods=args.method,
            repeat=args.repeat,
            time_backends=not args.no_timing,
            device=args.device,
        )
        print(header(result))
        print()
        print(format_table(result))
        path = save_figure(result, args.out)
    except DemoError as exc:
        print(f"vtprune demo: error: {exc}", file=sys.stderr)
        return 1
    print()
    print(f"wrote {path} ({time.perf_counter() - t0:.1f} s)")
    return 0
