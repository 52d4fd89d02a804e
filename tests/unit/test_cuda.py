"""The CUDA path of the FP8 linear (runs on the GPU machine; skipped where there is no CUDA).

The CPU tests cannot see the failure that matters most on a GPU: an out-of-range cast to FP8 on CUDA
gives NaN (CPU saturates). These tests check the real sm_89+/sm_90 ``_scaled_mm`` path against the
same error bounds as the CPU tests, at SD3.5-Large shapes, and that no input produces NaN.
"""
import os

import pytest
import torch

import sd35fp8
from sd35fp8 import DelayedScaling, FP8Linear, fp8_autocast

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.support.markers import cuda, fp8_gpu, hopper  # noqa: E402


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def build(in_f, out_f, gran="per_tensor", dtype=torch.bfloat16, device="cuda", seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, device=device, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    return lin, FP8Linear.from_linear(lin, gran, name="l")


def calibrate(q, x):
    with fp8_autocast(calibrating=True) as s:
        q(x)
    q.fp8_set_input_amax(s.amax()["l"])


@cuda
def test_raw_cuda_cast_overflows_to_nan_but_ours_saturates():
    x = torch.tensor([1000.0, -1e6, 448.0, float("inf")], device="cuda")
    raw = x.to(torch.float8_e4m3fn).float()
    ours = sd35fp8.saturating_cast(x, torch.tensor(1.0, device="cuda")).float()
    assert torch.isnan(raw[:2]).all()  # the hazard the clamp exists for
    assert torch.isfinite(ours).all() and ours.tolist() == [448.0, -448.0, 448.0, 448.0]


@fp8_gpu
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_fp8_linear_matches_cpu_bounds_and_cpu_result(gran, dtype):
    lin, q = build(256, 128, gran, dtype)
    x = torch.randn(2, 77, 256, device="cuda", dtype=dtype)
    calibrate(q, x)
    with fp8_autocast():
        y = q(x)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, lin(x)) < 0.06  # the CPU test's bound
    q_cpu = q.to("cpu")
    if hasattr(torch, "_scaled_mm") and sd35fp8.device_supports_fp8_matmul("cpu"):
        try:
            with fp8_autocast():
                y_cpu = q_cpu(x.cpu())
        except RuntimeError:  # this torch has no CPU _scaled_mm kernel
            return
        assert rel(y.cpu(), y_cpu) < 1e-2  # same quantized operands, same arithmetic


@fp8_gpu
@pytest.mark.parametrize("shape", [(2432, 9728), (9728, 2432), (2432, 7296), (2432, 14592)])
def test_sd35_large_shapes(shape):
    in_f, out_f = shape
    lin, q = build(in_f, out_f)
    x = torch.randn(2, 4096, in_f, device="cuda", dtype=torch.bfloat16)
    calibrate(q, x)
    with fp8_autocast():
        y = q(x)
    assert torch.isfinite(y).all() and rel(y, lin(x)) < 0.06
    # adaLN modulation: one token per sample
    lin, q = build(in_f, out_f, seed=1)
    t = torch.randn(2, in_f, device="cuda", dtype=torch.bfloat16)
    calibrate(q, t)
    with fp8_autocast():
        assert rel(q(t), lin(t)) < 0.06


