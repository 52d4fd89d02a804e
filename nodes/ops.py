"""ComfyUI ``custom_operations``: the Linear that ComfyUI builds the MMDiT with. It quantizes each weight while the
state dict loads (or takes stored FP8 weights with their scales) and merges LoRAs into FP8 weights."""
from __future__ import annotations

import logging

import torch

import comfy.ops

from sd35fp8 import CheckpointError, FP8LinearMixin, QuantPolicy
from sd35fp8.core.policy import LayerDecision
from sd35fp8.core.quant import dequantize_weight, qmax, quantize_to_scale
from sd35fp8.io.files import MappedSafetensors, fp8_layer_tensors, nonfinite_count

log = logging.getLogger("sd35fp8")


def make_ops(policy: QuantPolicy, quant_device: torch.device, source: "MappedSafetensors | None" = None,
             place: torch.device | None = None, key_prefix: str = ""):
    """ComfyUI ``custom_operations`` whose Linear takes its weight straight from the file: BF16/FP16
    weights of the policy's layers are quantized on ``quant_device`` one tensor at a time, weights
    already stored as FP8 (our files, stock scaled-FP8 files) are taken with their scales. No layer
    allocates its high-precision weight before loading (zero-size placeholders), and each consumed
    tensor's file pages are handed back (``source.release``), so neither the GPU nor host RAM ever
    holds the BF16 model. FP8 weights go to ``place`` (default: where ComfyUI builds the model).
    ``convert_weight``/``set_weight`` let ComfyUI merge LoRAs into FP8 weights. ``key_prefix``: the file's prefix of
    the diffusion model's keys (errors name the tensor as the file does)."""
    base = comfy.ops.manual_cast

    class Linear(FP8LinearMixin, base.Linear):
        build_device: torch.device  # where ComfyUI builds the model (high-precision layers go there)
        build_dtype: torch.dtype  # the model's dtype
        file_input_scale = None  # a stored FP8 layer's input_scale from the file (None: it had none)

        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, **kwargs):
            super().__init__(in_features, out_features, bias, device="meta", dtype=dtype, **kwargs)
            self.build_device = torch.device(device) if device is not None else torch.device("cpu")
            self.build_dtype = dtype or torch.get_default_dtype()
            empty = torch.empty(0, device=self.build_device, dtype=self.build_dtype)
            self.weight = torch.nn.Parameter(empty, requires_grad=False)
            if self.bias is not None:
                self.bias = torch.nn.Parameter(empty.clone(), requires_grad=False)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            w = state_dict.get(prefix + "weight")
            if w is None:
                missing_keys.append(prefix + "weight")
                return
            shape = (self.out_features, self.in_features)
            if tuple(w.shape) != shape:
                error_msgs.append(f"size mismatch for {prefix}weight: file {tuple(w.shape)}, model {shape}")
                return
            dev = self.weight.device
            name = prefix[:-1]
            fdev = place or dev
            if w.dtype == torch.float8_e4m3fn:  # stored FP8 (ours or stock scaled-FP8)
                ws, xs = fp8_layer_tensors(state_dict, prefix)
                self.fp8_set_weight(w.to(fdev, copy=True), ws.to(fdev), name)
                bad = nonfinite_count(self.weight)  # on the copy (the GPU, where it goes there): no second read
                if bad:
                    raise CheckpointError(f"tensor {key_prefix}{prefix}weight holds {bad} NaN/Inf value(s) of "
                                          f"{self.weight.numel()}: the file is damaged; download it again or save it "
                                          "again from a good model")
                self.file_input_scale = xs
                policy.decisions.append(LayerDecision(name, shape, True, "stored FP8 in the file"))
            elif w.dtype.is_floating_point and w.dtype.itemsize == 1:
                error_msgs.append(f"{prefix}weight is {w.dtype}: only float8_e4m3fn FP8 weights are supported")
                return
            elif source is not None and source.stored_fp8:
                self.weight = torch.nn.Parameter(w.to(dev, self.build_dtype, copy=True), requires_grad=False)
                policy.decisions.append(LayerDecision(name, shape, False, "high precision in the file"))
            elif policy.decide(prefix, *shape):
                try:
                    self.fp8_quantize_(policy.granularity_for(name), name=name, weight=w.to(quant_device))
                except ValueError as e:  # NaN/Inf in the weight: name the tensor (the loader adds the file)
                    raise CheckpointError(f"tensor {key_prefix}{prefix}weight: {e}") from None
                self.weight.data = self.weight.data.to(fdev)
                self.weight_scale = self.weight_scale.to(fdev)
            else:
                self.weight = torch.nn.Parameter(w.to(dev, self.build_dtype, copy=True), requires_grad=False)
            if source is not None:
                source.release(w)
            b = state_dict.get(prefix + "bias")
            if self.bias is not None:
                if b is None:
                    missing_keys.append(prefix + "bias")
                else:
                    bdt = self.build_dtype if self.build_dtype.itemsize > 1 else torch.bfloat16
                    self.bias = torch.nn.Parameter(b.to(fdev if self.fp8_quantized else dev, bdt, copy=True),
                                                   requires_grad=False)

        # ComfyUI's weight-patch hooks (ModelPatcher.patch_weight_to_device): LoRA deltas are merged
        # into the dequantized weight, then re-quantized with the layer's own scale (stochastic
        # rounding, as stock ComfyUI does for FP8); the calibrated input scale is untouched, and
        # unpatching restores the backed-up FP8 weight.
        def convert_weight(self, weight, inplace=False, **kwargs):
            if not self.fp8_quantized:
                return weight
            if inplace and weight.dtype == torch.float32:
                s = self.weight_scale.to(weight.device, torch.float32)
                return weight.mul_(s[:, None] if s.dim() == 1 else s)
            return dequantize_weight(weight, self.weight_scale, torch.float32)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if not self.fp8_quantized:
                w = weight.to(self.weight.dtype)
            else:
                s = self.weight_scale.to(weight.device, torch.float32)
                top = qmax(self.weight.dtype) * (s[:, None] if s.dim() == 1 else s)
                sat = float((weight.abs() > top).float().mean())
                if sat > 1e-3:
                    log.warning("sd35fp8: the LoRA pushes %.2f%% of %s's weights past its 8-bit range; they "
                                "saturate (a LoRA that large changes the layer a lot: compare with the BF16 model)",
                                100 * sat, self.fp8_name)
                w = quantize_to_scale(weight, self.weight_scale, seed=seed, dtype=self.weight.dtype)
            if return_weight:
                return w
            if inplace_update:
                self.weight.data.copy_(w)
            else:
                self.weight = torch.nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            if self.fp8_quantized and (getattr(self, "weight_function", None)
                                       or getattr(self, "weight_lowvram_function", None) is not None):
                raise RuntimeError(
                    f"sd35fp8: ComfyUI loaded {self.fp8_name} only partially (low-VRAM mode) with a LoRA on it; "
                    "FP8 layers need the LoRA merged into their weights. Free VRAM (unload other models) or "
                    "start ComfyUI with --normalvram/--highvram.")
            return super().forward(x)

    return type("SD35FP8Ops", (base,), {"Linear": Linear})
