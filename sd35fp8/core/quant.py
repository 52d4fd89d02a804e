"""Weight quantization to FP8 E4M3 with fp32 scales (per tensor or per output channel), and to INT8 with
one scale per output channel for the weight-only adaLN modulation layers (``INT8_ROWS``)."""
from __future__ import annotations

import torch

from .formats import E4M3, MIN_SCALE, fp8_max, saturating_cast

class PerChannelWeightsError(ValueError):
    """An operation that takes one E4M3 weight scale per tensor (the ComfyUI FP8 file format, TransformerEngine's
    FP8 weights) met per-channel weight scales."""


GRANULARITIES = ("per_tensor", "per_channel")
# INT8 weights with one fp32 scale per output channel. Only for layers that run weight-only (BF16 activations:
# the adaLN modulation): a uniform 8-bit grid per row has ~1/3 of E4M3's rounding error on Gaussian weights
# (bench/results/2026-11-22_h100_ablations.md), in the same bytes; there is no INT8 matmul path.
INT8_ROWS = "int8_per_channel"
INT8_MAX = 127.0


def qmax(dtype: torch.dtype) -> float:
    """Largest magnitude a weight of ``dtype`` stores (symmetric INT8: 127)."""
    return INT8_MAX if dtype == torch.int8 else fp8_max(dtype)


def quantize_weight(w: torch.Tensor, granularity: str = "per_tensor", dtype: torch.dtype = E4M3,
                    scale: torch.Tensor | None = None, chunk_rows: int = 4096):
    """Return ``(w_fp8, scale)`` with ``w ≈ w_fp8.float() * scale``.

    per_tensor: scale is a 0-d fp32 tensor. per_channel: scale has shape ``[out_features]``. Given
    ``scale`` (e.g. one a file recorded) it is used instead of being derived from the amax. The
    amax reduction runs in fp32 and the cast clamps first (:func:`saturating_cast`), ``chunk_rows``
    rows at a time: the fp32 temporaries are one chunk, never the whole tensor (the 90-226 M-value
    positional-embedding table would otherwise need ~3x its fp32 size).
    """
    if granularity not in GRANULARITIES + (INT8_ROWS,):
        raise ValueError(f"unknown weight granularity {granularity!r}; use one of {GRANULARITIES + (INT8_ROWS,)}")
    if granularity == INT8_ROWS:
        dtype = torch.int8
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D Linear weight, got shape {tuple(w.shape)}")
    w = w.detach()
    per_tensor = granularity == "per_tensor"
    if scale is None:
        amaxes = []
        for c in w.split(chunk_rows):
            cf = c.float()
            if not bool(torch.isfinite(cf).all()):
                raise ValueError("weight holds NaN/Inf values; the checkpoint is damaged")
            amaxes.append(cf.abs().amax() if per_tensor else cf.abs().amax(dim=1))
        amax = torch.stack(amaxes).amax() if per_tensor else torch.cat(amaxes)
        scale = (amax / qmax(dtype)).clamp_min(MIN_SCALE)
    scale = scale.to(device=w.device, dtype=torch.float32)
    scale = scale.reshape(()) if per_tensor else scale.reshape(-1)
    out = torch.empty(w.shape, dtype=dtype, device=w.device)
    for r0 in range(0, w.shape[0], chunk_rows):
        rows = slice(r0, r0 + chunk_rows)
        out[rows] = quantize_to_scale(w[rows], scale if per_tensor else scale[rows], dtype=dtype)
    return out, scale


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
    ``dtype=torch.int8``: round to integers (stochastically with ``seed``), clamp to ±127.
    """
    s = scale.to(device=w.device, dtype=torch.float32)
    v = w.float() / (s[:, None] if s.dim() == 1 else s)
    if dtype == torch.int8:
        if seed is not None:
            g = torch.Generator(device=v.device).manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
            v = v + torch.rand(v.shape, generator=g, device=v.device) - 0.5
        v = torch.nan_to_num(v, nan=0.0, posinf=INT8_MAX, neginf=-INT8_MAX)
        return v.round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    if seed is not None:
        m = fp8_max(dtype)
        mant = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}[dtype]
        tiny = torch.finfo(dtype).smallest_normal
        ulp = torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(tiny))) - mant)
        g = torch.Generator(device=v.device).manual_seed(int(seed) & 0x7FFFFFFFFFFFFFFF)
        v = v + (torch.rand(v.shape, generator=g, device=v.device) - 0.5) * ulp
        v = torch.nan_to_num(v, nan=0.0, posinf=m, neginf=-m)
    return saturating_cast(v, 1.0, dtype)

