"""Calibration observers: per-layer input amax over real sampling runs.

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
        self.hist: torch.Tensor | None = None
        self.calls = 0
        self.numel = 0
        self.nonfinite = 0
        self.keep_histogram = keep_histogram

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        a = x.detach().abs().float()
        finite = torch.isfinite(a)
        bad = int((~finite).sum())
        if bad:
            self.nonfinite += bad
            a = torch.where(finite, a, torch.zeros_like(a))
        m = a.amax() if a.numel() else torch.zeros((), device=a.device)
        self.amax = m if self.amax is None else torch.maximum(self.amax, m.to(self.amax.device))
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
