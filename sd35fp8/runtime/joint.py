"""The SD3 joint block's forward with fused kernels, installed on each eligible ``JointBlock`` by the static runtime.

It does exactly what ComfyUI's ``_block_mixing`` does (adaLN modulation, norm1 + modulate, qkv, the post-attention
parts are the module's own methods) with the joint-attention prologue of ``sd35fp8.kernels.joint`` (q/k RMSNorm,
context + image concat and, for FP8 attention, K/V quantization in one kernel), the LayerNorm + modulation +
quantization kernels of ``sd35fp8.kernels.norm`` (``fuse_norm``) and the fused MLP (``sd35fp8.runtime.mlp``). The
fused path runs only where the host's attention override is in the block's ``transformer_options`` and names its
backend (an attribute ``sd35fp8_backend`` on it); anything else runs the module's own forward. The modules are
duck-typed: nothing here imports the host framework.
"""
from __future__ import annotations

import torch

from ..core.marks import install_forward, marks, peek, restore_forward
from ..kernels.attention import attention
from ..kernels.joint import joint_fp8_attention, joint_qkv, joint_qkv_reference
from ..kernels.norm import ln_modulate_quant, residual_ln_modulate_quant, residual_ln_modulate_quant_int8
from .mlp import fused_mlp_ready, fused_mlp_residual

JOINT = "joint_block"  # the installed forward's kind (sd35fp8.core.marks)
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


def _centered_shift(shift: torch.Tensor, layer) -> torch.Tensor:
    """The modulation shift [B, C] that the fused LayerNorm kernels add before quantizing ``layer``'s input, less
    the layer's static input center where it has one (sd35fp8.core.centering): the kernel then writes ``x - center``
    and the GEMM adds ``W · center``."""
    c = layer.fp8_in_center
    return shift if c is None else (shift.float() - c).to(shift.dtype)


def _pre(d, x, c, fuse_norm: bool):
    """A DismantledBlock's pre-attention up to the qkv projection: (qkv, what post_attention takes). With
    ``fuse_norm`` and a static FP8 qkv layer: LayerNorm + modulation + quantization in one kernel
    (sd35fp8.kernels.norm), then the GEMM."""
    mods = d.adaLN_modulation(c).chunk(2 if d.pre_only else 6, dim=1)
    eps, qkv_layer = _plain_ln(d.norm1), d.attn.qkv
    if fuse_norm and eps is not None and _static_fp8(qkv_layer, x):
        h8 = ln_modulate_quant(x, _centered_shift(mods[0], qkv_layer), mods[1], qkv_layer.fp8_in_inv, eps)
        qkv = qkv_layer.fp8_static_matmul(h8, _gemm_dtype(x)).view(x.shape[0], x.shape[1], -1).to(x.dtype)
    else:
        qkv = qkv_layer(_modulate(d.norm1(x), mods[0], mods[1]))
    return qkv, (None if d.pre_only else (x, *mods[2:]))


def _post(d, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, fuse_norm: bool, a=None, fused=None):
    """``DismantledBlock.post_attention`` (``a``: the attention module whose output ``attn`` is, default
    ``d.attn``; ``fused``: :func:`fused_mlp_ready` if the caller knows it). With a fused static FP8 MLP, the MLP's
    gated residual add runs in fc2's epilogue (sd35fp8.kernels.mlp); with ``fuse_norm`` too, the attention's gated
    residual + LayerNorm + modulation + fc1's quantization run as one kernel (sd35fp8.kernels.norm) before the MLP's
    kernels."""
    eps, mlp, a = _plain_ln(d.norm2), d.mlp, a or d.attn
    fused = fused_mlp_ready(mlp, x) if fused is None else fused
    int8_mlp = fused and mlp.fc1.fp8_static == "int8_token"  # W8A8: fc1's input INT8 per token
    if not fused and a is d.attn:
        return d.post_attention(attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
    y = a.post_attention(attn)
    if fused and fuse_norm and eps is not None:
        if int8_mlp:
            x, h8, hs = residual_ln_modulate_quant_int8(x, y, gate_msa, _centered_shift(shift_mlp, mlp.fc1),
                                                        scale_mlp, eps)
            return fused_mlp_residual(mlp, h8, x, gate_mlp, hs)
        x, h8 = residual_ln_modulate_quant(x, y, gate_msa, _centered_shift(shift_mlp, mlp.fc1), scale_mlp,
                                           mlp.fc1.fp8_in_inv, eps)
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
    in sd35fp8.kernels.norm's residual + LayerNorm + quantization kernel) and the MLP's gated residual in fc2's
    epilogue."""
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


def _attention(ctx_qkv, x_qkv, ca, xa, backend: str):
    """The joint attention in ComfyUI's [B, S, H·D] layout."""
    wq_c, wk_c, eps = _qk_norm(ca)
    wq_x, wk_x, _ = _qk_norm(xa)
    heads = xa.num_heads
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
    fuse_norm = peek(self).joint_norm
    ctx_qkv, ctx_rest = _pre(cb, context, c, fuse_norm)
    if xb.x_block_self_attn:
        x_qkv, x_qkv2, x_rest = _pre_x(xb, x, c)
    else:
        x_qkv, x_rest = _pre(xb, x, c, fuse_norm)
    lc = context.shape[1]
    attn = _attention(ctx_qkv, x_qkv, cb.attn, xb.attn, backend)
    ctx_attn, x_attn = attn[:, :lc], attn[:, lc:]
    context = None if cb.pre_only else _post(cb, ctx_attn, *ctx_rest, fuse_norm)
    if xb.x_block_self_attn:
        attn2 = _attention(x_qkv2[:, :0], x_qkv2, xb.attn2, xb.attn2, backend)
        return context, _post_x(xb, x_attn, attn2, *x_rest, fuse_norm)
    return context, _post(xb, x_attn, *x_rest, fuse_norm)


def set_joint_blocks(model: torch.nn.Module, on: bool, fuse_norm: bool = True) -> int:
    """Install (``on``) or remove the fused-prologue forward on every eligible JointBlock of ``model``; installed
    once per module (a new bound method each time would be a new object for torch.compile's guards).
    ``fuse_norm``: the blocks also run their LayerNorm + modulation + quantization as sd35fp8.kernels.norm kernels (else
    as the model's own ops, which torch.compile fuses). Returns how many blocks have it."""
    n = 0
    for mod in model.modules():
        if on and _eligible(mod):
            install_forward(mod, JOINT, joint_block_forward)
            marks(mod).joint_norm = bool(fuse_norm)
            n += 1
        else:
            restore_forward(mod, JOINT)
    return n
