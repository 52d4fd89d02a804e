#!/usr/bin/env python3
"""Build tiny SD3.5-shaped checkpoints with random weights in the official single-file key layout.

No model weights can be downloaded in CI, so the tests and the demo run on these:
  * an MMDiT under ``model.diffusion_model.`` exactly as SD3.5 Large (qk RMSNorm) or Medium (MMDiT-X,
    ``x_block.attn2`` in the first blocks) lays it out, with hidden = 64 * depth (ComfyUI derives the
    depth from ``x_embedder``), default depth 2 (~2 M parameters);
  * a small VAE under ``first_stage_model.`` (TAESD layout, 16 latent channels, ~2.4 M parameters);
  * optionally a random CLIP-L text encoder (the one text encoder whose fixed size is small enough,
    123 M parameters), as ``text_encoders/`` file or embedded under ``text_encoders.clip_l.transformer.``.
Pure PyTorch + safetensors; usable as a module (tests) or a CLI (the demo).
"""
from __future__ import annotations

import argparse
import os

import torch
from safetensors.torch import save_file

P = "model.diffusion_model."


def _lin(sd, name, out_f, in_f, g, std=0.02, bias=True, dtype=torch.bfloat16):
    sd[f"{name}.weight"] = (torch.randn(out_f, in_f, generator=g) * std).to(dtype)
    if bias:
        sd[f"{name}.bias"] = (torch.randn(out_f, generator=g) * std).to(dtype)


def mmdit_state_dict(depth: int = 2, variant: str = "large", seed: int = 0, pos_embed_max_size: int = 96,
                     attn2_blocks: int | None = None, prefix: str = P) -> dict[str, torch.Tensor]:
    """SD3.5 MMDiT keys/shapes for ``depth`` joint blocks (hidden 64*depth, heads = depth, head dim 64)."""
    if variant not in ("large", "medium"):
        raise ValueError("variant must be 'large' or 'medium'")
    g = torch.Generator().manual_seed(seed)
    D = 64 * depth
    sd: dict[str, torch.Tensor] = {}
    sd["pos_embed"] = (torch.randn(1, pos_embed_max_size**2, D, generator=g) * 0.02).to(torch.bfloat16)
    sd["x_embedder.proj.weight"] = (torch.randn(D, 16, 2, 2, generator=g) * 0.05).to(torch.bfloat16)
    sd["x_embedder.proj.bias"] = torch.zeros(D, dtype=torch.bfloat16)
    _lin(sd, "context_embedder", D, 4096, g)
    _lin(sd, "t_embedder.mlp.0", D, 256, g)
    _lin(sd, "t_embedder.mlp.2", D, D, g)
    _lin(sd, "y_embedder.mlp.0", D, 2048, g)
    _lin(sd, "y_embedder.mlp.2", D, D, g)
    if attn2_blocks is None:
        attn2_blocks = (depth + 1) // 2 if variant == "medium" else 0
    for i in range(depth):
        last = i == depth - 1
        for stream in ("context_block", "x_block"):
            b = f"joint_blocks.{i}.{stream}"
            pre_only = last and stream == "context_block"
            attn2 = stream == "x_block" and i < attn2_blocks
            n_mods = 2 if pre_only else (9 if attn2 else 6)
            _lin(sd, f"{b}.adaLN_modulation.1", n_mods * D, D, g)
            attns = ["attn", "attn2"] if attn2 else ["attn"]
            for a in attns:
                _lin(sd, f"{b}.{a}.qkv", 3 * D, D, g)
                sd[f"{b}.{a}.ln_q.weight"] = torch.ones(64, dtype=torch.bfloat16)
                sd[f"{b}.{a}.ln_k.weight"] = torch.ones(64, dtype=torch.bfloat16)
                if not pre_only:
                    _lin(sd, f"{b}.{a}.proj", D, D, g)
            if not pre_only:
                _lin(sd, f"{b}.mlp.fc1", 4 * D, D, g)
                _lin(sd, f"{b}.mlp.fc2", D, 4 * D, g)
    _lin(sd, "final_layer.adaLN_modulation.1", 2 * D, D, g)
    _lin(sd, "final_layer.linear", 2 * 2 * 16, D, g)
    return {prefix + k: v.contiguous() for k, v in sd.items()}


