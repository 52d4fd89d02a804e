"""The static FP8 runtime (sd35fp8/runtime/static.py) and the FP8-weight kernel (sd35fp8/kernels/gemv.py), on CPU.
GPU-only parts (Triton GEMV, compiled static path, CUDA NaN behaviour) are in test_cuda.py."""
import pytest
import torch

import sd35fp8
import sd35fp8.runtime.mlp
from sd35fp8.kernels.gemv import fp8_weight_only_linear
from sd35fp8.runtime.static import RuntimeConfig, clear_static, is_static, set_static


class Block(torch.nn.Module):
    def __init__(self, d=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.adaLN_modulation = torch.nn.Sequential(torch.nn.SiLU(), torch.nn.Linear(d, 2 * d))
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        h = torch.nn.functional.layer_norm(x, x.shape[-1:]) * (1 + scale[:, None]) + shift[:, None]
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(h), approximate="tanh"))


def quantized_block():
    b = Block()
    ref = Block()
    for name in ("adaLN_modulation.1", "fc1", "fc2"):
        parent, _, attr = name.rpartition(".")
        owner = b.get_submodule(parent) if parent else b
        setattr(owner, attr, sd35fp8.FP8Linear.from_linear(getattr(owner, attr), name=name))
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    session = sd35fp8.CalibrationSession("max")
    with sd35fp8.fp8_autocast(enabled=False, calibrating=session):
        b(x, c)
    sd35fp8.apply_input_scales(b, sd35fp8.calibrated_amax(session, b))
    return b, ref, x, c


def test_static_runtime_computes_what_the_autocast_path_computes():
    b, ref, x, c = quantized_block()
    with sd35fp8.fp8_autocast(enabled=True):
        dyn = b(x, c)
    set_static(b, RuntimeConfig(adaln="fp8"))
    assert is_static(b)
    static = b(x, c)  # no autocast context needed: the layers are frozen
    # the static path rounds the matmul output through BF16 (the GPU's output dtype)
    assert float((static - dyn).norm() / dyn.norm()) < 1e-2
    high = ref(x, c)
    assert float((static - high).norm() / high.norm()) < 0.08
    clear_static(b)
    assert not is_static(b)
    with sd35fp8.fp8_autocast(enabled=True):
        assert torch.equal(b(x, c), dyn)


def test_adaln_layers_keep_bf16_activations_by_default():
    b, _, x, c = quantized_block()
    set_static(b)
    assert b.adaLN_modulation[1].fp8_static == "weight_only" and b.fc1.fp8_static == "fp8"
    w = b.adaLN_modulation[1]
    cc = torch.nn.functional.silu(c)
    expect = torch.nn.functional.linear(cc, w.fp8_dequantized_weight(torch.float32), w.bias)
    assert torch.allclose(w(cc), expect, atol=1e-5)


def test_static_runtime_needs_calibration_and_says_which_layer():
    b = Block()
    b.fc1 = sd35fp8.FP8Linear.from_linear(b.fc1, name="fc1")
    with pytest.raises(ValueError, match="fc1.*calibrat"):
        set_static(b)
    with pytest.raises(ValueError, match="adaln"):
        RuntimeConfig(adaln="int4")


def test_rerunning_set_static_updates_scales_in_place():
    """Compiled code and CUDA graphs hold the scale buffers: a new calibration must reach them."""
    b, _, x, c = quantized_block()
    set_static(b, RuntimeConfig(margin=0))
    buf = b.fc1.fp8_in_scale
    before = float(buf)
    set_static(b, RuntimeConfig(margin=1))
    assert b.fc1.fp8_in_scale is buf and float(buf) == pytest.approx(2 * before)
    assert float(b.fc1.fp8_in_inv) == pytest.approx(1 / (2 * before))


