"""FP8 formats and saturating casts.

Every cast to FP8 in this package goes through :func:`saturating_cast`: values are divided by the
scale and clamped to the format's finite range *before* the cast. On CPU an out-of-range cast
saturates, but on CUDA it becomes NaN, so the clamp is what keeps GPU images from going black.
"""
from __future__ import annotations

import enum
import logging

import torch

log = logging.getLogger("sd35fp8")


class Format(str, enum.Enum):
    """FP8 format names, shaped like TransformerEngine's ``recipe.Format``.

    For inference only the forward format matters: ``HYBRID`` (E4M3 forward, E5M2 gradients) runs
    exactly like ``E4M3`` here.
    """

    E4M3 = "E4M3"
    HYBRID = "HYBRID"

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn


E4M3 = torch.float8_e4m3fn
E4M3_MAX = float(torch.finfo(E4M3).max)  # 448.0
# Smallest scale we ever store: an all-zero tensor must not produce a zero (or denormal) scale.
MIN_SCALE = 1.0 / (E4M3_MAX * 2.0**16)


def fp8_max(dtype: torch.dtype = E4M3) -> float:
    return float(torch.finfo(dtype).max)


def scale_from_amax(amax: torch.Tensor | float, dtype: torch.dtype = E4M3, margin: int = 0) -> torch.Tensor:
    """fp32 scale so that ``amax`` maps to the format's max, divided by ``2**margin`` of headroom.

    Dequantized value = fp8 value * scale. Non-finite amax is an error, not a silent NaN scale.
    """
    amax = torch.as_tensor(amax, dtype=torch.float32)
    if not bool(torch.isfinite(amax).all()):
        raise ValueError(f"cannot derive an FP8 scale from a non-finite amax ({amax.tolist()})")
    scale = amax.float() * (2.0**margin) / fp8_max(dtype)
    return scale.clamp_min(MIN_SCALE)


def saturating_cast(x: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``clamp(x / scale, ±max)`` cast to ``dtype``; NaN/Inf inputs become ±max or 0, never NaN."""
    m = fp8_max(dtype)
    y = x.float() / scale if not isinstance(scale, float) or scale != 1.0 else x.float()
    y = torch.nan_to_num(y, nan=0.0, posinf=m, neginf=-m)
    return y.clamp_(-m, m).to(dtype)


def quantize_inv(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """E4M3 ``clamp(x·inv, ±448)`` with a static inverse scale: clamp before the cast (CUDA turns out-of-range
    into NaN), NaN stays NaN (``clamp`` propagates it: a NaN activation must stay visible)."""
    return (x.float() * inv.float()).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def quantize_inv_int8(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """INT8 ``round(clamp(x·inv, ±127))``, halves to even (as the INT8 kernels' epilogues,
    sd35fp8.kernels.common.round_int8). INT8 has no NaN: a NaN input becomes 0 here and in the kernels."""
    v = torch.nan_to_num((x.float() * inv.float()).clamp(-127.0, 127.0), nan=0.0)
    return torch.round(v).to(torch.int8)


def int8_quantize_rows(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] → (INT8 [M, K], fp32 [M]): one symmetric scale per row (per token), amax / 127. A row with NaN
    keeps a NaN scale, so the NaN stays visible in the product."""
    a = x2.detach().float().abs().amax(dim=1)
    s = (a / 127.0).clamp_min(MIN_SCALE)
    return quantize_inv_int8(x2, (1.0 / s)[:, None]), s


def device_supports_fp8_matmul(device: torch.device | str) -> bool:
    """FP8 tensor-core matmul needs compute capability >= 8.9 (Ada, Hopper, Blackwell).

    CPU: torch's ``_scaled_mm`` exists on CPU (used by tests to run the exact arithmetic).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return hasattr(torch, "_scaled_mm")
    if device.type == "cuda" and torch.cuda.is_available():
        if torch.version.hip is not None:  # ROCm: MI300 has FP8, but e4m3fn vs fnuz differ; stay safe
            return False
        major, minor = torch.cuda.get_device_capability(device)
        return (major, minor) >= (8, 9)
    return False


_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)
