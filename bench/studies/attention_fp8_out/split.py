"""Study (not product): the joint FP8 attention writing the context and image projections' E4M3 inputs directly (no
BF16 output, no separate quantization pass): ``attend(split_fp8=...)``'s epilogue in ``sd35fp8.kernels.attention``.

It was the runtime option ``attention_fp8_out``, off by default and never timed on a GPU; the runtime route was
removed on 2026-12-05 (issue "One house"). To evaluate it: time ``joint_fp8_attention_split`` + the two projections
against ``joint_fp8_attention`` + the projections' own quantization at SD3.5 shapes on an H100/H200, and only then
bring a route back into ``sd35fp8.runtime.joint``. ``tests/unit/test_studies.py`` checks it on an FP8 GPU.
"""
from __future__ import annotations

import torch

from sd35fp8.core.formats import E4M3, quantize_inv
from sd35fp8.kernels.attention import ATTN_CONFIG, CALLS, attend, reference_attention, supported
from sd35fp8.kernels.common import custom_op
from sd35fp8.kernels.joint import _kernel_ok, _launch, joint_qkv_reference


def _joint_split_fake(ctx_qkv, x_qkv, wq_c, wk_c, wq_x, wk_x, eps, heads, inv_c, inv_x):
    B, Lc, C3 = ctx_qkv.shape
    return (x_qkv.new_empty((B * Lc, C3 // 3), dtype=E4M3),
            x_qkv.new_empty((B * x_qkv.shape[1], C3 // 3), dtype=E4M3))


@custom_op("sd35fp8_study::joint_fp8_attention_split", _joint_split_fake)
def _joint_fp8_attention_split(ctx_qkv: torch.Tensor, x_qkv: torch.Tensor, wq_c: torch.Tensor | None,
                               wk_c: torch.Tensor | None, wq_x: torch.Tensor | None, wk_x: torch.Tensor | None,
                               eps: float, heads: int, inv_c: torch.Tensor,
                               inv_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