def test_repeated_set_static_is_free_until_a_layer_or_its_scale_changes(monkeypatch):
    """Every sampling run calls set_static: with the same config and scales it must not redo the per-layer work
    (at Large ~1500 small GPU ops and module walks per run); a new calibration, an in-place scale update or a
    layer reset since then must still be applied."""
    b, _, x, c = quantized_block()
    calls = []
    real = sd35fp8.FP8Linear.fp8_set_static
    monkeypatch.setattr(sd35fp8.FP8Linear, "fp8_set_static",
                        lambda self, *a, **k: (calls.append(self), real(self, *a, **k)))
    cfg = RuntimeConfig(adaln="fp8")
    assert set_static(b, cfg) == 3 and len(calls) == 3
    ref = b(x, c)
    assert set_static(b, cfg) == 3 and len(calls) == 3  # nothing changed: nothing redone
    assert torch.equal(b(x, c), ref)
    set_static(b, RuntimeConfig(adaln="fp8", margin=1))  # another config: the full pass
    assert len(calls) == 6 and float(b.fc1.fp8_in_scale) == pytest.approx(2 * float(b.fc1.input_scale))
    set_static(b, cfg)
    b.fc1.fp8_set_input_amax(4 * float(b.fc1.input_scale) * 448.0)  # a new calibration (new scale tensor)
    set_static(b, cfg)
    assert float(b.fc1.fp8_in_scale) == pytest.approx(float(b.fc1.input_scale))
    b.fc2.input_scale.mul_(3)  # updated in place
    set_static(b, cfg)
    assert float(b.fc2.fp8_in_scale) == pytest.approx(float(b.fc2.input_scale))
    n = len(calls)
    b.fc2.fp8_set_static(None)  # one layer reset by someone else
    set_static(b, cfg)
    assert b.fc2.fp8_static == "fp8" and len(calls) == n + 1 + 3
    clear_static(b)
    set_static(b, cfg)
    assert is_static(b) and len(calls) == n + 4 + 3 + 3
    with torch.inference_mode():  # as in ComfyUI's server: scales without a version counter still work
        b.fc1.fp8_set_input_amax(2 * float(b.fc1.input_scale) * 448.0)
        set_static(b, cfg)
        assert float(b.fc1.fp8_in_scale) == pytest.approx(float(b.fc1.input_scale))
        n = len(calls)
        set_static(b, cfg)
        assert len(calls) == n


def test_static_path_clamps_out_of_range_and_keeps_nan_visible():
    b, _, x, c = quantized_block()
    set_static(b)
    huge = b.fc1(torch.full((1, 64), 1e6))
    assert torch.isfinite(huge).all()  # clamped to ±448 before the cast
    assert torch.isnan(b.fc1(torch.full((1, 64), float("nan")))).all()  # not masked: the sampler check sees it


def test_fp8_weight_only_linear_matches_dequantized_linear():
    w8, s = sd35fp8.quantize_weight(torch.randn(96, 64) * 0.02, "per_channel")
    bias = torch.randn(96)
    x = torch.randn(3, 5, 64)
    y = fp8_weight_only_linear(x, w8, s, bias)
    expect = torch.nn.functional.linear(x, sd35fp8.dequantize_weight(w8, s, torch.float32), bias)
    assert y.shape == (3, 5, 96) and torch.allclose(y, expect, atol=1e-5)


def test_static_layer_on_a_gpu_without_fp8_falls_back_to_weight_only(monkeypatch, caplog):
    import sd35fp8.linear as lin
    b, ref, x, c = quantized_block()
    set_static(b)
    monkeypatch.setitem(lin._fp8_ok, torch.device("cpu"), False)  # pretend this device lacks FP8 tensor cores
    with caplog.at_level("WARNING", logger="sd35fp8"):
        y = b.fc1(x)
    expect = torch.nn.functional.linear(x, b.fc1.fp8_dequantized_weight(torch.float32), b.fc1.bias)
    assert torch.allclose(y, expect, atol=1e-5)


