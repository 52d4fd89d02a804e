#!/usr/bin/env python3
"""Where the time of our compiled FP8 model goes, and what Inductor options buy (GPU).

    python3 bench/compiled_profile.py [--variant large] [--depth 6] [--variants default,tree,autotune,...]
    python3 bench/compiled_profile.py --variant large --depth 0 --variants fp8attn --host-profile   # host side

Builds the first ``depth - 1`` blocks + the last block of the real SD3.5 shapes through ComfyUI's
model code (random weights), calibrates ours quickly (apply_model at 7 sigmas, max), then per
variant: first-call (compile) seconds, ms per denoiser call (CUDA graphs, median of 20), the error
vs BF16 on the same inputs, and a kernel profile (compiled, no graphs) grouped into GEMM /
attention / fused Triton elementwise+reductions / adaLN GEMV / other, plus the top kernels.
Not the benchmark of record (bench/sd35_bench.py); it picks what goes into it.
"""
from __future__ import annotations

import os
import re
import sys
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
import common  # noqa: E402

GROUPS = (("fused triton (pointwise/reduction)", re.compile(r"^triton_(poi|red|per)", re.I)),
          ("attention", re.compile(r"cudnn|flash|fmha|attn|sdpa|quant_kv|joint_prologue", re.I)),
          ("gemv (adaLN)", re.compile(r"gemv", re.I)),
          ("GEMM", re.compile(r"gemm|nvjet|cutlass|xmma|triton_tem|scaled_mm|_mm_|matmul|sm90|fc1_gelu", re.I)))

AUTOTUNE = {"max_autotune_gemm": True, "max_autotune_gemm_backends": "TRITON,ATEN"}
# variant: (Inductor config patch, attention backend, graphs[, RuntimeConfig fields]). Each variant runs compiled without graphs and
# with the runtime's CUDA graphs (the whole compiled model replayed by sd35fp8.runtime.graphs.GraphedModule); "tree"
# runs only with torch.compile's reduce-overhead mode (cudagraph trees) instead, for comparison.
VARIANTS = {
    "default": ({}, "cudnn", "ours"),
    "tree": ({}, "cudnn", "tree"),
    "autotune": (AUTOTUNE, "cudnn", "ours"),
    "autotune_fp8attn": (AUTOTUNE, "fp8", "ours"),
    "coord": ({"coordinate_descent_tuning": True}, "cudnn", "ours"),
    "fp8attn": ({}, "fp8", "ours"),
    "coord_fp8attn": ({"coordinate_descent_tuning": True}, "fp8", "ours"),
    # multi_kernel 2: force persistent reductions (the LayerNorm over 1536/2432 channels reads each row once)
    "persist_fp8attn": ({"triton.multi_kernel": 2}, "fp8", "ours"),
    "multik_fp8attn": ({"triton.multi_kernel": 1}, "fp8", "ours"),
    "nofuse": ({}, "cudnn", "ours", {"fuse_mlp": False}),
    "nofuse_fp8attn": ({}, "fp8", "ours", {"fuse_mlp": False}),
    # without the fused joint-attention prologue (sd35fp8.kernels.joint): ComfyUI's q/k RMSNorm + concat (+ K/V quantization)
    "nojoint": ({}, "cudnn", "ours", {"fuse_attention": False}),
    "nojoint_fp8attn": ({}, "fp8", "ours", {"fuse_attention": False}),
    # the joint forward without sd35fp8.kernels.norm's LayerNorm+modulation+quantization kernels (Inductor's fused ones)
    "nonorm": ({}, "cudnn", "ours", {"fuse_norm": False}),
    "nonorm_fp8attn": ({}, "fp8", "ours", {"fuse_norm": False}),
    # the FP8 attention writes the projections' E4M3 inputs (RuntimeConfig.attention_fp8_out, off by default)
    "fp8out_fp8attn": ({}, "fp8", "ours", {"attention_fp8_out": True}),
}


def host_and_pipelined(fn, n: int = 10):
    """(median host ms of one call until it returns, GPU idle before it; ms per call of ``n`` calls issued back
    to back with one sync at the end, as a sampling loop without host syncs runs them)."""
    import statistics
    import torch
    hosts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        hosts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(hosts), common.back_to_back_ms(fn, n)


