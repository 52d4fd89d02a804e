"""Static FP8 runtime: freeze a calibrated model into its fastest inference form.

``set_static`` turns every FP8 layer's calibrated input scale into device buffers and switches the
layer to a forward with no thread-local lookups and no run-time reductions: quantize (scale, clamp,
cast) → ``_scaled_mm`` with the bias in its epilogue. Under ``torch.compile`` the quantization is a
pure pointwise op, so Inductor fuses it into the kernel that produces the activation (LayerNorm +
adaLN modulation, GELU): no extra pass over activations. The adaLN modulation layers (one token per
sample, a third of the weight bytes) keep BF16 activations against their FP8 weights by default
(``sd35fp8.kernels.gemv``): same bytes, no activation rounding on the path that scales every token.
"""
from __future__ import annotations

import dataclasses
import re

import torch

from ..core.marks import marks, peek
from ..core.policy import ADALN_LAYERS
from ..model import fp8_layers
from .joint import set_joint_blocks
from .mlp import int8_mlp_modes, set_fused_mlps

ADALN = re.compile(ADALN_LAYERS)
# set_static keeps its config on the model (Marks.static_key) and what it left on each layer (Marks.static_state:
# (layer, mode, input_scale, its in-place version)): when the same config finds every layer as it left it,
# set_static returns at once (every sampling run calls it; the full pass cost ~40 ms of host time at Large depth on a
# CPU, more on a GPU host: ~1500 small ops plus module walks)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """fast_accum: Hopper's fast FP8 accumulation in ``_scaled_mm`` (no periodic fp32 promotion).
    fp32_accum: layer-name regex that keeps exact accumulation even with fast_accum (e.g. ``mlp\\.fc2``).
    adaln: "weight_only" (BF16 activations x FP8 weights) or "fp8" (FP8 activations too).
    margin: 2**margin headroom on every static input scale.
    fuse_mlp: each MLP's fc1 + GELU + the quantization of fc2's input as one kernel (sd35fp8.runtime.mlp), on GPUs
    where that kernel runs (Hopper); elsewhere the MLP runs as before.
    fuse_attention: each SD3 joint block's q/k RMSNorm, context+image concat and (with FP8 attention) K/V
    quantization as one kernel (sd35fp8.runtime.joint), where our attention override decides the block's attention.
    fuse_norm: in those blocks, also each stream's (gated residual +) LayerNorm + modulation + FP8 quantization
    as one kernel (sd35fp8.kernels.norm). Each is a custom-op call from Python, which costs host time on every call
    unless the model replays as CUDA graphs; that cost is not measured in isolation yet, so the node layer turns this
    on only with CUDA graphs.
    """

    fast_accum: bool = True
    fp32_accum: str = ""
    adaln: str = "weight_only"
    margin: int = 0
    fuse_mlp: bool = True
    fuse_attention: bool = True
    fuse_norm: bool = True

    def __post_init__(self):
        if self.adaln not in ("weight_only", "fp8"):
            raise ValueError(f"adaln must be 'weight_only' or 'fp8', got {self.adaln!r}")


def set_static(model: torch.nn.Module, cfg: RuntimeConfig = RuntimeConfig()) -> int:
    """Switch every FP8 layer of ``model`` to the static runtime. Needs calibrated input scales
    (raises naming the first layer without one). MLPs whose fc1 and fc2 hold INT8 weights run W8A8: fc1 on
    per-token INT8 activations, fc2 at its calibrated static INT8 scale; other INT8 layers run weight-only.
    Returns the number of layers switched."""
    key = dataclasses.astuple(cfg)
    mk = peek(model)
    state = None if mk is None else mk.static_state
    if state is not None and mk.static_key == key and all(
            m.fp8_static == mode and m.input_scale is s and _version(s) == v and _centering(m) == c
            for m, mode, s, v, c in state):
        return len(state)  # already in this state (same config, same calibrated scales, nothing reset)
    layers = fp8_layers(model)
    int8_modes = int8_mlp_modes(model)
    missing = [n for n, m in layers.items() if m.input_scale is None
               and (int8_modes.get(m) == "int8_static" or not m.fp8_int8)
               and not (cfg.adaln == "weight_only" and ADALN.search(n))]
    if missing:
        raise ValueError(f"{len(missing)} FP8 layer(s) have no calibrated input scale (first: {missing[0]}); "
                         "calibrate the model before switching to the static FP8 runtime")
    slow = re.compile(cfg.fp32_accum) if cfg.fp32_accum else None
    for name, m in layers.items():
        mode = "weight_only" if cfg.adaln == "weight_only" and ADALN.search(name) else int8_modes.get(m, "fp8")
        m.fp8_set_static(mode, cfg.margin, cfg.fast_accum and not (slow and slow.search(name)))
    set_fused_mlps(model, cfg.fuse_mlp)
    set_joint_blocks(model, cfg.fuse_attention, cfg.fuse_norm)
    # what the layers now do, for whole-model CUDA graphs (sd35fp8.runtime.graphs.state_version): the same config
    # again (every sampling run sets it) keeps captured graphs; another one re-captures them
    mk = marks(model)
    mk.static_key = key
    mk.static_state = [(m, m.fp8_static, m.input_scale, _version(m.input_scale), _centering(m))
                       for m in layers.values()]
    return len(layers)


def refresh_center_biases(model: torch.nn.Module) -> int:
    """Recompute every static bias that differs from the layer's own (``bias + correction + W·center``) from the
    weights as they are now, in place; call after the weights change (a LoRA merged or removed). Returns how many
    layers have one."""
    n = 0
    for m in fp8_layers(model).values():
        if getattr(m, "fp8_center_bias", None) is not None and m.fp8_static is not None:
            m.fp8_refresh_center_bias()
            n += 1
    return n


def _centering(m) -> tuple:
    """What a layer's centering was set up from (its center, centered scale and bias correction, by identity)."""
    return tuple(id(getattr(m, n, None)) for n in ("input_center", "input_center_scale", "bias_correction"))


def _version(t: torch.Tensor | None):
    """The in-place version counter of ``t``; None for None and for inference tensors (ComfyUI loads and
    calibrates under ``torch.inference_mode``: those have no counter, and an in-place update of such a scale is
    not seen. The pack never updates scales in place: a calibration installs new tensors)."""
    return None if t is None or t.is_inference() else t._version


def clear_static(model: torch.nn.Module) -> None:
    for m in fp8_layers(model).values():
        m.fp8_set_static(None)
    set_fused_mlps(model, False)
    set_joint_blocks(model, False)
    mk = peek(model)
    if mk is not None:
        mk.static_key = mk.static_state = None


def static_key(model: torch.nn.Module):
    """The static runtime's config on ``model`` as a tuple (None: not static). O(1): per-call checks use it."""
    mk = peek(model)
    return None if mk is None else mk.static_key


def is_static(model: torch.nn.Module) -> bool:
    return any(m.fp8_static is not None for m in fp8_layers(model).values())
