"""The joint attention of an SD3 MMDiT block with its prologue fused: one pass from the two qkv projections to
the attention's operands.

ComfyUI's ``_block_mixing`` splits each stream's qkv projection into q, k, v, RMS-normalizes q and k per head
(context and image streams have their own norm weights), concatenates context and image tokens for q, k and
v, and hands them to attention; our FP8 attention then reads K and V once more to quantize them. At SD3.5
Large's 1024² shapes that is ~6 kernels and ~0.14 ms per block around a 0.75 ms attention. Here one Triton
kernel reads each stream's packed qkv once and writes the joint Q (BF16/FP16) and either

- K as E4M3 and V transposed as E4M3, with one scale per block of keys — the operands of our FP8 attention
  (``fp8.attention.attend``), or
- K and V in BF16/FP16 for SDPA (cuDNN etc.).

The SD3 block forward that calls these (``sd35fp8.runtime.joint``) lives in the runtime layer.
"""
from __future__ import annotations

import torch

from .attention import ATTN_CONFIG, CALLS, attend, kv_buffers, reference_attention, supported
from .common import custom_op, tl, triton

if triton is not None:
    from .common import pow2_scale

HEAD_DIMS = (64, 128)

if triton is not None:
    @triton.jit
    def _joint_rows(c_ptr, x_ptr, c_off, x_off, in_c, in_x, col):
        """[rows, D] of the joint sequence: context rows from c_ptr, image rows from x_ptr (fp32, 0 elsewhere)."""
        a = tl.load(c_ptr + c_off[:, None] + col[None, :], mask=in_c[:, None], other=0.0)
        b = tl.load(x_ptr + x_off[:, None] + col[None, :], mask=in_x[:, None], other=0.0)
        return a.to(tl.float32) + b.to(tl.float32)

    @triton.jit
    def _rms(t, wc_ptr, wx_ptr, in_c, rd, eps, D: tl.constexpr, NORM: tl.constexpr):
        """Per-row RMSNorm over the head dimension with the context or image stream's weight."""
        if NORM:
            wc = tl.load(wc_ptr + rd).to(tl.float32)
            wx = tl.load(wx_ptr + rd).to(tl.float32)
            w = tl.where(in_c[:, None], wc[None, :], wx[None, :])
            t = t * tl.math.rsqrt(tl.sum(t * t, 1) / D + eps)[:, None] * w
        return t

    @triton.jit
    def _block_e4m3(t, s_ptr, POW2: tl.constexpr):
        """``t`` scaled into E4M3's range by its absolute max (stored as the block's scale; with ``POW2`` rounded
        up to a power of two, as the attention kernel needs K's scales); clamp, cast."""
        a = tl.maximum(tl.max(tl.max(tl.abs(t), 1), 0), 1e-12)
        if POW2:
            sc = pow2_scale(a)
            tl.store(s_ptr, sc)
            return tl.clamp(t * (1.0 / sc), -448.0, 448.0)
        else:
            tl.store(s_ptr, a / 448.0)
            return tl.clamp(t * (448.0 / a), -448.0, 448.0)

    @triton.jit
    def _joint_prologue(c_ptr, x_ptr, wqc_ptr, wkc_ptr, wqx_ptr, wkx_ptr, q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr,
                        Lc, S, S_PAD, H, NB, C, eps, stride_cb, stride_cs, stride_xb, stride_xs,
                        D: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr, FP8_KV: tl.constexpr):
        nb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rn = nb * BLOCK_N + tl.arange(0, BLOCK_N)
        rd = tl.arange(0, D)
        in_c = rn < Lc
        in_x = (rn >= Lc) & (rn < S)
        c_off = b * stride_cb + rn * stride_cs
        x_off = b * stride_xb + (rn - Lc) * stride_xs
        col = h * D + rd
        q = _rms(_joint_rows(c_ptr, x_ptr, c_off, x_off, in_c, in_x, col), wqc_ptr, wqx_ptr, in_c, rd, eps, D, NORM)
        k = _rms(_joint_rows(c_ptr, x_ptr, c_off, x_off, in_c, in_x, C + col), wkc_ptr, wkx_ptr, in_c, rd, eps, D,
                 NORM)
        v = _joint_rows(c_ptr, x_ptr, c_off, x_off, in_c, in_x, 2 * C + col)
        o_off = b * S * C + rn[:, None] * C + col[None, :]
        valid = (rn < S)[:, None]
        tl.store(q_ptr + o_off, q.to(q_ptr.dtype.element_ty), mask=valid)
        if FP8_KV:  # padded keys (rows >= S) are zeros: written too, the attention kernel reads whole blocks
            k8 = _block_e4m3(k, ks_ptr + bh * NB + nb, True)
            tl.store(k_ptr + bh * S_PAD * D + rn[:, None] * D + rd[None, :], k8.to(k_ptr.dtype.element_ty))
            v8 = _block_e4m3(v, vs_ptr + bh * NB + nb, False)
            tl.store(v_ptr + bh * D * S_PAD + rd[None, :] * S_PAD + rn[:, None], v8.to(v_ptr.dtype.element_ty))
        else:
            tl.store(k_ptr + o_off, k.to(k_ptr.dtype.element_ty), mask=valid)
            tl.store(v_ptr + o_off, v.to(v_ptr.dtype.element_ty), mask=valid)


def _check(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, heads: int) -> tuple[int, int]:
    if ctx_qkv.dim() != 3 or x_qkv.dim() != 3 or ctx_qkv.shape[0] != x_qkv.shape[0] \
            or ctx_qkv.shape[2] != x_qkv.shape[2] or x_qkv.shape[2] % (3 * heads):
        raise ValueError(f"expected two packed qkv projections [B, L, 3·H·D] with one B and H·D ({heads} heads), "
                         f"got {tuple(ctx_qkv.shape)} and {tuple(x_qkv.shape)}")
    c = x_qkv.shape[2] // 3
    return c, c // heads