def host_profile(fn, n: int = 20, top: int = 30) -> str:
    """cProfile of ``n`` calls of ``fn`` (host side only: each call profiled from an idle GPU, the sync after it
    not profiled), by cumulative time: what a CUDA-graph call spends on the host before and after its replay (ComfyUI's apply_model, the wrappers, the graph runner's
    signature and weight-version checks, the input copies, the output clone)."""
    import cProfile
    import io
    import pstats
    import torch
    fn()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    for _ in range(n):  # each call with the GPU idle (as a synced call), the sync itself not profiled: calls
        prof.enable()   # issued back to back would show the host blocked on a full launch queue instead
        fn()
        prof.disable()
        torch.cuda.synchronize()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return f"  host profile, {n} calls (cumulative s over all calls):\n" + out.getvalue()


def gaps(kev, top: int = 8) -> str:
    """Idle time between consecutive GPU activities of one call (the GPU's own launch latency between dependent
    kernels, which CUDA graphs do not remove and programmatic dependent launch would hide): total, per gap, and
    summed by the (previous -> next) kernel pair."""
    ev = sorted(kev, key=lambda e: e.time_range.start)
    by, total, n, end = {}, 0.0, 0, None
    for prev, e in zip(ev, ev[1:]):
        end = max(end or prev.time_range.end, prev.time_range.end)
        g = e.time_range.start - end
        if g <= 0:
            continue
        key = f"{prev.name[:40]} -> {e.name[:40]}"
        t, c = by.get(key, (0.0, 0))
        by[key] = (t + g, c + 1)
        total, n = total + g, n + 1
    lines = [f"  gaps: {total / 1000:.2f} ms idle in {n} gaps between {len(ev)} activities "
             f"({total / max(n, 1):.2f} µs each)"]
    lines += [f"    {t / 1000:6.3f} ms x{c:<4d} ({t / c:.2f} µs) {k}" for k, (t, c) in
              sorted(by.items(), key=lambda kv: -kv[1][0])[:top]]
    return "\n".join(lines)