@fp8_gpu
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
def test_out_of_range_activations_never_nan_on_cuda(gran):
    lin, q = build(512, 256, gran)
    calibrate(q, torch.randn(64, 512, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(64, 512, device="cuda", dtype=torch.bfloat16)
    x[0, :16] = 3e4        # ~1e4 x the calibrated amax
    x[1, 3] = float("inf")
    x[2] = -6e4
    with fp8_autocast():
        y = q(x)
    assert torch.isfinite(y).all()
    with fp8_autocast(recipe=DelayedScaling(margin=4)):
        assert torch.isfinite(q(x)).all()


@fp8_gpu
def test_uncalibrated_delayed_scaling_and_device_moves():
    lin, q = build(256, 256, device="cpu")
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    calibrate(q, x)  # calibrated on CPU ...
    q = q.to("cuda")  # ... then moved, as ComfyUI moves models between devices
    with fp8_autocast():
        y = q(x.cuda())
    assert y.device.type == "cuda" and rel(y, lin.cuda()(x.cuda())) < 0.06
    q.fp8_set_input_amax(None)
    with fp8_autocast(recipe=DelayedScaling(amax_history_len=2)):
        y2 = q(x.cuda())
    assert torch.isfinite(y2).all() and rel(y2, lin(x.cuda())) < 0.06
    assert q._fp8_amax_history.device.type == "cuda"
    # weights left on the CPU (ComfyUI low-VRAM mode) with activations on the GPU
    q = q.to("cpu")
    q.fp8_set_input_amax(float(x.float().abs().max()))
    with fp8_autocast():
        y3 = q(x.cuda())
    assert y3.device.type == "cuda" and torch.isfinite(y3).all()


# -- the static runtime on the GPU ---------------------------------------------------------------
@fp8_gpu
@pytest.mark.parametrize("gran", ["per_tensor", "per_channel", "int8_per_channel"])
def test_triton_fp8_weight_gemv_matches_dequantized_linear(gran):
    from sd35fp8.kernels.gemv import fp8_weight_only_linear
    torch.manual_seed(0)
    w8, s = sd35fp8.quantize_weight(torch.randn(14592, 2432, device="cuda") * 0.02, gran)
    bias = torch.randn(14592, device="cuda", dtype=torch.bfloat16) * 0.02
    for m in (1, 2, 8, 33):
        x = torch.randn(m, 2432, device="cuda", dtype=torch.bfloat16)
        y = fp8_weight_only_linear(x, w8, s, bias)
        expect = torch.nn.functional.linear(x.float(), sd35fp8.dequantize_weight(w8, s, torch.float32), bias.float())
        assert y.dtype == torch.bfloat16 and rel(y, expect) < 5e-3


@fp8_gpu
def test_static_runtime_eager_and_compiled_agree_and_never_nan():
    from sd35fp8.runtime.static import RuntimeConfig, set_static
    lin, q = build(2432, 9728)
    x = torch.randn(2, 4096, 2432, device="cuda", dtype=torch.bfloat16)
    calibrate(q, x)
    with fp8_autocast(enabled=True):
        dyn = q(x)
    holder = torch.nn.Sequential(q)
    set_static(holder, RuntimeConfig(fast_accum=True))
    eager = holder(x)
    assert rel(eager, dyn) < 1e-2 and rel(eager, lin(x)) < 0.06
    compiled = torch.compile(holder, dynamic=False)
    out = compiled(x)
    assert rel(out, eager) < 1e-2
    big = compiled(x * 1e4)  # far beyond the calibrated range: clamped, not NaN (a raw CUDA cast gives NaN)
    assert torch.isfinite(big).all()




@hopper
@pytest.mark.parametrize("gran,bias,approximate,m", [("per_tensor", True, "tanh", 308),
                                                     ("per_channel", True, "tanh", 1000),
                                                     ("per_tensor", False, "none", 128)])
def test_fused_fc1_gelu_kernel_equals_the_unfused_computation(gran, bias, approximate, m):
    """sd35fp8.kernels.mlp's Triton kernel (GEMM + bias + GELU + clamp + E4M3 cast in the epilogue) against the
    same math unfused; M not a multiple of the tile (the text stream: 2 x 154 tokens), N not of 256."""
    from sd35fp8.kernels.mlp import _launch, fused_supported, reference
    from sd35fp8.core.quant import quantize_weight
    g = torch.Generator(device="cuda").manual_seed(1)
    k, n = 384, 1552
    w8, ws = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02, gran)
    x = torch.randn(m, k, device="cuda", generator=g) * 2
    xs = (x.abs().amax() / 448).reshape(())
    xq = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    inv = torch.tensor(448 / 1.5, device="cuda")
    assert fused_supported(w8, xq.device)
    out = _launch(xq, w8, xs, ws, b, inv, approximate)
    ref = reference(xq, w8, xs, ws, b, inv, approximate)
    assert out.dtype == torch.float8_e4m3fn and out.shape == (m, n)
    assert bool(torch.isfinite(out.float()).all())
    assert rel(out, ref) < 1e-2  # fp32 accumulation order only: a few values one E4M3 step apart
    # out of range saturates (clamp before the cast), never NaN
    big = _launch(xq, w8, xs, ws, b, torch.tensor(1e6, device="cuda"), approximate).float()
    assert bool(torch.isfinite(big).all()) and float(big.abs().max()) == 448.0


@hopper
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
@pytest.mark.parametrize("impl", [0, 1, 2])
def test_fc1_epilogue_gelu_variants_match_the_unfused_computation(fmt, impl):
    """Each of sd35fp8.kernels.mlp.GELU_IMPL's epilogue GELUs (Triton's sigmoid; ftz exp2 + reciprocal; tanh.approx)
    against the unfused fp32 computation: E4M3 outputs within the accumulation-order tolerance, INT8 outputs at most one
    step off and rarely (tanh.approx's ~2^-11 error moves a few values across a rounding boundary); an input far
    past the output scale saturates, never NaN."""
    from sd35fp8.kernels.mlp import _launch, reference
    from sd35fp8.linear import int8_quantize_rows
    from sd35fp8.core.quant import quantize_weight
    g = torch.Generator(device="cuda").manual_seed(4)
    m, k, n = 1000, 768, 3072
    x = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16()
    if fmt == "int8":
        (xq, sx), (w8, ws) = int8_quantize_rows(x), quantize_weight(w, "int8_per_channel")
        inv = torch.tensor(127 / 1.5, device="cuda")
    else:
        sx = (x.abs().amax() / 448).reshape(())
        xq, (w8, ws) = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn), quantize_weight(w)
        inv = torch.tensor(448 / 1.5, device="cuda")
    out = _launch(xq, w8, sx, ws, b, inv, "tanh", gelu_impl=impl).float()
    ref = reference(xq, w8, sx, ws, b, inv).float()
    if fmt == "int8":
        d = (out - ref).abs()
        assert float(d.max()) <= 1 and float((d > 0).float().mean()) < (1e-2 if impl == 2 else 1e-3)
    else:
        assert rel(out, ref) < 1e-2
    big = _launch(xq, w8, sx, ws, b, torch.tensor(1e6, device="cuda"), "tanh", gelu_impl=impl).float()
    assert bool(torch.isfinite(big).all()) and float(big.abs().max()) == (127.0 if fmt == "int8" else 448.0)