def taesd_state_dict(seed: int = 1, prefix: str = "first_stage_model.") -> dict[str, torch.Tensor]:
    """TAESD (16 latent channels) keys: ComfyUI's VAE loader recognises ``taesd_decoder.1.weight``."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k=3, bias=True):
        sd[f"{name}.weight"] = (torch.randn(cout, cin, k, k, generator=g) * (1.0 / (cin * k * k)) ** 0.5).half()
        if bias:
            sd[f"{name}.bias"] = torch.zeros(cout, dtype=torch.float16)

    def block(name, c):
        for j in (0, 2, 4):
            conv(f"{name}.conv.{j}", c, c)

    # (in, out, bias) of each conv kind; "block" = 3 convs of 64; others hold no weights
    convs = {"rgb_in": (3, 64, True), "lat_in": (16, 64, True), "lat_out": (64, 16, True),
             "rgb_out": (64, 3, True), "down": (64, 64, False), "conv": (64, 64, False)}
    enc = ["rgb_in", "block"] + ["down", "block", "block", "block"] * 3 + ["lat_out"]
    dec = ["clamp", "lat_in", "relu"] + ["block", "block", "block", "up", "conv"] * 3 + ["block", "rgb_out"]
    for part, layout in (("taesd_encoder", enc), ("taesd_decoder", dec)):
        for i, kind in enumerate(layout):
            if kind == "block":
                block(f"{part}.{i}", 64)
            elif kind in convs:
                cin, cout, bias = convs[kind]
                conv(f"{part}.{i}", cin, cout, bias=bias)
    sd["vae_scale"] = torch.tensor(1.5305)
    sd["vae_shift"] = torch.tensor(0.0609)
    return {prefix + k: v for k, v in sd.items()}


def clip_l_state_dict(seed: int = 2, prefix: str = "") -> dict[str, torch.Tensor]:
    """Random CLIP-L text encoder (12 layers, width 768): the fixed config ComfyUI builds for clip_l."""
    g = torch.Generator().manual_seed(seed)
    W, L = 768, 12
    sd: dict[str, torch.Tensor] = {}
    t = "text_model."
    sd[t + "embeddings.token_embedding.weight"] = (torch.randn(49408, W, generator=g) * 0.02).half()
    sd[t + "embeddings.position_embedding.weight"] = (torch.randn(77, W, generator=g) * 0.01).half()
    for i in range(L):
        b = f"{t}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _lin(sd, f"{b}self_attn.{n}", W, W, g, dtype=torch.float16)
        for n in ("layer_norm1", "layer_norm2"):
            sd[f"{b}{n}.weight"] = torch.ones(W, dtype=torch.float16)
            sd[f"{b}{n}.bias"] = torch.zeros(W, dtype=torch.float16)
        _lin(sd, f"{b}mlp.fc1", 4 * W, W, g, dtype=torch.float16)
        _lin(sd, f"{b}mlp.fc2", W, 4 * W, g, dtype=torch.float16)
    sd[t + "final_layer_norm.weight"] = torch.ones(W, dtype=torch.float16)
    sd[t + "final_layer_norm.bias"] = torch.zeros(W, dtype=torch.float16)
    sd["text_projection.weight"] = (torch.randn(W, W, generator=g) * 0.02).half()
    return {prefix + k: v for k, v in sd.items()}


def write_checkpoint(path: str, depth: int = 2, variant: str = "large", vae: bool = True,
                     clip_l: bool = False, seed: int = 0, diffusion_only: bool = False,
                     title: str | None = None) -> str:
    """Write a tiny SD3.5 checkpoint. ``diffusion_only``: keys without prefix (diffusion_models/ layout)."""
    sd = mmdit_state_dict(depth, variant, seed, prefix="" if diffusion_only else P)
    if not diffusion_only:
        if vae:
            sd.update(taesd_state_dict(seed + 1))
        if clip_l:
            sd.update(clip_l_state_dict(seed + 2, prefix="text_encoders.clip_l.transformer."))
    meta = {"modelspec.title": title or f"tiny random SD3.5 {variant} ({depth} blocks)",
            "sd35fp8.tiny": "1"}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(sd, path, metadata=meta)
    return path


def write_clip_l(path: str, seed: int = 2) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not os.path.exists(path):
        tmp = path + ".tmp"
        save_file(clip_l_state_dict(seed), tmp)
        os.replace(tmp, path)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models_dir", help="a ComfyUI models/ folder to write into")
    ap.add_argument("--depth", type=int, default=2)
    args = ap.parse_args(argv)
    ck = os.path.join(args.models_dir, "checkpoints")
    for variant in ("large", "medium"):
        p = write_checkpoint(os.path.join(ck, f"tiny_sd3.5_{variant}.safetensors"), args.depth, variant)
        print("wrote", p)
    print("wrote", write_clip_l(os.path.join(args.models_dir, "text_encoders", "tiny_clip_l.safetensors")))


if __name__ == "__main__":
    main()
