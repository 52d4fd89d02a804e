"""TransformerEngine backend: our calibrated FP8 layers run as ``te.Linear`` modules inside TE's
``autocast`` with a TE recipe (DelayedScaling E4M3/HYBRID, or current scaling).

TransformerEngine is optional (never in requirements): everything here imports it lazily and
:func:`availability` says why it cannot be used. Each FP8 layer gets a ``te.Linear`` built with FP8
primary weights whose ``Float8Tensor`` **shares our FP8 weight's storage** (no BF16 copy and no
second FP8 copy on the GPU), and whose delayed-scaling state is seeded from our calibrated input
amax, so the first steps run with calibrated scales rather than TE's initial unit scales; after every
denoiser call :func:`te_step` runs TE's delayed-scaling update (amax history, then scales). TE's
per-module host overhead (~150 µs per Linear call) is removed by replaying the whole model as CUDA
graphs (``fp8.graphs``), with that update captured in the graph.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util

import torch

from ..core.autocast import DelayedScaling
from ..core.formats import E4M3, E4M3_MAX, Format
from ..core.marks import marks, peek
from ..core.quant import PerChannelWeightsError
from ..model import fp8_layers
from .static import ADALN

INSTALL_HINT = ("install it with `pip install --no-build-isolation transformer-engine[pytorch]` (NVIDIA GPU "
                "with FP8 tensor cores: Ada sm_89, Hopper sm_90, Blackwell; CUDA toolkit matching your torch)")
SCALINGS = ("delayed", "current")
BACKENDS = ("auto", "torch", "transformer_engine")
# The faster backend per GPU class (compute capability), as measured by bench/sd35_bench.py's TE rows
# (H100: bench/results/2026-11-22_h100_sd35_te_backend.md; H200, TE with CUDA graphs too:
# bench/results/2026-11-27_h200_sd35_bench_large.md); classes not measured get our torch path.
MEASURED_FASTER = {(9, 0): "torch"}


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """``auto`` -> the backend measured faster on this GPU class, if it is installed; else as given."""
    if name not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {name!r}; use one of {BACKENDS}")
    if name != "auto":
        return name
    dev = torch.device(device) if device is not None else None
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return "torch"
    pref = MEASURED_FASTER.get(torch.cuda.get_device_capability(dev), "torch")
    return pref if pref == "torch" or availability()[0] else "torch"


def preload() -> None:
    """Import TransformerEngine (if installed) before torch loads cuDNN for its own kernels: measured on
    the H100 image, a late import can bind TE's cuDNN to a different libcudnn than torch's and fail with
    an undefined cuDNN symbol. Errors are left for :func:`availability` to report."""
    if importlib.util.find_spec("transformer_engine") is not None:
        try:
            importlib.import_module("transformer_engine.pytorch")
        except Exception:  # noqa: BLE001
            pass


def availability() -> tuple[bool, str]:
    """``(usable, reason)``: TE importable with its PyTorch extension, and a CUDA GPU with FP8."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, f"TransformerEngine is not installed: {INSTALL_HINT}"
    try:
        te = importlib.import_module("transformer_engine.pytorch")
    except Exception as e:  # noqa: BLE001 - a broken install raises anything (missing .so, CUDA mismatch)
        return False, (f"TransformerEngine is installed but does not import ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200] if str(e) else ''}); reinstall it: {INSTALL_HINT}")
    ok, why = te.is_fp8_available(return_reason=True)
    if not ok:
        return False, f"TransformerEngine reports no FP8 on this machine ({why})"
    return True, f"TransformerEngine {getattr(importlib.import_module('transformer_engine'), '__version__', '?')}"


def te_recipe(recipe: DelayedScaling, scaling: str = "delayed"):
    """Our recipe (TE-shaped ``DelayedScaling``) as TransformerEngine's."""
    from transformer_engine.common import recipe as ter
    if scaling not in SCALINGS:
        raise ValueError(f"unknown scaling {scaling!r}; use one of {SCALINGS}")
    fmt = ter.Format.HYBRID if Format(recipe.fp8_format) == Format.HYBRID else ter.Format.E4M3
    if scaling == "current":
        return ter.Float8CurrentScaling(fp8_format=fmt)
    return ter.DelayedScaling(fp8_format=fmt, amax_history_len=recipe.amax_history_len, amax_compute_algo="max",
                              margin=recipe.margin)


def build_te_linear(layer, dtype: torch.dtype, rec, input_amax: float | None, margin: int = 0):
    """A ``te.Linear`` computing what ``layer`` (an FP8LinearMixin with a per-tensor scale) computes,
    on ``layer``'s FP8 weight storage."""
    import transformer_engine.pytorch as te
    if layer.weight_scale.dim() != 0:
        raise PerChannelWeightsError(f"{layer.fp8_name}: the TransformerEngine backend needs per-tensor weight "
                                     "scales")
    dev = layer.weight.device
    with torch.no_grad(), te.quantized_model_init(enabled=True, recipe=rec):  # no_grad: no transposed copy
        lin = te.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, params_dtype=dtype,
                        device=dev)
    w = lin.weight
    q = w._quantizer
    q.set_usage(rowwise=True, columnwise=False)
    ws = layer.weight_scale.detach().float().to(dev).reshape(())
    if hasattr(q, "scale"):  # delayed scaling: the weight's slot of TE's scale buffer holds 1/weight_scale
        q.scale.copy_(1.0 / ws)
    f8 = q.create_tensor_from_data(layer.weight.detach().view(torch.uint8), fake_dtype=dtype)
    f8._scale_inv = ws.clone().reshape(f8._scale_inv.shape)  # exactly our scale (not 1/(1/s))
    lin.weight = torch.nn.Parameter(f8, requires_grad=False)
    if layer.bias is not None:
        lin.bias = torch.nn.Parameter(layer.fp8_bias().detach().to(dev, dtype), requires_grad=False)
    seed_input_amax(lin, input_amax, margin)
    lin.eval()
    marks(lin).te_weight_ptr = layer.weight.data_ptr()
    return lin


