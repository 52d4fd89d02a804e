"""The FP8 linear: FP8 E4M3 weights with fp32 scales, static calibrated input scales.

``FP8LinearMixin`` adds the FP8 behaviour to any ``nn.Linear`` subclass (ours, or a host
framework's Linear with its own device-casting logic); ``FP8Linear`` is the plain-PyTorch one.
"""
from __future__ import annotations

import torch

from .core.autocast import DelayedScaling, current_state
from .core.formats import (E4M3, E4M3_MAX, device_supports_fp8_matmul, int8_quantize_rows, quantize_inv,
                           quantize_inv_int8, saturating_cast, scale_from_amax, warn_once)
from .core.quant import dequantize_weight, quantize_weight
from .kernels.gemv import fp8_weight_only_linear
from .kernels.matmul import int8_matmul, scaled_mm

_fp8_ok: dict[torch.device, bool] = {}


def _supports(device: torch.device) -> bool:
    ok = _fp8_ok.get(device)
    if ok is None:
        ok = _fp8_ok[device] = device_supports_fp8_matmul(device)
    return ok


def _on(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None = None):
    if t is None:
        return None
    if t.device != device or (dtype is not None and t.dtype != dtype):
        return t.to(device=device, dtype=dtype or t.dtype, non_blocking=True)
    return t


INT8_MODES = ("int8_token", "int8_static")  # static W8A8 modes of INT8-weight layers (the MLP: see set_static)


