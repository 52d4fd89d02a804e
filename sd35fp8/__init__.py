"""sd35fp8: calibrated FP8 (E4M3) for SD3-family MMDiT models, in pure PyTorch (no ComfyUI import).

Layers, each importing only those below it (a test enforces it):

                 integrations (diffusers)
    runtime (static, mlp, joint, graphs, te)   io (checkpoint, files, diffusers layout)
                      model, linear
                        kernels
                          core

``core``: formats and clamped casts, weight quantization, observers, the layer policy, ``fp8_autocast``;
``kernels``: one op per file with its PyTorch reference; ``linear``: the FP8 Linear; ``model``: the module swap,
scales and reports; ``runtime``: the static runtime and backends; ``io``: files. The ComfyUI adapter is ``nodes/``
beside this package.
"""
from .core.autocast import CalibrationSession, DelayedScaling, current_state, fp8_autocast, is_fp8_enabled
from .core.formats import E4M3, E4M3_MAX, Format, device_supports_fp8_matmul, saturating_cast, scale_from_amax
from .core.observers import METHODS, AmaxObserver, describe_outliers, outlier_channels
from .core.policy import LayerDecision, QuantPolicy
from .core.quant import GRANULARITIES, dequantize_weight, quantize_weight
from .io.checkpoint import CheckpointError, SD3Info, detect_sd3, inspect_checkpoint, read_safetensors_header
from .kernels.matmul import scaled_mm
from .linear import FP8Linear, FP8LinearMixin
from .model import (apply_input_scales, bf16_bytes, calibrated_amax, fp8_layers, quantize_model, quantize_pos_embed,
                    report, weight_bytes)

__all__ = [n for n in dir() if not n.startswith("_")]
