"""Static input centering, the handling of massive activations (sd35fp8.core.centering): which channels calibration
centers, that the FP8 layer then computes what the high-precision layer computes (unfused and fused MLP paths), the
bias it adds, and its refresh when the weights change."""
import pytest
import torch

import sd35fp8
from sd35fp8.core.centering import center_vector, choose_centers, describe_centers, weight_correction
from sd35fp8.runtime.static import RuntimeConfig, refresh_center_biases, set_static

from tests.unit.test_runtime import calibrated_mlp


def massive(x: torch.Tensor, channels, value: float) -> torch.Tensor:
    """``x`` with ``channels`` set to ``value`` plus a little of their own variation: an offset far above the rest."""
    x = x.clone()
    x[..., channels] = value + 0.5 * x[..., channels]
    return x


def ranges(x: torch.Tensor):
    x2 = x.reshape(-1, x.shape[-1])
    return x2.amin(0), x2.amax(0)


def test_a_channel_far_off_zero_is_centered_at_the_middle_of_its_range():
    g = torch.Generator().manual_seed(0)
    x = massive(torch.randn(512, 64, generator=g), [5, 40], 300.0)
    (name, e), = choose_centers({"l": ranges(x)}).items()
    lo, hi = ranges(x)
    assert name == "l" and e["channels"] == [5, 40]
    assert e["centers"] == pytest.approx([float((lo[c] + hi[c]) / 2) for c in (5, 40)])
    assert e["was"] == pytest.approx(float(x.abs().max())) and e["amax"] < e["was"] / 50
    v = center_vector(e, 64)
    assert float(((x - v).abs().max())) == pytest.approx(e["amax"], rel=1e-6)  # the centered range, exactly
    assert "2 channel(s) in 1 of 3 FP8 layers" in describe_centers({"l": e}, 3)


def test_no_centers_where_they_would_not_help():
    g = torch.Generator().manual_seed(1)
    plain = torch.randn(512, 64, generator=g)
    sign = plain.clone()
    sign[:, 7] *= 300.0  # a huge channel that swings through zero: centering cannot shrink it
    small = massive(plain, [3], 4.0)  # an offset, but not far above the others (<8x the median range)
    assert choose_centers({"a": ranges(plain), "b": ranges(sign), "c": ranges(small)}) == {}
    assert describe_centers({}, 3).startswith("input centering: none needed")
    with pytest.raises(ValueError, match="do not fit a layer with 8 input channels"):
        center_vector({"channels": [9], "centers": [1.0]}, 8)


def test_at_most_top_channels_a_layer():
    x = massive(torch.randn(256, 64), list(range(20)), 500.0)
    assert choose_centers({"l": ranges(x)}) == {}  # 20 offsets but top=16: the 17th keeps the amax up
    e = choose_centers({"l": ranges(x)}, top=32)["l"]
    assert len(e["channels"]) == 20


def test_observer_keeps_each_channels_signed_range():
    sess = sd35fp8.CalibrationSession("max")
    sess.observe("l", torch.tensor([[1.0, -2.0], [3.0, -5.0]]))
    sess.observe("l", torch.tensor([[-4.0, 0.5]]))
    lo, hi = sess.channel_ranges()["l"]
    assert lo.tolist() == [-4.0, -5.0] and hi.tolist() == [3.0, 0.5]
    assert sess.channel_amax()["l"].tolist() == [4.0, 5.0]


def centered_layer(value=300.0, seed=0):
    """A calibrated FP8Linear whose input has two massive offset channels, with its centers installed as the
    ComfyUI adapter installs them; (layer, high-precision layer, input)."""
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 48)
    x = massive(torch.randn(4, 32, 64), [5, 40], value)
    layer = sd35fp8.FP8Linear.from_linear(lin, name="l")
    sess = sd35fp8.CalibrationSession("max")
    with sd35fp8.fp8_autocast(enabled=False, calibrating=sess):
        layer(x)
    layer.fp8_set_input_amax(sess.amax()["l"])
    (e,) = choose_centers(sess.channel_ranges()).values()
    return layer, lin, x, e


