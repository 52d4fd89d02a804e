"""Calibration observers: per-layer input amax over real sampling runs, and each input channel's own amax (the
range of every feature over all tokens, steps, cond and uncond), which shows "massive activations": a few channels
far above the rest that set a per-tensor scale for all of them (:func:`outlier_channels`).

``max`` keeps the exact running maximum of |x|. ``percentile`` additionally keeps a histogram of
|x| over log2-spaced bins (64 per octave, 2^-24 .. 2^24), accumulated over every call, so the
percentile is taken over all tokens of all steps, cond and uncond, not per call.
"""
from __future__ import annotations

import math

import torch

METHODS = ("max", "percentile")
_LO, _HI, _PER_OCTAVE = -24.0, 24.0, 64
_BINS = int((_HI - _LO) * _PER_OCTAVE)


class AmaxObserver:
    def __init__(self, keep_histogram: bool = False):
        self.amax: torch.Tensor | None = None  # fp32 scalar on the data's device
        self.channel_amax: torch.Tensor | None = None  # fp32 [in_features]: each input channel's max |x|
        self.channel_min: torch.Tensor | None = None  # fp32 [in_features]: each input channel's signed range
        self.channel_max: torch.Tensor | None = None
        self.hist: torch.Tensor | None = None
        self.calls = 0
        self.numel = 0
        self.nonfinite = 0
        self.keep_histogram = keep_histogram

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        xf = x.detach().float()
        finite = torch.isfinite(xf)
        bad = int((~finite).sum())
        if bad:
            self.nonfinite += bad
            xf = torch.where(finite, xf, torch.zeros_like(xf))
        a = xf.abs()
        m = a.amax() if a.numel() else torch.zeros((), device=a.device)
        self.amax = m if self.amax is None else torch.maximum(self.amax, m.to(self.amax.device))
        if a.dim() >= 1 and a.numel():
            x2 = xf.reshape(-1, xf.shape[-1])
            lo, hi = x2.amin(0), x2.amax(0)
            ch = torch.maximum(hi, -lo)
            if self.channel_amax is None:
                self.channel_amax, self.channel_min, self.channel_max = ch, lo, hi
            elif self.channel_amax.shape == ch.shape:  # a layer's inputs always share their last dimension
                dev = self.channel_amax.device
                self.channel_amax = torch.maximum(self.channel_amax, ch.to(dev))
                self.channel_min = torch.minimum(self.channel_min, lo.to(dev))
                self.channel_max = torch.maximum(self.channel_max, hi.to(dev))
        if self.keep_histogram and a.numel():
            lg = torch.log2(a.flatten().clamp_min(2.0**_LO))
            h = torch.histc(lg, bins=_BINS, min=_LO, max=_HI).to(torch.float64).cpu()
            self.hist = h if self.hist is None else self.hist + h
        self.calls += 1
        self.numel += a.numel()

    def result(self, method: str = "max", percentile: float = 99.99) -> float:
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
        if self.amax is None:
            raise ValueError("observer saw no data")
        amax = float(self.amax)
        if method == "max":
            return amax
        if not (0.0 < percentile <= 100.0):
            raise ValueError(f"percentile must be in (0, 100], got {percentile}")
        if self.hist is None or percentile >= 100.0:
            return amax
        cdf = torch.cumsum(self.hist, 0)
        target = cdf[-1] * (percentile / 100.0)
        idx = int(torch.searchsorted(cdf, target.unsqueeze(0)).item())
        upper_edge = 2.0 ** (_LO + (idx + 1) / _PER_OCTAVE)  # conservative: the bin's upper edge
        return min(amax, upper_edge) if math.isfinite(upper_edge) else amax


def outlier_channels(channel_amax: dict[str, torch.Tensor], ratio: float = 20.0,
                     top: int = 4) -> list[tuple[str, float, list[tuple[int, float]]]]:
    """Layers whose input has channels ``ratio`` times or more above the layer's median channel range:
    ``[(layer, median channel amax, [(channel, times the median), ...]), ...]``, the largest first, at most ``top``
    channels a layer. With one per-tensor scale, such a channel leaves every other channel of that input only
    ``log2(ratio)`` fewer bits of E4M3's range."""
    out = []
    for name, ch in channel_amax.items():
        if ch is None or ch.numel() < 8:
            continue
        c = ch.detach().float().cpu()
        med = float(c.median())
        if not med > 0:
            continue
        times = c / med
        idx = torch.nonzero(times >= ratio).flatten()
        if idx.numel():
            order = idx[torch.argsort(times[idx], descending=True)][:top]
            out.append((name, med, [(int(i), float(times[i])) for i in order]))
    out.sort(key=lambda r: -r[2][0][1])
    return out


def describe_outliers(outliers: list, n_layers: int, ratio: float = 20.0, shown: int = 3) -> str:
    """One report line about :func:`outlier_channels`' result (also as stored in a calibration record: lists)."""
    if not outliers:
        return f"input channels: none {ratio:g}x or more above its layer's median range (no massive activations)"
    worst = "; ".join(f"{name} channel{'s' if len(chs) > 1 else ''} "
                      + ", ".join(f"{c} ({t:.0f}x)" for c, t in chs) for name, _med, chs in outliers[:shown])
    return (f"input channels {ratio:g}x or more above their layer's median range in {len(outliers)} of {n_layers} "
            f"FP8 layers (massive activations: one per-tensor scale spends E4M3's range on them); largest: {worst}")
