"""Scaled matmuls of 8-bit operands: FP8 E4M3 on tensor cores through ``torch._scaled_mm`` (torch's CPU kernel
elsewhere), and INT8 W8A8 with exact int32 accumulation (``torch._int_mm``)."""
from __future__ import annotations

import torch


def scaled_mm(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """``(xq·x_scale) @ (w8·w_scale)ᵀ + bias`` on FP8 tensor cores (or torch's CPU kernel).

    xq: [M, K] fp8; w8: [N, K] fp8 (row-major, so ``w8.t()`` is the column-major operand);
    w_scale: 0-d (per tensor) or [N] (per output channel, rowwise scaling).
    """
    cuda = xq.device.type == "cuda"
    if w_scale.dim() == 1:
        if not cuda:  # torch < 2.13 has only per-tensor CPU _scaled_mm: apply the row scale as an epilogue
            one = torch.ones((), dtype=torch.float32, device=xq.device)
            out = torch._scaled_mm(xq, w8.t(), scale_a=x_scale, scale_b=one, out_dtype=torch.float32)
            out = out * w_scale.reshape(1, -1)
            return (out if bias is None else out + bias.float()).to(out_dtype)
        # rowwise: scale_a [M,1], scale_b [1,N]; CUDA wants bf16 out here
        sa = x_scale.reshape(1, 1).expand(xq.shape[0], 1).contiguous()
        out = torch._scaled_mm(xq, w8.t(), scale_a=sa, scale_b=w_scale.reshape(1, -1), out_dtype=torch.bfloat16)
        out = out.to(out_dtype)
        return out if bias is None else out + bias
    fused_bias = bias is not None and not (cuda and out_dtype == torch.float32)
    out = torch._scaled_mm(xq, w8.t(), scale_a=x_scale, scale_b=w_scale,
                           bias=bias if fused_bias else None, out_dtype=out_dtype,
                           use_fast_accum=fast_accum and cuda)
    return out if bias is None or fused_bias else out + bias


def int8_matmul(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``(xq·x_scale) @ (w8·w_scale)ᵀ + bias`` for INT8 operands (W8A8): xq [M, K], w8 [N, K], x_scale 0-d or one
    per row [M], w_scale [N]. On CUDA ``torch._int_mm`` (exact int32 accumulation) where its shapes allow, else
    the same product in fp32."""
    if xq.is_cuda and xq.shape[0] > 16 and xq.shape[1] % 8 == 0 and w8.shape[0] % 8 == 0:
        acc = torch._int_mm(xq, w8.t()).float()
    else:
        acc = xq.float() @ w8.float().t()
    sx = x_scale.float()
    out = acc * (sx[:, None] if sx.dim() == 1 else sx) * w_scale.float()[None, :]
    return (out if bias is None else out + bias.float()).to(out_dtype)