def test_the_library_has_one_import_name_whatever_name_comfyui_gives_the_pack(tmp_path):
    """ComfyUI imports the pack under its folder's name; the pack registers the library as ``sd35fp8``, the name the
    tests and benchmarks use, so one copy of each module (and of each torch.library op) exists in a process. A second
    load of the pack reuses it; another copy of the library refuses to load, naming both places."""
    import shutil
    import subprocess
    import sys
    import os
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    other = tmp_path / "Other-Pack"
    shutil.copytree(os.path.join(repo, "sd35fp8"), other / "sd35fp8", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(os.path.join(repo, "__init__.py"), other / "__init__.py")
    code = f"""
import importlib.util, sys, torch
def load(name, path):
    spec = importlib.util.spec_from_file_location(name, path + "/__init__.py", submodule_search_locations=[path])
    m = importlib.util.module_from_spec(spec); sys.modules[name] = m; spec.loader.exec_module(m); return m
load("ComfyUI-SD35-FP8", {repo!r})
import sd35fp8.kernels.gemv as k1
load("sd35-fp8", {repo!r})  # the folder comfy-cli installs the Registry package into
import sd35fp8.kernels.gemv as k2
assert k1 is k2 and sys.modules["sd35fp8"].__file__.startswith({repo!r})
assert not any(n.endswith(".sd35fp8") or ".sd35fp8." in n for n in sys.modules), "a second copy under the pack's name"
x = torch.randn(3, 8, dtype=torch.bfloat16)
w, s = torch.randn(4, 8).to(torch.float8_e4m3fn), torch.tensor(0.5)
assert torch.equal(k1._fp8w_linear(x, w, s, None), k1._dequant_linear(x, w, s, None))
try:
    load("Other-Pack", {str(other)!r})
except ImportError as e:
    assert "another copy of the sd35fp8 library" in str(e) and {str(other)!r} in str(e), e
else:
    raise AssertionError("a second copy of the library loaded")
print("OK")
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stderr[-2000:]


class Mlp(torch.nn.Module):
    """The shape of ComfyUI's (and timm's) ``Mlp``: fc1 → GELU → dropout/identity → fc2."""

    def __init__(self, d=64, drop=0.0, approximate="tanh"):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.act = torch.nn.GELU(approximate=approximate)
        self.drop1 = torch.nn.Dropout(drop)
        self.norm = torch.nn.Identity()
        self.fc2 = torch.nn.Linear(4 * d, d)
        self.drop2 = torch.nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


def calibrated_mlp(drop=0.0, approximate="tanh", seed=0, prepare=None, session=None):
    """(FP8 Mlp calibrated with max, its high-precision twin, the input); ``prepare(mlp)``: edits the weights first
    (both get them); ``session``: the CalibrationSession to use (to read its statistics)."""
    torch.manual_seed(seed)
    m, ref = Mlp(drop=drop, approximate=approximate), Mlp(drop=drop, approximate=approximate)
    if prepare is not None:
        with torch.no_grad():
            prepare(m)
    ref.load_state_dict(m.state_dict())
    for name in ("fc1", "fc2"):
        setattr(m, name, sd35fp8.FP8Linear.from_linear(getattr(m, name), name=name))
    x = torch.randn(2, 24, 64) * 3
    session = session or sd35fp8.CalibrationSession("max")
    with sd35fp8.fp8_autocast(enabled=False, calibrating=session):
        m(x)
    sd35fp8.apply_input_scales(m, sd35fp8.calibrated_amax(session, m))
    return m.eval(), ref.eval(), x


@pytest.mark.parametrize("approximate", ["tanh", "none"])
def test_fused_mlp_computes_what_the_unfused_static_mlp_computes(monkeypatch, approximate):
    """set_static installs the fused fc1 + GELU + quantization forward on MLPs (as if on a Hopper GPU: the
    kernel's own math is checked against sd35fp8.kernels.mlp.reference on the GPU); clear_static removes it."""
    import sd35fp8.kernels.mlp as gemm
    from sd35fp8.runtime.mlp import fused_mlps
    m, ref, x = calibrated_mlp(approximate=approximate)
    set_static(m, RuntimeConfig(fuse_mlp=False))
    assert fused_mlps(m) == 0
    unfused = m(x)
    calls = []
    real = gemm._fp8_linear_gelu

    def spy(*a):
        calls.append(a[6])  # the GELU mode (then fc2's input center, None here)
        return real(*a)

    monkeypatch.setattr(sd35fp8.runtime.mlp, "fused_supported", lambda w8, device: True)  # as on Hopper
    monkeypatch.setattr(gemm, "_fp8_linear_gelu", spy)
    set_static(m, RuntimeConfig())
    assert fused_mlps(m) == 1 and "forward" in m.__dict__
    fused = m(x)
    assert calls == [approximate]  # the fused op ran, with the module's own GELU mode
    # the unfused path rounds fc1's output to BF16 before GELU; the fused one quantizes the fp32 value
    assert float((fused - unfused).norm() / unfused.norm()) < 2e-2
    high = ref(x)
    assert float((fused - high).norm() / high.norm()) < 0.08
    clear_static(m)
    assert fused_mlps(m) == 0 and "forward" not in m.__dict__
    with sd35fp8.fp8_autocast(enabled=False):
        m(x)
    assert len(calls) == 1


def test_fused_mlp_is_not_installed_where_it_would_change_the_result(monkeypatch):
    import sd35fp8.kernels.mlp as gemm
    from sd35fp8.runtime.mlp import fused_mlps
    monkeypatch.setattr(sd35fp8.runtime.mlp, "fused_supported", lambda w8, device: True)  # as on Hopper
    m, _, _ = calibrated_mlp(drop=0.1)  # a real dropout between GELU and fc2
    set_static(m)
    assert fused_mlps(m) == 0
    m, _, x = calibrated_mlp()
    set_static(m)
    assert fused_mlps(m) == 1
    # fc2 weight-only (e.g. an adaLN-like pattern matched it): the fused path needs both layers static FP8
    m.fc2.fp8_set_static("weight_only")
    monkeypatch.setattr(gemm, "_fp8_linear_gelu", lambda *a: pytest.fail("fused op called"))
    assert m(x).shape == x.shape


def test_fused_op_rejects_wrong_inputs_and_saturates():
    from sd35fp8.kernels.mlp import fp8_linear_gelu
    w8 = torch.randn(32, 16).to(torch.float8_e4m3fn)
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="E4M3"):
        fp8_linear_gelu(torch.randn(4, 16), w8, one, one, None, one)
    with pytest.raises(ValueError, match="approximate"):
        fp8_linear_gelu(torch.randn(4, 16).to(torch.float8_e4m3fn), w8, one, one, None, one, "erf")
    x8 = torch.full((4, 16), 400.0).to(torch.float8_e4m3fn)
    out = fp8_linear_gelu(x8, w8.abs(), one, one, None, torch.tensor(1e6))
    assert out.dtype == torch.float8_e4m3fn and torch.equal(out.float(), torch.full((4, 32), 448.0))