def test_centered_static_layer_computes_the_high_precision_result():
    """Without centering the offset channels set the per-tensor scale and their own E4M3 rounding (1/16 of 300)
    reaches every output; centered, the layer is as close as on an input without them, and the bias it adds is the
    layer's plus W·center from its 8-bit weight."""
    layer, lin, x, e = centered_layer()
    # the activations' share of the error: against the layer's own 8-bit weight in high precision
    want = torch.nn.functional.linear(x, layer.fp8_dequantized_weight(torch.float32), lin.bias)
    set_static(layer)
    plain = float((layer(x) - want).norm() / want.norm())
    layer.fp8_set_input_center(center_vector(e, 64), e["amax"])
    set_static(layer)
    out = layer(x)
    centered = float((out - want).norm() / want.norm())
    assert centered < plain / 2 and centered < 0.01, (plain, centered)
    c = center_vector(e, 64)
    expect = lin.bias.float() + layer.fp8_dequantized_weight(torch.float32) @ c
    assert torch.allclose(layer.fp8_static_bias(torch.float32), expect, atol=1e-4)


def test_weight_correction_takes_the_rounding_of_the_centered_columns_out():
    layer, lin, x, e = centered_layer(value=1000.0)
    layer.fp8_set_input_center(center_vector(e, 64), e["amax"])
    set_static(layer)
    want = lin(x)
    before = float((layer(x) - want).norm() / want.norm())
    idx = torch.tensor(e["channels"])
    corr = weight_correction(lin.weight[:, idx], layer.fp8_dequantized_weight(torch.float32)[:, idx],
                             torch.tensor(e["centers"]))
    assert torch.allclose(corr, (lin.weight[:, idx] - layer.fp8_dequantized_weight(torch.float32)[:, idx])
                          @ torch.tensor(e["centers"]), atol=1e-5)
    layer.fp8_set_bias_correction(corr)
    set_static(layer)
    after = float((layer(x) - want).norm() / want.norm())
    assert after < before / 2, (before, after)
    with pytest.raises(ValueError, match="does not fit"):
        layer.fp8_set_bias_correction(torch.zeros(3))


def test_the_centered_bias_follows_the_weight_in_place():
    """A weight merged in place (a LoRA) changes W·center: refresh_center_biases recomputes it into the same
    tensor (CUDA graphs and compiled code keep reading it)."""
    layer, lin, x, e = centered_layer()
    layer.fp8_set_input_center(center_vector(e, 64), e["amax"])
    set_static(layer)
    buf = layer.fp8_center_bias
    before = buf.clone()
    with torch.no_grad():
        layer.weight.data.copy_((layer.weight.float() * 0.5).to(layer.weight.dtype))
    assert torch.equal(layer.fp8_center_bias, before)  # stale until refreshed
    assert refresh_center_biases(layer) == 1
    assert layer.fp8_center_bias is buf and not torch.equal(buf, before)
    expect = lin.bias.float() + layer.fp8_dequantized_weight(torch.float32) @ center_vector(e, 64)
    assert torch.allclose(buf.float(), expect, atol=1e-4)


def test_fused_mlp_with_a_centered_fc2_input_matches_the_unfused_one(monkeypatch):
    """fc2's centered input in the fused MLP (the center subtracted in fc1's epilogue, W·center in fc2's bias) as
    on a Hopper GPU (the kernel's own math: tests/unit/test_cuda.py), against the unfused static MLP and the
    high-precision one, with two massive hidden channels (fc1's bias +300, fc2's bias cancelling them)."""
    import sd35fp8.runtime.mlp as rmlp

    def plant(mlp):
        mlp.fc1.bias[[3, 77]] += 300.0
        mlp.fc2.bias -= mlp.fc2.weight[:, [3, 77]].sum(1) * 300.0
    sess = sd35fp8.CalibrationSession("max")
    m, ref, x = calibrated_mlp(prepare=plant, session=sess)
    centers = choose_centers(sess.channel_ranges())
    assert list(centers) == ["fc2"] and centers["fc2"]["channels"] == [3, 77]
    e = centers["fc2"]
    m.fc2.fp8_set_input_center(center_vector(e, 256), e["amax"])
    idx = torch.tensor(e["channels"])  # and the massive channels' weight rounding, as calibration corrects it
    m.fc2.fp8_set_bias_correction(weight_correction(ref.fc2.weight[:, idx], m.fc2.fp8_dequantized_weight(
        torch.float32)[:, idx], torch.tensor(e["centers"])))
    want = ref(x)
    set_static(m, RuntimeConfig(fuse_mlp=False))
    unfused = m(x)
    monkeypatch.setattr(rmlp, "fused_supported", lambda w8, device: True)
    set_static(m, RuntimeConfig())
    assert rmlp.fused_mlps(m) == 1
    fused = m(x)
    e_fused, e_unfused = (float((y - want).norm() / want.norm()) for y in (fused, unfused))
    # the unfused path rounds fc1's output to BF16 before the center comes off (a step of 2 at 300); the fused one
    # subtracts it from the fp32 value: closer
    assert e_fused < e_unfused < 0.08, (e_fused, e_unfused)
