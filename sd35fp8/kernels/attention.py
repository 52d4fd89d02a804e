"""FP8 attention (Hopper/Ada): non-causal softmax(Q Kᵀ/√d) V with both matmuls on FP8 tensor cores.

Scales are found in the kernels, so nothing needs calibrating and nothing can overflow:
- Q: one scale per token and head (amax over the head dimension, rounded up to a power of two), taken in the
  attention kernel from the BF16 rows it loads once per program;
- K and V: one scale per (batch, head, block of ``BLOCK_N`` keys; K's a power of two), taken by one pass
  that reads K and V in BF16 and writes them as E4M3 (K as [B, H, S, D], V transposed to [B, H, D, S] so
  that both are K-major operands of the FP8 MMA) — the only extra memory traffic;
- P (softmax probabilities, ≤ 1 after the running-max shift) is scaled by 448 into E4M3's range.
Q's and K's scales are powers of two so that the softmax's scaled scores are exact products (see
``_attn_step``). Accumulation is fp32; the output is BF16/FP16 in ComfyUI's [B, S, H·D] layout, written directly.

``fp8_attention(q, k, v, heads)`` takes ComfyUI's layout ([B, S, H·D], the head dimension
contiguous). It is a ``torch.library`` custom op, so torch.compile treats it as one call.
"""
from __future__ import annotations

import collections
import contextlib
import math

import torch

import torch.nn.functional as F

from ..core.formats import E4M3
from .common import custom_op, tl, triton

# "fp8": our FP8 attention kernel; the others are SDPA backends
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fp8")

# (BLOCK_M, BLOCK_N, num_warps, num_stages, warp_specialize, exp mode) per head dim; exp mode bit 0: exp2 as
# ex2.approx.ftz, bit 1: P·V accumulated inside the MMA. Measured: H200, 2026-12-02, bench/tune/attn_bench.py and
# bench/results/2026-12-02_h200_fp8_attention_accumulation.md (how it was chosen: docs/tuning.md)
ATTN_CONFIG = {64: (64, 128, 4, 3, False, 1), 128: (64, 64, 4, 3, False, 1)}
HEAD_DIMS = (64, 128)
EXP_MODES = (0, 1, 2, 3)


def supported(q: torch.Tensor, heads: int) -> bool:
    """Whether :func:`fp8_attention` runs its FP8 kernels for these inputs (else callers use SDPA)."""
    if triton is None or q.device.type != "cuda" or q.dtype not in (torch.bfloat16, torch.float16) or q.dim() != 3:
        return False
    d = q.shape[-1] // heads
    return d in HEAD_DIMS and torch.cuda.get_device_capability(q.device) >= (8, 9)