def test_fc2_residual_op_is_the_gated_residual_add_per_sample_and_rejects_wrong_inputs():
    """sd35fp8.kernels.mlp.fp8_linear_residual: res + gate[sample] · (dequantized GEMM + bias), each gate row applying
    to its sample's rows, against the same math written out; wrong shapes and dtypes get clear errors."""
    from sd35fp8.kernels.mlp import fp8_linear_residual
    from sd35fp8.core.quant import dequantize_weight, quantize_weight
    g = torch.Generator().manual_seed(0)
    b, rows, k, n = 2, 5, 32, 24
    for gran in ("per_tensor", "per_channel"):
        w8, ws = quantize_weight(torch.randn(n, k, generator=g) * 0.1, gran)
        x = torch.randn(b * rows, k, generator=g)
        xs = (x.abs().amax() / 448).reshape(())
        x8 = (x / xs).clamp(-448, 448).to(torch.float8_e4m3fn)
        bias = torch.randn(n, generator=g).bfloat16()
        res = torch.randn(b * rows, n, generator=g).bfloat16()
        gate = torch.randn(b, 3 * n, generator=g).bfloat16()[:, n:2 * n]  # a chunk of the adaLN output: strided
        out = fp8_linear_residual(x8, w8, xs, ws, bias, res, gate)
        y = x8.float() * xs @ dequantize_weight(w8, ws, torch.float32).t() + bias.float()
        want = res.float() + torch.repeat_interleave(gate.float(), rows, 0) * y
        assert out.dtype == res.dtype and out.shape == res.shape
        assert torch.allclose(out.float(), want, rtol=1e-2, atol=1e-2)
        # sample 1's rows use gate row 1 only: a zero gate row leaves them the residual exactly
        gate0 = gate.clone()
        gate0[1] = 0
        assert torch.equal(fp8_linear_residual(x8, w8, xs, ws, bias, res, gate0)[rows:], res[rows:])
    one = torch.tensor(1.0)
    with pytest.raises(ValueError, match="E4M3"):
        fp8_linear_residual(x, w8, one, ws, None, res, gate)
    with pytest.raises(ValueError, match="gate"):
        fp8_linear_residual(x8, w8, xs, ws, None, res, gate[:, :4])
    with pytest.raises(ValueError, match="B dividing"):
        fp8_linear_residual(x8, w8, xs, ws, None, res, torch.zeros(3, n))
    with pytest.raises(ValueError, match="res"):
        fp8_linear_residual(x8, w8, xs, ws, None, res[:4], gate)


