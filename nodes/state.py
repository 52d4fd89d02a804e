"""The pack's state on a ComfyUI MODEL: one typed, immutable record, its defaults in one place.

A MODEL (ModelPatcher) carries an :class:`FP8State` in ``model_options["sd35fp8"]``. Nodes never change it in
place: they clone the MODEL and put a new record (:func:`put`, ``dataclasses.replace``). ComfyUI deep-copies
``model_options`` on every clone; the record is immutable, so the copy is the same object (the sampling wrapper
then recognises the scales it already installed on the shared diffusion model by identity).
"""
from __future__ import annotations

import dataclasses
import types
from typing import Mapping

from sd35fp8 import DelayedScaling
from sd35fp8.kernels.attention import ATTENTION_BACKENDS
from sd35fp8.runtime.te import BACKENDS, SCALINGS

KEY = "sd35fp8"


def _frozen(d: Mapping | None):
    return None if d is None else types.MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class Runtime:
    """How a calibrated MODEL samples (SD35FP8Autocast's choices). The defaults: every speed feature on."""

    static: bool = True          # the static FP8 runtime (calibrated scales frozen into the layers)
    compile: bool = True         # torch.compile the diffusion model
    attention: str = "auto"      # one of ATTENTION_BACKENDS ("auto": cuDNN on NVIDIA GPUs)
    fast_accum: bool = True      # Hopper's fast FP8 accumulation
    adaln: str = "weight_only"   # adaLN modulation layers: "weight_only" (BF16 activations) or "fp8"
    cudagraphs: bool = False     # replay the (compiled) model as CUDA graphs
    backend: str = "torch"       # "torch" (ours) or "transformer_engine" ("auto" is resolved before it gets here)
    scaling: str = "delayed"     # TransformerEngine's scaling: "delayed" or "current"
    fuse_mlp: bool = True        # the fused MLP kernels (sd35fp8.runtime.mlp)
    fuse_attention: bool = True  # the fused joint-attention prologue (sd35fp8.runtime.joint)
    fuse_norm: bool = True       # the LayerNorm kernels; only with cudagraphs (each is a Python op call)
    fp32_accum: str = ""         # layer-name regex kept at exact accumulation

    def __post_init__(self):
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_BACKENDS)} (got {self.attention!r})")
        if self.backend not in BACKENDS or self.backend == "auto":
            raise ValueError(f"backend must be 'torch' or 'transformer_engine' (got {self.backend!r})")
        if self.scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)} (got {self.scaling!r})")
        if self.adaln not in ("weight_only", "fp8"):
            raise ValueError(f"adaln must be 'weight_only' or 'fp8' (got {self.adaln!r})")


@dataclasses.dataclass(frozen=True)
class FP8State:
    """What the pack knows about one MODEL. ``input_amax``: calibrated amax per FP8 layer (None: uncalibrated);
    ``calibration``: how it was calibrated (saved into files); ``enabled``/``recipe``/``runtime``: how it samples
    (``recipe`` None: the default recipe); ``policy``: which layers are FP8 (``QuantPolicy.to_dict``); ``source``:
    where the weights came from (file name, content fingerprint, weight format: the calibration cache's key)."""

    variant: str = "SD3"
    policy: Mapping | None = None
    load_info: str = ""
    input_amax: Mapping[str, float] | None = None
    calibration: Mapping | None = None
    enabled: bool = False
    recipe: DelayedScaling | None = None
    runtime: Runtime = Runtime()
    source: Mapping | None = None
    # bias corrections per FP8 layer (sd35fp8.core.centering.weight_correction: tensors, not saved in records)
    corrections: Mapping | None = None

    def __post_init__(self):
        for f in ("policy", "input_amax", "calibration", "source"):
            v = getattr(self, f)
            if v is not None and not isinstance(v, types.MappingProxyType):
                object.__setattr__(self, f, _frozen(v))

    def __deepcopy__(self, memo):  # immutable: ComfyUI's clone may share it
        return self

    def __copy__(self):
        return self

    @property
    def calibrated(self) -> bool:
        return self.input_amax is not None

    @property
    def sampling_recipe(self) -> DelayedScaling:
        return self.recipe or DelayedScaling()


def get(model) -> FP8State | None:
    """The MODEL's record (None: not a MODEL of this pack)."""
    st = getattr(model, "model_options", {}).get(KEY)
    return st if isinstance(st, FP8State) else None


def put(model, state: FP8State) -> None:
    """Set the record of ``model`` (a clone the caller owns)."""
    model.model_options[KEY] = state
