"""Static per-channel centering of FP8 layer inputs: the handling of "massive activations".

A trained diffusion transformer's massive activations are a few input channels whose values sit far from zero,
nearly the same for every token (hundreds of times the other channels' range), moved a little by the timestep. With
one per-tensor input scale such a channel sets the scale: E4M3 rounds it with a step of 1/16 of its value, which
the layer's weights then carry into every output (the channel's offset cancels against the bias, its rounding does
not), and a uniform INT8 grid loses every other channel. Calibration records each channel's signed range; a channel
whose range lies far from zero is quantized as ``x - center`` (the middle of its range), and the layer adds
``W · center`` to its bias: exact in real arithmetic, the outlier's offset never passes through 8 bits. The centered
input's range (what the static scale then covers) is known from the same statistics: nothing is reduced at run time.

Chosen by measurement against per-channel smoothing (which rescales a channel and its weight column: E4M3 rounds
relative to a value, so rescaling does not shrink the rounding error of an offset) and an outlier side path (a
second, high-precision GEMM over the outlier channels: a pass over the activations per layer): see docs/fidelity.md.
"""
from __future__ import annotations

import torch

# a channel is a candidate when its |x| range is this many times the layer's median channel range
RATIO = 8.0
# at most this many centered channels per layer (the bias correction gathers their weight columns)
TOP = 16
# a layer is centered only when its amax falls at least this much (one bit of the format's range)
GAIN = 2.0


def choose_centers(ranges: dict[str, tuple[torch.Tensor, torch.Tensor]], ratio: float = RATIO, top: int = TOP,
                   gain: float = GAIN) -> dict[str, dict]:
    """``{layer: {"channels": [...], "centers": [...], "amax": centered amax, "was": amax}}`` for the layers
    whose input has channels ``ratio`` times the median range or more that lie off zero, where centering those
    channels (at most ``top``, the largest first) lowers the layer's input amax ``gain`` times or more. JSON-ready
    (a calibration record keeps it). ``ranges``: per-channel ``(min, max)`` (CalibrationSession.channel_ranges)."""
    out = {}
    for name, (lo, hi) in ranges.items():
        if lo is None or hi is None or lo.numel() < 8:
            continue
        lo, hi = lo.detach().float().cpu(), hi.detach().float().cpu()
        a = torch.maximum(hi, -lo)
        amax, med = float(a.max()), float(a.median())
        if not (med > 0 and amax >= ratio * med):
            continue
        mid, half = (hi + lo) / 2, (hi - lo) / 2
        cand = torch.nonzero((a >= ratio * med) & (half <= a / gain)).flatten()
        cand = cand[torch.argsort(a[cand], descending=True)][:top]
        if not cand.numel():
            continue
        after = a.clone()
        after[cand] = half[cand]
        new = float(after.max())
        if new * gain > amax:
            continue
        order = torch.argsort(cand)
        out[name] = {"channels": [int(c) for c in cand[order]], "centers": [float(mid[c]) for c in cand[order]],
                     "amax": new, "was": amax}
    return out


def center_vector(entry: dict, in_features: int, device=None) -> torch.Tensor:
    """The dense fp32 center [in_features] of one :func:`choose_centers` entry (zero off the centered channels).
    Raises naming the problem when the entry does not fit the layer."""
    ch = entry.get("channels") or []
    vals = entry.get("centers") or []
    if len(ch) != len(vals) or any(not 0 <= int(c) < in_features for c in ch):
        raise ValueError(f"input centers {list(ch)[:4]}... do not fit a layer with {in_features} input channels")
    v = torch.zeros(in_features, dtype=torch.float32)
    if ch:
        v[torch.tensor([int(c) for c in ch])] = torch.tensor([float(x) for x in vals], dtype=torch.float32)
    return v.to(device) if device is not None else v


def weight_correction(hp_columns: torch.Tensor, q_columns: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``(W - W_q)[:, c] · center[c]``, fp32 [out]: what the 8-bit weight's rounding of the columns that read centered
    channels costs at those channels' centers (a massive activation times its column's rounding error, in every
    output), added to the layer's bias. ``hp_columns``: those columns of the original weight; ``q_columns``: of the
    dequantized 8-bit weight; ``centers``: the channels' centers."""
    if hp_columns.shape != q_columns.shape or hp_columns.shape[1] != centers.numel():
        raise ValueError(f"weight columns {tuple(hp_columns.shape)} / {tuple(q_columns.shape)} do not match "
                         f"{centers.numel()} centers")
    return (hp_columns.float() - q_columns.float()) @ centers.float()


def describe_centers(centers: dict, n_layers: int) -> str:
    """One report line about what :func:`choose_centers` chose."""
    if not centers:
        return "input centering: none needed (no layer has input channels far off zero)"
    n_ch = sum(len(e["channels"]) for e in centers.values())
    worst = max(centers.items(), key=lambda kv: kv[1]["was"] / max(kv[1]["amax"], 1e-30))
    return (f"input centering (massive activations): {n_ch} channel(s) in {len(centers)} of {n_layers} FP8 layers "
            f"quantized around their calibrated centre; largest cut: {worst[0]} input range "
            f"{worst[1]['was']:.4g} -> {worst[1]['amax']:.4g} ({worst[1]['was'] / max(worst[1]['amax'], 1e-30):.0f}x)")
