"""Model-level operations: swap/quantize Linear layers by policy, install calibrated scales, report."""
from __future__ import annotations

from typing import Iterable

import torch

from .core.autocast import CalibrationSession
from .core.formats import E4M3, scale_from_amax
from .core.marks import install_method
from .core.policy import QuantPolicy
from .core.quant import quantize_weight
from .linear import FP8Linear, FP8LinearMixin


def fp8_layers(model: torch.nn.Module) -> dict[str, FP8LinearMixin]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8LinearMixin) and m.fp8_quantized}


@torch.no_grad()
def quantize_model(model: torch.nn.Module, policy: QuantPolicy | None = None) -> QuantPolicy:
    """Quantize every ``nn.Linear`` the policy selects (module swap for plain Linears, in-place for
    layers that already carry :class:`FP8LinearMixin`). Returns the policy with its decisions."""
    policy = policy or QuantPolicy()
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, torch.nn.Linear) or (isinstance(mod, FP8LinearMixin) and mod.fp8_quantized):
            continue
        if not policy.decide(name, mod.out_features, mod.in_features):
            continue
        gran = policy.granularity_for(name)
        if isinstance(mod, FP8LinearMixin):
            mod.fp8_quantize_(gran, name=name)
        else:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, FP8Linear.from_linear(mod, gran, name=name))
    return policy


def calibrated_amax(session: CalibrationSession, model: torch.nn.Module | None = None) -> dict[str, float]:
    """Amax per layer from a session; with ``model``, every FP8 layer must have been observed."""
    amax = session.amax()
    if model is not None:
        missing = sorted(set(fp8_layers(model)) - set(amax))
        if missing:
            raise ValueError(f"calibration never reached {len(missing)} FP8 layer(s), first: {missing[0]}")
    return amax


def apply_input_scales(model: torch.nn.Module, amax: dict[str, float]) -> int:
    layers = fp8_layers(model)
    unknown = sorted(set(amax) - set(layers))
    if unknown:
        raise KeyError(f"calibration names layer(s) the model does not have, first: {unknown[0]}")
    for name, a in amax.items():
        layers[name].fp8_set_input_amax(a)
    return len(amax)


def weight_bytes(model: torch.nn.Module, high_precision_itemsize: int | None = None,
                 as_if_unquantized: bool = False) -> int:
    """Bytes of all parameters and buffers.

    ``high_precision_itemsize`` (2 for BF16) counts every non-FP8 floating tensor at that size, so
    the number means the same on a CPU run (FP32) as in a BF16 deployment; ``as_if_unquantized``
    counts FP8 tensors at that size too (the BF16 baseline) and drops the FP8 scales."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        size = t.element_size()
        if as_if_unquantized and name.rsplit(".", 1)[-1] in ("weight_scale", "input_scale", "pos_embed_scale"):
            continue
        if high_precision_itemsize and t.is_floating_point() and t.numel() > 1:
            if size > 1 or as_if_unquantized:
                size = high_precision_itemsize
        total += t.numel() * size
    return total


def bf16_bytes(model: torch.nn.Module) -> int:
    """What the same model (parameters and buffers) takes in BF16: the baseline for FP8."""
    return weight_bytes(model, 2, as_if_unquantized=True)


def report(policy: QuantPolicy, amax: dict[str, float] | None = None,
           bytes_before: int | None = None, bytes_after: int | None = None,
           extra: Iterable[str] = ()) -> str:
    lines = list(extra) + [policy.summary()]
    if bytes_before is not None and bytes_after is not None:
        lines.append(f"weights: {bytes_before / 2**20:.1f} MiB in BF16 -> {bytes_after / 2**20:.1f} MiB "
                     f"with FP8 ({bytes_after / max(bytes_before, 1):.2f}x)")
    if amax:
        vals = sorted(amax.items(), key=lambda kv: kv[1])
        scales = [float(scale_from_amax(a)) for _, a in vals]
        lines.append(f"calibrated input scales for {len(vals)} layers: min {scales[0]:.3g} ({vals[0][0]}), "
                     f"max {scales[-1]:.3g} ({vals[-1][0]}); input amax {vals[0][1]:.4g} .. {vals[-1][1]:.4g}")
    return "\n".join(lines)


def _fp8_cropped_pos_embed(self, hw, device=None):
    """The class's ``cropped_pos_embed`` on the FP8 table, dequantized with ``pos_embed_scale``."""
    t = type(self).cropped_pos_embed(self, hw, device=device)
    return t.to(torch.float32) * self.pos_embed_scale.to(t.device) if t.dtype == E4M3 else t


@torch.no_grad()
def quantize_pos_embed(dm: torch.nn.Module, scale: torch.Tensor | None = None) -> bool:
    """Store an MMDiT's positional-embedding table (``dm.pos_embed``, 226 M values in SD3.5 Medium: 9% of its
    weights) as FP8 with a per-tensor scale (``scale``: one a file recorded, which recovers the saved FP8 values
    exactly); its ``cropped_pos_embed`` then dequantizes each crop. Returns whether the table was quantized (models
    without such a table, or with one already FP8, are left as they are)."""
    pe = getattr(dm, "pos_embed", None)
    if not isinstance(pe, torch.Tensor) or pe.dtype == E4M3 or not hasattr(dm, "cropped_pos_embed"):
        return False
    shape = pe.shape
    w8, scale = quantize_weight(pe.data.reshape(-1, shape[-1]), "per_tensor", scale=scale)
    del pe
    dm.pos_embed = torch.nn.Parameter(w8.reshape(shape), requires_grad=False)
    dm.register_buffer("pos_embed_scale", scale.to(w8.device))
    install_method(dm, "cropped_pos_embed", "fp8_pos_embed", _fp8_cropped_pos_embed)
    return True
