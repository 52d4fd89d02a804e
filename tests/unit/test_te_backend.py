"""TransformerEngine backend: selection and error paths (CPU, no TE needed); the GPU comparison
against our torch backend runs where TE is importable (tests/test_cuda.py style skip)."""
import importlib.util
import sys

import pytest
import torch

import sd35fp8
from sd35fp8.core.marks import marks
from tests.support.markers import te_gpu
from sd35fp8.runtime import te as te_backend
from sd35fp8.runtime.te import BACKENDS, availability, resolve_backend, set_te, te_recipe

HAS_TE = importlib.util.find_spec("transformer_engine") is not None


def calibrated_layer(seed=0, d=64):
    torch.manual_seed(seed)
    lin = sd35fp8.FP8Linear.from_linear(torch.nn.Linear(d, 2 * d), name="blk.fc")
    x = torch.randn(4, 16, d)
    session = sd35fp8.CalibrationSession("max")
    with sd35fp8.fp8_autocast(enabled=False, calibrating=session):
        lin(x)
    lin.fp8_set_input_amax(session.amax()["blk.fc"])
    return lin, x


@pytest.mark.skipif(HAS_TE, reason="TransformerEngine is installed here")
def test_without_te_availability_says_how_to_install_and_set_te_refuses():
    ok, why = availability()
    assert not ok and "not installed" in why and "pip install" in why and "transformer-engine" in why
    model = torch.nn.Sequential(calibrated_layer()[0])
    with pytest.raises(RuntimeError, match="TransformerEngine is not installed"):
        set_te(model, sd35fp8.DelayedScaling())
    assert model[0].fp8_backend is None and not te_backend.te_enabled(model[0])  # nothing changed
    assert set_te(model, None) == 0  # switching TE off never needs TE


def test_per_channel_weights_are_refused_before_anything_is_routed():
    """TE takes one weight scale per tensor: a model with per-channel E4M3 weights is refused up front (the error names
    the layer and speaks of scales, not of nodes), installed or not; per-channel INT8 weights run weight-only."""
    from sd35fp8.core.quant import PerChannelWeightsError
    lin, _ = calibrated_layer()
    lin.fp8_quantize_("per_channel", name="blocks.0.mlp.fc1", weight=torch.randn(lin.out_features, lin.in_features))
    model = torch.nn.Sequential(lin)
    with pytest.raises(PerChannelWeightsError, match=r"1 FP8 layer\(s\) have per-channel weight scales \(first: 0\)"):
        set_te(model, sd35fp8.DelayedScaling())
    assert lin.fp8_backend is None and sd35fp8.core.marks.peek(lin) is None


def test_auto_resolves_to_a_backend_that_runs_here_and_unknown_names_fail():
    assert resolve_backend("auto", "cpu") == "torch"
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("transformer_engine", "cpu") == "transformer_engine"  # explicit choice is kept
    with pytest.raises(ValueError, match="unknown FP8 backend 'tensorrt'"):
        resolve_backend("tensorrt")
    assert BACKENDS == ("auto", "torch", "transformer_engine")
    for cc, name in te_backend.MEASURED_FASTER.items():
        assert len(cc) == 2 and name in BACKENDS[1:]


def test_layer_without_te_state_runs_our_path_on_cpu():
    lin, x = calibrated_layer()
    marks(lin).te_config, marks(lin).te_modules = {"recipe": None, "margin": 0}, {}  # as set_te would leave it
    lin.fp8_backend = te_backend.te_forward  # CPU tensors never go to TE
    with sd35fp8.fp8_autocast():
        a = lin(x)
    lin.fp8_backend = None
    with sd35fp8.fp8_autocast():
        b = lin(x)
    assert torch.equal(a, b)


needs_te_gpu = te_gpu(HAS_TE and availability()[0])


