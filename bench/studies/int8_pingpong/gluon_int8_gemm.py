#!/usr/bin/env python3
"""A lead for the INT8 MLP's speed: fc2 (INT8 GEMM + per-channel dequant + bias + gated residual) written in Gluon
with explicitly asynchronous MMAs, against sd35fp8.kernels.mlp's Triton kernel (INT8 and E4M3) at SD3.5 Large's shape.

Why: Triton's WGMMA pipeliner only makes dots with an fp32 accumulator asynchronous, so every INT8 K step of
sd35fp8.kernels.mlp's kernels waits for its MMAs before the next load and MMA are issued (SASS ``WARPGROUP.DEPBAR.LE gsb0, 0x0``;
bench/results/2026-12-02_h200_sd35_bench_int8_mlp_full_depth.md). Here each K step issues its MMA, then waits until
only that one is in flight (``warpgroup_mma_wait(1)``: the previous step's MMA is done, so its shared-memory stage
is refilled by TMA while the current MMA runs). One flattened (tile, K step) loop per persistent program, so the
next tile's loads are in flight during this tile's last MMAs and epilogue.

    python3 bench/gluon_int8_gemm.py        # GPU (Hopper): correctness vs sd35fp8.kernels.mlp.residual_reference, µs
    python3 bench/gluon_int8_gemm.py --pingpong   # the ping-pong INT8 fc1 and fc2 vs sd35fp8.kernels.mlp's kernels (CUDA graphs)

Measured slower than sd35fp8.kernels.mlp's Triton kernel (H200, 2026-12-02: Large 368 vs 332 µs, bit-identical output;
bench/results/2026-12-02_h200_sd35_bench_int8_mlp_full_depth.md): sd35fp8.kernels.mlp stays the runtime's kernel.
"""
from __future__ import annotations

import os
import sys

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..", "..",), ("..", "..", "..", "bench"), ("..", "..", "..", "bench", "tune"), ("..", "..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # noqa: E402 this study's kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait  # noqa: E402,E501
from gluon_int8 import PP_CONFIG_FC1, PP_CONFIG_FC2, _residual_epilogue, launch_pp_fc1, launch_pp_fc2  # noqa: E402,E501


