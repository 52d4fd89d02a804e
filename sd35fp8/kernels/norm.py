"""LayerNorm + adaLN modulation + static E4M3 quantization in one pass, optionally after a gated residual.

In an SD3 block the image stream's activations go through ``x + gate·y`` (attention output, MLP output) and
``LayerNorm(x)·(1 + scale) + shift`` before each FP8 GEMM. Inductor fuses these but reduces each row in one
loop and normalizes in a second (reading the row twice), ~65 µs per 1024² Large call on an H200 vs a ~30 µs
memory floor. Here one program holds a whole row in registers: read x (and y), write the new residual (BF16)
and the GEMM's E4M3 operand.

``ln_modulate_quant(x, shift, scale, inv, eps)`` → E4M3 [B·L, C];
``residual_ln_modulate_quant(x, y, gate, shift, scale, inv, eps)`` → (x + gate·y in x's dtype, E4M3 [B·L, C]);
``residual_ln_modulate_quant_int8(x, y, gate, shift, scale, eps)`` → (x + gate·y, INT8 [B·L, C], fp32 [B·L]): the
same with INT8 output at one scale per row (amax / 127, the row is in registers anyway), for the W8A8 MLP's fc1.
x, y: [B, L, C]; gate, shift, scale: [B, C] (views into the adaLN output are fine); inv: 0-d fp32 (1 / the
GEMM's static input scale). Math in fp32, the residual rounded to x's dtype before it is normalized (as the
unfused model stores it), NaN kept visible (clamped to ±448 otherwise). Triton on CUDA, torch elsewhere.
"""
from __future__ import annotations

import torch

from ..core.formats import E4M3, MIN_SCALE, int8_quantize_rows, quantize_inv
from .common import custom_op, tl, triton

MAX_C = 8192  # one row per program, in registers

if triton is not None:
    from .common import round_int8

    @triton.jit
    def _ln_mod_q(x_ptr, y_ptr, g_ptr, sh_ptr, sc_ptr, inv_ptr, xo_ptr, h_ptr, L, C, eps,
                  stride_g, stride_sh, stride_sc, HAS_RES: tl.constexpr, BLOCK: tl.constexpr,
                  INT8: tl.constexpr = False, MIN_SCALE: tl.constexpr = 0.0):
        row = tl.program_id(0)
        b = row // L
        cols = tl.arange(0, BLOCK)
        m = cols < C
        off = row.to(tl.int64) * C + cols
        x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            y = tl.load(y_ptr + off, mask=m, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + b * stride_g + cols, mask=m, other=0.0).to(tl.float32)
            xr = (x + g * y).to(xo_ptr.dtype.element_ty)
            tl.store(xo_ptr + off, xr, mask=m)
            x = xr.to(tl.float32)
        mean = tl.sum(x, 0) / C
        d = tl.where(m, x - mean, 0.0)
        xn = d * tl.math.rsqrt(tl.sum(d * d, 0) / C + eps)
        sh = tl.load(sh_ptr + b * stride_sh + cols, mask=m, other=0.0).to(tl.float32)
        sc = tl.load(sc_ptr + b * stride_sc + cols, mask=m, other=0.0).to(tl.float32)
        if INT8:  # one scale per row (stored at inv_ptr[row]): amax / 127; a NaN row keeps a NaN scale
            h = xn * (1.0 + sc) + sh
            s = tl.maximum(tl.max(tl.where(m, tl.abs(h), 0.0), 0) / 127.0, MIN_SCALE)
            s = tl.where(tl.sum(tl.where(h == h, 0.0, 1.0), 0) > 0, float("nan"), s)
            tl.store(inv_ptr + row, s)
            q = round_int8(h * (1.0 / s))
            tl.store(h_ptr + off, q.to(h_ptr.dtype.element_ty), mask=m)
        else:
            h = (xn * (1.0 + sc) + sh) * tl.load(inv_ptr)
            h = tl.clamp(h, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)  # clamp before the cast (CUDA: NaN)
            tl.store(h_ptr + off, h.to(h_ptr.dtype.element_ty), mask=m)


def _modulated(x, y, gate, shift, scale, eps: float):
    """(new x = x + gate·y in x's dtype, or None without y; LayerNorm(x)·(1 + scale) + shift in fp32 [B·L, C])."""
    xr = None
    if y is not None:
        xr = (x.float() + gate.float().unsqueeze(1) * y.float()).to(x.dtype)
        x = xr
    xn = torch.nn.functional.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return xr, (xn * (1 + scale.float().unsqueeze(1)) + shift.float().unsqueeze(1)).reshape(-1, x.shape[-1])


def reference(x, y, gate, shift, scale, inv, eps: float):
    """The unfused computation (fp32 math, residual rounded to x's dtype): (new x or None, E4M3 [B·L, C])."""
    xr, h = _modulated(x, y, gate, shift, scale, eps)
    return xr, quantize_inv(h, inv)


