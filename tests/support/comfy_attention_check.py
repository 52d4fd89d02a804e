#!/usr/bin/env python3
"""Which attention calls of ComfyUI's real SD3 MMDiT reach our FP8 attention kernel (run by
tests/unit/test_attention.py with ComfyUI's Python; CPU is enough).

    python tests/support/comfy_attention_check.py COMFYUI_DIR

Builds tiny SD3.5 Large and Medium models through ComfyUI's own model code, installs the pack's
``attention=fp8`` override, and stands in for the FP8 kernel (which needs an FP8 GPU) with a
recorder that computes exact SDPA: every call that would reach the kernel is recorded with its
shapes. Prints one JSON line: per variant, the recorded calls, the SDPA fallbacks, the number of
joint blocks, and the output's difference from ComfyUI's own attention.
"""
from __future__ import annotations

import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts")]

from tests.support.adapter import call, import_adapter, quick_calibrate  # noqa: E402


def main(comfy_dir: str) -> None:
    adapter = import_adapter(comfy_dir, cpu=True)
    import torch
    import comfy.sd
    import tiny_sd35
    import sd35fp8.kernels.attention as att
    import sd35fp8.kernels.joint as kjoint
    import sd35fp8.runtime.joint as joint
    seen = []

    def kernel(q, k, v, heads):  # where the Triton kernels would run: check what they would get
        seen.append([list(t.shape) for t in (q, k, v)] + [heads, all(t.stride(-1) == 1 for t in (q, k, v))])
        return att.reference_attention(q, k, v, heads, "math")

    # the two hardware checks, as on an FP8 GPU; everything else is the real code path
    att.supported = kjoint.supported = lambda q, heads: q.dim() == 3 and q.shape[-1] // heads in att.HEAD_DIMS
    adapter.sampling.on_gpu = lambda t: True
    joint.runs_here = lambda t: True
    att._fp8_attention = kernel
    report = {}
    for variant, attn2 in (("large", 0), ("medium", 1)):
        sd = tiny_sd35.mmdit_state_dict(depth=2, variant=variant, attn2_blocks=attn2 or None)
        m = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float32})
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 16, 32, 32, generator=g)
        ctx = torch.randn(2, 20, 4096, generator=g)
        y = torch.randn(2, 2048, generator=g)
        sigma = torch.full((2,), 0.7)
        with torch.no_grad():
            ref = call(m, x, sigma, ctx, y)
            seen.clear()
            att.CALLS.clear()
            adapter.sampling.apply_runtime_options(m, adapter.state.Runtime(attention="fp8", compile=False))
            out = call(m, x, sigma, ctx, y)
        report[variant] = {"kernel_calls": list(seen), "sdpa_fallbacks": att.CALLS["sdpa"],
                           "joint_blocks": len(m.model.diffusion_model.joint_blocks),
                           "max_abs_diff": float((out - ref).abs().max()), "ref_max": float(ref.abs().max())}
        # the fused joint-block forward (sd35fp8.kernels.joint): on CPU its ops run their torch reference; it must
        # compute what ComfyUI's _block_mixing computes, for each backend, and be taken for every block
        dm = m.model.diffusion_model
        report[variant]["joint_installed"] = joint.set_joint_blocks(dm, True)
        for backend in ("fp8", "math"):
            att.CALLS.clear()
            seen.clear()
            calls = []
            real = joint.joint_qkv
            joint.joint_qkv = lambda *a: calls.append(a[-1]) or real(*a)
            adapter.sampling.apply_runtime_options(m, adapter.state.Runtime(attention=backend, compile=False))
            with torch.no_grad():
                out = call(m, x, sigma, ctx, y)
            joint.joint_qkv = real
            report[variant][f"joint_{backend}"] = {
                "fp8_calls": att.CALLS["joint_sdpa"] + att.CALLS["joint_kernel"], "qkv_calls": len(calls),
                "stock_calls": len(seen), "max_abs_diff": float((out - ref).abs().max())}
        adapter.sampling.apply_runtime_options(m, adapter.state.Runtime(attention="auto", compile=False))
        # no override of ours (here "auto" resolves to none on CPU, to cuDNN on a CUDA machine): ComfyUI's own
        m.model_options["transformer_options"].pop("optimized_attention_override", None)
        with torch.no_grad():
            report[variant]["joint_no_override_equal"] = bool(torch.equal(call(m, x, sigma, ctx, y), ref))
        report[variant]["joint_removed"] = joint.set_joint_blocks(dm, False) == 0 and "forward" not in \
            dm.joint_blocks[0].__dict__
    report["static"] = static_joint_check(adapter, tiny_sd35, "large")
    report["static_medium"] = static_joint_check(adapter, tiny_sd35, "medium")
    report["static_int8_mlp"] = static_joint_check(adapter, tiny_sd35, "medium", int8_mlp=True)
    print("RESULT " + json.dumps(report))