def test_int8_adaln_layers_run_weight_only_in_every_path():
    from sd35fp8.core.quant import INT8_ROWS
    b, _, x, c = quantized_block()
    w = b.adaLN_modulation[1]
    hp = torch.nn.Linear(64, 128)
    w.fp8_quantize_(INT8_ROWS, weight=hp.weight.detach())
    assert w.fp8_int8 and w.weight.dtype == torch.int8
    cc = torch.nn.functional.silu(c)
    expect = torch.nn.functional.linear(cc, w.fp8_dequantized_weight(torch.float32), w.bias)
    with sd35fp8.fp8_autocast(enabled=True):  # the autocast path would run FP8 matmuls: INT8 stays weight-only
        assert torch.allclose(w(cc), expect, atol=1e-5)
    set_static(b, RuntimeConfig(adaln="fp8"))  # even where adaLN layers would take FP8 activations
    assert w.fp8_static == "weight_only" and b.fc1.fp8_static == "fp8"
    assert torch.allclose(w(cc), expect, atol=1e-5)
    with pytest.raises(ValueError, match="one scale per output channel"):
        w.fp8_set_weight(w.weight, torch.tensor(1.0))


def test_fused_mlp_survives_repeated_set_static_without_recompiling(monkeypatch):
    """Every sampling run calls set_static: the fused forward must stay the same object, so a compiled model
    is not traced again (one frame for three runs), and it still computes the fused path."""
    from torch._dynamo.testing import CompileCounter
    monkeypatch.setattr(sd35fp8.runtime.mlp, "fused_supported", lambda w8, device: True)  # as on Hopper
    m, _, x = calibrated_mlp()
    set_static(m)
    fwd = m.forward
    cnt = CompileCounter()
    f = torch.compile(m, backend=cnt)
    outs = []
    for _ in range(3):
        set_static(m)
        assert m.forward is fwd
        outs.append(f(x))
    assert cnt.frame_count == 1
    assert torch.equal(outs[0], outs[2])
    set_static(m, RuntimeConfig(fuse_mlp=False))
    assert "forward" not in m.__dict__


def int8_mlp(approximate="tanh"):
    """calibrated_mlp() with fc1/fc2 re-quantized as INT8 rows from the same high-precision weights (their
    calibrated input scales kept), and the E4M3 one for comparison."""
    from sd35fp8.core.quant import INT8_ROWS
    m8, ref, x = calibrated_mlp(approximate=approximate)
    m, _, _ = calibrated_mlp(approximate=approximate)
    for name in ("fc1", "fc2"):
        getattr(m8, name).fp8_quantize_(INT8_ROWS, weight=getattr(ref, name).weight.detach())
    return m8, m, ref, x


