import pytest
import torch

from sd35fp8 import AmaxObserver, CalibrationSession, FP8Linear, describe_outliers, fp8_autocast, outlier_channels


def test_max_over_calls_is_exact():
    obs = AmaxObserver()
    obs.update(torch.tensor([0.5, -3.0]))
    obs.update(torch.tensor([[2.0, -7.25], [1.0, 0.0]]))
    obs.update(torch.tensor([6.0]))
    assert obs.result("max") == 7.25
    assert obs.calls == 3 and obs.numel == 7


def test_percentile_ignores_rare_outliers_across_calls():
    torch.manual_seed(0)
    obs = AmaxObserver(keep_histogram=True)
    for _ in range(4):
        x = torch.rand(250_000) * 2 - 1          # |x| uniform in [0, 1]
        x[:5] = 500.0                              # 20 outliers in 1e6 values: 0.002 %
        obs.update(x)
    assert obs.result("max") == 500.0
    p = obs.result("percentile", 99.99)
    assert 0.99 <= p <= 1.03                       # bin upper edge: within ~1 % above the true value
    p90 = obs.result("percentile", 90.0)
    assert 0.89 <= p90 <= 0.92
    assert obs.result("percentile", 100.0) == 500.0


def test_session_errors_are_clear():
    with pytest.raises(ValueError, match="observed no FP8 layer"):
        CalibrationSession().amax()
    s = CalibrationSession()
    s.observe("blk.fc1", torch.tensor([1.0, float("nan")]))
    with pytest.raises(FloatingPointError, match="blk.fc1"):
        s.amax()
    with pytest.raises(ValueError, match="method"):
        CalibrationSession("mse")
    with pytest.raises(ValueError, match="percentile"):
        o = AmaxObserver(True)
        o.update(torch.ones(3))
        o.result("percentile", 0.0)


def planted(scale: dict, calls=4, tokens=77, features=64, seed=0):
    """Inputs of one layer over several calls, with channels scaled up: massive activations."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(calls):
        x = torch.randn(2, tokens, features, generator=g)
        for c, k in scale.items():
            x[..., c] *= k
        xs.append(x.to(torch.bfloat16))
    return xs


def calibrate_layer(xs, features=64):
    torch.manual_seed(0)
    q = FP8Linear.from_linear(torch.nn.Linear(features, 32).to(torch.bfloat16), "per_tensor", name="blk.mlp.fc2")
    with fp8_autocast(calibrating=True) as sess:
        for x in xs:
            q(x)
    return sess


def test_calibration_names_the_outlier_channels_of_a_layer():
    sess = calibrate_layer(planted({17: 300.0, 3: 100.0, 40: 10.0}))
    ch = sess.channel_amax()["blk.mlp.fc2"]
    assert ch.shape == (64,) and int(ch.argmax()) == 17
    found = outlier_channels(sess.channel_amax())
    assert [(n, [c for c, _ in chs]) for n, _, chs in found] == [("blk.mlp.fc2", [17, 3])]  # 10x is not flagged
    times = dict(found[0][2])
    assert 200 < times[17] < 450 and 60 < times[3] < 160
    line = describe_outliers(found, n_layers=1)
    assert "in 1 of 1 FP8 layers" in line and "blk.mlp.fc2 channels 17 (" in line


def test_no_outliers_says_so():
    sess = calibrate_layer(planted({}))
    assert outlier_channels(sess.channel_amax()) == []
    assert describe_outliers([], 5).startswith("input channels: none 20x or more")
    # the stored form (lists, as in a calibration record) reads the same
    found = outlier_channels(calibrate_layer(planted({5: 300.0})).channel_amax())
    stored = [[n, m, [[c, t] for c, t in chs]] for n, m, chs in found]
    assert describe_outliers(stored, 3) == describe_outliers(found, 3)