def static_joint_check(adapter, tiny_sd35, variant: str, int8_mlp: bool = False) -> dict:
    """The fused joint forward on a calibrated static-FP8 model (tiny Large or Medium with MMDiT-X blocks 0-1, our
    loader's ops, bf16 on the CPU
    with the Hopper-only fused-MLP check set as on such a GPU): it must take its LayerNorm+modulation+quant
    ops and compute what the static runtime computes through ComfyUI's own block code. ``int8_mlp``: the
    QuantPolicy(adaln_int8=True, mlp_int8=True) (W8A8 MLPs: the INT8 per-token norm op before fc1)."""
    import torch
    import comfy.sd
    fp8 = sys.modules["sd35fp8"]
    import sd35fp8.runtime.joint as norm  # the fused forward's kernel calls, by the names it calls them
    import sd35fp8.runtime.mlp as gemm
    import sd35fp8.runtime.static as rtm
    gemm.fused_supported = lambda w8, device: True
    sd = tiny_sd35.mmdit_state_dict(depth=3, variant=variant)
    ops = adapter.ops.make_ops(fp8.QuantPolicy(adaln_int8=int8_mlp, mlp_int8=int8_mlp), torch.device("cpu"))
    m = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops,
                                                                    "dtype": torch.bfloat16})
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 32, 32, generator=g)
    ctx = torch.randn(2, 20, 4096, generator=g)
    y = torch.randn(2, 2048, generator=g)
    sigma = torch.full((2,), 0.6)
    dm = m.model.diffusion_model
    quick_calibrate(adapter, m, (x, sigma, ctx, y))
    adapter.sampling.apply_runtime_options(m, adapter.state.Runtime(attention="math", compile=False))
    calls = {"ln": 0, "res": 0, "fc2": 0, "res8": 0}
    real = (norm.ln_modulate_quant, norm.residual_ln_modulate_quant, gemm.fp8_linear_residual,
            norm.residual_ln_modulate_quant_int8)

    def ln(*a):
        calls["ln"] += 1
        return real[0](*a)

    def res(*a):
        calls["res"] += 1
        return real[1](*a)

    def fc2(*a, **k):
        calls["fc2"] += 1
        return real[2](*a, **k)

    def res8(*a):
        calls["res8"] += 1
        return real[3](*a)

    norm.ln_modulate_quant, norm.residual_ln_modulate_quant, gemm.fp8_linear_residual = ln, res, fc2
    norm.residual_ln_modulate_quant_int8 = res8
    out = {}
    with torch.no_grad():
        for fused in (False, True):
            rtm.set_static(dm, rtm.RuntimeConfig(fuse_attention=fused))
            out[fused] = call(m, x, sigma, ctx, y).float()
    norm.ln_modulate_quant, norm.residual_ln_modulate_quant, gemm.fp8_linear_residual = real[:3]
    norm.residual_ln_modulate_quant_int8 = real[3]
    mlp_modes = sorted({(b.x_block.mlp.fc1.fp8_static, b.x_block.mlp.fc2.fp8_static) for b in dm.joint_blocks})
    n = len(dm.joint_blocks)
    return {"blocks": n, "attn2_blocks": sum(1 for b in dm.joint_blocks if b.x_block.x_block_self_attn),
            "ln_calls": calls["ln"], "res_calls": calls["res"], "fc2_res_calls": calls["fc2"],
            "res_int8_calls": calls["res8"], "mlp_modes": mlp_modes,
            "rel_diff": float((out[True] - out[False]).norm() / out[False].norm()),
            "finite": bool(torch.isfinite(out[True]).all())}


if __name__ == "__main__":
    main(sys.argv[1])
