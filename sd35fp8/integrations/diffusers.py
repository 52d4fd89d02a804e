"""Calibrated FP8 for diffusers' ``StableDiffusion3Pipeline`` (``SD3Transformer2DModel``): the same layer policy,
weight formats, calibration and static scales as the ComfyUI nodes, on diffusers' module names.

    import torch
    from diffusers import StableDiffusion3Pipeline
    from sd35fp8 import fp8_autocast
    from sd35fp8.integrations import diffusers as sd35fp8_diffusers

    pipe = StableDiffusion3Pipeline.from_pretrained("stabilityai/stable-diffusion-3.5-large",
                                                    torch_dtype=torch.bfloat16).to("cuda")
    sd35fp8_diffusers.quantize(pipe.transformer)               # FP8 weights (embedders, norm_out, proj_out kept)
    sd35fp8_diffusers.calibrate(pipe.transformer, lambda: [    # your own calls: every step, both CFG halves
        pipe(p, num_inference_steps=28, guidance_scale=4.5) for p in ["a red fox in snow", "a product photo"]])
    with fp8_autocast():                                        # FP8 activations with the calibrated static scales
        image = pipe("a lighthouse at dusk", num_inference_steps=28, guidance_scale=4.5).images[0]
    sd35fp8_diffusers.save(pipe.transformer, amax, "sd3.5_large_fp8.safetensors")  # amax: what calibrate returned

``torch.compile(pipe.transformer)`` works as for any module. The joint attention's q, k and v share one weight scale
(per tensor) as the single-file layout's ``qkv`` does, so :func:`comfy_amax` maps a calibration onto a ComfyUI model
loaded from the same weights (tests/e2e/test_diffusers.py checks that both give the same output). diffusers is not
imported by this module: it works on the transformer you pass.
"""
from __future__ import annotations

import re
from typing import Callable

import torch

from ..core.autocast import CalibrationSession, fp8_autocast
from ..core.policy import QuantPolicy
from ..core.quant import quantize_weight
from ..linear import FP8Linear, FP8LinearMixin
from ..model import apply_input_scales, calibrated_amax, fp8_layers, quantize_model
from ..io.diffusers_keys import _BLOCK, _QKV, plan
from ..io.files import MARKER, file_metadata, hybrid_state_dict, write_safetensors

_ATTN = r"(attn|attn2)\.(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj|to_out\.0|to_add_out)"
INCLUDE = (rf"^transformer_blocks\.\d+\.{_ATTN}$", r"^transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)$",
           r"^transformer_blocks\.\d+\.(norm1|norm1_context)\.linear$")
# embedders, the output norm and projection stay in high precision (as in the single-file policy)
EXCLUDE = (r"^(pos_embed|time_text_embed|context_embedder|norm_out|proj_out)\b",)


def policy(granularity: str = "per_tensor") -> QuantPolicy:
    """The layer policy of the ComfyUI nodes, on diffusers' module names."""
    return QuantPolicy(include=INCLUDE, exclude=EXCLUDE, granularity=granularity)


def _qkv_groups(transformer: torch.nn.Module) -> list[list[str]]:
    names = dict(transformer.named_modules())
    groups = []
    for n in sorted({int(m.group(1)) for k in names if (m := re.match(r"transformer_blocks\.(\d+)\.", k))}):
        for parts in _QKV.values():
            g = [f"transformer_blocks.{n}.{p}" for p in parts]
            if all(x in names for x in g):
                groups.append(g)
    return groups


@torch.no_grad()
def quantize(transformer: torch.nn.Module, granularity: str = "per_tensor") -> QuantPolicy:
    """Swap the policy's Linear layers of ``transformer`` for FP8 ones (in place); q, k and v of each attention share
    one weight scale. Returns the policy with its per-layer decisions."""
    pol = policy(granularity)
    for g in _qkv_groups(transformer):  # q, k, v quantized together (once), then the other layers one by one
        mods = [transformer.get_submodule(x) for x in g]
        if any(isinstance(m, FP8LinearMixin) for m in mods) or not all(
                [pol.decide(x, m.out_features, m.in_features) for x, m in zip(g, mods)]):
            continue
        w8, scale = quantize_weight(torch.cat([m.weight for m in mods], 0), granularity)
        rows = [m.out_features for m in mods]
        scales = scale.split(rows, 0) if scale.numel() > 1 else [scale] * len(mods)
        for name, m, part, s in zip(g, mods, w8.split(rows, 0), scales):
            q = FP8Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta", dtype=m.weight.dtype)
            q.bias = None if m.bias is None else torch.nn.Parameter(m.bias.detach(), requires_grad=False)
            q.fp8_set_weight(part.contiguous(), s.contiguous(), name)
            parent, _, child = name.rpartition(".")
            setattr(transformer.get_submodule(parent), child, q)
    quantize_model(transformer, pol)  # the rest; the FP8 q/k/v are skipped, their decisions kept
    return pol


def calibrate(transformer: torch.nn.Module, run: Callable[[], object], method: str = "max",
              percentile: float = 99.99) -> dict[str, float]:
    """Record every FP8 layer's input range while ``run()`` makes your pipeline calls, then install the static input
    scales (q, k and v of one attention see the same input: one range). Returns {layer: amax}."""
    session = CalibrationSession(method=method, percentile=percentile)
    with fp8_autocast(calibrating=session):
        run()
    amax = calibrated_amax(session, transformer)
    for g in _qkv_groups(transformer):
        if all(x in amax for x in g):
            top = max(amax[x] for x in g)
            for x in g:
                amax[x] = top
    apply_input_scales(transformer, amax)
    return amax


