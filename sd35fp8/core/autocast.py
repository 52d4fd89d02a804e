"""``fp8_autocast``: TransformerEngine-shaped context selecting FP8 execution or calibration.

Layers quantized by this package (:class:`~fp8.linear.FP8LinearMixin`) look at the innermost active
context when they run:

* no context, or ``enabled=False``: weight-only compute (FP8 weights dequantized to the activation
  dtype) — exact BF16 arithmetic on FP8-stored weights;
* ``enabled=True``: FP8 matmul (``torch._scaled_mm``) with the layer's static calibrated input scale;
  a layer without one uses delayed scaling from its own amax history (``recipe.amax_history_len``);
  on a GPU without FP8 tensor cores (< sm_89) it falls back to weight-only with one warning;
* ``calibrating=True``: the layer records its input statistics in the session and computes
  weight-only, so calibration sees the activations of the model as it will be quantized.
"""
from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Iterator

import torch

from .formats import Format
from .observers import METHODS, AmaxObserver


@dataclasses.dataclass(frozen=True)
class DelayedScaling:
    """Recipe with the fields of ``transformer_engine.common.recipe.DelayedScaling``.

    margin: scales get ``2**margin`` of headroom (applies to calibrated scales too).
    amax_history_len: window of the delayed scaling used by layers with no calibrated scale.
    """

    fp8_format: Format = Format.E4M3
    amax_history_len: int = 16
    margin: int = 0

    def __post_init__(self):
        object.__setattr__(self, "fp8_format", Format(self.fp8_format))
        if not (1 <= int(self.amax_history_len) <= 1024):
            raise ValueError(f"amax_history_len must be in 1..1024, got {self.amax_history_len}")
        if not (0 <= int(self.margin) <= 8):
            raise ValueError(f"margin must be in 0..8, got {self.margin}")


class CalibrationSession:
    """Collects per-layer input statistics while ``fp8_autocast(calibrating=...)`` is active."""

    def __init__(self, method: str = "max", percentile: float = 99.99):
        if method not in METHODS:
            raise ValueError(f"unknown calibration method {method!r}; use one of {METHODS}")
        self.method = method
        self.percentile = float(percentile)
        self.observers: dict[str, AmaxObserver] = {}

    def observe(self, name: str, x: torch.Tensor) -> None:
        obs = self.observers.get(name)
        if obs is None:
            obs = self.observers[name] = AmaxObserver(keep_histogram=self.method == "percentile")
        obs.update(x)

    def amax(self) -> dict[str, float]:
        """Per-layer calibrated amax. Raises a clear error if nothing was observed or data was bad."""
        if not self.observers:
            raise ValueError(
                "calibration observed no FP8 layer: no sampling ran through a quantized model "
                "(empty calibration set, or the model has no FP8 layers)")
        bad = [n for n, o in self.observers.items() if o.nonfinite]
        if bad:
            raise FloatingPointError(
                f"calibration saw NaN/Inf activations in {len(bad)} layer(s), first: {bad[0]}; "
                "the model or its inputs are broken (check the checkpoint and the text encoders)")
        return {n: o.result(self.method, self.percentile) for n, o in self.observers.items()}

    def channel_amax(self) -> dict[str, torch.Tensor]:
        """Each layer's per-input-channel amax (max |x| of every feature over all calls)."""
        return {n: o.channel_amax for n, o in self.observers.items() if o.channel_amax is not None}

    def channel_ranges(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each layer's per-input-channel signed range ``(min, max)`` over all calls (for centering: see
        :func:`sd35fp8.core.centering.choose_centers`)."""
        return {n: (o.channel_min, o.channel_max) for n, o in self.observers.items() if o.channel_min is not None}


@dataclasses.dataclass
class _State:
    enabled: bool
    calibrating: CalibrationSession | None
    recipe: DelayedScaling


_local = threading.local()


def _stack() -> list[_State]:
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def current_state() -> _State | None:
    s = _stack()
    return s[-1] if s else None


def is_fp8_enabled() -> bool:
    s = current_state()
    return bool(s and s.enabled)


@contextlib.contextmanager
def fp8_autocast(enabled: bool = True, calibrating: bool | CalibrationSession = False,
                 recipe: DelayedScaling | None = None) -> Iterator[CalibrationSession | None]:
    """Run the FP8 layers inside in FP8 (``enabled``) or record calibration statistics.

    ``calibrating=True`` creates a :class:`CalibrationSession` (method ``max``); pass a session to
    choose the method or to accumulate over several runs. The session is what the context yields.
    Contexts nest; the innermost wins; leaving restores the outer state, also on exceptions.
    """
    if calibrating is True:
        calibrating = CalibrationSession()
    elif calibrating is False:
        calibrating = None
    elif not isinstance(calibrating, CalibrationSession):
        raise TypeError("calibrating must be a bool or a CalibrationSession")
    st = _State(enabled=bool(enabled), calibrating=calibrating, recipe=recipe or DelayedScaling())
    stack = _stack()
    stack.append(st)
    try:
        yield calibrating
    finally:
        # pop our own entry even if an inner context leaked
        while stack and stack[-1] is not st:
            stack.pop()
        if stack:
            stack.pop()
