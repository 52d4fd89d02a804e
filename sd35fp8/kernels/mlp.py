"""The MLP in two kernels (Hopper): FP8 GEMM + bias + GELU + FP8 quantization of its output (the up-projection),
and FP8 GEMM + bias + the block's gated residual add (the down-projection).

Unfused, ``fc1`` writes its BF16 output (M x 4·hidden: the largest activation of the block) and a
second kernel reads it back to apply GELU and quantize it for ``fc2``. Here the GELU and the cast
with ``fc2``'s static input scale run on the fp32 accumulator in the GEMM's epilogue and only the
E4M3 result is written: half the bytes out, no second pass. The GEMM is a persistent Triton kernel
with TMA loads (sm90). ``fp8_linear_gelu`` computes the same thing unfused where that kernel cannot
run (CPU, pre-Hopper GPUs, odd shapes), so callers get one result either way. ``fp8_linear_residual`` likewise
reads the residual stream and the per-sample gate in ``fc2``'s epilogue and writes ``x + gate·fc2(h)`` once,
instead of ``fc2``'s output and a separate add over it.

Both kernels also take INT8 operands (W8A8, exact int32 accumulation; INT8 tensor cores run at the FP8 rate on
Hopper): fc1 with one scale per input row (per token) and an INT8 output at fc2's static input scale, fc2 with a
per-tensor input scale. A uniform 8-bit grid has about a third of E4M3's rounding error on Gaussian data, which the
fidelity target needs in the MLP (bench/results/2026-11-27_cpu_fidelity_sim.md); the static runtime uses them for
MLPs with INT8 weights (``QuantPolicy(mlp_int8=True)``; ``bench/tune/fc1_sweep.py --int8`` times them against the E4M3
kernels).
"""
from __future__ import annotations

import collections

import torch
import torch.nn.functional as F

from ..core.formats import E4M3, quantize_inv, quantize_inv_int8
from ..core.quant import dequantize_weight
from .common import custom_op, tl, triton

if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .common import round_int8

# Tile configs (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, warp_specialize, epilogue in halves]);
# "few tiles": where the main config's tiles would not fill the GPU (the text stream). How each was chosen, with
# the timings: docs/tuning.md.
FC1_CONFIG = (128, 256, 128, 8, 8, 4, True, False)  # measured: H200 2026-12-02, bench/tune/fc1_sweep.py
FC2_CONFIG = (128, 256, 128, 8, 8, 3, True, True)  # measured: H200 2026-12-02, bench/tune/fc1_sweep.py --fc2
FC2_CONFIG_FEW_TILES = (128, 128, 128, 8, 8, 4)  # measured: H200 2026-12-02, bench/tune/fc1_sweep.py --fc2
FC1_CONFIG_FEW_TILES = FC1_CONFIG  # not swept yet (bench/tune/fc1_sweep.py --text)
# INT8 operands (W8A8): measured H200 2026-12-02, bench/tune/fc1_sweep.py --text --int8-configs
FC1_CONFIG_INT8, FC2_CONFIG_INT8 = FC1_CONFIG, FC2_CONFIG
FC1_CONFIG_FEW_TILES_INT8, FC2_CONFIG_FEW_TILES_INT8 = FC1_CONFIG_FEW_TILES, (128, 64, 128, 8, 4, 4)
GELU_MODES = ("tanh", "none")
# How fc1's epilogue computes the tanh GELU on a GPU (CPU tensors under Triton's interpreter always take 0):
# 0 ``h·tl.sigmoid(2u)``; 1 the same with ``ex2.approx``/``rcp.approx``; 2 ``tanh.approx`` (one MUFU instruction).
GELU_IMPL = 2  # measured: H200 2026-12-02, bench/tune/fc1_sweep.py --gelu (fastest, error unchanged: docs/tuning.md)
# how often each op launched its kernel or computed unfused on a CUDA device (a silent slow path: layouts or
# dtypes the kernel does not take), in eager calls and compiled code's op calls (CUDA-graph replays do not count)
CALLS: collections.Counter = collections.Counter()
_SMS: dict[int, int] = {}  # SM count per device; filled inside the custom op only (never in traced code)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # CPU tensors reach the kernels only under Triton's interpreter (tests)
        return 4
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