def comfy_amax(amax: dict[str, float]) -> dict[str, float]:
    """A diffusers calibration's ranges under the single-file (ComfyUI) layer names: q/k/v become ``qkv``."""
    out = {}
    for name, a in amax.items():
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        if not m:
            continue
        n, sub = m.groups()
        dst = next((k for k, v in _BLOCK.items() if v == sub), None)
        if dst is None:
            dst = next((k for k, parts in _QKV.items() if sub in parts), None)
        if dst is not None:
            key = f"joint_blocks.{n}.{dst}"
            out[key] = max(out.get(key, 0.0), a)
    return out


FP8_EXTRAS = ("weight_scale", "input_scale", "comfy_quant", "scale_weight", "scale_input")


def _rows(t: torch.Tensor, op: str, parts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """concat / swap along the rows, FP8 included (as bytes: cat and chunk of float8 are not everywhere)."""
    fp8 = t.dtype == torch.float8_e4m3fn if parts is None else parts[0].dtype == torch.float8_e4m3fn
    view = (lambda x: x.view(torch.uint8)) if fp8 else (lambda x: x)
    back = (lambda x: x.view(torch.float8_e4m3fn)) if fp8 else (lambda x: x)
    if op == "concat":
        return back(torch.cat([view(x) for x in parts], 0))
    a, b = view(t).chunk(2, 0)
    return back(torch.cat([b, a], 0))


def single_file_tensors(transformer: torch.nn.Module, amax: dict[str, float]) -> dict[str, torch.Tensor]:
    """The calibrated FP8 transformer in the single-file hybrid FP8 layout (the ComfyUI nodes' files): q/k/v
    joined into ``qkv`` (exact: they share one weight scale and one input range), (scale, shift) swapped."""
    d = hybrid_state_dict(transformer, "", amax)
    base = {k: t for k, t in d.items() if k != MARKER and not k.endswith(tuple("." + e for e in FP8_EXTRAS))}
    out = {}
    for dst, (op, srcs) in plan(base).items():
        out[dst] = base[srcs[0]] if op == "copy" else _rows(base[srcs[0]], op, [base[x] for x in srcs])
        layer = srcs[0][:-len(".weight")] if srcs[0].endswith(".weight") else None
        if layer and f"{layer}.weight_scale" in d:  # an FP8 layer: its scales follow (q's stand for q, k, v)
            for e in FP8_EXTRAS:
                out[f"{dst[:-len('weight')]}{e}"] = d[f"{layer}.{e}"]
    out[MARKER] = d[MARKER]
    return out


def save(transformer: torch.nn.Module, amax: dict[str, float], path: str, calibration: dict | None = None,
         overwrite: bool = False, version: str = "") -> int:
    """Write the calibrated transformer as a single-file FP8 checkpoint: ComfyUI's Load SD3.5 Checkpoint (FP8) loads
    it calibrated, stock ComfyUI's UNETLoader reads it, :func:`load` puts it back into a diffusers transformer.
    Written atomically; an existing file is kept unless ``overwrite``. Returns bytes written."""
    md = file_metadata(calibration, {"include": list(INCLUDE), "exclude": list(EXCLUDE),
                                     "granularity": "per_tensor", "multiple_of": 16}, "SD3.5 (diffusers)", version)
    return write_safetensors(path, single_file_tensors(transformer, amax), md, overwrite=overwrite)


@torch.no_grad()
def load(transformer: torch.nn.Module, path: str) -> dict[str, float]:
    """Put a single-file FP8 checkpoint (:func:`save`, or the ComfyUI nodes' Save) into a diffusers transformer of
    the same configuration: FP8 weights, weight scales and static input scales, nothing re-quantized. Returns the
    file's input ranges (amax) per diffusers layer."""
    from safetensors.torch import load_file
    from ..core.formats import E4M3_MAX
    f = load_file(path)
    quantize(transformer)  # the FP8 layer structure; every value below comes from the file
    sd = transformer.state_dict()
    recipes = plan({k for k in sd if k.endswith((".weight", ".bias", "pos_embed"))})  # not the FP8 scales
    layers = fp8_layers(transformer)
    amax = {}
    for dst, (op, srcs) in recipes.items():
        t = f[dst]
        if op == "concat":
            rows = [sd[x].shape[0] for x in srcs]
            parts = (t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t).split(rows, 0)
            parts = [p.view(torch.float8_e4m3fn) if t.dtype == torch.float8_e4m3fn else p for p in parts]
        elif op == "swap":
            parts = [_rows(t, "swap")]
        else:
            parts = [t]
        for src, part in zip(srcs, parts):
            name = src[:-len(".weight")]
            if src.endswith(".weight") and name in layers:
                pre = dst[:-len("weight")]
                layers[name].fp8_set_weight(part.contiguous(), f[pre + "weight_scale"].float(), name)
                amax[name] = float(f[pre + "input_scale"].float()) * E4M3_MAX
            else:
                target = transformer.get_submodule(src.rpartition(".")[0]) if "." in src else transformer
                getattr(target, src.rpartition(".")[2]).copy_(part.to(sd[src].dtype))
    apply_input_scales(transformer, amax)
    return amax


__all__ = ["INCLUDE", "EXCLUDE", "policy", "quantize", "calibrate", "comfy_amax", "save", "load",
           "single_file_tensors"]
