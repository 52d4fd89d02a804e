"""Diffusers' SD3 transformer layout (``SD3Transformer2DModel``: ``transformer_blocks.N.attn.to_q``, ...) to the
single-file MMDiT layout ComfyUI and this library use (``joint_blocks.N.x_block.attn.qkv``, ...), tensor by tensor.

:func:`plan` maps every single-file key to the diffusers tensors it is made of; :func:`convert` yields the converted
tensors one at a time, reading only their sources (``get(key)``: e.g. a safetensors ``get_tensor`` over the shards),
so a checkpoint converts while it streams, with no second full copy in memory. Pure PyTorch; diffusers itself is
not needed.

The differences between the layouts: separate q/k/v projections become one ``qkv`` (concatenated along the output
dimension); the final layer's modulation and the last block's context modulation (diffusers'
``AdaLayerNormContinuous``) hold (scale, shift) where the single-file layout holds (shift, scale).
"""
from __future__ import annotations

import re
from typing import Callable, Iterator

import torch

# single-file name <- diffusers name, outside the blocks
_TOP = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "context_embedder": "context_embedder",
    "final_layer.linear": "proj_out",
}
# inside block N: single-file suffix <- diffusers suffix (weights and biases alike)
_BLOCK = {
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.adaLN_modulation.1": "norm1_context.linear",
    "x_block.attn.proj": "attn.to_out.0",
    "context_block.attn.proj": "attn.to_add_out",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
}
_NORMS = {  # RMS norms of q and k (weights only)
    "x_block.attn.ln_q": "attn.norm_q", "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q", "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.ln_q": "attn2.norm_q", "x_block.attn2.ln_k": "attn2.norm_k",
}
_QKV = {"x_block.attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
        "context_block.attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
        "x_block.attn2.qkv": ("attn2.to_q", "attn2.to_k", "attn2.to_v")}

# a recipe: (operation, source keys); operations: "copy", "concat" (dim 0), "swap" (halves exchanged)
Recipe = tuple[str, tuple[str, ...]]


def is_diffusers_sd3(keys) -> bool:
    """Whether ``keys`` are a diffusers SD3 transformer's (any prefix, e.g. ``transformer.``)."""
    return any(re.search(r"(^|\.)transformer_blocks\.\d+\.attn\.to_q\.weight$", k) for k in keys) and any(
        re.search(r"(^|\.)pos_embed\.proj\.weight$", k) for k in keys)


def _prefix(keys) -> str:
    for k in keys:
        m = re.match(r"(.*?)pos_embed\.proj\.weight$", k)
        if m:
            return m.group(1)
    raise ValueError("not a diffusers SD3 transformer: no pos_embed.proj.weight")


def plan(keys, prefix_out: str = "") -> dict[str, Recipe]:
    """{single-file key: recipe} for a diffusers SD3 transformer's ``keys``. Raises ``ValueError`` naming any
    diffusers tensor that no single-file tensor uses (an unknown layout is never converted half)."""
    keys = set(keys)
    p = _prefix(keys)
    out: dict[str, Recipe] = {}

    def add(dst, op, *srcs):
        if all(p + s in keys for s in srcs):
            out[prefix_out + dst] = (op, tuple(p + s for s in srcs))

    for dst, src in _TOP.items():
        for end in ("weight", "bias"):
            add(f"{dst}.{end}", "copy", f"{src}.{end}")
    add("pos_embed", "copy", "pos_embed.pos_embed")
    for end in ("weight", "bias"):
        add(f"final_layer.adaLN_modulation.1.{end}", "swap", f"norm_out.linear.{end}")
    blocks = sorted({int(m.group(1)) for k in keys if (m := re.match(re.escape(p) + r"transformer_blocks\.(\d+)\.",
                                                                      k))})
    for n in blocks:
        b, d = f"joint_blocks.{n}.", f"transformer_blocks.{n}."
        # the last block's context stream is "pre only": AdaLayerNormContinuous, (scale, shift)
        pre_only = n == blocks[-1] and p + d + "attn.to_add_out.weight" not in keys
        for dst, src in _BLOCK.items():
            for end in ("weight", "bias"):
                op = "swap" if pre_only and dst.startswith("context_block.adaLN") else "copy"
                add(f"{b}{dst}.{end}", op, f"{d}{src}.{end}")
        for dst, src in _NORMS.items():
            add(f"{b}{dst}.weight", "copy", f"{d}{src}.weight")
        for dst, srcs in _QKV.items():
            for end in ("weight", "bias"):
                add(f"{b}{dst}.{end}", "concat", *(f"{d}{s}.{end}" for s in srcs))
    used = {s for _, srcs in out.values() for s in srcs}
    left = sorted(keys - used)
    if left:
        raise ValueError(f"diffusers SD3 transformer: {len(left)} tensor(s) with no place in the single-file layout, "
                         f"e.g. {left[:3]} (a newer or different model?)")
    return out


def build(recipe: Recipe, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
    op, srcs = recipe
    if op == "concat":
        return torch.cat([get(s) for s in srcs], dim=0)
    t = get(srcs[0])
    if op == "swap":
        a, b = t.chunk(2, dim=0)
        return torch.cat([b, a], dim=0)
    return t


def convert(keys, get: Callable[[str], torch.Tensor], prefix_out: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """The single-file tensors of a diffusers SD3 transformer, one at a time (``get(key)`` reads one source)."""
    for dst, recipe in plan(keys, prefix_out).items():
        yield dst, build(recipe, get)
