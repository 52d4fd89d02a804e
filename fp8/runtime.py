"""Static FP8 runtime: freeze a calibrated model into its fastest inference form.

``set_static`` turns every FP8 layer's calibrated input scale into device buffers and switches the
layer to a forward with no thread-local lookups and no run-time reductions: quantize (scale, clamp,
cast) → ``_scaled_mm`` with the bias in its epilogue. Under ``torch.compile`` the quantization is a
pure pointwise op, so Inductor fuses it into the kernel that produces the activation (LayerNorm +
adaLN modulation, GELU): no extra pass over activations. The adaLN modulation layers (one token per
sample, a third of the weight bytes) keep BF16 activations against their FP8 weights by default
(``fp8.kernels``): same bytes, no activation rounding on the path that scales every token.

``attention`` is SDPA with a chosen backend (cuDNN's is the fastest on Hopper at SD3.5's shapes).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re

import torch
import torch.nn.functional as F

from .joint import set_joint_blocks
from .model import fp8_layers
from .policy import ADALN_LAYERS

ADALN = re.compile(ADALN_LAYERS)
# "fp8": our FP8 attention kernel (fp8/attention.py); the others are SDPA backends
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "efficient", "math", "fp8")
STATIC_KEY = "_sd35fp8_static_key"  # set_static's config, kept on the model it was applied to
# what set_static left on each layer ((layer, mode, input_scale, its in-place version)): when the same config
# finds every layer as it left it, set_static returns at once (every sampling run calls it; the full pass cost
# ~40 ms of host time at Large depth on a CPU, more on a GPU host: ~1500 small ops plus module walks)
STATIC_STATE = "_sd35fp8_static_state"


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """fast_accum: Hopper's fast FP8 accumulation in ``_scaled_mm`` (no periodic fp32 promotion).
    fp32_accum: layer-name regex that keeps exact accumulation even with fast_accum (e.g. ``mlp\\.fc2``).
    adaln: "weight_only" (BF16 activations x FP8 weights) or "fp8" (FP8 activations too).
    margin: 2**margin headroom on every static input scale.
    fuse_mlp: each MLP's fc1 + GELU + the quantization of fc2's input as one kernel (fp8.gemm), on GPUs
    where that kernel runs (Hopper); elsewhere the MLP runs as before.
    fuse_attention: each SD3 joint block's q/k RMSNorm, context+image concat and (with FP8 attention) K/V
    quantization as one kernel (fp8.joint), where our attention override decides the block's attention.
    fuse_norm: in those blocks, also each stream's (gated residual +) LayerNorm + modulation + FP8 quantization
    as one kernel (fp8.norm). Each is a custom-op call from Python, which costs host time on every call unless
    the model replays as CUDA graphs; that cost is not measured in isolation yet, so the node layer turns this
    on only with CUDA graphs.
    attention_fp8_out: with FP8 attention, the joint attention writes the context and image projections' E4M3
    inputs directly (no BF16 output and no quantization pass). Off by default until measured on a GPU."""

    fast_accum: bool = True
    fp32_accum: str = ""
    adaln: str = "weight_only"
    margin: int = 0
    fuse_mlp: bool = True
    fuse_attention: bool = True
    fuse_norm: bool = True
    attention_fp8_out: bool = False

    def __post_init__(self):
        if self.adaln not in ("weight_only", "fp8"):
            raise ValueError(f"adaln must be 'weight_only' or 'fp8', got {self.adaln!r}")


def set_static(model: torch.nn.Module, cfg: RuntimeConfig = RuntimeConfig()) -> int:
    """Switch every FP8 layer of ``model`` to the static runtime. Needs calibrated input scales
    (raises naming the first layer without one). MLPs whose fc1 and fc2 hold INT8 weights run W8A8: fc1 on
    per-token INT8 activations, fc2 at its calibrated static INT8 scale; other INT8 layers run weight-only.
    Returns the number of layers switched."""
    key = dataclasses.astuple(cfg)
    state = model.__dict__.get(STATIC_STATE)
    if state is not None and model.__dict__.get(STATIC_KEY) == key and all(
            m.fp8_static == mode and m.input_scale is s and _version(s) == v for m, mode, s, v in state):
        return len(state)  # already in this state (same config, same calibrated scales, nothing reset)
    layers = fp8_layers(model)
    int8_modes = _int8_mlp_modes(model)
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
    _set_fused_mlps(model, cfg.fuse_mlp)
    set_joint_blocks(model, cfg.fuse_attention, cfg.fuse_norm, cfg.attention_fp8_out)
    # what the layers now do, for whole-model CUDA graphs (fp8.graphs.state_version): the same config
    # again (every sampling run sets it) keeps captured graphs; another one re-captures them
    model.__dict__[STATIC_KEY] = key
    model.__dict__[STATIC_STATE] = [(m, m.fp8_static, m.input_scale, _version(m.input_scale)) for m in layers.values()]
    return len(layers)


def _version(t: torch.Tensor | None):
    """The in-place version counter of ``t``; None for None and for inference tensors (ComfyUI loads and
    calibrates under ``torch.inference_mode``: those have no counter, and an in-place update of such a scale is
    not seen. The pack never updates scales in place: a calibration installs new tensors)."""
    return None if t is None or t.is_inference() else t._version


def clear_static(model: torch.nn.Module) -> None:
    for m in fp8_layers(model).values():
        m.fp8_set_static(None)
    _set_fused_mlps(model, False)
    set_joint_blocks(model, False)
    model.__dict__.pop(STATIC_KEY, None)
    model.__dict__.pop(STATIC_STATE, None)


FUSED_MLP = "_sd35fp8_fused_mlp"  # marks an MLP whose forward set_static replaced
# the static modes of an MLP's two layers that its fused forward takes: E4M3, or INT8 W8A8 (per-token input into
# fc1, whose kernel writes fc2's input as INT8 at fc2's static scale)
FUSED_MODES = (("fp8", "fp8"), ("int8_token", "int8_static"))


def _int8_mlp_modes(model: torch.nn.Module) -> dict:
    """{layer: static mode} for the MLPs whose fc1 and fc2 both hold INT8 weights (W8A8: fc1 per token, fc2 at
    its calibrated static scale); other INT8 layers run weight-only."""
    modes = {}
    for mod in model.modules():
        parts = _mlp_parts(mod)
        if parts is not None and parts[0].fp8_int8 and parts[2].fp8_int8:
            modes[parts[0]], modes[parts[2]] = "int8_token", "int8_static"
    return modes


def _mlp_parts(mod: torch.nn.Module):
    """(fc1, act, fc2) of a timm/ComfyUI-style ``Mlp`` (fc1 → GELU → dropout/identity → fc2) with two FP8
    layers; None for anything else."""
    from .linear import FP8LinearMixin
    fc1, act, fc2 = (mod._modules.get(n) for n in ("fc1", "act", "fc2"))
    if type(mod).__name__ != "Mlp" or not isinstance(act, torch.nn.GELU) or not all(
            isinstance(f, FP8LinearMixin) and f.fp8_quantized for f in (fc1, fc2)):
        return None
    for n in ("drop1", "norm", "drop2"):
        m = mod._modules.get(n)
        if not (m is None or isinstance(m, torch.nn.Identity) or (isinstance(m, torch.nn.Dropout) and m.p == 0)):
            return None
    return fc1, act, fc2


def fused_mlp_ready(mlp: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether ``mlp`` (an installed fused MLP) runs its fused kernel for activations ``x``."""
    from .gemm import fused_supported
    fc1, fc2 = mlp.fc1, mlp.fc2
    return bool(mlp.__dict__.get(FUSED_MLP)) and (fc1.fp8_static, fc2.fp8_static) in FUSED_MODES \
        and fc1.fp8_static_ready(x) and fc2.fp8_static_ready(x) and fused_supported(fc1.weight, x.device)


