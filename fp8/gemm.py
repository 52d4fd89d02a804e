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
``weight_scaling=per_tensor_int8_mlp`` (``bench/fc1_sweep.py --int8`` times them against the E4M3 kernels).
"""
from __future__ import annotations

import collections
import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:  # noqa: BLE001
    triton = None

from .formats import E4M3, quantize_inv, quantize_inv_int8
from .kernels import custom_op_once
from .quant import dequantize_weight

if triton is not None:
    from .kernels import round_int8

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, warp_specialize, epilogue in halves]):
# bench/int8_gemm.py --triton (H100, fc1 shapes), bench/fc1_sweep.py
# (H200, 2026-12-02: Large 319.5 vs 323.9 µs without warp specialization, 3 stages; the epilogue in halves: slower)
FC1_CONFIG = (128, 256, 128, 8, 8, 4, True, False)
# fc2: bench/fc1_sweep.py --fc2 (H200, 2026-12-02): warp specialization + the epilogue (residual and gate loads, the
# store) in two column halves, Large 290.9 vs 327.0 µs, Medium 124.9 vs 138.5; the smaller tile where the default's
# tiles would not fill the GPU (the text stream: 308 rows, 37.3 vs 58.6 µs at Large's fc2)
FC2_CONFIG = (128, 256, 128, 8, 8, 3, True, True)
FC2_CONFIG_FEW_TILES = (128, 128, 128, 8, 8, 4)
# fc1 where FC1_CONFIG's tiles would not fill the GPU (the text stream: 308 rows give 3 x 38 tiles for 132 SMs);
# the same config until bench/fc1_sweep.py --text (64-row tiles among the candidates, CUDA-graph timing) has picked
FC1_CONFIG_FEW_TILES = FC1_CONFIG
# The same four for INT8 operands (W8A8: Triton's int32-accumulator MMAs are synchronous, so other tiles may win).
# bench/fc1_sweep.py --text --int8-configs (H200, 2026-12-02, CUDA-graph timing, L2 flushed): the text stream's INT8
# fc2 (308 x 9728 -> 2432) 34.6 µs with 128 x 64 tiles vs 42.4 with FC2_CONFIG_FEW_TILES (every other candidate,
# 64-row tiles included, slower); INT8 text fc1 24.6 µs with its default (best of 8); the image stream's INT8 fc1
# 345.4 µs with FC1_CONFIG (best of 8), INT8 fc2 328.7 with FC2_CONFIG vs 322.4 with (256, 128, 128, 8, 8, 4, True,
# True) (1.9%: under the sweep's 2% noise margin, not taken)
FC1_CONFIG_INT8, FC2_CONFIG_INT8 = FC1_CONFIG, FC2_CONFIG
FC1_CONFIG_FEW_TILES_INT8, FC2_CONFIG_FEW_TILES_INT8 = FC1_CONFIG_FEW_TILES, (128, 64, 128, 8, 4, 4)
CONFIG_NAMES = ("FC1_CONFIG", "FC2_CONFIG", "FC1_CONFIG_FEW_TILES", "FC2_CONFIG_FEW_TILES", "FC1_CONFIG_INT8",
                "FC2_CONFIG_INT8", "FC1_CONFIG_FEW_TILES_INT8", "FC2_CONFIG_FEW_TILES_INT8")
CONFIG_ENV = "SD35FP8_GEMM_CONFIGS"  # JSON {name: [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, warps, stages, ws, halves]}
# Which kernels take INT8 (W8A8) operands where the caller names no config: "triton" (the kernels below) or
# "pingpong" (fp8.gluon_int8: Gluon, asynchronous int32 MMAs, two consumer warpgroups; needs Gluon). Off by default
# until bench/gluon_int8_gemm.py --pingpong has shown it faster and equal on a GPU.
INT8_GEMM_ENV = "SD35FP8_INT8_GEMM"
INT8_GEMM = os.environ.get(INT8_GEMM_ENV, "triton")
if INT8_GEMM not in ("triton", "pingpong"):
    raise ValueError(f"{INT8_GEMM_ENV} must be 'triton' or 'pingpong', got {INT8_GEMM!r}")
GELU_MODES = ("tanh", "none")
# How fc1's epilogue computes the tanh GELU on a GPU (Triton's interpreter, i.e. CPU tensors, always takes 0):
# 0 ``h·tl.sigmoid(2u)``: exp2 and division with denormal fix-ups (≈58 SASS instructions per INT8 element, the
#   epilogue's bulk; it does not overlap the MMAs on Hopper, where the accumulator lives in the MMA warps' registers);
# 1 the same formula with ``ex2.approx.ftz`` and ``rcp.approx.ftz`` (two MUFU instructions, no fix-ups; both are
#   exact to ~2^-22, far under the 8-bit output's step);
# 2 ``0.5·h·(1 + tanh.approx(u))``: one MUFU instruction (max error ~2^-11 in tanh: within an E4M3 step, a few
#   INT8 outputs one step off). The default: H200, ``bench/fc1_sweep.py --gelu`` (2026-12-02), Large fc1 INT8
#   395.5 / 361.4 / 349.3 µs for 0 / 1 / 2, E4M3 318.1 / 319.7 / 307.4; Medium INT8 196.5 / 168.1 / 161.3, E4M3
#   154.5 / 142.7 / 135.0; the MLP's error vs fp32 unchanged (0.02424 INT8, 0.05401 E4M3, every impl), INT8 outputs
#   off the reference 2.4e-5 (vs 7.6e-6), never more than one step.
GELU_IMPL = 2
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
    def _gelu_q(acc, sa, sb_ptr, bias_ptr, inv, rn, N, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                TANH: tl.constexpr, INT8: tl.constexpr = False, IMPL: tl.constexpr = 0):
        """fc1's epilogue on (part of) a tile: dequantize, bias, GELU, scaled by fc2's static input scale and
        clamped (before the cast: out of range becomes NaN on CUDA); for INT8 clamped to ±127 and rounded to nearest
        by fp8.kernels.round_int8, with per-row ``sa``. ``IMPL``: the tanh GELU's instructions (GELU_IMPL)."""
        h = _dequant(acc, sa, sb_ptr, bias_ptr, rn, N, PER_CHANNEL, HAS_BIAS, INT8)
        if TANH:
            g = _gelu_tanh_scaled(h, inv, IMPL)
        else:  # exact GELU
            g = 0.5 * h * (1.0 + tl.erf(h * 0.7071067811865476)) * inv
        if INT8:  # one return: Triton compiles both returns of an early-return and needs one type (int32 here)
            q = round_int8(g)
        else:
            q = tl.clamp(g, -448.0, 448.0)
        return q

    @triton.jit
    def _fc1_gelu_q(a_desc, b_desc, c_desc, sa_ptr, sb_ptr, bias_ptr, inv_ptr, M, N, K, NUM_SMS: tl.constexpr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, G: tl.constexpr,
                    PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, TANH: tl.constexpr,
                    WARP_SPEC: tl.constexpr = False, SUBTILE: tl.constexpr = False, INT8: tl.constexpr = False,
                    IMPL: tl.constexpr = 0):
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
                g0 = _gelu_q(a0, sa, sb_ptr, bias_ptr, inv, rn, N, PER_CHANNEL, HAS_BIAS, TANH, INT8, IMPL)
                c_desc.store([pm * BM, pn * BN], g0.to(c_desc.dtype))
                g1 = _gelu_q(a1, sa, sb_ptr, bias_ptr, inv, rn + BN // 2, N, PER_CHANNEL, HAS_BIAS, TANH, INT8,
                             IMPL)
                c_desc.store([pm * BM, pn * BN + BN // 2], g1.to(c_desc.dtype))
            else:
                rn = pn * BN + tl.arange(0, BN)
                g = _gelu_q(acc, sa, sb_ptr, bias_ptr, inv, rn, N, PER_CHANNEL, HAS_BIAS, TANH, INT8, IMPL)
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


def configs_from_env(text: str | None) -> dict:
    """Kernel configs overriding the defaults above, from ``SD35FP8_GEMM_CONFIGS`` (JSON: name -> config list, e.g.
    ``{"FC1_CONFIG_INT8": [128, 256, 128, 8, 8, 4, true, false]}``; what bench/fc1_sweep.py prints for a GPU
    other than the one the defaults were tuned on). Unknown names and malformed configs are refused."""
    import json
    if not text:
        return {}
    try:
        got = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{CONFIG_ENV} is not JSON: {e}") from None
    if not isinstance(got, dict):
        raise ValueError(f"{CONFIG_ENV} must be a JSON object of config names, got {type(got).__name__}")
    out = {}
    for name, cfg in got.items():
        if name not in CONFIG_NAMES:
            raise ValueError(f"{CONFIG_ENV}: unknown config {name!r}; known: {', '.join(CONFIG_NAMES)}")
        if not isinstance(cfg, list) or not 6 <= len(cfg) <= 8 or not all(isinstance(v, (int, bool)) for v in cfg) \
                or any(int(v) <= 0 for v in cfg[:6]):
            raise ValueError(f"{CONFIG_ENV}: {name} must be [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, "
                             f"num_stages] (positive integers) plus optional warp_specialize and halves, got {cfg!r}")
        out[name] = tuple(bool(v) if i >= 6 else int(v) for i, v in enumerate(cfg))
    return out


globals().update(configs_from_env(os.environ.get(CONFIG_ENV)))


def _configs(int8: bool) -> tuple:
    """(fc1 main, fc1 few-tile, fc2 main, fc2 few-tile) configs for INT8 or E4M3 operands (module globals: what
    tests and sweeps set)."""
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


def _launch(xq, w8, x_scale, w_scale, bias, out_inv, approximate: str, config=None, gelu_impl=None):
    """fc1's kernel. E4M3 operands: ``x_scale`` 0-d, E4M3 output. INT8 operands (W8A8): ``x_scale`` one scale per
    row of ``xq`` (per token) and the output is INT8 (``out_inv`` the static inverse scale of fc2's INT8 input)."""
    M, K = xq.shape
    N = w8.shape[0]
    int8 = _int8(xq, w8)
    _check_fc1_scale(xq, x_scale)
    if config is None and int8 and _pingpong(w_scale) and approximate == "tanh" and _gelu_impl(xq, gelu_impl) == 2:
        from .gluon_int8 import launch_pp_fc1
        CALLS["fc1_pingpong"] += 1
        return launch_pp_fc1(xq, w8, x_scale, w_scale, bias, out_inv)
    config = config or _default_config(M, N, xq.device, *_configs(int8)[:2])
    bm, bn, bk, grp, warps, stages, wspec, sub = _config(config)
    out = torch.empty((M, N), device=xq.device, dtype=torch.int8 if int8 else E4M3)
    grid, sms, a_desc, b_desc, ws = _operands(xq, w8, w_scale, config)
    _fc1_gelu_q[grid](a_desc, b_desc, TensorDescriptor.from_tensor(out, [bm, bn // 2 if sub else bn]),
                      x_scale.to(torch.float32), ws, bias if bias is not None else ws, out_inv.to(torch.float32), M, N,
                      K, NUM_SMS=sms, BM=bm, BN=bn, BK=bk, G=grp, PER_CHANNEL=ws.dim() == 1,
                      HAS_BIAS=bias is not None, TANH=approximate == "tanh", WARP_SPEC=wspec, SUBTILE=sub,
                      INT8=int8, IMPL=_gelu_impl(xq, gelu_impl), num_warps=warps, num_stages=stages)
    return out


def _pingpong(w_scale: torch.Tensor) -> bool:
    """Whether INT8 operands go to fp8.gluon_int8's ping-pong kernels (INT8_GEMM, Gluon importable, per-channel
    weight scales as INT8 weights have)."""
    if INT8_GEMM != "pingpong" or w_scale.dim() != 1:
        return False
    from .gluon_int8 import AVAILABLE
    return AVAILABLE


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


def reference(xq, w8, x_scale, w_scale, bias, out_inv, approximate: str = "tanh") -> torch.Tensor:
    """The unfused computation in fp32 (dequantized GEMM, bias, GELU, clamp, cast to E4M3, or to INT8 for INT8
    operands with per-row ``x_scale``): what the kernel must equal up to accumulation order."""
    h = F.linear(_dequant_input(xq, x_scale), dequantize_weight(w8, w_scale, torch.float32),
                 None if bias is None else bias.float())
    g = F.gelu(h, approximate=approximate)
    return quantize_inv_int8(g, out_inv) if _int8(xq, w8) else quantize_inv(g, out_inv)


def _launch_residual(xq, w8, x_scale, w_scale, bias, res, gate, precise: bool = False, config=None):
    M, K = xq.shape
    N = w8.shape[0]
    int8 = _int8(xq, w8)
    if config is None and int8 and _pingpong(w_scale):
        from .gluon_int8 import launch_pp_fc2
        CALLS["fc2_pingpong"] += 1
        return launch_pp_fc2(xq, w8, x_scale, w_scale, bias, res, gate)
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


@custom_op_once("sd35fp8::fp8_linear_residual", _residual_fake)
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


def _fake(xq, w8, x_scale, w_scale, bias, out_inv, approximate):
    return xq.new_empty((xq.shape[0], w8.shape[0]), dtype=xq.dtype)  # E4M3 in, E4M3 out; INT8 in, INT8 out


@custom_op_once("sd35fp8::fp8_linear_gelu", _fake)
def _fp8_linear_gelu(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_inv: torch.Tensor, approximate: str) -> torch.Tensor:
    if xq.is_cuda and fused_supported(w8, xq.device) and xq.is_contiguous() and w8.is_contiguous():
        CALLS["fc1_kernel"] += 1
        return _launch(xq, w8, x_scale, w_scale, bias, out_inv, approximate)
    if xq.is_cuda:
        CALLS["fc1_unfused_on_cuda"] += 1
    return reference(xq, w8, x_scale, w_scale, bias, out_inv, approximate)


# how often each op launched its kernel or computed unfused on a CUDA device (a silent slow path: layouts or
# dtypes the kernel does not take), in eager calls and compiled code's op calls (CUDA-graph replays do not count).
# Kept on one op so that every import of this module counts into one table (the ops run the first import's code).
CALLS: collections.Counter = _fp8_linear_gelu.__dict__.setdefault("sd35fp8_calls", collections.Counter())


def fp8_linear_gelu(xq: torch.Tensor, w8: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_inv: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """E4M3 ``clamp(gelu((xq·x_scale) @ (w8·w_scale)ᵀ + bias) · out_inv)``: an MLP's first layer, its
    activation and the quantization of the second layer's input in one kernel where
    :func:`fused_supported`. xq [M, K] E4M3; w8 [N, K] E4M3; x_scale 0-d; w_scale 0-d or [N]. INT8 operands
    (W8A8): x_scale one per row [M], w_scale [N], and the output is INT8 (rounded, ±127)."""
    if approximate not in GELU_MODES:
        raise ValueError(f"approximate must be one of {GELU_MODES}, got {approximate!r}")
    _check_operands(xq, w8)
    _check_fc1_scale(xq, x_scale)
    return _fp8_linear_gelu(xq, w8, x_scale, w_scale, bias, out_inv, approximate)


def _check_operands(xq: torch.Tensor, w8: torch.Tensor) -> None:
    if xq.dtype != w8.dtype or xq.dtype not in (E4M3, torch.int8) or xq.dim() != 2 or xq.shape[1] != w8.shape[1]:
        raise ValueError(f"expected E4M3 (or INT8) [M, K] x [N, K] of one dtype, got {xq.dtype} {tuple(xq.shape)} "
                         f"x {w8.dtype} {tuple(w8.shape)}")