@hopper
@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_fc1_epilogue_subtracts_fc2s_input_center(fmt):
    """fc2's centered input (sd35fp8.core.centering): the fc1 kernel writes ``GELU·inv - center·inv`` per column,
    as the unfused computation does; a few columns made massive (a constant far above the rest) come out near zero
    after the shift instead of saturating, and the others keep their values."""
    from sd35fp8.core.quant import quantize_weight
    from sd35fp8.kernels.mlp import _launch, reference
    from sd35fp8.linear import int8_quantize_rows
    g = torch.Generator(device="cuda").manual_seed(5)
    m, k, n = 1000, 768, 3072
    x = torch.randn(m, k, device="cuda", generator=g)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    b = torch.randn(n, device="cuda", generator=g) * 0.1
    big = torch.tensor([7, 1000, 3071], device="cuda")
    b[big] = 300.0  # massive hidden channels: GELU(h + 300) = h + 300
    b = b.bfloat16()
    center = torch.zeros(n, device="cuda")
    center[big] = 300.0
    if fmt == "int8":
        (xq, sx), (w8, ws) = int8_quantize_rows(x), quantize_weight(w, "int8_per_channel")
        inv = torch.tensor(127 / 16.0, device="cuda")
    else:
        sx = (x.abs().amax() / 448).reshape(())
        xq, (w8, ws) = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn), quantize_weight(w)
        inv = torch.tensor(448 / 16.0, device="cuda")  # fc2's range +-16 (the GEMM's outputs reach about +-3)
    shift = center * inv
    out = _launch(xq, w8, sx, ws, b, inv, "tanh", out_shift=shift).float()
    ref = reference(xq, w8, sx, ws, b, inv, "tanh", shift).float()
    plain = _launch(xq, w8, sx, ws, b, inv, "tanh").float()
    if fmt == "int8":
        d = (out - ref).abs()
        assert float(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-2
    else:
        assert rel(out, ref) < 1e-2
    top = 127.0 if fmt == "int8" else 448.0
    assert float(plain[:, big].abs().min()) == top  # unshifted: the massive columns saturate
    assert float(out[:, big].abs().max()) < top / 4  # shifted: near zero
    rest = torch.ones(n, dtype=torch.bool, device="cuda")
    rest[big] = False
    assert torch.equal(out[:, rest], plain[:, rest])


@hopper
@pytest.mark.parametrize("gran,bias,m,precise", [("per_tensor", True, 308, False), ("per_channel", True, 8192, False),
                                                 ("per_tensor", False, 1000, True)])
def test_fused_fc2_residual_kernel_equals_the_unfused_computation(gran, bias, m, precise):
    """sd35fp8.kernels.mlp's fc2 kernel (GEMM + bias + per-sample gate + residual add in the epilogue) against the same
    math in fp32: M not a multiple of the tile (2 x 154 text tokens; 1000), N not of 256, a strided gate (a chunk
    of the adaLN output) and both accumulation modes; compiled as the runtime calls it: one op, same result."""
    from sd35fp8.kernels.mlp import _launch_residual, fp8_linear_residual, fused_supported, residual_reference
    from sd35fp8.core.quant import quantize_weight
    g = torch.Generator(device="cuda").manual_seed(2)
    k, n = 1536, 1552
    w8, ws = quantize_weight(torch.randn(n, k, device="cuda", generator=g) * 0.02, gran)
    x = torch.randn(m, k, device="cuda", generator=g)
    xs = (x.abs().amax() / 448).reshape(())
    xq = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
    b = (torch.randn(n, device="cuda", generator=g) * 0.1).bfloat16() if bias else None
    res = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    gate = torch.randn(2, 6 * n, device="cuda", generator=g).bfloat16()[:, 5 * n:]
    assert fused_supported(w8, xq.device)
    out = _launch_residual(xq, w8, xs, ws, b, res, gate, precise)
    ref = residual_reference(xq, w8, xs, ws, b, res, gate)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n) and bool(torch.isfinite(out).all())
    assert rel(out - res, ref.float() - res.float()) < 1e-2  # the branch: accumulation order and one BF16 rounding
    f = torch.compile(lambda *a: fp8_linear_residual(*a, precise=precise), dynamic=False)
    from sd35fp8.kernels.mlp import CALLS
    before = CALLS.copy()
    assert torch.equal(f(xq, w8, xs, ws, b, res, gate), out)
    assert CALLS["fc2_kernel"] == before["fc2_kernel"] + 1
    assert CALLS["fc2_unfused_on_cuda"] == before["fc2_unfused_on_cuda"]
    # a layout the kernel does not take (a residual that is a strided view): the unfused math, counted as such
    wide = torch.randn(m, n + 16, device="cuda", generator=g).bfloat16()
    wide[:, :n] = res
    slow = fp8_linear_residual(xq, w8, xs, ws, b, wide[:, :n], gate, precise=precise)
    assert CALLS["fc2_unfused_on_cuda"] == before["fc2_unfused_on_cuda"] + 1
    assert rel(slow - res, out.float() - res.float()) < 1e-2