def seed_input_amax(lin, amax: float | None, margin: int = 0) -> None:
    """Put a calibrated input amax into a TE module's delayed-scaling state (history and scale)."""
    meta = getattr(lin, "fp8_meta", {}).get("scaling_fwd")
    if amax is None or meta is None or not hasattr(meta, "amax_history"):
        return
    a = max(float(amax), 1e-12)
    meta.amax_history[:, 0].fill_(a)
    meta.scale[0] = E4M3_MAX / a / (2.0 ** margin)


def te_step() -> None:
    """TE's delayed-scaling update for the forward FP8 tensors: roll every registered amax history and
    recompute the scales from it (amax_compute_algo "max", the recipe's margin). TE runs this only when
    its outermost autocast exits with grad enabled, and inference runs under no_grad, so without this
    call the scales would stay at their seeds (calibrated amax, or TE's unit scale when uncalibrated)
    forever. Called after every denoiser call; a no-op for current scaling (nothing registered)."""
    from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    FP8GlobalStateManager.reduce_and_update_fp8_tensors(forward=True)


@contextlib.contextmanager
def te_autocast(rec):
    import transformer_engine.pytorch as te
    with torch.no_grad(), te.autocast(enabled=True, recipe=rec):
        yield


def te_forward(layer, x: torch.Tensor) -> torch.Tensor | None:
    """The TE backend's forward of an FP8 layer (installed as ``layer.fp8_backend`` by :func:`set_te`): the call runs
    through the layer's TE module (built on first use per dtype; rebuilt when the host replaced the FP8 weight, e.g.
    a LoRA merge). None (the layer's own path) for calls TE cannot take: off the GPU or away from the weight."""
    if not x.is_cuda or layer.weight.device != x.device:
        return None
    mk = marks(layer)
    cfg = mk.te_config
    lin = mk.te_modules.get(x.dtype)
    if lin is None or peek(lin).te_weight_ptr != layer.weight.data_ptr():
        amax = None if layer.input_scale is None else float(layer.input_scale) * E4M3_MAX
        lin = mk.te_modules[x.dtype] = build_te_linear(layer, x.dtype, cfg["recipe"], amax, cfg["margin"])
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows = x2.shape[0]
    pad = -rows % 8  # TE's FP8 GEMM needs a multiple of 8 rows (adaLN: batch rows; context: 2 x 154 tokens)
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    out = lin(x2)
    if pad:
        out = out[:rows]
    return out.reshape(*shape[:-1], layer.out_features)


def te_enabled(layer) -> bool:
    """Whether ``layer`` runs through TransformerEngine."""
    return layer.fp8_backend is te_forward


def set_te(model: torch.nn.Module, recipe: DelayedScaling | None, scaling: str = "delayed",
           adaln: str = "weight_only") -> int:
    """Route the FP8 layers of ``model`` through TransformerEngine (``recipe=None``: back to ours).
    With ``adaln="weight_only"`` (the runtime default) the adaLN modulation layers, which see one token
    per sample, keep BF16 activations against their FP8 weight (our GEMV) as in the torch backend;
    ``"fp8"`` sends them to TE too. Modules are built lazily at the first forward (they need the
    activation dtype). Returns the number of layers routed to TE."""
    layers = fp8_layers(model)
    if recipe is None:
        for layer in layers.values():
            mk = peek(layer)
            if layer.fp8_backend is te_forward:
                layer.fp8_backend = None
            if mk is not None and mk.te_weight_only:
                if layer.fp8_static == "weight_only":
                    layer.fp8_set_static(None)
                mk.te_weight_only = False
        return 0

    def weight_only(name, layer):
        return (adaln == "weight_only" and ADALN.search(name)) or layer.fp8_int8

    per_channel = [n for n, m in layers.items() if not weight_only(n, m) and m.weight_scale.dim() != 0]
    if per_channel:  # refused before anything is routed (TE modules are built at the first call)
        raise PerChannelWeightsError(f"{len(per_channel)} FP8 layer(s) have per-channel weight scales (first: "
                                     f"{per_channel[0]}); the TransformerEngine backend needs one scale per tensor")
    ok, why = availability()
    if not ok:
        raise RuntimeError(why)
    rec = te_recipe(recipe, scaling)
    key = (Format(recipe.fp8_format).value, recipe.amax_history_len, recipe.margin, scaling)
    n = 0
    for name, layer in layers.items():
        if layer.weight.dtype not in (E4M3, torch.int8):
            raise TypeError(f"{layer.fp8_name}: weight is {layer.weight.dtype}, not FP8")
        mk = marks(layer)
        if weight_only(name, layer):
            layer.fp8_backend = None
            layer.fp8_set_static("weight_only")
            mk.te_weight_only = True
            continue
        if mk.te_key != key or mk.te_modules is None:
            mk.te_modules = {}
            mk.te_key = key
        mk.te_config = {"recipe": rec, "margin": recipe.margin}
        layer.fp8_backend = te_forward
        n += 1
    return n
