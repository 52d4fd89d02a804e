#!/usr/bin/env python3
"""Ablations behind the runtime's defaults (GPU): where the FP8 error comes from, what each speed
feature buys. Not the benchmark of record (that is bench/sd35_bench.py).

    python3 bench/ablate.py [--variant large] [--size 1024] [--compile-depth 6]

1. Fidelity, full depth, eager static runtime: denoiser-output error vs BF16 for layer-set and
   accumulation variants (same inputs, same calibrated scales).
2. Eager ms per denoiser call at full depth.
3. SDPA backends at the joint-attention shape.
4. torch.compile variants on the first blocks (+ the last) of the same model: ms per call.
"""
from __future__ import annotations

import os
import re
import sys
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
import common  # noqa: E402


def main():
    ap = common.arg_parser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--compile-depth", type=int, default=6)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: fidelity,eager,attention,compile")
    a = ap.parse_args()
    skip = set(a.skip.split(","))
    adapter = common.import_adapter(a.comfy)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    fp8 = sys.modules["sd35fp8"]
    from sd35pack.fp8 import runtime as rtm

    dev = mm.get_torch_device()
    t0 = time.perf_counter()
    sd = common.state_dict(a.variant, "cuda")
    print(f"state dict on GPU in {time.perf_counter() - t0:.1f} s", flush=True)
    stock = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={})
    fast = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True})
    policy = fp8.QuantPolicy()
    ours = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={"custom_operations": adapter.ops.make_ops(policy, dev)})
    del sd
    for p in (stock, fast, ours):
        mm.load_models_gpu([p], force_full_load=True)
    dm = ours.model.diffusion_model
    x, sigma, ctx, y = common.denoiser_inputs(a.batch, a.size, dev)

    # quick calibration: apply_model at several sigmas (two conditionings), max method
    common.quick_calibrate(adapter, ours, (x, sigma, ctx, y))
    rows = []

    with torch.no_grad():
        ref = common.call(stock, x, sigma, ctx, y).float()
        if "fidelity" not in skip:
            layers = fp8.fp8_layers(dm)

            def variant(name, cfg, weight_only=""):
                rtm.set_static(dm, cfg)
                if weight_only:
                    pat = re.compile(weight_only)
                    for n, m in layers.items():
                        if pat.search(n):
                            m.fp8_set_static("weight_only")
                out = common.call(ours, x, sigma, ctx, y)
                rows.append(("fidelity", name, common.rel(out, ref), bool(torch.isfinite(out).all())))
                print(rows[-1], flush=True)

            out = common.call(fast, x, sigma, ctx, y)
            rows.append(("fidelity", "stock fp8_e4m3fn_fast", common.rel(out, ref), bool(torch.isfinite(out).all())))
            rtm.clear_static(dm)
            out = common.call(ours, x, sigma, ctx, y)
            rows.append(("fidelity", "ours weight-only (all)", common.rel(out, ref), True))
            R = rtm.RuntimeConfig
            variant("static fp8, adaLN fp8, exact accum", R(fast_accum=False, adaln="fp8"))
            variant("static fp8, adaLN weight-only, exact accum", R(fast_accum=False))
            variant("static fp8, adaLN wo, fast accum", R(fast_accum=True))
            variant("static fp8, adaLN wo, fast accum, fc2 exact", R(fast_accum=True, fp32_accum=r"mlp\.fc2"))
            variant("  + context_block weight-only", R(fast_accum=False), r"context_block")
            variant("  + mlp.fc2 weight-only", R(fast_accum=False), r"mlp\.fc2")
            variant("  + mlp weight-only", R(fast_accum=False), r"\.mlp\.")
            variant("  + attn.qkv weight-only", R(fast_accum=False), r"attn2?\.qkv")
            variant("  + attn.proj weight-only", R(fast_accum=False), r"attn2?\.proj")
            variant("  + blocks 0-3 weight-only", R(fast_accum=False), r"^joint_blocks\.[0-3]\.")
            variant("  + last 4 blocks weight-only", R(fast_accum=False), r"^joint_blocks\.(3[4-7])\.")
            for margin in (1, 2):
                variant(f"static, adaLN wo, exact, margin {margin}", R(fast_accum=False, margin=margin))

        if "contrib" not in skip:
            # weight error only (BF16 activations everywhere): which layer groups carry it?
            import torch.nn.functional as F
            layers = fp8.fp8_layers(dm)
            sdm = stock.model.diffusion_model

            def weights(name, bf16="", int8=""):
                rtm.set_static(dm, rtm.RuntimeConfig(adaln="weight_only"))
                for n, m in layers.items():
                    m.fp8_set_static("weight_only")
                    ref_m = sdm.get_submodule(n)
                    if bf16 and re.search(bf16, n):
                        m.forward = ref_m.forward
                    elif int8 and re.search(int8, n):
                        w = ref_m.weight.float()
                        sc = w.abs().amax(1, keepdim=True) / 127
                        wq = ((w / sc).round().clamp(-127, 127) * sc).to(torch.bfloat16)
                        m.forward = (lambda x, wq=wq, b=ref_m.bias: F.linear(x, wq.to(x.dtype), None if b is None else b.to(x.dtype)))
                out = common.call(ours, x, sigma, ctx, y)
                for m in layers.values():
                    m.__dict__.pop("forward", None)
                rows.append(("weight error", name, common.rel(out, ref), bool(torch.isfinite(out).all())))
                print(rows[-1], flush=True)

            weights("all FP8 weights (BF16 activations)")
            weights("adaLN weights BF16, rest FP8", bf16="adaLN")
            weights("adaLN weights INT8 per-row, rest FP8", int8="adaLN")
            weights("only adaLN FP8 (rest BF16)", bf16=r"\.(attn2?|mlp)\.")
            weights("attn weights BF16", bf16=r"\.attn2?\.")
            weights("mlp weights BF16", bf16=r"\.mlp\.")
            weights("context_block BF16", bf16=r"context_block")
            weights("all INT8 per-row", int8=".")
            rtm.clear_static(dm)

        if "eager" not in skip:
            for name, p, cfg in (("stock BF16", stock, None), ("stock fp8_e4m3fn_fast", fast, None),
                                 ("ours static, exact accum", ours, rtm.RuntimeConfig(fast_accum=False)),
                                 ("ours static, fast accum", ours, rtm.RuntimeConfig(fast_accum=True)),
                                 ("ours static, fast accum, adaLN fp8", ours, rtm.RuntimeConfig(adaln="fp8"))):
                if cfg is not None:
                    rtm.set_static(dm, cfg)
                ms, _ = common.time_cuda(lambda: common.call(p, x, sigma, ctx, y))
                rows.append(("eager ms/call", name, ms, True))
                print(rows[-1], flush=True)
            tok = ctx.shape[1] + (a.size // 16) ** 2
            heads = dm.joint_blocks[0].x_block.attn.num_heads
            q = torch.randn(a.batch, heads, tok, 64, device=dev, dtype=torch.bfloat16)
            for be in ("flash", "cudnn", "efficient"):
                try:
                    ms, _ = common.time_cuda(lambda: rtm.attention(q, q, q, be), n=20)
                except Exception as e:  # noqa: BLE001
                    ms = float("nan")
                    print(be, e)
                rows.append(("attention ms (one joint attention)", be, ms, True))
                print(rows[-1], flush=True)

        if "compile" not in skip:
            k = a.compile_depth
            for p in (stock, fast, ours):
                m = p.model.diffusion_model
                m.joint_blocks = torch.nn.ModuleList(list(m.joint_blocks[:k - 1]) + [m.joint_blocks[-1]])
            torch.cuda.empty_cache()
            ref = common.call(stock, x, sigma, ctx, y).float()

            def comp(name, p, cfg=None, mode=None, attn="auto", regional=False):
                q = p.clone()
                if cfg is not None:
                    rtm.set_static(q.model.diffusion_model, cfg)
                adapter.sampling.apply_runtime_options(q, {"attention": attn, "compile": not regional,
                                               "cudagraphs": mode == "reduce-overhead"})
                if regional:
                    for b in q.model.diffusion_model.joint_blocks:
                        b.compile(dynamic=False)
                torch._dynamo.reset()
                torch.cuda.synchronize()
                t1 = time.perf_counter()
                out = common.call(q, x, sigma, ctx, y)
                torch.cuda.synchronize()
                first = time.perf_counter() - t1
                ms, out = common.time_cuda(lambda: common.call(q, x, sigma, ctx, y), n=10)
                if regional:
                    for b in q.model.diffusion_model.joint_blocks:
                        b._compiled_call_impl = None
                rows.append((f"compiled, {k} blocks: ms/call | first s | err", name,
                             f"{ms:.2f} | {first:.0f} | {common.rel(out, ref):.4f}", bool(torch.isfinite(out).all())))
                print(rows[-1], flush=True)

            R = rtm.RuntimeConfig
            comp("stock BF16 + compile", stock)
            comp("stock fp8_fast + compile", fast)
            comp("ours static fast-accum + compile (sdpa auto)", ours, R(fast_accum=True))
            comp("ours static fast-accum + compile + cudnn attention", ours, R(fast_accum=True), attn="cudnn")
            comp("ours static exact-accum + compile + cudnn", ours, R(fast_accum=False), attn="cudnn")
            comp("ours static fast-accum + regional compile + cudnn", ours, R(fast_accum=True), attn="cudnn",
                 regional=True)
            comp("ours static fast-accum + compile + cudnn + CUDA graphs", ours, R(fast_accum=True),
                 mode="reduce-overhead", attn="cudnn")
            # where the time goes: one compiled call of ours, kernels by CUDA time
            q = ours.clone()
            rtm.set_static(q.model.diffusion_model, R(fast_accum=True))
            adapter.sampling.apply_runtime_options(q, {"attention": "cudnn", "compile": True})
            common.call(q, x, sigma, ctx, y)
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                common.call(q, x, sigma, ctx, y)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=90))

    print(f"\nGPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {a.variant}, {a.size}², batch {a.batch}")
    print("| section | variant | value | finite |\n|---|---|---|---|")
    for sec, name, v, ok in rows:
        print(f"| {sec} | {name} | {v if isinstance(v, str) else f'{v:.4f}'} | {ok} |")


if __name__ == "__main__":
    main()
