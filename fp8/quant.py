"""Weight quantization to FP8 E4M3 with fp32 scales (per tensor or per output channel)."""
from __future__ import annotations

import torch

from .formats import E4M3, MIN_SCALE, fp8_max, saturating_cast

GRANULARITIES = ("per_tensor", "per_channel")


def quantize_weight(w: torch.Tensor, granularity: str = "per_tensor", dtype: torch.dtype = E4M3):
    """Return ``(w_fp8, scale)`` with ``w ≈ w_fp8.float() * scale``.

    per_tensor: scale is a 0-d fp32 tensor. per_channel: scale has shape ``[out_features]``.
    The amax reduction runs in fp32; the cast clamps first (see :func:`saturating_cast`).
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown weight granularity {granularity!r}; use one of {GRANULARITIES}")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    wf = w.detach().float()
    if not bool(torch.isfinite(wf).all()):
        raise ValueError("weight holds NaN/Inf values; the checkpoint is damaged")
    if granularity == "per_tensor":
        amax = wf.abs().amax()
    else:
        amax = wf.abs().amax(dim=1)
    scale = (amax / fp8_max(dtype)).clamp_min(MIN_SCALE)
    s = scale if granularity == "per_tensor" else scale[:, None]
    return saturating_cast(wf, s, dtype), scale.to(torch.float32)


def dequantize_weight(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    s = scale.to(device=w_fp8.device, dtype=torch.float32)
    if s.dim() == 1:
        s = s[:, None]
    return (w_fp8.to(torch.float32) * s).to(dtype)


def quantize_to_scale(w: torch.Tensor, scale: torch.Tensor, seed: int | None = None,
                      dtype: torch.dtype = E4M3) -> torch.Tensor:
    """Quantize ``w`` with a given (existing) scale, e.g. a weight with a LoRA merged into it.

    With ``seed``, rounding is stochastic (unbiased up to binade edges): a low-rank delta far smaller
    than one FP8 step still shifts the weight in expectation instead of rounding away. Clamps first.
    """
    s = scale.to(device=w.device, dtype=torch.float32)
    v = w.float() / (s[:, None] if s.dim() == 1 else s)
    if seed is not None:
        m = fp8_max(dtype)
        mant = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
        tiny = torch.finfo(dtype).smallest_normal
        ulp = torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(tiny))) - mant)
        g = torch.Generator(device=v.device).manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        v = v + (torch.rand(v.shape, generator=g, device=v.device) - 0.5) * ulp
        v = torch.nan_to_num(v, nan=0.0, posinf=m, neginf=-m)
    return saturating_cast(v, 1.0, dtype)


def quantize_per_tensor_chunked(w: torch.Tensor, scale: torch.Tensor | None = None, chunk_rows: int = 4096,
                                dtype: torch.dtype = E4M3):
    """``quantize_weight(w, "per_tensor")`` (or, given ``scale``, ``quantize_to_scale``) for a large
    2-D table, ``chunk_rows`` rows at a time: same result, but the fp32 temporaries are one chunk, not
    the table (the 90-226 M-value positional embedding would otherwise need ~3x its fp32 size)."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(w.shape)}")
    if scale is None:
        amax = torch.zeros((), dtype=torch.float32, device=w.device)
        for c in w.split(chunk_rows):
            cf = c.float()
            if not bool(torch.isfinite(cf).all()):
                raise ValueError("weight holds NaN/Inf values; the checkpoint is damaged")
            amax = torch.maximum(amax, cf.abs().amax())
        scale = (amax / fp8_max(dtype)).clamp_min(MIN_SCALE)
    scale = scale.float().reshape(()).to(w.device)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for i, c in enumerate(w.split(chunk_rows)):
        out[i * chunk_rows:i * chunk_rows + c.shape[0]] = quantize_to_scale(c, scale, dtype=dtype)
    return out, scale