def fused_supported(w8: torch.Tensor, device: torch.device) -> bool:
    """Whether the fused kernel runs for the weight ``w8`` [N, K] with activations on ``device``
    (TMA: Hopper; 16-byte aligned rows)."""
    if triton is None or device.type != "cuda" or w8.device != device or w8.dim() != 2:
        return False
    n, k = w8.shape
    return torch.cuda.get_device_capability(device)[0] == 9 and k % 16 == 0 and n % 16 == 0


if triton is not None:
    @triton.jit
    def _tile(tile, npm, npn, G: tl.constexpr):
        """(row tile, column tile) of persistent tile ``tile`` in grouped order: G row tiles share the B tiles
        in L2."""
        first = (tile // (G * npn)) * G
        gs = min(npm - first, G)
        return first + (tile % (G * npn)) % gs, (tile % (G * npn)) // gs

    @triton.jit
    def _tile_dot(a_desc, b_desc, pm, pn, k_tiles, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  PRECISE: tl.constexpr = False, INT8: tl.constexpr = False):
        """The accumulator of one output tile: A[pm] @ B[pn]ᵀ over all of K (TMA loads); fp32, or exact int32
        for INT8 operands. Hopper's FP8 MMA accumulates with fewer bits unless promoted; Triton's default (as
        ``_scaled_mm``'s fast accumulation) never promotes, ``PRECISE`` promotes to fp32 after every MMA."""
        if INT8:
            acc = tl.zeros((BM, BN), dtype=tl.int32)
        else:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ki in range(k_tiles):
            a = a_desc.load([pm * BM, ki * BK])
            b = b_desc.load([pn * BN, ki * BK])
            if INT8:
                acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
            elif PRECISE:
                acc = tl.dot(a, b.T, acc, max_num_imprecise_acc=0)
            else:
                acc = tl.dot(a, b.T, acc)
        return acc

    @triton.jit
    def _dequant(acc, sa, sb_ptr, bias_ptr, rn, N, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 ROW_SCALES: tl.constexpr = False):
        """acc · x_scale · w_scale (+ bias) in fp32; ``ROW_SCALES``: ``sa`` is one scale per row of the tile [BM]
        (per-token activation scales) instead of a scalar."""
        h = acc.to(tl.float32)
        if ROW_SCALES:  # the row scale first; the scalar x_scale folded into the weight scale below is then 1
            h = h * sa[:, None]
            sa = 1.0
        if PER_CHANNEL:
            h = h * (sa * tl.load(sb_ptr + rn, mask=rn < N, other=0.0))[None, :]
        else:
            h = h * (sa * tl.load(sb_ptr))
        if HAS_BIAS:
            h += tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        return h

    @triton.jit
    def _halves(acc, BM: tl.constexpr, BN: tl.constexpr):
        """The accumulator's left and right column halves (an epilogue in two steps: half the registers live)."""
        return tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))

    @triton.jit
    def _asm1(x, op: tl.constexpr):
        """One PTX unary float instruction ``op`` (e.g. "tanh.approx.f32") per element."""
        return tl.inline_asm_elementwise(op + " $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)

    @triton.jit
    def _gelu_tanh_scaled(h, inv, IMPL: tl.constexpr):
        """inv·GELU_tanh(h) = inv·0.5·h·(1 + tanh(u)) = inv·h·sigmoid(2u), u = √(2/π)·(h + 0.044715·h³); IMPL as
        GELU_IMPL."""
        if IMPL == 2:
            t = _asm1(h * (0.7978845608028654 + 0.035677408136300125 * (h * h)), "tanh.approx.f32")
            hi = h * (0.5 * inv)
            g = tl.fma(hi, t, hi)
        elif IMPL == 1:  # 1 / (1 + 2^(-2u·log2 e)): -2√(2/π)·log2(e) and its 0.044715 multiple folded
            e = _asm1(h * (-2.302208198144325 + -0.1029432395800235 * (h * h)), "ex2.approx.ftz.f32")
            g = (h * inv) * _asm1(1.0 + e, "rcp.approx.ftz.f32")
        else:
            g = h * tl.sigmoid(1.5957691216057308 * (h + 0.044715 * h * h * h)) * inv
        return g

    @triton.jit
    def _gelu_q(acc, sa, sb_ptr, bias_ptr, inv, shift_ptr, rn, N, PER_CHANNEL: tl.constexpr,
                HAS_BIAS: tl.constexpr, TANH: tl.constexpr, INT8: tl.constexpr = False, IMPL: tl.constexpr = 0,
                HAS_SHIFT: tl.constexpr = False):
        """fc1's epilogue on (part of) a tile: dequantize, bias, GELU, scaled by fc2's static input scale and
        clamped (before the cast: out of range becomes NaN on CUDA); for INT8 clamped to ±127 and rounded to nearest
        by kernels.common.round_int8, with per-row ``sa``. ``IMPL``: the tanh GELU's instructions (GELU_IMPL).
        ``HAS_SHIFT``: fc2's input centered, ``center·inv`` per column subtracted (sd35fp8.core.centering)."""
        h = _dequant(acc, sa, sb_ptr, bias_ptr, rn, N, PER_CHANNEL, HAS_BIAS, INT8)
        if TANH:
            g = _gelu_tanh_scaled(h, inv, IMPL)
        else:  # exact GELU
            g = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476)) * inv
        if HAS_SHIFT:
            g = g - tl.load(shift_ptr + rn, mask=rn < N, other=0.0)[None, :]
        if INT8:  # one return: Triton compiles both returns of an early-return and needs one type (int32 here)
            q = round_int8(g)
        else:
            q = tl.clamp(g, -448.0, 448.0)
        return q

    @triton.jit
    def _fc1_gelu_q(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, inv_ptr, shift_ptr, M, N, K,
                    NUM_SMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
                    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                    WARP_SPEC: tl.constexpr = False, SUBTILE: tl.constexpr = False, INT8: tl.constexpr = False,
                    IMPL: tl.constexpr = 0, HAS_SHIFT: tl.constexpr = False):
        npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        inv = tl.load(inv_ptr)
        if not INT8:
            sa = tl.load(sa_ptr)
        for tile in tl.range(tl.program_id(0), npm * npn, NUM_SMS, flatten=True, warp_specialize=WARP_SPEC):
            pm, pn = _tile(tile, npm, npn, G)
            acc = _tile_dot(a_desc, b_desc, pm, pn, k_tiles, BM, BN, BK, False, INT8)
            if INT8:  # per-token input scales
                rm = pm * BM + tl.arange(0, BM)
                sa = tl.load(sa_ptr + rm, mask=rm < M, other=0.0)
            if SUBTILE:  # c_desc's block is [BM, BN / 2]
                a0, a1 = _halves(acc, BM, BN)
                rn = pn * BN + tl.arange(0, BN // 2)
                g0 = _gelu_q(a0, sa, sb_ptr, bias_ptr, inv, shift_ptr, rn, N, PER_CHANNEL, HAS_BIAS, TANH, INT8, IMPL,
                             HAS_SHIFT)
                c_desc.store([pm * BM, pn * BN], g0.to(c_desc.dtype))
                g1 = _gelu_q(a1, sa, sb_ptr, bias_ptr, inv, shift_ptr, rn + BN // 2, N, PER_CHANNEL, HAS_BIAS, TANH,
                             INT8, IMPL, HAS_SHIFT)
                c_desc.store([pm * BM, pn * BN + BN // 2], g1.to(c_desc.dtype))
            else:
                rn = pn * BN + tl.arange(0, BN)
                g = _gelu_q(acc, sa, sb_ptr, bias_ptr, inv, shift_ptr, rn, N, PER_CHANNEL, HAS_BIAS, TANH, INT8, IMPL,
                            HAS_SHIFT)
                c_desc.store([pm * BM, pn * BN], g.to(c_desc.dtype))

    @triton.jit
    def _residual_out(acc, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, rm, rn, M, N, L, stride_gate,
                      PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
        """fc2's epilogue on (part of) a tile: res + gate·(dequantized acc + bias), written once."""
        h = _dequant(acc, sa, sb_ptr, bias_ptr, rn, N, PER_CHANNEL, HAS_BIAS)
        mask = (rm[:, None] < M) & (rn[None, :] < N)
        offs = rm[:, None] * N + rn[None, :]
        gate = tl.load(gate_ptr + (rm // L)[:, None] * stride_gate + rn[None, :], mask=mask, other=0.0)
        r = tl.load(res_ptr + offs, mask=mask, other=0.0)
        out = r.to(tl.float32) + gate.to(tl.float32) * h
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _fc2_residual(a_desc, b_desc, sa_ptr, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, M, N, K, L,
                      stride_gate, NUM_SMS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      G: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISE: tl.constexpr,
                      WARP_SPEC: tl.constexpr = False, SUBTILE: tl.constexpr = False, INT8: tl.constexpr = False):
        npm, npn = tl.cdiv(M, BM), tl.cdiv(N, BN)
        k_tiles = tl.cdiv(K, BK)
        sa = tl.load(sa_ptr)
        for tile in tl.range(tl.program_id(0), npm * npn, NUM_SMS, flatten=True, warp_specialize=WARP_SPEC):
            pm, pn = _tile(tile, npm, npn, G)
            acc = _tile_dot(a_desc, b_desc, pm, pn, k_tiles, BM, BN, BK, PRECISE, INT8)
            rm = pm * BM + tl.arange(0, BM)
            if SUBTILE:
                a0, a1 = _halves(acc, BM, BN)
                rn = pn * BN + tl.arange(0, BN // 2)
                _residual_out(a0, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, rm, rn, M, N, L, stride_gate,
                              PER_CHANNEL, HAS_BIAS)
                _residual_out(a1, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, rm, rn + BN // 2, M, N, L,
                              stride_gate, PER_CHANNEL, HAS_BIAS)
            else:
                _residual_out(acc, sa, sb_ptr, bias_ptr, res_ptr, gate_ptr, out_ptr, rm, pn * BN + tl.arange(0, BN),
                              M, N, L, stride_gate, PER_CHANNEL, HAS_BIAS)


def _operands(xq, w8, w_scale, config):
    """What both persistent kernels take: (grid, SM count, A and B TMA descriptors, fp32 weight scale)."""
    bm, bn, bk = config[:3]
    sms = _sm_count(xq.device)
    grid = (min(sms, triton.cdiv(xq.shape[0], bm) * triton.cdiv(w8.shape[0], bn)),)
    return (grid, sms, TensorDescriptor.from_tensor(xq, [bm, bk]), TensorDescriptor.from_tensor(w8, [bn, bk]),
            w_scale.to(torch.float32).contiguous())


def _configs(int8: bool) -> tuple:
    """(fc1 main, fc1 few-tile, fc2 main, fc2 few-tile) configs for INT8 or E4M3 operands (module globals: what
    tests and the sweeps in bench/tune set)."""
    g = globals()
    sfx = "_INT8" if int8 else ""
    return tuple(g[n + sfx] for n in ("FC1_CONFIG", "FC1_CONFIG_FEW_TILES", "FC2_CONFIG", "FC2_CONFIG_FEW_TILES"))


def _default_config(M: int, N: int, device, main: tuple, few: tuple) -> tuple:
    """``main``, or ``few`` (smaller tiles) where ``main``'s tiles of an [M, N] output would leave SMs idle."""
    return few if triton.cdiv(M, main[0]) * triton.cdiv(N, main[1]) < _sm_count(device) else main


def _config(config) -> tuple:
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, warp_specialize, epilogue in halves); the last
    two are optional (off)."""
    return (*config[:6], bool(config[6]) if len(config) > 6 else False, bool(config[7]) if len(config) > 7 else False)


def _int8(xq, w8) -> bool:
    """Whether the operands are INT8 (W8A8; else E4M3); mixed operands are refused."""
    if (xq.dtype == torch.int8) != (w8.dtype == torch.int8):
        raise ValueError(f"both operands INT8 or both E4M3, got {xq.dtype} x {w8.dtype}")
    return xq.dtype == torch.int8


def _launch(xq, w8, x_scale, w_scale, bias, out_inv, approximate: str, config=None, gelu_impl=None, out_shift=None):
    """fc1's kernel. E4M3 operands: ``x_scale`` 0-d, E4M3 output. INT8 operands (W8A8): ``x_scale`` one scale per
    row of ``xq`` (per token) and the output is INT8 (``out_inv`` the static inverse scale of fc2's INT8 input).
    ``out_shift``: fp32 [N] subtracted from the scaled GELU (fc2's centered input: center·inv)."""
    M, K = xq.shape
    N = w8.shape[0]
    int8 = _int8(xq, w8)
    _check_fc1_scale(xq, x_scale)
    config = config or _default_config(M, N, xq.device, *_configs(int8)[:2])
    bm, bn, bk, grp, warps, stages, wspec, sub = _config(config)
    out = torch.empty((M, N), device=xq.device, dtype=torch.int8 if int8 else E4M3)
    grid, sms, a_desc, b_desc, ws = _operands(xq, w8, w_scale, config)
    _fc1_gelu_q[grid](a_desc, b_desc, TensorDescriptor.from_tensor(out, [bm, bn // 2 if sub else bn]),
                      x_scale.to(torch.float32), ws, bias if bias is not None else ws, out_inv.to(torch.float32),
                      ws if out_shift is None else out_shift.to(torch.float32).contiguous(), M, N,
                      K, NUM_SMS=sms, BM=bm, BN=bn, BK=bk, G=grp, PER_CHANNEL=ws.dim() == 1,
                      HAS_BIAS=bias is not None, TANH=approximate == "tanh", WARP_SPEC=wspec, SUBTILE=sub,
                      INT8=int8, IMPL=_gelu_impl(xq, gelu_impl), HAS_SHIFT=out_shift is not None, num_warps=warps,
                      num_stages=stages)
    return out


def _gelu_impl(xq: torch.Tensor, impl=None) -> int:
    """GELU_IMPL (or ``impl``) on a GPU; 0 under Triton's interpreter (CPU tensors: no PTX to run)."""
    impl = GELU_IMPL if impl is None else int(impl)
    if impl not in (0, 1, 2):
        raise ValueError(f"gelu_impl must be 0, 1 or 2, got {impl}")
    return impl if xq.is_cuda else 0


def _check_fc1_scale(xq: torch.Tensor, x_scale: torch.Tensor) -> None:
    """fc1's INT8 activations come with one scale per row (per token)."""
    if xq.dtype == torch.int8 and x_scale.shape != (xq.shape[0],):
        raise ValueError(f"INT8 activations take one scale per row: expected x_scale [{xq.shape[0]}], got "
                         f"{tuple(x_scale.shape)}")


def _dequant_input(xq, x_scale) -> torch.Tensor:
    s = x_scale.float()
    return xq.float() * (s[:, None] if s.dim() == 1 else s)


def reference(xq, w8, x_scale, w_scale, bias, out_inv, approximate: str = "tanh", out_shift=None) -> torch.Tensor:
    """The unfused computation in fp32 (dequantized GEMM, bias, GELU, clamp, cast to E4M3, or to INT8 for INT8
    operands with per-row ``x_scale``; ``out_shift`` [N] subtracted after scaling): what the kernel must equal up to
    accumulation order."""
    h = F.linear(_dequant_input(xq, x_scale), dequantize_weight(w8, w_scale, torch.float32),
                 None if bias is None else bias.float())
    g = F.gelu(h, approximate=approximate) * out_inv.float()
    if out_shift is not None:
        g = g - out_shift.float()
    one = torch.ones((), device=g.device)
    return quantize_inv_int8(g, one) if _int8(xq, w8) else quantize_inv(g, one)


def _launch_residual(xq, w8, x_scale, w_scale, bias, res, gate, precise: bool = False, config=None):
    M, K = xq.shape
    N = w8.shape[0]
    int8 = _int8(xq, w8)
    config = config or _default_config(M, N, xq.device, *_configs(int8)[2:])
    bm, bn, bk, grp, warps, stages, wspec, sub = _config(config)
    out = torch.empty_like(res)
    grid, sms, a_desc, b_desc, ws = _operands(xq, w8, w_scale, config)
    _fc2_residual[grid](a_desc, b_desc, x_scale.to(torch.float32), ws, bias if bias is not None else ws, res, gate,
                        out, M, N, K, M // gate.shape[0], gate.stride(0), NUM_SMS=sms, BM=bm, BN=bn, BK=bk, G=grp,
                        PER_CHANNEL=ws.dim() == 1, HAS_BIAS=bias is not None, PRECISE=bool(precise),
                        WARP_SPEC=wspec, SUBTILE=sub, INT8=int8, num_warps=warps, num_stages=stages)
    return out


def residual_reference(xq, w8, x_scale, w_scale, bias, res, gate) -> torch.Tensor:
    """``res + gate · ((xq·x_scale) @ (w8·w_scale)ᵀ + bias)`` in fp32, each of gate's B rows applying to its
    M / B rows of ``res``; cast to res's dtype once (the kernel's math, up to accumulation order)."""
    _int8(xq, w8)
    h = F.linear(_dequant_input(xq, x_scale), dequantize_weight(w8, w_scale, torch.float32),
                 None if bias is None else bias.float())
    b = gate.shape[0]
    out = res.float().view(b, -1, res.shape[-1]) + gate.float()[:, None] * h.view(b, -1, h.shape[-1])
    return out.view(res.shape).to(res.dtype)


def _residual_fake(xq, w8, x_scale, w_scale, bias, res, gate, precise):
    return res.new_empty(res.shape)


@custom_op("sd35fp8::fp8_linear_residual", _residual_fake)
def _fp8_linear_residual(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                         bias: torch.Tensor | None, res: torch.Tensor, gate: torch.Tensor,
                         precise: bool) -> torch.Tensor:
    if xq.is_cuda and fused_supported(w8, xq.device) and xq.is_contiguous() and w8.is_contiguous() \
            and res.is_contiguous() and res.dtype in (torch.bfloat16, torch.float16) and gate.stride(1) == 1:
        CALLS["fc2_kernel"] += 1
        return _launch_residual(xq, w8, x_scale, w_scale, bias, res, gate, precise)
    if xq.is_cuda:
        CALLS["fc2_unfused_on_cuda"] += 1
    return residual_reference(xq, w8, x_scale, w_scale, bias, res, gate)


def fp8_linear_residual(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                        bias: torch.Tensor | None, res: torch.Tensor, gate: torch.Tensor,
                        precise: bool = False) -> torch.Tensor:
    """``res + gate · ((xq·x_scale) @ (w8·w_scale)ᵀ + bias)``: an MLP's second layer with the block's gated
    residual add in the GEMM's epilogue (one kernel where :func:`fused_supported`; no separate pass over the
    output). xq [M, K] E4M3 (or INT8, with an INT8 w8: exact accumulation); w8 [N, K] E4M3; res [M, N] (the
    residual stream, its dtype is the output's); gate [B, N], row b applying to rows b·M/B … (b+1)·M/B − 1 (one
    sample's tokens). ``precise``: fp32 accumulation (no fast accumulation) for E4M3 on Hopper."""
    _check_operands(xq, w8)
    n = w8.shape[0]
    if res.shape != (xq.shape[0], n) or gate.dim() != 2 or gate.shape[1] != n or gate.shape[0] == 0 \
            or xq.shape[0] % gate.shape[0]:
        raise ValueError(f"expected res [{xq.shape[0]}, {n}] and gate [B, {n}] with B dividing {xq.shape[0]}, got "
                         f"{tuple(res.shape)} and {tuple(gate.shape)}")
    return _fp8_linear_residual(xq, w8, x_scale, w_scale, bias, res, gate, bool(precise))


def _fake(xq, w8, x_scale, w_scale, bias, out_inv, approximate, out_shift):
    return xq.new_empty((xq.shape[0], w8.shape[0]), dtype=xq.dtype)  # E4M3 in, E4M3 out; INT8 in, INT8 out


@custom_op("sd35fp8::fp8_linear_gelu", _fake)
def _fp8_linear_gelu(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_inv: torch.Tensor, approximate: str,
                     out_shift: torch.Tensor | None) -> torch.Tensor:
    if xq.is_cuda and fused_supported(w8, xq.device) and xq.is_contiguous() and w8.is_contiguous():
        CALLS["fc1_kernel"] += 1
        return _launch(xq, w8, x_scale, w_scale, bias, out_inv, approximate, out_shift=out_shift)
    if xq.is_cuda:
        CALLS["fc1_unfused_on_cuda"] += 1
    return reference(xq, w8, x_scale, w_scale, bias, out_inv, approximate, out_shift)




def fp8_linear_gelu(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_inv: torch.Tensor, approximate: str = "tanh",
                    out_shift: torch.Tensor | None = None) -> torch.Tensor:
    """E4M3 ``clamp(gelu((xq·x_scale) @ (w8·w_scale)ᵀ + bias) · out_inv - out_shift)``: an MLP's first layer, its
    activation and the quantization of the second layer's input in one kernel where
    :func:`fused_supported`. xq [M, K] E4M3; w8 [N, K] E4M3; x_scale 0-d; w_scale 0-d or [N]. INT8 operands
    (W8A8): x_scale one per row [M], w_scale [N], and the output is INT8 (rounded, ±127). ``out_shift`` (fp32 [N],
    optional): the second layer's static input center times ``out_inv`` (sd35fp8.core.centering)."""
    if approximate not in GELU_MODES:
        raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
    _check_operands(xq, w8)
    _check_fc1_scale(xq, x_scale)
    if out_shift is not None and tuple(out_shift.shape) != (w8.shape[0],):
        raise ValueError(f"out_shift must be [{w8.shape[0]}], got {tuple(out_shift.shape)}")
    return _fp8_linear_gelu(xq, w8, x_scale, w_scale, bias, out_inv, approximate, out_shift)


def _check_operands(xq: torch.Tensor, w8: torch.Tensor) -> None:
    if xq.dtype != w8.dtype or xq.dtype not in (E4M3, torch.int8) or xq.dim() != 2 or xq.shape[1] != w8.shape[1]:
        raise ValueError(f"expected E4M3 (or INT8) [M, K] x [N, K] of one dtype, got {xq.dtype} {tuple(xq.shape)} "
                         f"x {w8.dtype} {tuple(w8.shape)}")

