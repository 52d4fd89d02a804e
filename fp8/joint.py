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

:func:`set_joint_blocks` installs a forward on each eligible ``JointBlock`` that does exactly what ComfyUI's
``_block_mixing`` does around this (adaLN modulation, norm1 + modulate, qkv, the post-attention parts are the
module's own methods), and uses the fused path only where our attention override is in the block's
``transformer_options`` (an attribute ``sd35fp8_backend`` on it, set by the node layer); anything else runs
the module's own forward. No ComfyUI import: the modules are duck-typed.
"""
from __future__ import annotations

import types

import torch

try:
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = None

from .formats import E4M3, quantize_inv
from .kernels import custom_op_once

if triton is not None:
    from .attention import pow2_scale

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
        from .attention import kv_buffers
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


@custom_op_once("sd35fp8::joint_qkv", _joint_qkv_fake)
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


@custom_op_once("sd35fp8::joint_fp8_attention", _joint_attention_fake)
def _joint_fp8_attention(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, wq_c: torch.Tensor | None,
                         wk_c: torch.Tensor | None, wq_x: torch.Tensor | None, wk_x: torch.Tensor | None, eps: float,
                         heads: int) -> torch.Tensor:
    from .attention import ATTN_CONFIG, CALLS, attend, reference_attention, supported
    if not (_kernel_ok(ctx_qkv, x_qkv, heads) and supported(x_qkv[..., : x_qkv.shape[-1] // 3], heads)):
        CALLS["joint_sdpa"] += 1
        q, k, v = joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads)
        return reference_attention(q, k, v, heads, "cudnn")
    CALLS["joint_kernel"] += 1
    d = x_qkv.shape[-1] // 3 // heads
    cfg = ATTN_CONFIG[d]
    q, k8, vt8, ks, vs = _launch(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, fp8_kv=True, block_n=cfg[1])
    return attend(q, k8, vt8, ks, vs, heads, cfg)


def _joint_split_fake(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, inv_c, inv_x):
    B, Lc, C3 = ctx_qkv.shape
    return (x_qkv.new_empty((B * Lc, C3 // 3), dtype=E4M3),
            x_qkv.new_empty((B * x_qkv.shape[1], C3 // 3), dtype=E4M3))


@custom_op_once("sd35fp8::joint_fp8_attention_split", _joint_split_fake)
def _joint_fp8_attention_split(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, wq_c: torch.Tensor | None,
                               wk_c: torch.Tensor | None, wq_x: torch.Tensor | None, wk_x: torch.Tensor | None,
                               eps: float, heads: int, inv_c: torch.Tensor,
                               inv_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from .attention import ATTN_CONFIG, CALLS, attend, reference_attention, supported
    lc = ctx_qkv.shape[1]
    if not (_kernel_ok(ctx_qkv, x_qkv, heads) and supported(x_qkv[..., : x_qkv.shape[-1] // 3], heads)):
        CALLS["joint_sdpa"] += 1
        o = reference_attention(*joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads), heads,
                                "cudnn")
        return (quantize_inv(o[:, :lc].reshape(-1, o.shape[-1]), inv_c),
                quantize_inv(o[:, lc:].reshape(-1, o.shape[-1]), inv_x))
    CALLS["joint_kernel"] += 1
    cfg = ATTN_CONFIG[x_qkv.shape[-1] // 3 // heads]
    q, k8, vt8, ks, vs = _launch(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, fp8_kv=True, block_n=cfg[1])
    return attend(q, k8, vt8, ks, vs, heads, cfg, split_fp8=(lc, inv_c, inv_x))


def joint_fp8_attention_split(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int, inv_c, inv_x):
    """:func:`joint_fp8_attention` whose output is written as the two projections' quantized inputs: the context
    tokens as E4M3 [B·Lc, H·D] scaled by ``inv_c``, the image tokens as E4M3 [B·Lx, H·D] scaled by ``inv_x``
    (0-d fp32: 1 / each projection's static input scale)."""
    return _joint_fp8_attention_split(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, float(eps), int(heads), inv_c, inv_x)


def joint_qkv(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int):
    """Joint q, k, v [B, Lc + Lx, H·D] from the context and image streams' packed qkv projections [B, L, 3·H·D]
    (q and k RMS-normalized per head with each stream's weight; None: no norm): one Triton kernel on CUDA,
    :func:`joint_qkv_reference` elsewhere."""
    return _joint_qkv(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, float(eps), int(heads))


def joint_fp8_attention(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps: float, heads: int) -> torch.Tensor:
    """Attention over the joint sequence of :func:`joint_qkv` in ComfyUI's [B, S, H·D] layout: the fused
    prologue writes K/V as E4M3 for our FP8 attention kernel; where that cannot run, SDPA (cuDNN first)."""
    return _joint_fp8_attention(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, float(eps), int(heads))


# -- the block forward ------------------------------------------------------------------------------------
JOINT = "_sd35fp8_joint"  # marks a JointBlock whose forward set_joint_blocks replaced
NORM = "_sd35fp8_joint_norm"  # on such a block: whether it also runs fp8.norm's LayerNorm kernels
FP8_OUT = "_sd35fp8_joint_fp8_out"  # ... and whether its FP8 attention writes the projections' E4M3 inputs
OVERRIDE = "optimized_attention_override"  # the transformer_options key of the host's attention override


def _qk_norm(attn):
    """(wq, wk, eps) of an attention's q/k norm: RMSNorm weights, or (None, None, 0.0) for no norm; None if
    the norm is anything else (LayerNorm q/k norms, unknown modules)."""
    lq, lk = attn._modules.get("ln_q"), attn._modules.get("ln_k")
    if isinstance(lq, torch.nn.Identity) and isinstance(lk, torch.nn.Identity):
        return None, None, 0.0
    if all(type(m).__name__ == "RMSNorm" and getattr(m, "weight", None) is not None for m in (lq, lk)) \
            and lq.eps == lk.eps:
        return lq.weight, lk.weight, float(lq.eps)
    return None


def _eligible(block) -> bool:
    cb, xb = block._modules.get("context_block"), block._modules.get("x_block")
    if type(block).__name__ != "JointBlock" or cb is None or xb is None or xb.pre_only \
            or getattr(cb, "x_block_self_attn", False):
        return False
    attns = [cb.attn, xb.attn] + ([xb.attn2] if getattr(xb, "x_block_self_attn", False) else [])
    norms = [_qk_norm(a) for a in attns]
    return (not cb.scale_mod_only and not xb.scale_mod_only and None not in norms
            and len({(n[0] is None, n[2]) for n in norms}) == 1
            and all(a.num_heads == xb.attn.num_heads and a.head_dim == xb.attn.head_dim for a in attns))


def _modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def _plain_ln(norm) -> float | None:
    """eps of a LayerNorm without affine parameters (SD3's norm1/norm2), else None."""
    if isinstance(norm, torch.nn.LayerNorm) and norm.weight is None and norm.bias is None \
            and tuple(norm.normalized_shape) == (norm.normalized_shape[0],):
        return float(norm.eps)
    return None


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The output dtype of our static FP8 GEMMs for activations ``x`` (as the layers' own forward picks it)."""
    return x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


def _static_fp8(layer, x) -> bool:
    return getattr(layer, "fp8_static", None) == "fp8" and layer.fp8_static_ready(x)


def _pre(d, x, c, fuse_norm: bool):
    """A DismantledBlock's pre-attention up to the qkv projection: (qkv, what post_attention takes). With
    ``fuse_norm`` and a static FP8 qkv layer: LayerNorm + modulation + quantization in one kernel (fp8.norm),
    then the GEMM."""
    mods = d.adaLN_modulation(c).chunk(2 if d.pre_only else 6, dim=1)
    eps, qkv_layer = _plain_ln(d.norm1), d.attn.qkv
    if fuse_norm and eps is not None and _static_fp8(qkv_layer, x):
        from .norm import ln_modulate_quant
        h8 = ln_modulate_quant(x, mods[0], mods[1], qkv_layer.fp8_in_inv, eps)
        qkv = qkv_layer.fp8_static_matmul(h8, _gemm_dtype(x)).view(x.shape[0], x.shape[1], -1).to(x.dtype)
    else:
        qkv = qkv_layer(_modulate(d.norm1(x), mods[0], mods[1]))
    return qkv, (None if d.pre_only else (x, *mods[2:]))


def _post(d, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, fuse_norm: bool, a=None, fused=None):
    """``DismantledBlock.post_attention`` (``a``: the attention module whose output ``attn`` is, default
    ``d.attn``; ``fused``: :func:`fused_mlp_ready` if the caller knows it). With a fused static FP8 MLP, the MLP's
    gated residual add runs in fc2's epilogue (fp8.gemm); with ``fuse_norm`` too, the attention's gated residual
    + LayerNorm + modulation + fc1's quantization run as one kernel (fp8.norm) before the MLP's kernels."""
    from .runtime import fused_mlp_ready, fused_mlp_residual
    eps, mlp, a = _plain_ln(d.norm2), d.mlp, a or d.attn
    fused = fused_mlp_ready(mlp, x) if fused is None else fused
    int8_mlp = fused and mlp.fc1.fp8_static == "int8_token"  # W8A8: fc1's input INT8 per token
    if attn.dtype != E4M3 and not fused and a is d.attn:
        return d.post_attention(attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    # attn as E4M3 [B·L, C]: the attention already wrote proj's quantized input (see _proj_inv)
    y = a.proj.fp8_static_matmul(attn, _gemm_dtype(x)).view(x.shape).to(x.dtype) if attn.dtype == E4M3 \
        else a.post_attention(attn)
    if fused and fuse_norm and eps is not None:
        from .norm import residual_ln_modulate_quant, residual_ln_modulate_quant_int8
        if int8_mlp:
            x, h8, hs = residual_ln_modulate_quant_int8(x, y, gate_msa, shift_mlp, scale_mlp, eps)
            return fused_mlp_residual(mlp, h8, x, gate_mlp, hs)
        x, h8 = residual_ln_modulate_quant(x, y, gate_msa, shift_mlp, scale_mlp, mlp.fc1.fp8_in_inv, eps)
        return fused_mlp_residual(mlp, h8, x, gate_mlp)
    x = x + gate_msa.unsqueeze(1) * y  # post_attention from here
    h = _modulate(d.norm2(x), shift_mlp, scale_mlp)
    if fused:
        h8, hs = mlp.fc1.fp8_static_input(h.reshape(-1, h.shape[-1]))
        return fused_mlp_residual(mlp, h8, x, gate_mlp, hs)
    return x + gate_mlp.unsqueeze(1) * mlp(h)


def _post_x(d, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2, fuse_norm: bool):
    """``DismantledBlock.post_attention_x`` (MMDiT-X: a second, image-only attention). With a fused static FP8
    MLP: the first attention's gated residual, then the second's as :func:`_post`'s attention (with ``fuse_norm``
    in fp8.norm's residual + LayerNorm + quantization kernel) and the MLP's gated residual in fc2's epilogue."""
    from .runtime import fused_mlp_ready
    if not fused_mlp_ready(d.mlp, x):
        return d.post_attention_x(attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)
    x = x + gate_msa.unsqueeze(1) * d.attn.post_attention(attn)
    return _post(d, attn2, x, gate_msa2, shift_mlp, scale_mlp, gate_mlp, fuse_norm, d.attn2, fused=True)


def _pre_x(d, x, c):
    """The same for an MMDiT-X image block with its second (image-only) attention."""
    mods = d.adaLN_modulation(c).chunk(9, dim=1)
    xn = d.norm1(x)
    qkv = d.attn.qkv(_modulate(xn, mods[0], mods[1]))
    qkv2 = d.attn2.qkv(_modulate(xn, mods[6], mods[7]))
    return qkv, qkv2, (x, *mods[2:6], mods[8])


def _attention(ctx_qkv, x_qkv, ca, xa, backend: str, proj_inv=None):
    """The joint attention in ComfyUI's [B, S, H·D] layout; with ``proj_inv`` (FP8 only), the context and image
    parts as their projections' E4M3 inputs instead (see :func:`joint_fp8_attention_split`)."""
    from .runtime import attention
    wq_c, wk_c, eps = _qk_norm(ca)
    wq_x, wk_x, _ = _qk_norm(xa)
    heads = xa.num_heads
    if proj_inv is not None:
        return joint_fp8_attention_split(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, *proj_inv)
    if backend == "fp8":
        return joint_fp8_attention(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads)
    if ctx_qkv.shape[1] == 0:  # image-only (MMDiT-X's attn2) with BF16 attention: Inductor's fused split + norm
        # is faster than our prologue kernel here (81.9 vs 114.8 µs, Medium b2, H100: bench/attn_bench.py --joint)
        q, k, v = joint_qkv_reference(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads)
    else:
        q, k, v = joint_qkv(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads)
    b, s, hd = q.shape
    q, k, v = (t.view(b, s, heads, hd // heads).transpose(1, 2) for t in (q, k, v))
    return attention(q, k, v, backend).transpose(1, 2).reshape(b, s, hd)


def runs_here(x: torch.Tensor) -> bool:
    """Whether the fused forward takes a call with activations ``x``: on CUDA. On the CPU the module's own forward
    is as fast and stays bit-identical to a run without the override (the CPU checks patch this to test the
    fused forward's logic there)."""
    return x.is_cuda


def joint_block_forward(self, context, x, c=None, transformer_options=None, **kwargs):
    """``JointBlock.forward`` with the fused prologue, where our attention override decides the attention
    (else, or for any call it does not know, the module's own forward)."""
    backend = getattr((transformer_options or {}).get(OVERRIDE), "sd35fp8_backend", None)
    checkpoint = kwargs.get("use_checkpoint", False) and torch.is_grad_enabled()  # training: ComfyUI's own
    if backend is None or checkpoint or set(kwargs) - {"use_checkpoint"} or context is None or c is None \
            or not runs_here(x):
        if transformer_options is not None:
            kwargs["transformer_options"] = transformer_options
        return type(self).forward(self, context, x, c=c, **kwargs)
    cb, xb = self.context_block, self.x_block
    fuse_norm = bool(self.__dict__.get(NORM, True))
    ctx_qkv, ctx_rest = _pre(cb, context, c, fuse_norm)
    if xb.x_block_self_attn:
        x_qkv, x_qkv2, x_rest = _pre_x(xb, x, c)
    else:
        x_qkv, x_rest = _pre(xb, x, c, fuse_norm)
    lc = context.shape[1]
    proj_inv = _proj_inv(self, context, x) if backend == "fp8" else None
    if proj_inv is not None:
        ctx_attn, x_attn = _attention(ctx_qkv, x_qkv, cb.attn, xb.attn, backend, proj_inv)
    else:
        attn = _attention(ctx_qkv, x_qkv, cb.attn, xb.attn, backend)
        ctx_attn, x_attn = attn[:, :lc], attn[:, lc:]
    context = None if cb.pre_only else _post(cb, ctx_attn, *ctx_rest, fuse_norm)
    if xb.x_block_self_attn:
        attn2 = _attention(x_qkv2[:, :0], x_qkv2, xb.attn2, xb.attn2, backend)
        return context, _post_x(xb, x_attn, attn2, *x_rest, fuse_norm)
    return context, _post(xb, x_attn, *x_rest, fuse_norm)


def _proj_inv(block, context, x):
    """(inv_c, inv_x) for the attention to write both projections' E4M3 inputs, where the block is set to and
    both projections run static FP8 with no dropout (the last block's context has no projection: its part is
    written with the image's scale and dropped); else None."""
    cb, xb = block.context_block, block.x_block
    if not block.__dict__.get(FP8_OUT) or xb.x_block_self_attn:
        return None
    for d, t in ((xb, x),) + (() if cb.pre_only else ((cb, context),)):
        drop = d.attn._modules.get("proj_drop")
        if not (_static_fp8(d.attn.proj, t) and (drop is None or isinstance(drop, torch.nn.Identity)
                                                 or (isinstance(drop, torch.nn.Dropout) and drop.p == 0))):
            return None
    inv_x = xb.attn.proj.fp8_in_inv
    return (inv_x if cb.pre_only else cb.attn.proj.fp8_in_inv), inv_x


def set_joint_blocks(model: torch.nn.Module, on: bool, fuse_norm: bool = True, fp8_out: bool = False) -> int:
    """Install (``on``) or remove the fused-prologue forward on every eligible JointBlock of ``model``; installed
    once per module (a new bound method each time would be a new object for torch.compile's guards).
    ``fuse_norm``: the blocks also run their LayerNorm + modulation + quantization as fp8.norm kernels (else as
    the model's own ops, which torch.compile fuses). ``fp8_out``: with FP8 attention, the attention writes the
    projections' E4M3 inputs (no BF16 output, no separate quantization). Returns how many blocks have it."""
    n = 0
    for mod in model.modules():
        if on and _eligible(mod):
            if not mod.__dict__.get(JOINT):
                mod.forward = types.MethodType(joint_block_forward, mod)
                mod.__dict__[JOINT] = True
            mod.__dict__[NORM] = bool(fuse_norm)
            mod.__dict__[FP8_OUT] = bool(fp8_out)
            n += 1
        elif mod.__dict__.pop(JOINT, False):
            for k in ("forward", NORM, FP8_OUT):
                mod.__dict__.pop(k, None)
    return n