@needs_te_gpu
@pytest.mark.parametrize("scaling", ["delayed", "current"])
def test_te_linear_matches_our_fp8_linear_on_the_same_fp8_weight_storage(scaling):
    lin, x = calibrated_layer(d=256)
    lin = lin.cuda()
    x = x.cuda().to(torch.bfloat16)
    ref_bf16 = torch.nn.functional.linear(x.float(), lin.fp8_dequantized_weight(torch.float32), lin.bias.float())
    with sd35fp8.fp8_autocast():
        ours = lin(x).float()
    warm, _ = calibrated_layer(seed=1, d=256)  # TE allocates its cuBLAS workspace once, on first use
    warm = warm.cuda()
    set_te(torch.nn.Sequential(warm), sd35fp8.DelayedScaling(), scaling)
    with te_backend.te_autocast(te_recipe(sd35fp8.DelayedScaling(), scaling)):
        warm(x[:, :3])  # 12 rows: also exercises the pad-to-8-rows path
    before = torch.cuda.memory_allocated()
    set_te(torch.nn.Sequential(lin), sd35fp8.DelayedScaling(), scaling)
    with te_backend.te_autocast(te_recipe(sd35fp8.DelayedScaling(), scaling)):
        out = lin(x).float()
        out3 = lin(x[:, :3]).float()
    assert torch.allclose(out3, out[:, :3], rtol=0.05, atol=0.05 * float(out.abs().max()))
    mod = marks(lin).te_modules[torch.bfloat16]
    assert mod.weight._data.data_ptr() == lin.weight.data_ptr()  # shares our FP8 storage
    kept = torch.cuda.memory_allocated() - before - out.numel() * 4 - out3.numel() * 4
    assert kept < lin.weight.numel() // 2, kept  # no BF16 and no second FP8 copy of the weight
    assert torch.isfinite(out).all()
    e_te = float((out - ref_bf16).norm() / ref_bf16.norm())
    e_ours = float((ours - ref_bf16).norm() / ref_bf16.norm())
    assert e_te < 0.08 and e_te < 2 * e_ours + 0.01, (e_te, e_ours)
    if scaling == "delayed":  # seeded from calibration: the first call already used the calibrated scale
        meta = mod.fp8_meta["scaling_fwd"]
        assert float(meta.amax_history[:, 0].max()) == pytest.approx(float(lin.input_scale) * 448, rel=1e-5)
    set_te(torch.nn.Sequential(lin), None)
    with sd35fp8.fp8_autocast():
        assert torch.equal(lin(x).float(), ours)
    sys.stdout.write(f"TE ({scaling}) error {e_te:.4f}, ours {e_ours:.4f}\n")


@needs_te_gpu
def test_delayed_scaling_updates_after_each_call_and_te_replays_as_a_cuda_graph():
    from sd35fp8.runtime.graphs import GraphedModule
    lin, x = calibrated_layer(d=256)
    lin = lin.cuda()
    x = x.cuda().to(torch.bfloat16)
    net = torch.nn.Sequential(lin)
    rec = sd35fp8.DelayedScaling(amax_history_len=4)
    trec = te_recipe(rec, "delayed")
    set_te(net, rec, "delayed")
    seed = float(lin.input_scale) * 448
    small = x * 0.25
    with te_backend.te_autocast(trec):
        net(small)
    meta = marks(lin).te_modules[torch.bfloat16].fp8_meta["scaling_fwd"]
    assert float(meta.scale[0]) == pytest.approx(448 / seed, rel=1e-5)  # TE itself never updates under no_grad
    with te_backend.te_autocast(trec):
        for _ in range(5):  # the seed leaves the 4-long history
            net(small)
            te_backend.te_step()
        assert float(meta.scale[0]) == pytest.approx(448 / float(small.abs().max()), rel=1e-3)
        ref = net(small).float()
        gm = GraphedModule(net, after=te_backend.te_step, warmup=1)
        outs = [gm(small).float() for _ in range(3)]
        assert gm.replays == 2 and all(torch.equal(o, ref) for o in outs)  # steady state: bit-identical
        for _ in range(5):  # the update is part of the graph: a larger input moves the scale back up
            gm(x)
    assert gm.replays >= 5
    assert float(meta.scale[0]) == pytest.approx(448 / float(x.abs().max()), rel=1e-3)
    set_te(net, None)
