"""What the kernels share: the Triton import (absent on CPU-only installs), Triton helpers used by several
kernels, and the definition of a ``torch.library`` custom op (torch.compile treats each as one call)."""
from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs may lack it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001
    triton = tl = None


def custom_op(qualname: str, fake):
    """``torch.library.custom_op`` with no mutated arguments and ``fake`` as its fake (meta) kernel."""
    def define(fn):
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return define


if triton is not None:
    @triton.jit
    def round_int8(x):
        """fp32 → int32 whose low byte is the INT8 ``round(clamp(x, ±127))`` (halves to even, as
        fp8.formats.quantize_inv_int8); NaN → 0 (INT8 has none). NaN is tested on ``x`` itself: on CUDA the clamp's
        min/max returns the non-NaN operand, so after it a NaN would already be ±127. FP32 adds instead of a
        float-to-int conversion (a quarter-rate unit): q + 1.5·2^23 is the integer's float in the exponent 2^23,
        whose mantissa's low byte is round(q) in two's complement; the caller's cast to int8 keeps that byte."""
        q = tl.clamp(x, -127.0, 127.0)
        return (tl.where(x == x, q, 0.0) + 12582912.0).to(tl.int32, bitcast=True)

    @triton.jit
    def pow2_scale(amax):
        """The smallest power of two >= amax / 448 (amax > 0, finite): a scale into E4M3's range that multiplies
        exactly (bit operations, no rounding)."""
        bits = (amax / 448.0).to(tl.int32, bitcast=True)
        e = (bits & 0x7F800000) + tl.where((bits & 0x7FFFFF) != 0, 0x800000, 0)
        return e.to(tl.float32, bitcast=True)
