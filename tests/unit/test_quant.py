import pytest
import torch

from sd35fp8 import E4M3, E4M3_MAX, dequantize_weight, quantize_weight, saturating_cast, scale_from_amax


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
def test_random_weight_roundtrip_error_bound(gran):
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    w8, s = quantize_weight(w, gran)
    assert w8.dtype == E4M3 and s.dtype == torch.float32
    assert s.shape == (() if gran == "per_tensor" else (256,))
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 per element, ~2-3% in norm
    err = rel(dequantize_weight(w8, s, torch.float32), w)
    assert 0 < err < 0.04


def test_outlier_heavy_rows_per_channel_beats_per_tensor():
    torch.manual_seed(1)
    w = torch.randn(128, 256) * 0.01
    w[:4] *= 1e5  # a few rows hold huge values (outlier channels): small rows fall to subnormals
    e_t = rel(dequantize_weight(*quantize_weight(w, "per_tensor"), torch.float32)[4:], w[4:])
    e_c = rel(dequantize_weight(*quantize_weight(w, "per_channel"), torch.float32)[4:], w[4:])
    assert e_c < 0.04
    assert e_t > 2 * e_c  # per-tensor crushes the small rows into e4m3's subnormal range


def test_scale_maps_amax_to_448():
    w = torch.tensor([[0.5, -2.0], [1.0, 0.25]])
    w8, s = quantize_weight(w)
    assert float(s) == pytest.approx(2.0 / 448)
    assert float(w8.float().abs().max()) == E4M3_MAX


def test_saturating_cast_never_produces_nan_or_inf():
    x = torch.tensor([1e6, -1e9, 448.0, 449.0, float("inf"), float("-inf"), float("nan"), 3e38, -5.0])
    y = saturating_cast(x, torch.tensor(1.0)).float()
    assert torch.isfinite(y).all()
    assert y.abs().max() == E4M3_MAX
    assert y[0] == E4M3_MAX and y[1] == -E4M3_MAX and y[6] == 0 and y[8] == -5.0
    # scaled: values far beyond the calibrated range saturate instead of overflowing
    y2 = saturating_cast(torch.full((4,), 1e7), torch.tensor(0.01)).float()
    assert (y2 == E4M3_MAX).all()


def test_zero_weight_and_nonfinite_weight():
    w8, s = quantize_weight(torch.zeros(16, 16))
    assert float(s) > 0 and torch.isfinite(dequantize_weight(w8, s)).all()
    bad = torch.ones(16, 16)
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_weight(bad)
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(torch.ones(16, 16), "per_block")


def test_scale_from_amax_rejects_nonfinite_and_applies_margin():
    assert float(scale_from_amax(448.0)) == pytest.approx(1.0)
    assert float(scale_from_amax(448.0, margin=2)) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="non-finite"):
        scale_from_amax(float("inf"))


def test_chunked_quantization_equals_the_whole_table():
    w = torch.randn(1000, 48) * 0.3
    w[123, 7] = 9.0  # the amax sits in one chunk only
    s = w.abs().amax() / E4M3_MAX
    w8, ws = quantize_weight(w, "per_tensor", chunk_rows=64)
    assert torch.equal(ws, s) and torch.equal(w8, saturating_cast(w, s))
    c8, cs = quantize_weight(w, "per_channel", chunk_rows=64)
    assert torch.equal(cs, w.abs().amax(dim=1) / E4M3_MAX) and torch.equal(c8, saturating_cast(w, cs[:, None]))
    g8, gs = quantize_weight(w.bfloat16(), "per_tensor", scale=s, chunk_rows=100)  # a given scale is kept
    assert torch.equal(gs, s) and torch.equal(g8, quantize_weight(w.bfloat16(), "per_tensor")[0])
    w[5, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        quantize_weight(w, chunk_rows=64)


def test_int8_rows_have_a_fraction_of_e4m3s_error_on_gaussian_weights():
    from sd35fp8.core.quant import INT8_ROWS, quantize_to_scale
    torch.manual_seed(0)
    w = torch.randn(256, 512) * 0.02
    q, s = quantize_weight(w, INT8_ROWS, chunk_rows=100)
    assert q.dtype == torch.int8 and s.shape == (256,) and int(q.abs().max()) == 127
    e_int8 = rel(dequantize_weight(q, s, torch.float32), w)
    e_fp8 = rel(dequantize_weight(*quantize_weight(w, "per_tensor"), torch.float32), w)
    assert e_int8 < 0.5 * e_fp8
    assert torch.equal(quantize_to_scale(w, s, dtype=torch.int8), q)  # same grid as a merge with the scale
    # stochastic rounding: a delta of 0.25 step on grid values survives on average instead of rounding away
    shifted = dequantize_weight(q, s, torch.float32) + 0.25 * s[:, None]
    assert torch.equal(quantize_to_scale(shifted, s, dtype=torch.int8), q)
    mean = (quantize_to_scale(shifted, s, seed=7, dtype=torch.int8).float() - q.float()).mean()
    assert float(mean) == pytest.approx(0.25, abs=0.02)
    big = quantize_to_scale(torch.full((2, 4), 1e9), torch.ones(2), dtype=torch.int8)
    assert int(big.min()) == 127  # saturates
