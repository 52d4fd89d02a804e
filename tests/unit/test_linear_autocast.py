import logging

import pytest
import torch

import sd35fp8
from sd35fp8 import CalibrationSession, DelayedScaling, FP8Linear, fp8_autocast
from sd35fp8 import linear as fp8_linear_mod


def rel(a, b):
    return float((a.detach().float() - b.detach().float()).norm() / b.detach().float().norm())


def make(in_f=256, out_f=128, gran="per_tensor", dtype=torch.bfloat16, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f).to(dtype)
    return lin, FP8Linear.from_linear(lin, gran, name="layer")


def calibrate(q, *xs):
    with fp8_autocast(calibrating=True) as sess:
        for x in xs:
            q(x)
    q.fp8_set_input_amax(sess.amax()["layer"])
    return sess


@pytest.mark.parametrize("gran", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_linear_vs_high_precision(gran, dtype):
    lin, q = make(gran=gran, dtype=dtype)
    x = torch.randn(2, 77, 256, dtype=dtype)
    ref = lin(x)
    calibrate(q, x)
    with fp8_autocast():
        y = q(x)
    assert y.shape == ref.shape and y.dtype == dtype
    assert rel(y, ref) < 0.06
    wo = q(x)  # outside autocast: weight-only
    assert rel(wo, ref) < 0.04
    assert not torch.equal(y, wo)  # the FP8 path really ran


def test_fp8_path_is_the_scaled_matmul_of_the_quantized_operands():
    lin, q = make()
    x = torch.randn(64, 256, dtype=torch.bfloat16)
    calibrate(q, x)
    with fp8_autocast():
        y = q(x).float()
    xs = q.input_scale
    xq = sd35fp8.saturating_cast(x, xs).float() * xs
    wq = q.weight.float() * q.weight_scale
    expect = xq @ wq.t() + q.bias.float()
    assert rel(y, expect) < 1e-2  # only bf16 output rounding differs


def test_out_of_range_activations_saturate_not_nan():
    lin, q = make()
    calibrate(q, torch.randn(8, 256, dtype=torch.bfloat16))  # amax ~ 3
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    x[0, :8] = 1e4       # >> calibrated range: /scale is ~1e6, far beyond 448
    x[1, 0] = float("inf")
    with fp8_autocast():
        y = q(x)
    assert torch.isfinite(y[1:]).all() and torch.isfinite(y[0]).all()


def test_uncalibrated_layer_uses_delayed_scaling_with_one_warning(caplog, monkeypatch):
    lin, q = make(seed=3)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    q.fp8_name = "uncal-test-layer"
    monkeypatch.setattr(sd35fp8.core.formats, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sd35fp8"):
        with fp8_autocast(recipe=DelayedScaling(amax_history_len=4)):
            y1 = q(x)
            y2 = q(x * 0.01)  # history still holds the large amax: coarse but finite
    assert rel(y1, lin(x)) < 0.06
    assert torch.isfinite(y2).all()
    assert q._fp8_amax_history.numel() == 4
    assert sum("uncal-test-layer" in r.message for r in caplog.records) == 1


def test_margin_gives_headroom():
    lin, q = make()
    x = torch.randn(32, 256, dtype=torch.bfloat16)
    calibrate(q, x)
    with fp8_autocast(recipe=DelayedScaling(margin=3)):
        y = q(x * 4)  # 4x beyond calibration still representable with 8x headroom
    assert rel(y, lin(x * 4)) < 0.08


def test_autocast_enter_exit_semantics():
    assert sd35fp8.current_state() is None
    r = DelayedScaling(fp8_format="HYBRID", amax_history_len=8, margin=1)
    with fp8_autocast(recipe=r):
        assert sd35fp8.is_fp8_enabled() and sd35fp8.current_state().recipe is r
        with fp8_autocast(enabled=False):
            assert not sd35fp8.is_fp8_enabled()
            with fp8_autocast(calibrating=True) as s:
                assert isinstance(s, CalibrationSession) and sd35fp8.current_state().calibrating is s
            assert sd35fp8.current_state().calibrating is None
        assert sd35fp8.is_fp8_enabled()
        with pytest.raises(RuntimeError):
            with fp8_autocast(enabled=False):
                raise RuntimeError("boom")
        assert sd35fp8.is_fp8_enabled()  # restored after the exception
    assert sd35fp8.current_state() is None
    with pytest.raises(ValueError):
        DelayedScaling(amax_history_len=0)
    with pytest.raises(ValueError):
        DelayedScaling(fp8_format="E5M7")


def test_calibration_observes_and_computes_weight_only():
    lin, q = make()
    x = torch.randn(4, 256, dtype=torch.bfloat16) * 5
    with fp8_autocast(calibrating=CalibrationSession("max")) as s:
        y = q(x)
    assert s.amax()["layer"] == pytest.approx(float(x.float().abs().max()))
    with torch.no_grad():
        assert torch.equal(y, q._fp8_weight_only(x))


def test_gpu_without_fp8_falls_back_to_weight_only_with_one_warning(monkeypatch, caplog):
    lin, q = make()
    x = torch.randn(4, 256, dtype=torch.bfloat16)
    calibrate(q, x)
    monkeypatch.setattr(fp8_linear_mod, "_supports", lambda dev: False)
    monkeypatch.setattr(sd35fp8.core.formats, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="sd35fp8"):
        with fp8_autocast():
            y = q(x)
            q(x)
    assert torch.equal(y, q._fp8_weight_only(x))
    assert sum("no FP8 matmul" in r.message for r in caplog.records) == 1


def test_state_dict_roundtrip_keeps_fp8():
    lin, q = make()
    calibrate(q, torch.randn(4, 256, dtype=torch.bfloat16))
    sd = q.state_dict()
    assert sd["weight"].dtype == torch.float8_e4m3fn and "weight_scale" in sd and "input_scale" in sd
    assert q.weight.numel() * 1 < lin.weight.numel() * 2  # half the bytes of bf16