if triton is not None:
    from .common import pow2_scale

    @triton.jit
    def _program_rows(BLOCK: tl.constexpr, H):
        """This program's block of sequence rows, and its batch*head index, batch and head."""
        bh = tl.program_id(1)
        return tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), bh, bh // H, bh % H

    @triton.jit
    def _head_rows(ptr, b, h, rows, stride_b, stride_s, S, D: tl.constexpr):
        """Rows ``rows`` of head ``h`` of batch ``b`` from a [B, S, H*D] tensor, as fp32 (zeros past S)."""
        rd = tl.arange(0, D)
        t = tl.load(ptr + b * stride_b + rows[:, None] * stride_s + h * D + rd[None, :], mask=rows[:, None] < S,
                    other=0.0)
        return t.to(tl.float32)

    @triton.jit
    def _quant_kv(k_ptr, v_ptr, k8_ptr, vt8_ptr, ks_ptr, vs_ptr, S, S_PAD, H, NB,
                  stride_kb, stride_ks, stride_vb, stride_vs,
                  D: tl.constexpr, BLOCK_N: tl.constexpr, V_FP8: tl.constexpr):
        nb = tl.program_id(0)
        rn, bh, b, h = _program_rows(BLOCK_N, H)
        rd = tl.arange(0, D)
        k = _head_rows(k_ptr, b, h, rn, stride_kb, stride_ks, S, D)
        v = _head_rows(v_ptr, b, h, rn, stride_vb, stride_vs, S, D)
        ks = pow2_scale(tl.maximum(tl.max(tl.max(tl.abs(k), 1), 0), 1e-12))  # a power of two: see _attn_step
        tl.store(ks_ptr + bh * NB + nb, ks)
        k8 = tl.clamp(k * (1.0 / ks), -448.0, 448.0).to(k8_ptr.dtype.element_ty)
        if V_FP8:
            va = tl.maximum(tl.max(tl.max(tl.abs(v), 1), 0), 1e-12)
            tl.store(vs_ptr + bh * NB + nb, va / 448.0)
            v8 = tl.clamp(v * (448.0 / va), -448.0, 448.0).to(vt8_ptr.dtype.element_ty)
        else:  # V (and P) stay 16-bit: the P·V matmul runs in BF16/FP16
            tl.store(vs_ptr + bh * NB + nb, 1.0)
            v8 = v.to(vt8_ptr.dtype.element_ty)
        tl.store(k8_ptr + bh * S_PAD * D + rn[:, None] * D + rd[None, :], k8)
        tl.store(vt8_ptr + bh * D * S_PAD + rd[None, :] * S_PAD + rn[:, None], v8)

    @triton.jit
    def _exp2(x, MODE: tl.constexpr):
        if MODE == 1:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.math.exp2(x)

    @triton.jit
    def _attn_step(q8, row_scale, m_i, l_i, acc, vs_prev, k_base, v_base, ks_ptr, vs_ptr, j, S, S_PAD,
                   rn, rd, D: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr, EXP: tl.constexpr,
                   PV_IN_MMA: tl.constexpr):
        k8 = tl.load(k_base + (j * BLOCK_N + rn)[:, None] * D + rd[None, :])
        # Q's row scale and K's block scales are powers of two, so c is one (capped: finite for any input) and
        # s·c is exact: the FMA s·c - m_new below computes the same product as the rounded max, and the row
        # maximum's exponent is exactly 0. With arbitrary scales the FMA's exact product exceeded the rounded
        # maximum by up to ulp/2 (±128 at 2^32: huge unnormalized inputs), so exp2 gave inf or 0 for every key:
        # NaN or 0 output (found on the H100). One FMA per score: the softmax bounds this kernel's speed.
        c = tl.minimum(row_scale * tl.load(ks_ptr + j), 1.2676506002282294e30)  # 2^100
        s = tl.dot(q8, tl.trans(k8))
        if MASK:  # the tail block: padded keys get no weight
            s = tl.where((j * BLOCK_N + rn)[None, :] < S, s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        p = _exp2(s * c[:, None] - m_new[:, None], EXP)
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        vt8 = tl.load(v_base + rd[:, None] * S_PAD + (j * BLOCK_N + rn)[None, :])
        vs = tl.load(vs_ptr + j)
        # acc is kept in units of the current V block's scale
        f = alpha * (vs_prev / vs)
        p8 = (p * 448.0).to(vt8.dtype)
        if PV_IN_MMA:  # the MMA accumulates in place: never promoted (Triton's FP8 default, as fast accumulation)
            acc = tl.dot(p8, tl.trans(vt8), acc * f[:, None])
        else:  # a fresh MMA per block, added in fp32 (tl.fma: not folded back into the MMA's accumulator)
            acc = tl.fma(acc, tl.broadcast_to(f[:, None], acc.shape), tl.dot(p8, tl.trans(vt8)))
        return m_new, l_i, acc, vs

    @triton.jit
    def _attn_fwd(q_ptr, k8_ptr, vt8_ptr, ks_ptr, vs_ptr, o_ptr, o2_ptr, inv_ptr, inv2_ptr, LC, S, S_PAD, H, NB,
                  qk_scale,
                  stride_qb, stride_qs, stride_ob, stride_os,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPEC: tl.constexpr,
                  EXP: tl.constexpr, SPLIT_FP8: tl.constexpr, PV_IN_MMA: tl.constexpr = False):
        rm, bh, b, h = _program_rows(BLOCK_M, H)
        rd = tl.arange(0, D)
        rn = tl.arange(0, BLOCK_N)
        q = _head_rows(q_ptr, b, h, rm, stride_qb, stride_qs, S, D) * qk_scale  # log2(e)/sqrt(d) folded in
        row_scale = pow2_scale(tl.maximum(tl.max(tl.abs(q), 1), 1e-12))  # per row, a power of two
        q8 = tl.clamp(q * (1.0 / row_scale)[:, None], -448.0, 448.0).to(k8_ptr.dtype.element_ty)
        m_i = tl.full((BLOCK_M,), -float("inf"), tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        vs = 1.0
        k_base = k8_ptr + bh * S_PAD * D
        v_base = vt8_ptr + bh * D * S_PAD
        ks_base = ks_ptr + bh * NB
        vs_base = vs_ptr + bh * NB
        n_full = S // BLOCK_N
        for j in tl.range(0, n_full, warp_specialize=WARP_SPEC):
            m_i, l_i, acc, vs = _attn_step(q8, row_scale, m_i, l_i, acc, vs, k_base, v_base, ks_base, vs_base, j,
                                           S, S_PAD, rn, rd, D, BLOCK_N, False, EXP, PV_IN_MMA)
        if n_full * BLOCK_N < S:
            m_i, l_i, acc, vs = _attn_step(q8, row_scale, m_i, l_i, acc, vs, k_base, v_base, ks_base, vs_base,
                                           n_full, S, S_PAD, rn, rd, D, BLOCK_N, True, EXP, PV_IN_MMA)
        out = acc * (vs / 448.0) / l_i[:, None]
        if SPLIT_FP8:  # rows < LC to o_ptr [B*LC, H*D], the others to o2_ptr [B*(S-LC), H*D]; E4M3, own scales
            in_c = rm < LC
            inv = tl.where(in_c, tl.load(inv_ptr), tl.load(inv2_ptr))
            o8 = tl.clamp(out * inv[:, None], -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
            o8 = o8.to(o_ptr.dtype.element_ty)
            col = h * D + rd[None, :]
            tl.store(o_ptr + (b * LC + rm)[:, None] * (H * D) + col, o8, mask=in_c[:, None])
            tl.store(o2_ptr + (b * (S - LC) + rm - LC)[:, None] * (H * D) + col, o8,
                     mask=((rm >= LC) & (rm < S))[:, None])
        else:
            tl.store(o_ptr + b * stride_ob + rm[:, None] * stride_os + h * D + rd[None, :],
                     out.to(o_ptr.dtype.element_ty), mask=rm[:, None] < S)


def attention_launch(q, k, v, heads: int, config=None, pv_fp8: bool = True) -> torch.Tensor:
    """Quantize K/V (one pass) and run the FP8 attention kernel with ``config`` (default: ATTN_CONFIG).
    ``pv_fp8=False`` keeps P and V 16-bit (only Q·Kᵀ in FP8)."""
    B, S, HD = q.shape
    D = HD // heads
    config = config or ATTN_CONFIG[D]
    bn = config[1]
    for t in (q, k, v):
        if t.stride(-1) != 1:
            raise ValueError("fp8_attention needs the head dimension contiguous")
    k8, vt8, ks, vs = kv_buffers(B, heads, S, D, bn, q.device, E4M3 if pv_fp8 else q.dtype)
    nb = ks.shape[-1]
    _quant_kv[(nb, B * heads)](k, v, k8, vt8, ks, vs, S, k8.shape[2], heads, nb, k.stride(0), k.stride(1),
                               v.stride(0), v.stride(1), D=D, BLOCK_N=bn, V_FP8=pv_fp8, num_warps=4)
    return attend(q, k8, vt8, ks, vs, heads, config)


def kv_buffers(B: int, heads: int, S: int, D: int, block_n: int, device, v_dtype=E4M3):
    """Empty K/V operands of :func:`attend`: K as E4M3 [B, H, S_PAD, D], V transposed [B, H, D, S_PAD] (S_PAD:
    S rounded up to ``block_n``; padded keys must be written as zeros), one fp32 scale per block of keys."""
    nb = triton.cdiv(S, block_n)
    k8 = torch.empty((B, heads, nb * block_n, D), device=device, dtype=E4M3)
    vt8 = torch.empty((B, heads, D, nb * block_n), device=device, dtype=v_dtype)
    ks = torch.empty((B, heads, nb), device=device, dtype=torch.float32)
    return k8, vt8, ks, torch.empty_like(ks)


def attend(q, k8, vt8, ks, vs, heads: int, config=None, split_fp8=None):
    """The FP8 attention kernel over BF16/FP16 ``q`` ([B, S, H·D], head dimension contiguous) and K/V already
    quantized into :func:`kv_buffers` with the same BLOCK_N as ``config``; returns [B, S, H·D] in q's dtype.
    ``split_fp8=(lc, inv_c, inv_x)``: instead, the first ``lc`` tokens of each sample and the others as two E4M3
    tensors [B·lc, H·D] and [B·(S - lc), H·D], scaled by the 0-d fp32 ``inv_c`` / ``inv_x`` and clamped (NaN
    kept): the next GEMMs' quantized inputs (the joint block's context and image projections)."""
    B, S, HD = q.shape
    D = HD // heads
    bm, bn, warps, stages, ws, exp = config or ATTN_CONFIG[D]
    nb = ks.shape[-1]
    if k8.shape[2] != nb * bn:
        raise ValueError(f"K/V were quantized in blocks of {k8.shape[2] // nb} keys, the kernel takes {bn}")
    if split_fp8 is None:
        lc, inv_c, inv_x = 0, ks, ks
        o = o2 = torch.empty((B, S, HD), device=q.device, dtype=q.dtype)
    else:
        lc, inv_c, inv_x = int(split_fp8[0]), *(t.to(q.device, torch.float32) for t in split_fp8[1:])
        if not 0 <= lc <= S:
            raise ValueError(f"split_fp8 needs 0 <= lc <= {S}, got {lc}")
        o = torch.empty((B * lc, HD), device=q.device, dtype=E4M3)
        o2 = torch.empty((B * (S - lc), HD), device=q.device, dtype=E4M3)
    qk_scale = 1.4426950408889634 / math.sqrt(D)
    _attn_fwd[(triton.cdiv(S, bm), B * heads)](q, k8, vt8, ks, vs, o, o2, inv_c, inv_x, lc, S, k8.shape[2], heads,
                                                nb, qk_scale, q.stride(0), q.stride(1), o.stride(0), o.stride(-2),
                                                D=D, BLOCK_M=bm, BLOCK_N=bn, WARP_SPEC=bool(ws), EXP=exp & 1,
                                                SPLIT_FP8=split_fp8 is not None,
                                                PV_IN_MMA=bool(exp & 2), num_warps=warps,
                                                num_stages=stages)
    return o if split_fp8 is None else (o, o2)


def reference_attention(q, k, v, heads: int, backend: str = "auto") -> torch.Tensor:
    """SDPA in ComfyUI's layout (what :func:`fp8_attention` approximates; its fallback with cuDNN first)."""
    B, S, HD = q.shape
    D = HD // heads
    q, k, v = (t.view(B, -1, heads, D).transpose(1, 2) for t in (q, k, v))
    with sdpa_context(backend):
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(B, S, HD)


def _fp8_attention_fake(q, k, v, heads):
    return q.new_empty(q.shape)


@custom_op("sd35fp8::fp8_attention", _fp8_attention_fake)
def _fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    CALLS["kernel"] += 1
    return attention_launch(q, k, v, heads)


# how often fp8_attention fell back to SDPA ("sdpa") and launched the FP8 kernels from the host ("kernel"), and the
# joint prologue's ops likewise ("joint_sdpa", "joint_kernel"), in eager calls (traced code under torch.compile and
# CUDA-graph replays do not count)
CALLS: collections.Counter = collections.Counter()


def _flat_heads(t: torch.Tensor, b: int, hd: int) -> torch.Tensor:
    """[B, S, H, D] → [B, S, H·D] (a view). ComfyUI's attention reads any q/k/v as [B, S, H, D]
    (``view(b, -1, heads, dim_head)``), and SD3's MMDiT passes v unflattened: [B, S, H, D]."""
    if t.dim() == 4 and t.shape[0] == b and t.shape[2] * t.shape[3] == hd:
        return t.flatten(2)
    return t


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q kᵀ/√d) v over ComfyUI's [B, S, H·D] tensors (k and v may also come as [B, S, H, D]), in FP8
    where :func:`supported` and Q, K, V have one shape; else SDPA with cuDNN first (the runtime's default)."""
    if q.dim() == 3:
        k, v = (_flat_heads(t, q.shape[0], q.shape[-1]) for t in (k, v))
    if k.shape != q.shape or v.shape != q.shape or not supported(q, heads):
        if not torch.compiler.is_compiling():  # no Python side effects in traced code (guards, recompiles)
            CALLS["sdpa"] += 1
        return reference_attention(q, k, v, heads, "cudnn")
    return _fp8_attention(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)), heads)


def _backends(name: str):
    from torch.nn.attention import SDPBackend
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = [table[name]] if name in table else []
    return first + [b for b in (table["flash"], table["efficient"], table["math"]) if b not in first]


def sdpa_context(backend: str = "auto"):
    """Context preferring ``backend`` for SDPA (others stay allowed as fallbacks)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return contextlib.nullcontext()
    if backend == "fp8":  # where our FP8 kernel cannot run, callers fall back to SDPA's best (cuDNN first)
        backend = "cudnn"
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(_backends(backend), set_priority=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal attention over [B, H, S, D] tensors with the chosen backend (``fp8``: our FP8 kernel
    where it runs, else SDPA with cuDNN first)."""
    if backend == "fp8":  # fp8_attention decides where its kernel runs (else SDPA, cuDNN first)
        b, h, s, d = q.shape
        return fp8_attention(*(t.transpose(1, 2).flatten(2) for t in (q, k, v)), h).view(
            b, s, h, d).transpose(1, 2)
    with sdpa_context(backend):
        return F.scaled_dot_product_attention(q, k, v)