class FP8LinearMixin:
    """Mix into an ``nn.Linear`` subclass (first in the bases). Unquantized, it is that Linear."""

    fp8_quantized: bool = False
    fp8_name: str = ""
    # Static runtime (``sd35fp8.runtime.static.set_static``): None = the autocast-driven path below. "fp8": FP8
    # matmul with the static input scale held in the ``fp8_in_scale``/``fp8_in_inv`` buffers, no
    # thread-local lookups and nothing reduced at run time (torch.compile fuses the cast into the
    # producer of ``x``); "weight_only": BF16 activations against the FP8 weight. INT8 weights (W8A8):
    # "int8_token" quantizes each input row with its own scale (amax per token), "int8_static" with the
    # calibrated static scale (amax / 127); the MLP's fc1 and fc2 (set_static decides).
    fp8_static: str | None = None
    fp8_fast_accum: bool = False
    # A backend's forward (e.g. TransformerEngine's, ``sd35fp8.runtime.te``): None, or a callable
    # ``(layer, x) -> Tensor | None`` that the backend installs and removes; None from it: this call runs here.
    fp8_backend = None

    # -- state ---------------------------------------------------------------------------
    def fp8_set_weight(self, w8: torch.Tensor, weight_scale: torch.Tensor, name: str | None = None) -> None:
        """Install an 8-bit weight: E4M3 (0-d or [out] scale), or INT8 with an [out] scale (weight-only)."""
        if w8.dtype not in (E4M3, torch.int8):
            raise TypeError(f"expected a float8_e4m3fn (or int8) weight, got {w8.dtype}")
        if tuple(w8.shape) != (self.out_features, self.in_features):
            raise ValueError(f"weight shape {tuple(w8.shape)} does not match "
                             f"Linear({self.in_features}, {self.out_features})")
        if w8.dtype == torch.int8 and tuple(weight_scale.shape) != (self.out_features,):
            raise ValueError(f"an int8 weight needs one scale per output channel ({self.out_features}), got "
                             f"shape {tuple(weight_scale.shape)}")
        self.weight = torch.nn.Parameter(w8, requires_grad=False)
        self.register_buffer("weight_scale", weight_scale.to(torch.float32).to(w8.device))
        if "input_scale" not in self._buffers:
            self.register_buffer("input_scale", None)
        self.fp8_quantized = True
        self._fp8_amax_history = None
        if name is not None:
            self.fp8_name = name

    @torch.no_grad()
    def fp8_quantize_(self, granularity: str = "per_tensor", name: str | None = None,
                      weight: torch.Tensor | None = None) -> None:
        """Quantize this layer's weight (or the given high-precision ``weight``) in place."""
        w = self.weight if weight is None else weight
        w8, scale = quantize_weight(w, granularity)
        self.fp8_set_weight(w8, scale, name)

    def fp8_set_input_amax(self, amax: float | torch.Tensor | None) -> None:
        """Install a calibrated static input scale (``None``: back to uncalibrated)."""
        if amax is None:
            self.input_scale = None
        else:
            self.input_scale = scale_from_amax(amax).to(self.weight.device)

    def fp8_set_input_center(self, center: torch.Tensor | None, amax: float | None = None) -> None:
        """Install a static per-channel input center (``sd35fp8.core.centering``: dense fp32 [in_features], zero off
        the centered channels) and the amax of the centered input, or remove it (None). The static runtime then
        quantizes ``x - center`` at the centered scale and adds ``W · center`` to the bias; ``input_scale`` (the
        uncentered one: files, TransformerEngine, the autocast path) is unchanged."""
        for n in ("input_center", "input_center_scale"):
            if n not in self._buffers:
                self.register_buffer(n, None, persistent=False)  # kept in calibration records, not in state dicts
        if center is None:
            self.input_center = self.input_center_scale = None
            return
        if tuple(center.shape) != (self.in_features,):
            raise ValueError(f"input center of shape {tuple(center.shape)} does not fit {self.fp8_name or self} "
                             f"({self.in_features} input channels)")
        if amax is None:
            raise ValueError("an input center needs the centered input's amax")
        self.input_center = center.to(self.weight.device, torch.float32)
        self.input_center_scale = scale_from_amax(amax).to(self.weight.device)

    def fp8_dequantized_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    # -- compute -------------------------------------------------------------------------
    def _fp8_weight_only(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_weight_only_linear(x, _on(self.weight, x.device), _on(self.weight_scale, x.device),
                                      _on(self.fp8_bias(), x.device))

    def _fp8_input_scale(self, x2: torch.Tensor, recipe: DelayedScaling) -> torch.Tensor:
        s = self.input_scale
        if s is not None:
            s = _on(s, x2.device, torch.float32)
            return s * (2.0 ** recipe.margin) if recipe.margin else s
        # Not calibrated: delayed scaling over this layer's own amax history (current call included).
        warn_once("uncalibrated", f"sd35fp8: FP8 layer {self.fp8_name or self} (and possibly others) has no "
                  "calibrated input scale; using delayed scaling (calibrate the model for static scales)")
        amax = torch.nan_to_num(x2.detach().abs().amax().float(), nan=0.0, posinf=0.0)
        h = self._fp8_amax_history
        n = recipe.amax_history_len
        if h is None or h.device != x2.device or h.numel() != n:
            h = torch.zeros(n, device=x2.device, dtype=torch.float32)
        h = torch.roll(h, 1)
        h[0] = amax
        self._fp8_amax_history = h
        return (h.amax() * (2.0 ** recipe.margin) / 448.0).clamp_min(1e-12)

    def _fp8_matmul(self, x: torch.Tensor, recipe: DelayedScaling) -> torch.Tensor:
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        x2 = x.reshape(-1, self.in_features)
        s_in = self._fp8_input_scale(x2, recipe)
        xq = saturating_cast(x2, s_in)
        out = scaled_mm(xq, _on(self.weight, x.device), s_in, _on(self.weight_scale, x.device),
                        _on(self.fp8_bias(), x.device, out_dtype), out_dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def fp8_int8(self) -> bool:
        """INT8 weights: this layer always runs weight-only (BF16 activations)."""
        return self.weight.dtype == torch.int8

    def fp8_forward(self, x: torch.Tensor) -> torch.Tensor:
        st = current_state()
        if st is None or (self.fp8_int8 and st.calibrating is None):
            return self._fp8_weight_only(x)
        if st.calibrating is not None:
            st.calibrating.observe(self.fp8_name, x)
            return self._fp8_weight_only(x)
        if not st.enabled:
            return self._fp8_weight_only(x)
        if not _supports(x.device):
            warn_once(f"nofp8:{x.device}", f"sd35fp8: {x.device} has no FP8 matmul (needs compute capability "
                      ">= 8.9: Ada, Hopper, Blackwell); running weight-only FP8 (BF16 compute) instead")
            return self._fp8_weight_only(x)
        return self._fp8_matmul(x, st.recipe)

    # -- static runtime ------------------------------------------------------------------
    def fp8_set_static(self, mode: str | None, margin: int = 0, fast_accum: bool = False) -> None:
        """Freeze this layer's execution for the static runtime (see ``sd35fp8.runtime.static``)."""
        if mode not in (None, "fp8", "weight_only") + INT8_MODES:
            raise ValueError(f"unknown static mode {mode!r}")
        if mode == "fp8" and self.fp8_int8:  # INT8 weights take an INT8 mode (the MLP), else run weight-only
            mode = "weight_only"
        if mode in INT8_MODES and not self.fp8_int8:
            raise ValueError(f"static mode {mode!r} needs INT8 weights; {self.fp8_name or self} has "
                             f"{self.weight.dtype}")
        if mode in ("fp8", "int8_static") and self.input_scale is None:
            raise ValueError(f"FP8 layer {self.fp8_name or self} has no calibrated input scale; "
                             "the static FP8 runtime needs a calibrated model")
        for n in ("fp8_in_scale", "fp8_in_inv", "fp8_in_center", "fp8_center_idx", "fp8_in_shift",
                  "fp8_center_bias"):
            if n not in self._buffers:
                self.register_buffer(n, None, persistent=False)
        center = getattr(self, "input_center", None) if mode in ("fp8",) + INT8_MODES else None
        if center is not None:  # quantize x - center; the GEMM adds W·center (fp8_static_bias)
            self.fp8_in_center = center
            self.fp8_center_idx = torch.nonzero(center).flatten()
        else:
            self.fp8_in_center = self.fp8_center_idx = None
        # the static bias (bias + correction + W·center), precomputed where it differs from the layer's own bias
        if mode is not None and (center is not None or getattr(self, "bias_correction", None) is not None):
            self.fp8_refresh_center_bias()
        else:
            self.fp8_center_bias = None
        if mode in ("fp8", "int8_static"):
            # input_scale is amax / 448 (E4M3, the file format's convention): amax / 127 for INT8
            grid = E4M3_MAX / 127.0 if mode == "int8_static" else 1.0
            base = self.input_scale if center is None else self.input_center_scale
            s = (base.float() * (grid * 2.0 ** margin)).reshape(()).clone()
            cur = self.fp8_in_scale
            if cur is not None and cur.device == s.device:  # in place: compiled code / CUDA graphs keep their inputs
                cur.copy_(s)
                self.fp8_in_inv.copy_(1.0 / s)
            else:
                self.fp8_in_scale, self.fp8_in_inv = s, (1.0 / s)
            # a centered input's center on the quantized grid (what fc1's fused epilogue subtracts for fc2's input)
            shift = None if center is None else center * self.fp8_in_inv
            cur = self.fp8_in_shift
            if shift is not None and cur is not None and cur.shape == shift.shape and cur.device == shift.device:
                cur.copy_(shift)
            else:
                self.fp8_in_shift = shift
        else:
            self.fp8_in_scale = self.fp8_in_inv = self.fp8_in_shift = None
        self.fp8_static = mode
        self.fp8_fast_accum = bool(fast_accum)

    def fp8_static_quantize(self, x2: torch.Tensor) -> torch.Tensor:
        """[M, K] activations → E4M3 with the static input scale (a pointwise op: compile fuses it into
        the producer), around the static center where one is set. Clamp before the cast (CUDA turns out-of-range
        into NaN); NaN stays NaN."""
        return quantize_inv(self.fp8_centered(x2), self.fp8_in_inv)

    def fp8_centered(self, x: torch.Tensor) -> torch.Tensor:
        """``x - center`` where this layer's static runtime centers its input (else ``x``)."""
        c = getattr(self, "fp8_in_center", None)
        return x if c is None else x.float() - c

    def fp8_static_bias(self, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The bias the static GEMM adds (in ``dtype``; None: the bias's own, fp32 without one): the layer's, plus its
        correction and ``W · center`` for a centered input, precomputed (:meth:`fp8_refresh_center_bias`): nothing
        per call."""
        bias = self.fp8_bias() if getattr(self, "fp8_center_bias", None) is None else self.fp8_center_bias
        if dtype is None:
            dtype = torch.float32 if bias is None else bias.dtype
        return None if bias is None else bias.to(dtype)

    @torch.no_grad()
    def fp8_refresh_center_bias(self) -> None:
        """Recompute the static bias (``bias + correction``, ``+ W · center`` for a centered input) from the weight
        and bias as they are now (a LoRA merged into them included), in place where it exists (CUDA graphs and
        compiled code keep reading the same buffer). The static runtime calls it when it sets the layer up, and the
        ComfyUI adapter once per sampling run after ComfyUI has patched the weights. Only the centered channels'
        weight columns are read."""
        bias = self.fp8_bias()
        idx = getattr(self, "fp8_center_idx", None)
        if idx is None:
            new = None if bias is None else bias.detach().clone()
        else:
            w = self.weight.index_select(1, idx).float()
            corr = (w @ self.fp8_in_center.index_select(0, idx)) * self.weight_scale.float()
            new = (corr if bias is None else bias.float() + corr).to(torch.float32 if bias is None else bias.dtype)
        cur = self.fp8_center_bias
        if new is None:
            self.fp8_center_bias = None
        elif cur is not None and cur.shape == new.shape and cur.dtype == new.dtype and cur.device == new.device:
            cur.copy_(new)
        else:
            self.fp8_center_bias = new

    def fp8_set_bias_correction(self, corr: torch.Tensor | None) -> None:
        """Install (None: remove) a correction [out_features] added to the bias on every path: the rounding error of
        the 8-bit weight columns that read massive input channels, times those channels' centers
        (sd35fp8.core.centering.weight_correction); saved files fold it into the stored bias."""
        if "bias_correction" not in self._buffers:
            self.register_buffer("bias_correction", None, persistent=False)
        if corr is not None and tuple(corr.shape) != (self.out_features,):
            raise ValueError(f"bias correction of shape {tuple(corr.shape)} does not fit {self.fp8_name or self}")
        self.bias_correction = None if corr is None else corr.to(self.weight.device, torch.float32)

    def fp8_bias(self) -> torch.Tensor | None:
        """The layer's bias with its correction (:meth:`fp8_set_bias_correction`) where one is set."""
        c = getattr(self, "bias_correction", None)
        if c is None:
            return self.bias
        dtype = torch.float32 if self.bias is None else self.bias.dtype
        return (c if self.bias is None else self.bias.float() + c.to(self.bias.device)).to(dtype)

    def fp8_static_input(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[M, K] activations → (quantized input, its scale) for this layer's static mode: E4M3 or INT8 with the
        static scale (0-d), or INT8 with one scale per row (``int8_token``)."""
        if self.fp8_static == "int8_token":
            return int8_quantize_rows(self.fp8_centered(x2))
        if self.fp8_static == "int8_static":
            return quantize_inv_int8(self.fp8_centered(x2), self.fp8_in_inv), self.fp8_in_scale
        return self.fp8_static_quantize(x2), self.fp8_in_scale

    def fp8_static_matmul(self, xq: torch.Tensor, out_dtype: torch.dtype,
                          x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Static FP8 (or INT8 W8A8) GEMM of already quantized [M, K] activations, bias in the epilogue;
        ``x_scale``: the input's scale where it is not the static one (INT8 per token)."""
        bias = self.fp8_static_bias(out_dtype)
        x_scale = self.fp8_in_scale if x_scale is None else x_scale
        if xq.dtype == torch.int8:
            return int8_matmul(xq, self.weight, x_scale, self.weight_scale, bias, out_dtype)
        return scaled_mm(xq, self.weight, x_scale, self.weight_scale, bias, out_dtype, self.fp8_fast_accum)

    def _fp8_static_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_static == "weight_only":
            return fp8_weight_only_linear(x, self.weight, self.weight_scale, self.fp8_static_bias())
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        xq, sx = self.fp8_static_input(x.reshape(-1, self.in_features))
        out = self.fp8_static_matmul(xq, out_dtype, sx)
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def fp8_static_ready(self, x: torch.Tensor) -> bool:
        """Whether the static path runs for ``x``: it needs the weights and scales where x is (ComfyUI may
        offload) and, for FP8 matmul, FP8 tensor cores; otherwise the autocast path (weight-only fallback)."""
        return self.fp8_static is not None and self.weight.device == x.device and (
            self.fp8_in_scale is None or (self.fp8_in_scale.device == x.device
                                          and (self.fp8_static in INT8_MODES or _supports(x.device))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D401
        if self.fp8_quantized:
            if self.fp8_backend is not None:
                out = self.fp8_backend(self, x)
                if out is not None:
                    return out
            if self.fp8_static_ready(x):
                return self._fp8_static_forward(x)
            return self.fp8_forward(x)
        return super().forward(x)


class FP8Linear(FP8LinearMixin, torch.nn.Linear):
    """A plain-PyTorch FP8 linear."""

    @classmethod
    def from_linear(cls, lin: torch.nn.Linear, granularity: str = "per_tensor", name: str = "") -> "FP8Linear":
        m = cls(lin.in_features, lin.out_features, bias=lin.bias is not None,
                device="meta", dtype=lin.weight.dtype)
        m.bias = None if lin.bias is None else torch.nn.Parameter(lin.bias.detach(), requires_grad=False)
        m.fp8_quantize_(granularity, name=name, weight=lin.weight)
        return m