@hopper
def test_fused_mlp_on_the_gpu_eager_and_compiled():
    from test_runtime import calibrated_mlp
    from sd35fp8.runtime.mlp import fused_mlps
    from sd35fp8.runtime.static import RuntimeConfig, set_static
    m, ref, x = calibrated_mlp()
    m, ref, x = m.cuda(), ref.cuda(), x.cuda().bfloat16()
    set_static(m, RuntimeConfig(fuse_mlp=False))
    unfused = m(x)
    set_static(m, RuntimeConfig())
    assert fused_mlps(m) == 1
    fused = m(x)
    assert rel(fused, unfused) < 2e-2 and rel(fused, ref(x.float())) < 0.08
    compiled = torch.compile(m)(x)
    assert rel(compiled, fused) < 1e-2 and bool(torch.isfinite(compiled).all())


@hopper
@pytest.mark.parametrize("m", [308, 8192])
def test_int8_mlp_kernels_equal_the_unfused_computation_and_beat_e4m3s_error(m):
    """sd35fp8.kernels.mlp's W8A8 INT8 variants (per-token scales into fc1, INT8 out at fc2's static scale, exact int32
    accumulation) against the same math unfused, every epilogue layout; and against fp32 their MLP error is
    below the E4M3 kernels' on the same data (the reason they exist: a third of E4M3's rounding error)."""
    from sd35fp8.kernels.mlp import FC1_CONFIG, FC2_CONFIG, _launch, _launch_residual, reference, residual_reference
    from sd35fp8.core.quant import quantize_weight
    g = torch.Generator(device="cuda").manual_seed(3)
    k, n = 1536, 6144
    x = torch.randn(m, k, device="cuda", generator=g)
    w1 = torch.randn(n, k, device="cuda", generator=g) * 0.02
    w2 = torch.randn(k, n, device="cuda", generator=g) * 0.02
    res = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    gate = torch.randn(2, k, device="cuda", generator=g).bfloat16()
    exact = res.float().view(2, -1, k) + gate.float()[:, None] * torch.nn.functional.linear(
        torch.nn.functional.gelu(torch.nn.functional.linear(x, w1), approximate="tanh"), w2).view(2, -1, k)
    h_amax = torch.nn.functional.gelu(torch.nn.functional.linear(x, w1), approximate="tanh").abs().amax()
    errs = {}
    for fmt in ("int8", "e4m3"):
        if fmt == "int8":
            sx = (x.abs().amax(1) / 127).clamp_min(1e-8)
            xq = (x / sx[:, None]).round().clamp(-127, 127).to(torch.int8)
            (q1, s1), (q2, s2) = (quantize_weight(w, "int8_per_channel") for w in (w1, w2))
            s_h = h_amax / 127
        else:
            sx = (x.abs().amax() / 448).reshape(())
            xq = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn)
            (q1, s1), (q2, s2) = (quantize_weight(w) for w in (w1, w2))
            s_h = h_amax / 448
        h8 = _launch(xq, q1, sx, s1, None, 1 / s_h, "tanh")
        if fmt == "int8":
            assert h8.dtype == torch.int8
            for cfg in ((128, 256, 128, 8, 8, 3), FC1_CONFIG, (*FC1_CONFIG[:6], True, True)):
                d = (_launch(xq, q1, sx, s1, None, 1 / s_h, "tanh", cfg).int()
                     - reference(xq, q1, sx, s1, None, 1 / s_h).int()).abs()
                assert int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3
        out = _launch_residual(h8, q2, s_h.reshape(()), s2, None, res, gate)
        if fmt == "int8":
            ref = residual_reference(h8, q2, s_h.reshape(()), s2, None, res, gate).float()
            assert float(((out.float() - ref).abs() > ref.abs() * 2**-7 + 1e-3).float().mean()) == 0.0  # a BF16 step
            assert torch.equal(_launch_residual(h8, q2, s_h.reshape(()), s2, None, res, gate, False, FC2_CONFIG),
                               _launch_residual(h8, q2, s_h.reshape(()), s2, None, res, gate, False,
                                                (*FC2_CONFIG[:6], False, False)))
        assert bool(torch.isfinite(out).all())
        errs[fmt] = rel(out.float() - res.float(), exact.view(m, k) - res.float())
    assert errs["int8"] < 0.6 * errs["e4m3"], errs


