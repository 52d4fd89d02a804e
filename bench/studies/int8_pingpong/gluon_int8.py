"""W8A8 INT8 MLP kernels for Hopper written in Gluon with the ping-pong schedule (fc1 + GELU + INT8 out; fc2 + gated
residual), the alternative to sd35fp8.kernels.mlp's Triton INT8 kernels, whose int32-accumulator MMAs Triton never issues
asynchronously (bench/results/2026-12-02_h200_sd35_bench_int8_mlp_full_depth.md).

Same contracts and the same math as sd35fp8.kernels.mlp's INT8 paths (``_launch`` with tanh GELU,
``_launch_residual``), per-channel weight scales. A study, not product (moved out of the library on 2026-12-05): its
first launch failed with "unspecified launch failure" on an H200 (Triton 3.6,
bench/results/2026-12-02_h200_sd35_bench_large_fidelity_pingpong_fault.md); nothing routes to it. Time it with
``bench/studies/int8_pingpong/gluon_int8_gemm.py --pingpong`` once it runs. ``AVAILABLE`` says whether this Triton has Gluon's Hopper API.
"""
from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    AVAILABLE = True
except Exception:  # noqa: BLE001 - no Triton, or one without Gluon
    AVAILABLE = False

if AVAILABLE:
    @gluon.jit
    def _residual_epilogue(acc, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, m0, n0, M, N, L, stride_gate,
                           BM: gl.constexpr, BN: gl.constexpr, HAS_BIAS: gl.constexpr):
        """res + gate·(acc·x_scale·w_scale + bias) for the [BM, BN] block at (m0, n0), in the accumulator's layout."""
        lay: gl.constexpr = acc.type.layout
        rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lay))
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, lay))
        col_ok = rn < N
        h = acc.to(gl.float32) * gl.expand_dims(sa * gl.load(sb_ptr + rn, mask=col_ok, other=0.0), 0)
        if HAS_BIAS:
            h = h + gl.expand_dims(gl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(gl.float32), 0)
        rm2 = gl.expand_dims(rm, 1)
        rn2 = gl.expand_dims(rn, 0)
        mask = (rm2 < M) & (rn2 < N)
        offs = rm2 * N + rn2
        gate = gl.load(gate_ptr + gl.expand_dims(rm // L, 1) * stride_gate + rn2, mask=mask, other=0.0)
        r = gl.load(res_ptr + offs, mask=mask, other=0.0)
        gl.store(out_ptr + offs, (r.to(gl.float32) + gate.to(gl.float32) * h).to(out_ptr.dtype.element_ty), mask=mask)


    # -- ping-pong: two consumer warpgroups on alternate tiles, one loader warp ------------------------------------------
    # The schedule CUTLASS calls "ping-pong", here for INT8: a 1-warp loader partition streams every (tile, K step) of
    # this program through a STAGES-deep shared-memory ring (TMA, one ready and one empty mbarrier per stage); consumer
    # warpgroup 0 (the default partition) takes the program's even tiles and consumer 1 (a worker partition) the odd
    # ones. Each consumer issues its MMAs asynchronously and keeps one in flight (``warpgroup_mma_wait(1)``: the step
    # before is done and its stage goes back to the loader). The loader fills the ring in tile order, so one consumer's
    # MMAs run while the other does its epilogue: the tensor cores are fed by one warpgroup at a time, the epilogues are
    # hidden behind them, and no int32 MMA waits for completion before the next is issued (what Triton's pipeliner
    # does, bench/results/2026-12-02_h200_sd35_bench_int8_mlp_full_depth.md).


    @gluon.jit
    def _pp_tile(tile, npm, npn, G: gl.constexpr):
        first = (tile // (G * npn)) * G
        gs = gl.minimum(npm - first, G)
        return first + (tile % (G * npn)) % gs, (tile % (G * npn)) // gs


    @gluon.jit
    def _pp_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_SMS: gl.constexpr, G: gl.constexpr):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        npm = gl.cdiv(M, BM)
        npn = gl.cdiv(N, BN)
        k_tiles = gl.cdiv(K, BK)
        pid = gl.program_id(0)
        i = 0
        for t in range(gl.cdiv(npm * npn - pid, NUM_SMS)):
            pm, pn = _pp_tile(pid + t * NUM_SMS, npm, npn, G)
            for kk in range(k_tiles):
                s = i % STAGES
                mbarrier.wait(empty.index(s), ((i // STAGES) & 1) ^ 1)  # a fresh barrier counts as phase 1 complete
                mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(a_desc, [pm * BM, kk * BK], ready.index(s), a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [pn * BN, kk * BK], ready.index(s), b_bufs.index(s))
                i += 1


    @gluon.jit
    def _pp_mainloop(a_bufs, b_bufs, ready, empty, base, k_tiles, acc):
        """acc += A·Bᵀ over this tile's k_tiles ring steps starting at ring index ``base``; every stage is handed back
        to the loader once the MMA reading it is done."""
        STAGES: gl.constexpr = a_bufs.type.shape[0]
        for kk in range(k_tiles):
            i = base + kk
            s = i % STAGES
            mbarrier.wait(ready.index(s), (i // STAGES) & 1)
            acc = warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), acc, is_async=True)
            acc = warpgroup_mma_wait(1, deps=(acc,))  # the previous step's MMA is done: its stage is free
            mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=kk > 0)
        acc = warpgroup_mma_wait(0, deps=(acc,))
        mbarrier.arrive(empty.index((base + k_tiles - 1) % STAGES))
        return acc


    @gluon.jit
    def _pp_tile_acc(a_desc, b_desc, a_bufs, b_bufs, ready, empty, t, K):
        """The int32 accumulator of this program's ``t``-th tile (one consumer warpgroup, the MMA layout)."""
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BK: gl.constexpr = a_desc.block_type.shape[1]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        # INT8 wgmma: N <= 128 per instruction in Triton's lowering
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                      instr_shape=[16, BN if BN <= 128 else 128, 32])
        k_tiles = gl.cdiv(K, BK)
        return _pp_mainloop(a_bufs, b_bufs, ready, empty, t * k_tiles, k_tiles, gl.zeros((BM, BN), gl.int32, mma))

    @gluon.jit
    def _pp_alloc(a_desc, b_desc, STAGES: gl.constexpr):
        """The shared-memory ring (A and B stages) and its ready / empty mbarriers, initialized."""
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=1)
        return a_bufs, b_bufs, ready, empty

    @gluon.jit
    def _pp_fc2_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                         out_ptr, M, N, K, L, stride_gate, NUM_SMS: gl.constexpr, G: gl.constexpr,
                         HAS_BIAS: gl.constexpr, HALVES: gl.constexpr, WHICH):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        npm = gl.cdiv(M, BM)
        npn = gl.cdiv(N, BN)
        pid = gl.program_id(0)
        sa = gl.load(sa_ptr)
        for t in range(WHICH, gl.cdiv(npm * npn - pid, NUM_SMS), 2):
            pm, pn = _pp_tile(pid + t * NUM_SMS, npm, npn, G)
            acc = _pp_tile_acc(a_desc, b_desc, a_bufs, b_bufs, ready, empty, t, K)
            if HALVES:  # four column quarters: the residual, gate and output of a whole tile would spill
                a0, a1 = gl.reshape(acc, [BM, 2, BN // 2]).permute(0, 2, 1).split()
                q0, q1 = gl.reshape(a0, [BM, 2, BN // 4]).permute(0, 2, 1).split()
                q2, q3 = gl.reshape(a1, [BM, 2, BN // 4]).permute(0, 2, 1).split()
                _residual_epilogue(q0, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN, M, N, L,
                                   stride_gate, BM, BN // 4, HAS_BIAS)
                _residual_epilogue(q1, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN + BN // 4, M,
                                   N, L, stride_gate, BM, BN // 4, HAS_BIAS)
                _residual_epilogue(q2, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN + BN // 2, M,
                                   N, L, stride_gate, BM, BN // 4, HAS_BIAS)
                _residual_epilogue(q3, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN + 3 * (BN // 4),
                                   M, N, L, stride_gate, BM, BN // 4, HAS_BIAS)
            else:
                _residual_epilogue(acc, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, pm * BM, pn * BN, M, N, L,
                                   stride_gate, BM, BN, HAS_BIAS)


    # The consumers' entry points, one per epilogue split, which reaches the consumer as a literal: Triton 3.6 hands
    # warp_specialize's arguments to the partitions as run-time values, so a constexpr flag passed through them compiles
    # both branches (and 3.6 cannot lower the split's 3-D reshape in a branch it does not take). The kernel picks the
    # entry point with its own constexpr; the consumer index (WHICH, its first tile) is a run-time argument.
    @gluon.jit
    def _pp_fc2_whole(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                      out_ptr, M, N, K, L, stride_gate, NUM_SMS, G, HAS_BIAS, HALVES, WHICH):
        _pp_fc2_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                         out_ptr, M, N, K, L, stride_gate, NUM_SMS, G, HAS_BIAS, False, WHICH)


    @gluon.jit
    def _pp_fc2_split(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                      out_ptr, M, N, K, L, stride_gate, NUM_SMS, G, HAS_BIAS, HALVES, WHICH):
        _pp_fc2_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                         out_ptr, M, N, K, L, stride_gate, NUM_SMS, G, HAS_BIAS, True, WHICH)


    @gluon.jit
    def _pp_fc2_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr,
                       out_ptr, M, N, K, L, stride_gate, NUM_SMS: gl.constexpr, G: gl.constexpr,
                       HAS_BIAS: gl.constexpr, HALVES: gl.constexpr, WHICH):  # WHICH unused: workers take one signature
        _pp_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_SMS, G)


    @gluon.jit
    def fc2_int8_pingpong(a_desc, b_desc, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N, K, L, stride_gate,
                          NUM_SMS: gl.constexpr, G: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr,
                          HALVES: gl.constexpr, CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """fc2 (INT8 x INT8 -> int32, then res + gate·(acc·x_scale·w_scale + bias)) with the ping-pong schedule above;
        ``num_warps`` must be 4 (the default partition is consumer warpgroup 0)."""
        a_bufs, b_bufs, ready, empty = _pp_alloc(a_desc, b_desc, STAGES)
        args = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N,
                K, L, stride_gate, NUM_SMS, G, HAS_BIAS, HALVES)
        first = gl.program_id(0) * 0  # consumer 0's first tile, a run-time value (a partition argument)
        if HALVES:
            gl.warp_specialize([(_pp_fc2_split, args + (first,)), (_pp_fc2_split, args + (first + 1,)),
                                (_pp_fc2_loader, args + (first + 1,))], [4, 1], [CONSUMER_REGS, 40])
        else:
            gl.warp_specialize([(_pp_fc2_whole, args + (first,)), (_pp_fc2_whole, args + (first + 1,)),
                                (_pp_fc2_loader, args + (first + 1,))], [4, 1], [CONSUMER_REGS, 40])


    @gluon.jit
    def _tanh_approx(x):
        return gl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x], dtype=gl.float32, is_pure=True, pack=1)


    @gluon.jit
    def _gelu_int8_epilogue(acc, sa_ptr, sb_ptr, bias_ptr, inv, out_ptr, m0, n0, M, N, BM: gl.constexpr,
                            BN: gl.constexpr, HAS_BIAS: gl.constexpr):
        """fc1's INT8 epilogue as sd35fp8.kernels.mlp's (GELU_IMPL 2): acc·x_scale[row]·w_scale[col] + bias, tanh GELU, times fc2's
        inverse input scale, clamped to ±127 and rounded to nearest even (fp8.kernels.round_int8's fp32 trick), NaN -> 0;
        stored as INT8 [M, N]."""
        lay: gl.constexpr = acc.type.layout
        rm = m0 + gl.arange(0, BM, layout=gl.SliceLayout(1, lay))
        rn = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, lay))
        row_ok = rm < M
        col_ok = rn < N
        h = acc.to(gl.float32) * gl.expand_dims(gl.load(sa_ptr + rm, mask=row_ok, other=0.0), 1)
        h = h * gl.expand_dims(gl.load(sb_ptr + rn, mask=col_ok, other=0.0), 0)
        if HAS_BIAS:
            h = h + gl.expand_dims(gl.load(bias_ptr + rn, mask=col_ok, other=0.0).to(gl.float32), 0)
        t = _tanh_approx(h * (0.7978845608028654 + 0.035677408136300125 * (h * h)))
        hi = h * (0.5 * inv)
        g = gl.fma(hi, t, hi)
        q = gl.where(g == g, gl.minimum(gl.maximum(g, -127.0), 127.0), 0.0)
        q8 = (q + 12582912.0).to(gl.int32, bitcast=True).to(gl.int8)
        rm2 = gl.expand_dims(rm, 1)
        rn2 = gl.expand_dims(rn, 0)
        gl.store(out_ptr + rm2 * N + rn2, q8, mask=(rm2 < M) & (rn2 < N))


    @gluon.jit
    def _pp_fc1_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                         K, NUM_SMS: gl.constexpr, G: gl.constexpr, HAS_BIAS: gl.constexpr, HALVES: gl.constexpr,
                         WHICH):
        BM: gl.constexpr = a_desc.block_type.shape[0]
        BN: gl.constexpr = b_desc.block_type.shape[0]
        npm = gl.cdiv(M, BM)
        npn = gl.cdiv(N, BN)
        pid = gl.program_id(0)
        inv = gl.load(inv_ptr)
        for t in range(WHICH, gl.cdiv(npm * npn - pid, NUM_SMS), 2):
            pm, pn = _pp_tile(pid + t * NUM_SMS, npm, npn, G)
            acc = _pp_tile_acc(a_desc, b_desc, a_bufs, b_bufs, ready, empty, t, K)
            if HALVES:
                a0, a1 = gl.reshape(acc, [BM, 2, BN // 2]).permute(0, 2, 1).split()
                _gelu_int8_epilogue(a0, sa_ptr, sb_ptr, bias_ptr, inv, out_ptr, pm * BM, pn * BN, M, N, BM, BN // 2,
                                    HAS_BIAS)
                _gelu_int8_epilogue(a1, sa_ptr, sb_ptr, bias_ptr, inv, out_ptr, pm * BM, pn * BN + BN // 2, M, N, BM,
                                    BN // 2, HAS_BIAS)
            else:
                _gelu_int8_epilogue(acc, sa_ptr, sb_ptr, bias_ptr, inv, out_ptr, pm * BM, pn * BN, M, N, BM, BN, HAS_BIAS)


    # fc1's partition entry points (see fc2's)
    @gluon.jit
    def _pp_fc1_whole(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                      K, NUM_SMS, G, HAS_BIAS, HALVES, WHICH):
        _pp_fc1_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                         K, NUM_SMS, G, HAS_BIAS, False, WHICH)


    @gluon.jit
    def _pp_fc1_split(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                      K, NUM_SMS, G, HAS_BIAS, HALVES, WHICH):
        _pp_fc1_consumer(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                         K, NUM_SMS, G, HAS_BIAS, True, WHICH)


    @gluon.jit
    def _pp_fc1_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N,
                       K, NUM_SMS: gl.constexpr, G: gl.constexpr, HAS_BIAS: gl.constexpr, HALVES: gl.constexpr,
                       WHICH):  # unused: the workers take one signature
        _pp_loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, M, N, K, NUM_SMS, G)


    @gluon.jit
    def fc1_int8_pingpong(a_desc, b_desc, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N, K, NUM_SMS: gl.constexpr,
                          G: gl.constexpr, STAGES: gl.constexpr, HAS_BIAS: gl.constexpr, HALVES: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, num_warps: gl.constexpr):
        """fc1 (INT8 x INT8 -> int32, per-token and per-channel scales, bias, tanh GELU, INT8 out at fc2's static scale)
        with the ping-pong schedule; ``num_warps`` must be 4."""
        a_bufs, b_bufs, ready, empty = _pp_alloc(a_desc, b_desc, STAGES)
        args = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, sa_ptr, sb_ptr, bias_ptr, inv_ptr, out_ptr, M, N, K,
                NUM_SMS, G, HAS_BIAS, HALVES)
        first = gl.program_id(0) * 0
        if HALVES:
            gl.warp_specialize([(_pp_fc1_split, args + (first,)), (_pp_fc1_split, args + (first + 1,)),
                                (_pp_fc1_loader, args + (first + 1,))], [4, 1], [CONSUMER_REGS, 40])
        else:
            gl.warp_specialize([(_pp_fc1_whole, args + (first,)), (_pp_fc1_whole, args + (first + 1,)),
                                (_pp_fc1_loader, args + (first + 1,))], [4, 1], [CONSUMER_REGS, 40])


    def _pp_descs(xq, w8, bm, bn, bk):
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
        return (TensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8)),
                TensorDescriptor.from_tensor(w8, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8)))


    # (BM, BN, BK, GROUP_M, stages, split epilogue, consumer registers): the split is fc1's epilogue in two column
    # halves, fc2's in four quarters (a whole 128 x 128 tile's residual, gate and output spill: offline SASS, sm_90)
    PP_CONFIG_FC1 = (128, 128, 128, 8, 4, False, 232)
    PP_CONFIG_FC2 = (128, 128, 128, 8, 4, True, 232)


    # 4 + 4 + 1 warps (three warpgroups of registers): the consumers CONSUMER_REGS each, the loader 40, within 64K
    MAXNREG = 168


    def launch_pp_fc2(xq, w8, x_scale, w_scale, bias, res, gate, config=PP_CONFIG_FC2):
        """sd35fp8.kernels.mlp._launch_residual's contract for INT8 operands, with the ping-pong kernel."""
        bm, bn, bk, grp, stages, halves, regs = config
        M, K = xq.shape
        N = w8.shape[0]
        a_desc, b_desc = _pp_descs(xq, w8, bm, bn, bk)
        sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
        out = torch.empty_like(res)
        ws = w_scale.to(torch.float32).contiguous()
        fc2_int8_pingpong[(min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)](
            a_desc, b_desc, x_scale.to(torch.float32).reshape(1), ws, bias if bias is not None else ws, res, gate, out,
            M, N, K, M // gate.shape[0], gate.stride(0), NUM_SMS=sms, G=grp, STAGES=stages, HAS_BIAS=bias is not None,
            HALVES=halves, CONSUMER_REGS=regs, num_warps=4, maxnreg=MAXNREG)
        return out


    def launch_pp_fc1(xq, w8, x_scale, w_scale, bias, out_inv, config=PP_CONFIG_FC1):
        """sd35fp8.kernels.mlp._launch's contract for INT8 operands (per-row x_scale, tanh GELU), with the ping-pong kernel."""
        bm, bn, bk, grp, stages, halves, regs = config
        M, K = xq.shape
        N = w8.shape[0]
        a_desc, b_desc = _pp_descs(xq, w8, bm, bn, bk)
        sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
        out = torch.empty((M, N), device=xq.device, dtype=torch.int8)
        ws = w_scale.to(torch.float32).contiguous()
        fc1_int8_pingpong[(min(sms, triton.cdiv(M, bm) * triton.cdiv(N, bn)),)](
            a_desc, b_desc, x_scale.to(torch.float32).contiguous(), ws, bias if bias is not None else ws,
            out_inv.to(torch.float32).reshape(1), out, M, N, K, NUM_SMS=sms, G=grp, STAGES=stages,
            HAS_BIAS=bias is not None, HALVES=halves, CONSUMER_REGS=regs, num_warps=4, maxnreg=MAXNREG)
        return out