def profile_groups(fn, top: int):
    """Kernel time by group and the top kernels of one call; plus the call's timeline: host time until
    the call returns (no sync), wall time to the end of its GPU work, GPU span and kernel busy time."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kev = [e for e in prof.events() if e.device_type.name == "CUDA"]
    span = (max(e.time_range.end for e in kev) - min(e.time_range.start for e in kev)) / 1000 if kev else 0.0
    busy = sum(e.time_range.elapsed_us() for e in kev) / 1000
    walls, hosts = [], []
    for _ in range(5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        hosts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t0)
    timeline = (f"  timeline: wall {1000 * min(walls):.2f} ms, host until return {1000 * min(hosts):.2f} ms, GPU span "
                f"{span:.2f} ms, kernels busy {busy:.2f} ms ({len(kev)} kernels)\n" + gaps(kev))
    ev = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0)]
    tot, groups, kern = 0.0, {}, []
    for e in ev:
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if not t:
            continue
        tot += t
        g = next((n for n, rx in GROUPS if rx.search(e.key)), "other")
        groups[g] = groups.get(g, 0.0) + t
        kern.append((t, e.count, e.key))
    kern.sort(reverse=True)
    lines = [f"  GPU time {tot / 1000:.2f} ms: " + ", ".join(f"{g} {t / 1000:.2f} ms ({100 * t / tot:.0f}%)"
                                                             for g, t in sorted(groups.items(), key=lambda x: -x[1]))]
    lines.append(timeline)
    lines += [f"    {t / 1000:7.3f} ms  x{c:<4d} {k[:110]}" for t, c, k in kern[:top]]
    return "\n".join(lines)


def main():
    ap = common.arg_parser()
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--depth", type=int, default=6)
    ap.add_argument("--variants", default="default,autotune")
    ap.add_argument("--top", type=int, default=18)
    ap.add_argument("--stock", action="store_true", help="also stock BF16 and fp8_e4m3fn_fast + compile")
    ap.add_argument("--profile-graphs", action="store_true", help="also profile the CUDA-graph runs")
    ap.add_argument("--host-profile", action="store_true",
                    help="cProfile the host side of 20 CUDA-graph calls (where a synced call's host time goes)")
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (the benchmark of record uses bfloat16)")
    a = ap.parse_args()
    adapter = common.import_adapter(a.comfy)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    from comfy_api.torch_helpers import set_torch_compile_wrapper
    fp8 = sys.modules["sd35fp8"]
    from sd35pack.fp8 import runtime as rtm

    dev = mm.get_torch_device()
    sd = common.state_dict(a.variant, "cuda")
    k = a.depth or common.SHAPES[a.variant][0]
    dt = getattr(torch, a.dtype)
    stock = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dt})
    ours = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={"custom_operations": adapter.ops.make_ops(fp8.QuantPolicy(), dev), "dtype": dt})
    fast = comfy.sd.load_diffusion_model_state_dict(
        dict(sd), model_options={"dtype": torch.float8_e4m3fn, "fp8_optimizations": True}) if a.stock else None
    del sd
    mm.load_models_gpu([p for p in (stock, ours, fast) if p is not None], force_full_load=True)
    dm = ours.model.diffusion_model
    x, sigma, ctx, y = common.denoiser_inputs(a.batch, a.size, dev)
    common.quick_calibrate(adapter, ours, (x, sigma, ctx, y))
    rtm.set_static(dm, rtm.RuntimeConfig(fast_accum=True))
    for p in (stock, ours, fast):
        if p is not None:
            m = p.model.diffusion_model
            if k < len(m.joint_blocks):
                m.joint_blocks = torch.nn.ModuleList(list(m.joint_blocks[:k - 1]) + [m.joint_blocks[-1]])
    torch.cuda.empty_cache()
    rows, profiles = [], []
    with torch.no_grad():
        ref = common.call(stock, x, sigma, ctx, y).float()

        def run(name, p, patch, graphs_too=True):
            import torch._inductor.config as icfg
            out = {}
            inductor, attn, kind, *rt = patch
            if not name.startswith("stock"):
                rtm.set_static(dm, rtm.RuntimeConfig(fast_accum=True, **(rt[0] if rt else {})))
            for graphs in ((True,) if kind == "tree" else (False, True) if graphs_too else (False,)):
                torch._dynamo.reset()
                q = p.clone()
                if name.startswith("stock"):
                    set_torch_compile_wrapper(model=q, backend="inductor")
                elif kind == "tree":
                    adapter.sampling.apply_runtime_options(q, adapter.state.Runtime(attention=attn, compile=False))
                    set_torch_compile_wrapper(model=q, backend="inductor", mode="reduce-overhead")
                else:
                    adapter.sampling.apply_runtime_options(q, adapter.state.Runtime(attention=attn, compile=True, cudagraphs=graphs))
                with icfg.patch(inductor):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    o = common.call(q, x, sigma, ctx, y)
                    torch.cuda.synchronize()
                    first = time.perf_counter() - t0
                    ms, o = common.time_cuda(lambda: common.call(q, x, sigma, ctx, y), n=20, warmup=3)
                    host, piped = host_and_pipelined(lambda: common.call(q, x, sigma, ctx, y))
                    print(f"  {name}{' + graphs' if graphs else ''}: {ms:.2f} ms per call (synced), host {host:.2f} ms "
                          f"until return, {piped:.2f} ms per call back to back", flush=True)
                    if graphs and a.host_profile:
                        print(host_profile(lambda: common.call(q, x, sigma, ctx, y)), flush=True)
                    if not graphs or a.profile_graphs:
                        profiles.append(f"{name}{' + graphs' if graphs else ''}:\n" + profile_groups(lambda: common.call(q, x, sigma, ctx, y), a.top))
                        print(profiles[-1], flush=True)
                out[graphs] = (ms, first)
                err = common.rel(o, ref)
                fin = bool(torch.isfinite(o).all())
                q = None  # free the clone before the next one
            nan = (float("nan"),)
            rows.append((name, out.get(False, nan)[0], out.get(True, nan)[0],
                         " / ".join(f"{v[1]:.0f}" for v in out.values()), err, fin))
            print(rows[-1], flush=True)

        if a.stock:
            run("stock BF16 + compile", stock, ({}, None, None), graphs_too=False)
            run("stock fp8_e4m3fn_fast + compile", fast, ({}, None, None), graphs_too=False)
        for v in a.variants.split(","):
            try:
                run(f"ours {v}", ours, VARIANTS[v])
            except Exception as e:  # noqa: BLE001
                print(f"ours {v} FAILED: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                rows.append((f"ours {v} (failed: {type(e).__name__})", float("nan"), float("nan"), "-", float("nan"),
                             False))

    print(f"\nGPU {torch.cuda.get_device_name()}, torch {torch.__version__}, {a.variant} first {k - 1} blocks + "
          f"last, {a.size}², batch {a.batch}; command: python3 bench/compiled_profile.py {' '.join(sys.argv[1:])}")
    print("\n".join(profiles))
    print("| variant | ms compiled | ms compiled + CUDA graphs | first call s (no graphs / graphs) | err vs BF16 | "
          "finite |\n|---|---|---|---|---|---|")
    for n, m1, m2, f, e, ok in rows:
        print(f"| {n} | {m1:.2f} | {m2:.2f} | {f} | {e:.4f} | {ok} |")


if __name__ == "__main__":
    main()
