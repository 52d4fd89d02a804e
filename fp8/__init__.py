"""Pure-PyTorch FP8 (E4M3) library: formats, weight quantization, calibration, the FP8 linear,
``fp8_autocast`` and checkpoint inspection. No ComfyUI imports (the node layer lives in ``nodes/``)."""
from .autocast import CalibrationSession, DelayedScaling, current_state, fp8_autocast, is_fp8_enabled
from .checkpoint import CheckpointError, SD3Info, detect_sd3, inspect_checkpoint, read_safetensors_header
from .formats import E4M3, E4M3_MAX, Format, device_supports_fp8_matmul, saturating_cast, scale_from_amax
from .linear import FP8Linear, FP8LinearMixin, scaled_mm
from .model import apply_input_scales, calibrated_amax, fp8_layers, quantize_model, report, weight_bytes, bf16_bytes
from .observers import METHODS, AmaxObserver
from .policy import LayerDecision, QuantPolicy
from .quant import GRANULARITIES, dequantize_weight, quantize_weight

__all__ = [n for n in dir() if not n.startswith("_")]
