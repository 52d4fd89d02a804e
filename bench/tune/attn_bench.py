#!/usr/bin/env python3
"""FP8 attention (sd35fp8/kernels/attention.py) vs BF16 SDPA at SD3.5's attention shapes: time, TFLOP/s, error.

    python3 bench/attn_bench.py [--sweep]

Inputs shaped like the MMDiT's: Q and K after a per-head RMSNorm (unit RMS times a learned weight),
V random normal; error = relative L2 vs an fp32 reference. ``--sweep`` times the tile/pipelining configs
(tiles, warps, warp specialization, exp mode: see sd35fp8.kernels.attention.ATTN_CONFIG) of the attention kernel, with
each new kernel's registers, spills and shared memory, and prints the best per shape (to set ATTN_CONFIG).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/

import torch  # noqa: E402
import triton.testing  # noqa: E402

from sd35fp8.kernels.attention import ATTN_CONFIG, EXP_MODES, attention_launch, fp8_attention, reference_attention  # noqa: E402
from sd35fp8.kernels.attention import attention as sdpa  # noqa: E402

SHAPES = [("Large joint, b2", 2, 38, 4250), ("Large joint, b8", 8, 38, 4250),
          ("Medium joint, b2", 2, 24, 4250), ("Medium attn2 (x only), b2", 2, 24, 4096)]
D = 64


def inputs(b, h, s, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def normed():
        x = torch.randn(b, s, h, D, device="cuda", generator=g)
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        w = 1 + 0.5 * torch.randn(D, device="cuda", generator=g)
        return (x * w).reshape(b, s, h * D).to(torch.bfloat16)

    q, k = normed(), normed()
    v = torch.randn(b, s, h * D, device="cuda", generator=g).to(torch.bfloat16)
    return q, k, v


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def bshd_sdpa(q, k, v, h, backend):
    b, s, hd = q.shape
    q, k, v = (t.view(b, s, h, hd // h).transpose(1, 2) for t in (q, k, v))
    return sdpa(q, k, v, backend).transpose(1, 2).reshape(b, s, hd)


def _attn_kernels() -> list:
    from sd35fp8.kernels import attention
    try:
        return list(attention._attn_fwd.device_caches[torch.cuda.current_device()][0].values())
    except Exception:  # noqa: BLE001 - Triton internals vary between versions
        return []


def compiled_count() -> int:
    return len(_attn_kernels())


def kernel_resources() -> str:
    """Registers, spills and shared memory of the attention kernel compiled last (Triton's JIT cache)."""
    ks = _attn_kernels()
    if not ks:
        return "(resources unknown)"
    return f"regs {ks[-1].n_regs} spills {ks[-1].n_spills} smem {ks[-1].metadata.shared}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-shapes", default="Large joint, b2", help="';'-separated shape names to sweep")
    ap.add_argument("--joint", action="store_true", help="only the fused joint prologue (sd35fp8/kernels/joint.py) vs "
                    "ComfyUI's split + RMSNorm + concat (compiled) before the same attention")
    a = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if a.joint:
        return joint_table()
    rows = []
    for name, b, h, s in SHAPES:
        q, k, v = inputs(b, h, s)
        ref = reference_attention(q.float(), k.float(), v.float(), h)
        flops = 4 * b * h * s * s * D
        r = {"shape": name}
        for label, fn in (("cudnn bf16", lambda: bshd_sdpa(q, k, v, h, "cudnn")),
                          ("flash bf16", lambda: bshd_sdpa(q, k, v, h, "flash")),
                          ("fp8 (ours, with K/V quant)", lambda: fp8_attention(q, k, v, h)),
                          ("fp8 QK only", lambda: attention_launch(q, k, v, h, pv_fp8=False))):
            out = fn()
            ms = triton.testing.do_bench(fn, warmup=25, rep=200)
            r[label] = (ms, flops / ms / 1e9, rel(out, ref), bool(torch.isfinite(out).all()))
            print(f"{name:28s} {label:28s} {ms * 1e3:8.1f} us {flops / ms / 1e9:7.1f} TF/s err {rel(out, ref):.4f}",
                  flush=True)
        if a.sweep and name in a.sweep_shapes.split(";"):
            best = None
            # the default tile in depth (pipelining, warp specialization, exp2), the other tiles at 3 stages
            configs = [(64, 64, 4, st, ws, e) for st, ws, e in itertools.product((2, 3, 4), (False, True), EXP_MODES)
                       if e or not ws]
            configs += [(bm, bn, w, 3, ws, 1) for (bm, bn, w), ws in
                        itertools.product(((64, 128, 4), (128, 64, 8), (128, 128, 8)), (False, True))]
            for cfg in configs:
                try:
                    n_compiled = compiled_count()
                    out = attention_launch(q, k, v, h, cfg)
                    res = kernel_resources() if compiled_count() > n_compiled else "(compiled before)"
                    ms = triton.testing.do_bench(lambda: attention_launch(q, k, v, h, cfg), warmup=10, rep=60)
                except Exception as e:  # noqa: BLE001 - configs that do not fit are skipped
                    print(f"  {cfg}: failed ({type(e).__name__})", flush=True)
                    continue
                print(f"  {cfg}: {ms * 1e3:.1f} us err {rel(out, ref):.4f} {res}", flush=True)
                if best is None or ms < best[1]:
                    best = (cfg, ms)
            r["best"] = best
            print(f"  best {best[0]} {best[1] * 1e3:.1f} us (current {ATTN_CONFIG[D]})", flush=True)
        rows.append(r)
    print("\n| shape | cuDNN BF16 µs (TF/s, err) | flash BF16 µs | FP8 ours µs (TF/s, err) | FP8 / cuDNN "
          "| FP8 QK only µs (err) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        c, f, o, h = r["cudnn bf16"], r["flash bf16"], r["fp8 (ours, with K/V quant)"], r["fp8 QK only"]
        print(f"| {r['shape']} | {c[0] * 1e3:.0f} ({c[1]:.0f}, {c[2]:.4f}) | {f[0] * 1e3:.0f} | "
              f"{o[0] * 1e3:.0f} ({o[1]:.0f}, {o[2]:.4f}{'' if o[3] else ', NaN!'}) | {o[0] / c[0]:.2f} "
              f"| {h[0] * 1e3:.0f} ({h[2]:.4f}) |")


def joint_table():
    """The joint block's attention from the two streams' packed qkv projections: ComfyUI's prologue (split, q/k
    RMSNorm per stream, concat; torch.compile'd as in the runtime) + our K/V quantization + FP8 attention, vs
    sd35fp8.kernels.joint's one-pass prologue + the same attention kernel; and the q/k/v prologue alone (for SDPA)."""
    from sd35fp8.kernels.attention import attention_launch as launch
    from sd35fp8.kernels.joint import joint_fp8_attention, joint_qkv, joint_qkv_reference
    print("| shape | prologue: compiled torch µs | fused µs | prologue + FP8 attention: unfused µs | fused µs "
          "| err unfused / fused |\n|---|---|---|---|---|---|")
    for name, b, h, lx in (("Large b2", 2, 38, 4096), ("Large b8", 8, 38, 4096), ("Medium b2", 2, 24, 4096),
                           ("Medium attn2 b2", 2, 24, 4096)):
        lc = 0 if "attn2" in name else 154
        g = torch.Generator(device="cuda").manual_seed(0)
        c = h * D
        ctx, x = (torch.randn(b, n, 3 * c, device="cuda", generator=g).to(torch.bfloat16) for n in (lc, lx))
        ws = [(1 + 0.5 * torch.randn(D, device="cuda", generator=g)).to(torch.bfloat16) for _ in range(4)]
        ref_pro = torch.compile(lambda a_, b_: joint_qkv_reference(a_, b_, *ws, 1e-6, h), dynamic=False)
        t_ref = triton.testing.do_bench(lambda: ref_pro(ctx, x), warmup=10, rep=60)
        t_fused = triton.testing.do_bench(lambda: joint_qkv(ctx, x, *ws, 1e-6, h), warmup=10, rep=60)
        t_ref_att = triton.testing.do_bench(lambda: launch(*ref_pro(ctx, x), h), warmup=10, rep=60)
        t_fused_att = triton.testing.do_bench(lambda: joint_fp8_attention(ctx, x, *ws, 1e-6, h), warmup=10, rep=60)
        exact = reference_attention(*(t.float() for t in joint_qkv_reference(ctx, x, *ws, 1e-6, h)), h)
        e1 = rel(launch(*ref_pro(ctx, x), h), exact)
        e2 = rel(joint_fp8_attention(ctx, x, *ws, 1e-6, h), exact)
        print(f"| {name} | {t_ref * 1e3:.1f} | {t_fused * 1e3:.1f} | {t_ref_att * 1e3:.1f} | {t_fused_att * 1e3:.1f} "
              f"| {e1:.4f} / {e2:.4f} |", flush=True)


if __name__ == "__main__":
    main()