def _kernel_ok(ctx_qkv, x_qkv, heads: int) -> bool:
    _, d = _check(ctx_qkv, x_qkv, heads)
    return (triton is not None and x_qkv.device.type == "cuda" and ctx_qkv.device == x_qkv.device
            and x_qkv.dtype in (torch.bfloat16, torch.float16) and ctx_qkv.dtype == x_qkv.dtype
            and d in HEAD_DIMS and x_qkv.stride(-1) == 1 and ctx_qkv.stride(-1) == 1)


def joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int):
    """What ComfyUI computes: split, RMSNorm per head (None: no norm), concat context + image tokens.
    Returns contiguous q, k, v [B, Lc + Lx, H·D] in the inputs' dtype."""
    c, d = _check(ctx_qkv, x_qkv, heads)

    def part(t, i, w):
        p = t[..., i * c:(i + 1) * c]
        if w is None:
            return p
        pf = p.float().unflatten(-1, (heads, d))
        pf = pf * torch.rsqrt(pf.pow(2).mean(-1, keepdim=True) + eps) * w.to(pf.device, torch.float32)
        return pf.flatten(-2).to(p.dtype)

    ws = ((wq_c, wq_x), (wk_c, wk_x), (None, None))
    return tuple(torch.cat((part(ctx_qkv, i, w[0]), part(x_qkv, i, w[1])), dim=1) for i, w in enumerate(ws))


def _launch(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, fp8_kv: bool, block_n: int = 64):
    B, Lc, _ = ctx_qkv.shape
    S = Lc + x_qkv.shape[1]
    c, d = _check(ctx_qkv, x_qkv, heads)
    norm = wq_x is not None
    ws = [w.to(x_qkv.device, x_qkv.dtype).contiguous() if w is not None else x_qkv for w in (wq_c, wk_c, wq_x, wk_x)]
    q = torch.empty((B, S, c), device=x_qkv.device, dtype=x_qkv.dtype)
    if fp8_kv:
        k, v, ks, vs = kv_buffers(B, heads, S, d, block_n, x_qkv.device)
    else:
        k, v = torch.empty_like(q), torch.empty_like(q)
        ks = vs = q
    nb = triton.cdiv(S, block_n)
    _joint_prologue[(nb, B * heads)](ctx_qkv, x_qkv, *ws, q, k, v, ks, vs, Lc, S, nb * block_n, heads, nb, c,
                                     float(eps), ctx_qkv.stride(0), ctx_qkv.stride(1), x_qkv.stride(0),
                                     x_qkv.stride(1), D=d, BLOCK_N=block_n, NORM=norm, FP8_KV=fp8_kv, num_warps=4)
    return q, k, v, ks, vs


def _joint_qkv_fake(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads):
    B, Lc, C3 = ctx_qkv.shape
    shape = (B, Lc + x_qkv.shape[1], C3 // 3)
    return tuple(x_qkv.new_empty(shape) for _ in range(3))


@custom_op("sd35fp8::joint_qkv", _joint_qkv_fake)
def _joint_qkv(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, wq_c: torch.Tensor | None, wk_c: torch.Tensor | None,
               wq_x: torch.Tensor | None, wk_x: torch.Tensor | None, eps: float,
               heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not _kernel_ok(ctx_qkv, x_qkv, heads):
        return tuple(t.contiguous() for t in joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads))
    q, k, v, _, _ = _launch(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, fp8_kv=False)
    return q, k, v


def _joint_attention_fake(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads):
    B, Lc, C3 = ctx_qkv.shape
    return x_qkv.new_empty((B, Lc + x_qkv.shape[1], C3 // 3))


@custom_op("sd35fp8::joint_fp8_attention", _joint_attention_fake)
def _joint_fp8_attention(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, wq_c: torch.Tensor | None,
                         wk_c: torch.Tensor | None, wq_x: torch.Tensor | None, wk_x: torch.Tensor | None, eps: float,
                         heads: int) -> torch.Tensor:
    if not (_kernel_ok(ctx_qkv, x_qkv, heads) and supported(x_qkv[..., : x_qkv.shape[-1] // 3], heads)):
        CALLS["joint_sdpa"] += 1
        q, k, v = joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads)
        return reference_attention(q, k, v, heads, "cudnn")
    CALLS["joint_kernel"] += 1
    d = x_qkv.shape[-1] // 3 // heads
    cfg = ATTN_CONFIG[d]
    q, k8, vt8, ks, vs = _launch(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, fp8_kv=True, block_n=cfg[1])
    return attend(q, k8, vt8, ks, vs, heads, cfg)


def joint_qkv(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int):
    """Joint q, k, v [B, Lc + Lx, H·D] from the context and image streams' packed qkv projections [B, L, 3·H·D]
    (q and k RMS-normalized per head with each stream's weight; None: no norm): one Triton kernel on CUDA,
    :func:`joint_qkv_reference` elsewhere."""
    return _joint_qkv(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, float(eps), int(heads))


def joint_fp8_attention(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int) -> torch.Tensor:
    """Attention over the joint sequence of :func:`joint_qkv` in ComfyUI's [B, S, H·D] layout: the fused
    prologue writes K/V as E4M3 for our FP8 attention kernel; where that cannot run, SDPA (cuDNN first)."""
    return _joint_fp8_attention(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, float(eps), int(heads))
