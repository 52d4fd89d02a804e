"""Kernels: BF16-activation x FP8-weight linear for few rows (the adaLN modulation).

The adaLN modulation Linear layers hold a third of SD3.5's weight bytes but see one token per
sample. Keeping their activation in BF16 costs no tensor-core time; what matters is reading the
weight once, as FP8. ``fp8_weight_only_linear`` does that with a Triton kernel on CUDA for up to 64
rows (the weight is converted in registers, accumulation in fp32) and falls back to dequantize +
``F.linear`` elsewhere. It is a ``torch.library`` custom op, so torch.compile treats it as one call.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import custom_op, tl, triton

from ..core.quant import dequantize_weight

GEMV_MAX_ROWS = 64


def _dequant_linear(x, w8, w_scale, bias):
    return F.linear(x, dequantize_weight(w8, w_scale, x.dtype), None if bias is None else bias.to(x.dtype))


if triton is not None:
    @triton.jit
    def _gemv_fp8w(x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
                   PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BN + tl.arange(0, BN)
        rm = tl.arange(0, BM)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            rk = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K), other=0.0)
            acc += tl.dot(x.to(tl.bfloat16), tl.trans(w.to(tl.bfloat16)))
        if PER_CHANNEL:
            acc = acc * tl.load(ws_ptr + rn, mask=rn < N, other=0.0)[None, :]
        else:
            acc = acc * tl.load(ws_ptr)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=(rm[:, None] < M) & (rn[None, :] < N))


def _fp8w_linear_fake(x, w8, w_scale, bias):
    return x.new_empty((x.shape[0], w8.shape[0]))


@custom_op("sd35fp8::fp8w_linear", _fp8w_linear_fake)
def _fp8w_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    M, K = x.shape
    if (triton is None or x.device.type != "cuda" or M > GEMV_MAX_ROWS or x.dtype not in (torch.bfloat16, torch.float16)
            or torch.cuda.get_device_capability(x.device) < (8, 9)):
        return _dequant_linear(x, w8, w_scale, bias)
    return gemv_launch(x, w8, w_scale, bias, GEMV_CONFIG)


# (BN, BK, num_warps, num_stages): tile of output features, K chunk, and pipelining of the kernel.
GEMV_CONFIG = (32, 128, 4, 4)  # measured: bench/tune/gemv_tune.py, H100, best summed over the SD3.5 adaLN shapes


def gemv_launch(x, w8, w_scale, bias, config):
    """Launch the Triton GEMV with ``config`` (also used by bench/tune/gemv_tune.py to pick GEMV_CONFIG)."""
    M, K = x.shape
    N = w8.shape[0]
    bn, bk, warps, stages = config
    x = x.contiguous()
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    ws = w_scale.to(torch.float32).contiguous()
    b = bias.to(x.dtype).contiguous() if bias is not None else y
    _gemv_fp8w[(triton.cdiv(N, bn),)](x, w8, ws, b, y, M, N, K, PER_CHANNEL=ws.dim() == 1,
                                       HAS_BIAS=bias is not None, BM=max(16, triton.next_power_of_2(M)), BN=bn,
                                       BK=bk, num_warps=warps, num_stages=stages)
    return y


def fp8_weight_only_linear(x: torch.Tensor, w8: torch.Tensor, w_scale: torch.Tensor,
                           bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ (w8·w_scale)ᵀ + bias`` with ``x`` kept in its own precision (BF16/FP16)."""
    dt = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    x2 = x.reshape(-1, x.shape[-1]).to(dt)
    if x2.shape[0] > GEMV_MAX_ROWS or w8.device != x2.device:
        y = _dequant_linear(x2, w8.to(x2.device), w_scale.to(x2.device),
                            None if bias is None else bias.to(x2.device))
    else:
        y = _fp8w_linear(x2, w8, w_scale, bias)
    return y.reshape(*x.shape[:-1], w8.shape[0])