def reference_int8(x, y, gate, shift, scale, eps: float):
    """:func:`reference` with INT8 output, one scale per row: (new x or None, INT8 [B·L, C], fp32 [B·L])."""
    xr, h = _modulated(x, y, gate, shift, scale, eps)
    return (xr, *int8_quantize_rows(h))


def _kernel_ok(x, *vecs) -> bool:
    return (triton is not None and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.dim() == 3
            and x.is_contiguous() and x.shape[-1] <= MAX_C
            and all(v.dim() == 2 and v.stride(-1) == 1 and v.device == x.device for v in vecs))


def _launch(x, y, gate, shift, scale, inv, eps):
    B, L, C = x.shape
    h8 = torch.empty((B * L, C), device=x.device, dtype=E4M3)
    xo = torch.empty_like(x) if y is not None else h8
    block = triton.next_power_of_2(C)
    g = gate if gate is not None else shift
    _ln_mod_q[(B * L,)](x, y if y is not None else x, g, shift, scale, inv.to(torch.float32), xo, h8, L, C,
                        float(eps), g.stride(0), shift.stride(0), scale.stride(0), HAS_RES=y is not None,
                        BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return (xo if y is not None else None), h8


def _launch_int8(x, y, gate, shift, scale, eps):
    B, L, C = x.shape
    h8 = torch.empty((B * L, C), device=x.device, dtype=torch.int8)
    rs = torch.empty((B * L,), device=x.device, dtype=torch.float32)
    xo = torch.empty_like(x)
    block = triton.next_power_of_2(C)
    _ln_mod_q[(B * L,)](x, y, gate, shift, scale, rs, xo, h8, L, C, float(eps), gate.stride(0), shift.stride(0),
                        scale.stride(0), HAS_RES=True, BLOCK=block, INT8=True, MIN_SCALE=MIN_SCALE,
                        num_warps=8 if block >= 2048 else 4)
    return xo, h8, rs


def _fake_int8(x, y, gate, shift, scale, eps):
    m = x.shape[0] * x.shape[1]
    return torch.empty_like(x), x.new_empty((m, x.shape[2]), dtype=torch.int8), x.new_empty((m,), dtype=torch.float32)


@custom_op("sd35fp8::residual_ln_modulate_quant_int8", _fake_int8)
def _residual_ln_modulate_quant_int8(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                     scale: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                               torch.Tensor]:
    if not (_kernel_ok(x, gate, shift, scale) and y.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype):
        return reference_int8(x, y, gate, shift, scale, eps)
    return _launch_int8(x, y, gate, shift, scale, eps)


def residual_ln_modulate_quant_int8(x, y, gate, shift, scale, eps: float):
    """(``x + gate·y``, INT8 [B·L, C], fp32 row scales [B·L]): :func:`residual_ln_modulate_quant` with the INT8
    per-token quantization of the W8A8 MLP's fc1 input instead of a static E4M3 one."""
    return _residual_ln_modulate_quant_int8(x.contiguous(), y.contiguous(), gate, shift, scale, float(eps))


def _fake_h8(x, shift, scale, inv, eps):
    return x.new_empty((x.shape[0] * x.shape[1], x.shape[2]), dtype=E4M3)


@custom_op("sd35fp8::ln_modulate_quant", _fake_h8)
def _ln_modulate_quant(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, inv: torch.Tensor,
                       eps: float) -> torch.Tensor:
    if not _kernel_ok(x, shift, scale):
        return reference(x, None, None, shift, scale, inv, eps)[1]
    return _launch(x, None, None, shift, scale, inv, eps)[1]


def _fake_res(x, y, gate, shift, scale, inv, eps):
    return torch.empty_like(x), _fake_h8(x, shift, scale, inv, eps)


@custom_op("sd35fp8::residual_ln_modulate_quant", _fake_res)
def _residual_ln_modulate_quant(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                scale: torch.Tensor, inv: torch.Tensor,
                                eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_kernel_ok(x, gate, shift, scale) and y.is_contiguous() and y.shape == x.shape and y.dtype == x.dtype):
        return reference(x, y, gate, shift, scale, inv, eps)
    return _launch(x, y, gate, shift, scale, inv, eps)


def ln_modulate_quant(x, shift, scale, inv, eps: float) -> torch.Tensor:
    """E4M3 ``clamp((LayerNorm(x)·(1 + scale) + shift)·inv)`` as [B·L, C] (see the module docstring)."""
    return _ln_modulate_quant(x.contiguous(), shift, scale, inv, float(eps))


def residual_ln_modulate_quant(x, y, gate, shift, scale, inv, eps: float):
    """(``x + gate·y``, its :func:`ln_modulate_quant`) in one pass."""
    return _residual_ln_modulate_quant(x.contiguous(), y.contiguous(), gate, shift, scale, inv, float(eps))
