"""Image and latent fidelity metrics (pure PyTorch): what FP8 changes, measured against a reference.

Images are ComfyUI's IMAGE layout, ``[B, H, W, C]`` floats in [0, 1] (a single ``[H, W, C]`` image is one batch).
PSNR uses a peak of 1.0 (the same number as 255 for uint8 images); SSIM is the mean SSIM of the luma with a uniform
7x7 window and the usual constants (K1 = 0.01, K2 = 0.03), per image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LUMA = (0.299, 0.587, 0.114)


def _batch(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"expected images as [B, H, W, C] (or [H, W, C]), got shape {tuple(x.shape)}")
    return x.to(torch.float64)


def _pair(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _batch(a), _batch(b)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"the images differ in size: {tuple(a.shape[1:3])} vs {tuple(b.shape[1:3])} "
                         "(compare images rendered at the same width and height)")
    if a.shape[0] != b.shape[0]:
        if 1 not in (a.shape[0], b.shape[0]):
            raise ValueError(f"the batches differ in length: {a.shape[0]} vs {b.shape[0]} images "
                             "(give equal batches, or one image to compare with every image of the other)")
        a, b = torch.broadcast_tensors(a, b)
    return a, b


def psnr(a, b) -> list[float]:
    """Peak signal-to-noise ratio of each image pair in dB (peak 1.0); ``inf`` for identical images."""
    a, b = _pair(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return [math.inf if m == 0 else float(10 * math.log10(1.0 / m)) for m in mse.tolist()]


def ssim(a, b, win: int = 7) -> list[float]:
    """Mean SSIM of each image pair's luma (uniform ``win`` x ``win`` window, valid region)."""
    a, b = _pair(a, b)

    def grey(x):
        return x[..., :3] @ torch.tensor(LUMA, dtype=x.dtype) if x.shape[-1] >= 3 else x[..., 0]
    x, y = grey(a)[:, None], grey(b)[:, None]
    if min(x.shape[-2:]) < win:
        raise ValueError(f"images of {tuple(x.shape[-2:])} are smaller than the SSIM window ({win})")

    def box(t):
        return F.avg_pool2d(t, win, stride=1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mx, my = box(x), box(y)
    vx, vy, cxy = box(x * x) - mx * mx, box(y * y) - my * my, box(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).tolist()


def max_abs_diff(a, b) -> list[float]:
    """The largest absolute channel difference of each image pair (0..1)."""
    a, b = _pair(a, b)
    return (a - b).abs().flatten(1).amax(1).tolist()


def relative_error(x, ref) -> float:
    """||x - ref|| / ||ref|| over whole tensors (e.g. final latents against the BF16 run's)."""
    x, ref = torch.as_tensor(x).double(), torch.as_tensor(ref).double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def heatmap(a, b, scale: float | None = None) -> tuple[torch.Tensor, float]:
    """A difference heat map of each pair, ``[B, H, W, 3]`` in [0, 1] (black: equal; through red and yellow to
    white: the largest difference), and the difference that maps to white: ``scale``, or the batch's largest
    per-pixel difference when None (so small differences stay visible)."""
    a, b = _pair(a, b)
    d = (a - b).abs().amax(-1)
    top = float(d.max()) if scale is None else float(scale)
    t = (d / top).clamp(0, 1) if top > 0 else torch.zeros_like(d)
    rgb = torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)], -1)
    return rgb.float(), top


def compare(a, b, names: tuple[str, str] = ("A", "B")) -> dict:
    """Every metric per image pair and their means: ``{"psnr": [...], "ssim": [...], "max_diff": [...],
    "mean": {...}, "lines": [report lines]}``."""
    p, s, m = psnr(a, b), ssim(a, b), max_abs_diff(a, b)
    finite = [v for v in p if math.isfinite(v)]
    mean = {"psnr": (sum(finite) / len(finite)) if finite else math.inf, "ssim": sum(s) / len(s),
            "max_diff": sum(m) / len(m)}
    lines = [f"{names[0]} vs {names[1]}: {len(p)} image pair(s)"]
    lines += [f"image {i}: PSNR {fmt_db(pi)}, SSIM {si:.4f}, max difference {mi * 255:.0f}/255"
              for i, (pi, si, mi) in enumerate(zip(p, s, m))]
    lines.append(f"mean: PSNR {fmt_db(mean['psnr'])}, SSIM {mean['ssim']:.4f}, max difference "
                 f"{mean['max_diff'] * 255:.1f}/255")
    return {"psnr": p, "ssim": s, "max_diff": m, "mean": mean, "lines": lines}


def fmt_db(v: float) -> str:
    return "identical (inf dB)" if math.isinf(v) else f"{v:.2f} dB"
