import pytest
import torch

from sd35fp8 import AmaxObserver, CalibrationSession


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