@gluon.jit
def _tile_of(p, pid, k_tiles, npm, npn, NUM_SMS: gl.constexpr, G: gl.constexpr):
    """(row tile, column tile, K offset index) of this program's flattened step ``p`` (grouped tile order, as
    sd35fp8.kernels.mlp._tile)."""
    tile = pid + (p // k_tiles) * NUM_SMS
    first = (tile // (G * npn)) * G
    gs = gl.minimum(npm - first, G)
    return first + (tile % (G * npn)) % gs, (tile % (G * npn)) // gs, p % k_tiles


@gluon.jit
def _issue_load(p, total, pid, k_tiles, npm, npn, a_desc, b_desc, a_bufs, b_bufs, bars,
                NUM_SMS: gl.constexpr, G: gl.constexpr, STAGES: gl.constexpr):
    pm, pn, kk = _tile_of(p, pid, k_tiles, npm, npn, NUM_SMS, G)
    s = p % STAGES
    ok = p < total
    bar = bars.index(s)
    mbarrier.expect(bar, a_desc.block_type.nbytes + b_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(a_desc, [pm * a_desc.block_type.shape[0], kk * a_desc.block_type.shape[1]], bar,
                                    a_bufs.index(s), ok)
    tma.async_copy_global_to_shared(b_desc, [pn * b_desc.block_type.shape[0], kk * b_desc.block_type.shape[1]], bar,
                                    b_bufs.index(s), ok)


@gluon.jit
def fc2_int8_residual(a_desc, b_desc, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N, K, L, stride_gate,
                      NUM_SMS: gl.constexpr, G: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                      INSTR_N: gl.constexpr, HALVES: gl.constexpr, num_warps: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BN: gl.constexpr = b_desc.block_type.shape[0]
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, INSTR_N, 32])
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
    b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    npm = gl.cdiv(M, BM)
    npn = gl.cdiv(N, BN)
    k_tiles = gl.cdiv(K, a_desc.block_type.shape[1])
    pid = gl.program_id(0)
    total = gl.cdiv(npm * npn - pid, NUM_SMS) * k_tiles
    for p in gl.static_range(STAGES - 1):
        _issue_load(p, total, pid, k_tiles, npm, npn, a_desc, b_desc, a_bufs, b_bufs, bars, NUM_SMS, G, STAGES)
    sa = gl.load(sa_ptr)
    acc = gl.zeros((BM, BN), gl.int32, mma)
    for c in range(total):
        s = c % STAGES
        mbarrier.wait(bars.index(s), (c // STAGES) & 1)
        kk = c % k_tiles
        acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, use_acc=kk != 0, is_async=True)
        # the previous step's MMA is done: its stage takes the load STAGES - 1 steps ahead
        acc = warpgroup_mma_wait(1, deps=(acc,))
        _issue_load(c + STAGES - 1, total, pid, k_tiles, npm, npn, a_desc, b_desc, a_bufs, b_bufs, bars, NUM_SMS, G,
                    STAGES)
        if kk == k_tiles - 1:
            acc = warpgroup_mma_wait(0, deps=(acc,))
            pm, pn, _ = _tile_of(c, pid, k_tiles, npm, npn, NUM_SMS, G)
            if HALVES:  # two column halves: half the epilogue's registers live (as sd35fp8.kernels.mlp's SUBTILE)
                a0, a1 = gl.reshape(acc, [BM, 2, BN // 2]).permute(0, 2, 1).split()
                _residual_epilogue(a0, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN, M, N, L,
                                   stride_gate, BM, BN // 2, HAS_BIAS)
                _residual_epilogue(a1, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN + BN // 2,
                                   M, N, L, stride_gate, BM, BN // 2, HAS_BIAS)
            else:
                _residual_epilogue(acc, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN, M, N, L,
                                   stride_gate, BM, BN, HAS_BIAS)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


PP_CONFIGS = [PP_CONFIG_FC1, PP_CONFIG_FC2, (128, 128, 128, 8, 5, True, 232), (64, 256, 128, 8, 4, False, 232),
              (64, 256, 128, 8, 4, True, 232), (128, 128, 64, 8, 8, True, 232)]


def pingpong_main():
    """The ping-pong INT8 fc1 and fc2 against sd35fp8.kernels.mlp's Triton kernels (INT8, and E4M3 on the same data) at SD3.5
    Large's image and text shapes: CUDA-graph µs (L2 flushed, bench/fc1_sweep.graph_us) per config, and whether the
    output equals the Triton INT8 kernel's (fc2: bit for bit; fc1: INT8 steps off)."""
    from fc1_sweep import graph_us, mlp_data, mlp_operands
    from sd35fp8.kernels.mlp import _launch, _launch_residual
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    rows = []
    for name, m, c in (("Large", 8192, 2432), ("Large text", 308, 2432), ("Medium", 8192, 1536)):
        x, w1, w2, b1, b2, res, gate, exact = mlp_data(m, c)
        xq, sx, q1, s1, q2, s2, sh = mlp_operands("int8", x, w1, w2)
        e = mlp_operands("e4m3", x, w1, w2)
        h8 = _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh")
        he = _launch(e[0], e[2], e[1], e[3], b1, 1 / e[6], "tanh")
        ref1, ref2 = h8, _launch_residual(h8, q2, sh, s2, b2, res, gate)
        base = {"fc1": (graph_us(lambda: _launch(xq, q1, sx, s1, b1, 1 / sh, "tanh")),
                        graph_us(lambda: _launch(e[0], e[2], e[1], e[3], b1, 1 / e[6], "tanh"))),
                "fc2": (graph_us(lambda: _launch_residual(h8, q2, sh, s2, b2, res, gate)),
                        graph_us(lambda: _launch_residual(he, e[4], e[6], e[5], b2, res, gate)))}
        for cfg in PP_CONFIGS:
            for layer, run, ref in (("fc1", lambda: launch_pp_fc1(xq, q1, sx, s1, b1, 1 / sh, cfg), ref1),
                                    ("fc2", lambda: launch_pp_fc2(h8, q2, sh, s2, b2, res, gate, cfg), ref2)):
                try:
                    out = run()
                    torch.cuda.synchronize()
                    if layer == "fc1":
                        d = (out.float() - ref.float()).abs()
                        same = f"{float((d > 0).float().mean()):.1e} off, max {float(d.max()):.0f} steps"
                    else:
                        same = "bit-identical" if torch.equal(out, ref) else \
                            f"max diff {float((out.float() - ref.float()).abs().max()):.3g}"
                    us = graph_us(run)
                except Exception as ex:  # noqa: BLE001 - a config that does not fit, or an API this Triton lacks
                    print(f"{name} {layer} {cfg}: failed: {type(ex).__name__}: {str(ex)[:300]}", flush=True)
                    continue
                rows.append((name, layer, cfg, us, *base[layer], same))
                print(rows[-1], flush=True)
    print("\n| shape | layer | ping-pong config (BM, BN, BK, G, stages, halves, regs) | ping-pong INT8 µs | Triton INT8 µs "
          "| Triton E4M3 µs | vs Triton INT8's output |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1f} | {r[6]} |")


def launch(xq, w8, x_scale, w_scale, bias, res, gate, config=(128, 256, 128, 8, 8, 4, 128, True)):
    """sd35fp8.kernels.mlp._launch_residual's contract for INT8 operands: res + gate·((xq·x_scale) @ (w8·w_scale)ᵀ + bias)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    bm, bn, bk, grp, warps, stages, instr_n, halves = config
    M, K = xq.shape
    N = w8.shape[0]
    a_desc = TensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    b_desc = TensorDescriptor.from_tensor(w8, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
    grid = (min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)
    out = torch.empty_like(res)
    ws = w_scale.to(torch.float32).contiguous()
    fc2_int8_residual[grid](a_desc, b_desc, x_scale.to(torch.float32).reshape(1), ws,
                            bias if bias is not None else ws, res, gate, out, M, N, K, M // gate.shape[0],
                            gate.stride(0), NUM_SMS=sms, G=grp, STAGES=stages, HAS_BIAS=bias is not None,
                            INSTR_N=instr_n, HALVES=halves, num_warps=warps)
    return out


def main():
    import triton.testing
    from sd35fp8.kernels.mlp import _launch_residual, residual_reference
    from sd35fp8.core.quant import quantize_weight
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for name, m, n in (("Large fc2", 8192, 2432), ("Large fc2 text", 308, 2432), ("Medium fc2", 8192, 1536)):
        k = 4 * n
        h = torch.nn.functional.gelu(torch.randn(m, k, device="cuda", generator=g))
        w = torch.randn(n, k, device="cuda", generator=g) * 0.02
        bias = (torch.randn(n, device="cuda", generator=g) * 0.02).bfloat16()
        res = torch.randn(m, n, device="cuda", generator=g).bfloat16()
        gate = torch.randn(2, 6 * n, device="cuda", generator=g).bfloat16()[:, 5 * n:]
        w8, ws = quantize_weight(w, "int8_per_channel")
        sh = (h.abs().amax() / 127).reshape(())  # fc2's static per-tensor input scale
        q8 = torch.clamp(torch.round(h / sh), -127, 127).to(torch.int8)
        ref = residual_reference(q8, w8, sh, ws, bias, res, gate).float()
        triton_int8 = _launch_residual(q8, w8, sh, ws, bias, res, gate)
        t_tri = triton.testing.do_bench(lambda: _launch_residual(q8, w8, sh, ws, bias, res, gate), warmup=25, rep=200)
        e8 = (h / (h.abs().amax() / 448)).clamp(-448, 448).to(torch.float8_e4m3fn)
        w_e, ws_e = quantize_weight(w)
        t_e4m3 = triton.testing.do_bench(
            lambda: _launch_residual(e8, w_e, h.abs().amax() / 448, ws_e, bias, res, gate), warmup=25, rep=200)
        for cfg in ((128, 256, 128, 8, 8, 4, 128, True), (128, 256, 128, 8, 8, 3, 128, True),
                    (128, 256, 128, 8, 8, 4, 128, False)):
            try:
                out = launch(q8, w8, sh, ws, bias, res, gate, cfg).float()
                bad = float(((out - ref).abs() > ref.abs() * 2**-7 + 1e-3).float().mean())
                t = triton.testing.do_bench(lambda: launch(q8, w8, sh, ws, bias, res, gate, cfg), warmup=25, rep=200)
            except Exception as e:  # noqa: BLE001 - a config or API the installed Triton lacks is a result here
                print(f"{name} {cfg}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            same = bool(torch.equal(out, triton_int8.float()))
            rows.append((name, cfg, t * 1e3, t_tri * 1e3, t_e4m3 * 1e3, bad, same))
            print(rows[-1], flush=True)
    print("\n| shape | Gluon config (BM, BN, BK, G, warps, stages, instr N) | Gluon INT8 µs | Triton INT8 µs "
          "(default configs) | Triton E4M3 µs | outputs off the fp32 reference | equal to Triton's INT8 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.1f} | {r[5]:.1e} | {r[6]} |")


if __name__ == "__main__":
    pingpong_main() if "--pingpong" in sys.argv else main()