def test_int8_mlp_runs_w8a8_in_the_static_runtime_fused_or_not(monkeypatch):
    """INT8 fc1/fc2 weights: set_static runs fc1 on per-token INT8 inputs and fc2 at its calibrated static INT8
    scale (amax / 127), the same math fused (sd35fp8.kernels.mlp's INT8 ops, their unfused fallback here) and unfused,
    and it is closer to the exact MLP than the E4M3 static runtime on the same weights and inputs."""
    from sd35fp8.core.formats import quantize_inv_int8
    from sd35fp8.linear import int8_quantize_rows
    from sd35fp8.runtime.mlp import fused_mlps
    m8, m, ref, x = int8_mlp()
    set_static(m8, RuntimeConfig(fuse_mlp=False))
    assert (m8.fc1.fp8_static, m8.fc2.fp8_static) == ("int8_token", "int8_static") and fused_mlps(m8) == 0
    assert float(m8.fc2.fp8_in_scale) == pytest.approx(float(m8.fc2.input_scale) * 448 / 127)
    unfused = m8(x)
    # the W8A8 math by hand: per-token INT8 into fc1, exact integer products, GELU, static INT8 into fc2
    x2 = x.reshape(-1, 64)
    xq, sx = int8_quantize_rows(x2)
    h = (xq.float() @ m8.fc1.weight.float().t()) * sx[:, None] * m8.fc1.weight_scale + m8.fc1.bias
    h = h.bfloat16().float()  # the static GEMMs write BF16 for fp32 activations (as the E4M3 ones)
    hq = quantize_inv_int8(torch.nn.functional.gelu(h, approximate="tanh"), m8.fc2.fp8_in_inv)
    y = (hq.float() @ m8.fc2.weight.float().t()) * m8.fc2.fp8_in_scale * m8.fc2.weight_scale + m8.fc2.bias
    assert float((unfused - y.view_as(unfused)).norm() / y.norm()) < 4e-3  # BF16 output rounding
    monkeypatch.setattr(sd35fp8.runtime.mlp, "fused_supported", lambda w8, device: True)  # as on Hopper
    set_static(m8)
    assert fused_mlps(m8) == 1
    fused = m8(x)  # fp8_linear_gelu's unfused INT8 math on the CPU; fc1's output stays fp32 (no BF16 rounding
    assert float((fused - unfused).norm() / unfused.norm()) < 1e-2  # before GELU): some INT8 steps differ
    set_static(m, RuntimeConfig(fuse_mlp=False))
    exact = ref(x)
    e_int8, e_e4m3 = (float((o - exact).norm() / exact.norm()) for o in (unfused, m(x)))
    assert e_int8 < 0.6 * e_e4m3, (e_int8, e_e4m3)
    # fc2's static INT8 scale needs calibration; other INT8 layers keep running weight-only
    m8.fc2.input_scale = None
    with pytest.raises(ValueError, match="fc2"):
        set_static(m8)
    with pytest.raises(ValueError, match="INT8 weights"):
        m.fc1.fp8_set_static("int8_token")


def test_int8_matmul_keeps_nan_visible_and_matches_fp32():
    from sd35fp8.linear import int8_matmul, int8_quantize_rows
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 32, generator=g)
    w = torch.randint(-127, 128, (8, 32), generator=g, dtype=torch.int8)
    ws = torch.rand(8, generator=g) * 0.01
    xq, sx = int8_quantize_rows(x)
    assert xq.dtype == torch.int8 and sx.shape == (5,) and int(xq.abs().max()) == 127
    out = int8_matmul(xq, w, sx, ws, None, torch.float32)
    exact = x @ (w.float() * ws[:, None]).t()
    assert float((out - exact).norm() / exact.norm()) < 0.01
    x[2, 3] = float("nan")
    xq, sx = int8_quantize_rows(x)
    out = int8_matmul(xq, w, sx, ws, None, torch.float32)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[[0, 1, 3, 4]]).all()