@hopper
@pytest.mark.parametrize("m", [308, 8192])
def test_pingpong_int8_study_kernels_equal_the_triton_ones(m):
    """The study bench/studies/int8_pingpong (not product): its ping-pong kernels against sd35fp8.kernels.mlp's Triton
    INT8 kernels on the same operands, at the text stream's and the image stream's row counts and every ping-pong
    candidate config: fc2 bit-identical (exact int32 accumulation, the same epilogue); fc1 at most one INT8 step off
    (the GELU's instruction order), in under 0.1% of the outputs."""
    from bench.studies.int8_pingpong import gluon_int8
    from sd35fp8.core.quant import quantize_weight
    from sd35fp8.kernels import mlp as gemm
    if not gluon_int8.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    from bench.studies.int8_pingpong.gluon_int8_gemm import PP_CONFIGS
    g = torch.Generator(device="cuda").manual_seed(5)
    k, n = 2432, 9728
    x = torch.randn(m, k, device="cuda", generator=g)
    sx = (x.abs().amax(1) / 127).clamp_min(1e-8)
    xq = (x / sx[:, None]).round().clamp(-127, 127).to(torch.int8)
    (q1, s1), (q2, s2) = (quantize_weight(torch.randn(*shape, device="cuda", generator=g) * 0.02, "int8_per_channel")
                          for shape in ((n, k), (k, n)))
    b1, b2 = (torch.randn(c, device="cuda", generator=g).bfloat16() * 0.02 for c in (n, k))
    res = torch.randn(m, k, device="cuda", generator=g).bfloat16()
    gate = torch.randn(2, k, device="cuda", generator=g).bfloat16()
    inv = torch.tensor(40.0, device="cuda")
    tri1 = gemm._launch(xq, q1, sx, s1, b1, inv, "tanh")
    tri2 = gemm._launch_residual(tri1, q2, torch.tensor(0.05, device="cuda"), s2, b2, res, gate)
    for cfg in PP_CONFIGS:
        h = gluon_int8.launch_pp_fc1(xq, q1, sx, s1, b1, inv, cfg)
        d = (h.int() - tri1.int()).abs()
        assert h.dtype == torch.int8 and int(d.max()) <= 1 and float((d > 0).float().mean()) < 1e-3, cfg
        o = gluon_int8.launch_pp_fc2(tri1, q2, torch.tensor(0.05, device="cuda"), s2, b2, res, gate, cfg)
        assert torch.equal(o, tri2), cfg