def _fc1_gelu(mlp: torch.nn.Module, h8: torch.Tensor, h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fc1 + GELU + the quantization of fc2's input, one kernel (fp8.gemm), from fc1's quantized input (its
    scale: fc1's static one unless given, e.g. INT8 per-token scales)."""
    from .gemm import fp8_linear_gelu
    fc1, fc2 = mlp.fc1, mlp.fc2
    return fp8_linear_gelu(h8, fc1.weight, fc1.fp8_in_scale if h_scale is None else h_scale, fc1.weight_scale,
                           fc1.bias, fc2.fp8_in_inv, mlp.act.approximate)


def fused_mlp_quantized(mlp: torch.nn.Module, h8: torch.Tensor, out_dtype: torch.dtype,
                        h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """fc2(GELU(fc1(h))) of a fused MLP from fc1's input already quantized (``fc1.fp8_static_input``: [M, K]
    E4M3 or INT8, ``h_scale`` its scale): fc1 + GELU + the quantization of fc2's input in one kernel, then fc2;
    returns [M, out]."""
    return mlp.fc2.fp8_static_matmul(_fc1_gelu(mlp, h8, h_scale), out_dtype)


def fused_mlp_residual(mlp: torch.nn.Module, h8: torch.Tensor, x: torch.Tensor, gate: torch.Tensor,
                       h_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``x + gate·mlp(h)`` for a DiT block's MLP branch, from fc1's quantized input ``h8`` ([B·L, K] E4M3 or
    INT8, ``h_scale`` its scale where not fc1's static one), the residual stream ``x`` [B, L, C] and the
    per-sample gate [B, C]: fc1's kernel, then fc2 with the gated residual add in its epilogue (fp8.gemm;
    computed unfused in fp32 where that kernel does not run)."""
    from .gemm import fp8_linear_residual
    fc2 = mlp.fc2
    out = fp8_linear_residual(_fc1_gelu(mlp, h8, h_scale), fc2.weight, fc2.fp8_in_scale, fc2.weight_scale,
                              fc2.bias, x.reshape(-1, x.shape[-1]), gate, precise=not fc2.fp8_fast_accum)
    return out.view(x.shape)


def _fused_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    """``Mlp.forward`` with fc1 + GELU + fc2's input quantization in one kernel (fp8.gemm); the module's
    own forward wherever the static FP8 path or that kernel does not apply to ``x``."""
    if not fused_mlp_ready(self, x):
        return type(self).forward(self, x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    h8, hs = self.fc1.fp8_static_input(x.reshape(-1, self.fc1.in_features))
    out = fused_mlp_quantized(self, h8, out_dtype, hs)
    return out.reshape(*x.shape[:-1], self.fc2.out_features).to(x.dtype)


def _set_fused_mlps(model: torch.nn.Module, on: bool) -> None:
    """Install (or remove) the fused forward on every MLP of ``model`` whose layers are both static FP8."""
    import types
    for mod in model.modules():
        parts = _mlp_parts(mod)
        fuse = on and parts is not None and (parts[0].fp8_static, parts[2].fp8_static) in FUSED_MODES
        if fuse:  # installed once: every sampling run calls set_static, and a new bound method each time
            if not mod.__dict__.get(FUSED_MLP):  # would be a new object for torch.compile's guards
                mod.forward = types.MethodType(_fused_mlp_forward, mod)
                mod.__dict__[FUSED_MLP] = True
        elif mod.__dict__.pop(FUSED_MLP, False):
            mod.__dict__.pop("forward", None)


def fused_mlps(model: torch.nn.Module) -> int:
    """How many MLPs of ``model`` run the fused forward."""
    return sum(1 for m in model.modules() if m.__dict__.get(FUSED_MLP))


def static_key(model: torch.nn.Module):
    """The static runtime's config on ``model`` as a tuple (None: not static). O(1): per-call checks use it."""
    return getattr(model, STATIC_KEY, None)


def is_static(model: torch.nn.Module) -> bool:
    return any(m.fp8_static is not None for m in fp8_layers(model).values())


def _backends(name: str):
    from torch.nn.attention import SDPBackend
    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = [table[name]] if name in table else []
    return first + [b for b in (table["flash"], table["efficient"], table["math"]) if b not in first]


def sdpa_context(backend: str = "auto"):
    """Context preferring ``backend`` for SDPA (others stay allowed as fallbacks)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; use one of {ATTENTION_BACKENDS}")
    if backend == "auto":
        return contextlib.nullcontext()
    if backend == "fp8":  # where our FP8 kernel cannot run, callers fall back to SDPA's best (cuDNN first)
        backend = "cudnn"
    from torch.nn.attention import sdpa_kernel
    return sdpa_kernel(_backends(backend), set_priority=True)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal attention over [B, H, S, D] tensors with the chosen backend (``fp8``: our FP8 kernel
    where it runs, else SDPA with cuDNN first)."""
    if backend == "fp8":  # fp8_attention decides where its kernel runs (else SDPA, cuDNN first)
        from .attention import fp8_attention
        b, h, s, d = q.shape
        return fp8_attention(*(t.transpose(1, 2).flatten(2) for t in (q, k, v)), h).view(
            b, s, h, d).transpose(1, 2)
    with sdpa_context(backend):
        return F.scaled_dot_product_attention(q, k, v)