@hopper
def test_int8_mlp_runtime_on_the_gpu_fused_eager_and_compiled():
    """The W8A8 MLP of the static runtime on Hopper: the fused INT8 kernels (counted), the unfused CUDA path
    (torch._int_mm) and the compiled model agree, and the MLP stays closer to the exact one than E4M3's."""
    from test_runtime import int8_mlp
    from sd35fp8.kernels.mlp import CALLS
    from sd35fp8.runtime.mlp import fused_mlps
    from sd35fp8.runtime.static import RuntimeConfig, set_static
    m8, m, ref, x = int8_mlp()
    m8, m, ref, x = m8.cuda(), m.cuda(), ref.cuda(), x.cuda().bfloat16()
    set_static(m8, RuntimeConfig(fuse_mlp=False))
    unfused = m8(x)
    set_static(m8)
    assert fused_mlps(m8) == 1 and m8.fc1.fp8_static == "int8_token"
    before = CALLS.copy()
    fused = m8(x)
    assert CALLS["fc1_kernel"] == before["fc1_kernel"] + 1 and CALLS["fc1_unfused_on_cuda"] == \
        before["fc1_unfused_on_cuda"]
    assert rel(fused, unfused) < 2e-2
    compiled = torch.compile(m8)(x)
    assert rel(compiled, fused) < 1e-2 and bool(torch.isfinite(compiled).all())
    set_static(m)
    exact = ref(x.float())
    assert rel(fused, exact) < 0.6 * rel(m(x), exact)
