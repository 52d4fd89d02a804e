#!/usr/bin/env python3
"""Random-weight model files of the real SD3.5 shapes, for the end-to-end benchmark (no weights can be
downloaded here): the MMDiT (BF16, diffusion_models/ layout), the three text encoders in the layouts
TripleCLIPLoader reads (clip_l, clip_g, t5xxl_fp16) and the SD3 VAE (16 latent channels).

    python3 bench/e2e_models.py --comfy /path/to/ComfyUI --models DIR --variants large,medium [--tiny]

The text encoders and the VAE take their key layout from ComfyUI's own classes, built on the meta device, so
the files are what its loaders expect; weights are N(0, 0.02), norm weights 1, biases 0. ``--tiny`` writes a
2-block MMDiT and leaves out T5-XXL (a CPU dry run of the benchmark; its graphs then use DualCLIPLoader).
Files that exist are kept.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

CLIP_FILES = {"clip_l": "clip_l.safetensors", "clip_g": "clip_g.safetensors", "t5xxl": "t5xxl_fp16.safetensors"}
VAE_FILE = "sd3_vae.safetensors"


def mmdit_file(variant: str, tiny: bool = False) -> str:
    return f"sd3.5_{variant}{'_tiny' if tiny else ''}.safetensors"


def _random_like(shapes: dict, dtype, device, seed: int) -> dict:
    """N(0, 0.02) for weights, ones for 1-D norm weights, zeros for biases (CPU tensors, ``dtype``)."""
    import torch
    g = torch.Generator(device).manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        if k.endswith(".bias"):
            t = torch.zeros(shape, dtype=dtype)
        elif len(shape) == 1 and "norm" in k:
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g, device=device) * 0.02).to(dtype).cpu()
        out[k] = t
    return out


def _meta_shapes(build) -> dict:
    import torch
    with torch.device("meta"):
        m = build()
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


def text_encoder_shapes(comfy_dir: str, which: str) -> dict:
    """Key -> shape of ComfyUI's ``which`` text encoder (clip_l, clip_g, t5xxl) as its file stores it."""
    import torch
    import comfy.clip_model
    import comfy.ops
    import comfy.text_encoders.t5
    cfg = {"clip_l": "comfy/sd1_clip_config.json", "clip_g": "comfy/clip_config_bigg.json",
           "t5xxl": "comfy/text_encoders/t5_config_xxl.json"}[which]
    with open(os.path.join(comfy_dir, cfg)) as f:
        config = json.load(f)
    ops = comfy.ops.manual_cast
    if which == "t5xxl":
        return _meta_shapes(lambda: comfy.text_encoders.t5.T5(config, torch.float16, "meta", ops))
    shapes = _meta_shapes(lambda: comfy.clip_model.CLIPTextModel(config, torch.float16, "meta", ops))
    return {k: v for k, v in shapes.items() if "position_ids" not in k}


SD3_VAE = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
           "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def vae_state_dict(comfy_dir: str, device: str, seed: int = 5) -> dict:
    """The SD3 VAE's keys (ComfyUI's Encoder/Decoder, 16 latent channels), random like the rest (ComfyUI's layers
    skip PyTorch's initialisation: built as they are, they would hold whatever memory they got)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.model import Decoder, Encoder
    shapes = {f"encoder.{k}": v for k, v in _meta_shapes(lambda: Encoder(**SD3_VAE)).items()}
    shapes.update({f"decoder.{k}": v for k, v in _meta_shapes(lambda: Decoder(**SD3_VAE)).items()})
    return _random_like(shapes, torch.bfloat16, device, seed)


def build(comfy_dir: str, models: str, variants: list[str], tiny: bool = False) -> dict:
    """Write every missing file; returns {role: path}."""
    import torch
    from safetensors.torch import save_file
    import common
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = {}
    for sub in ("diffusion_models", "text_encoders", "vae"):
        os.makedirs(os.path.join(models, sub), exist_ok=True)

    def write(path, make, what):
        if not os.path.exists(path):
            t0 = time.perf_counter()
            sd = make()
            tmp = path + ".partial"
            save_file(sd, tmp)
            os.replace(tmp, path)
            n = sum(v.numel() for v in sd.values())
            print(f"[models] {what}: {n / 1e6:.0f} M params -> {path} ({time.perf_counter() - t0:.0f} s)", flush=True)
        return path

    for v in variants:
        paths[v] = write(os.path.join(models, "diffusion_models", mmdit_file(v, tiny)),
                         lambda: {k: t.cpu() for k, t in common.state_dict(v, device, depth=2 if tiny else None)
                                  .items()}, f"SD3.5 {v} MMDiT")
    for i, which in enumerate(("clip_l", "clip_g") if tiny else ("clip_l", "clip_g", "t5xxl")):
        paths[which] = write(os.path.join(models, "text_encoders", CLIP_FILES[which]),
                             lambda: _random_like(text_encoder_shapes(comfy_dir, which), torch.float16, device,
                                                  seed=10 + i), which)
    paths["vae"] = write(os.path.join(models, "vae", VAE_FILE), lambda: vae_state_dict(comfy_dir, device), "SD3 VAE")
    return paths


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--variants", default="large")
    ap.add_argument("--tiny", action="store_true")
    a = ap.parse_args()
    import common  # noqa: F401  (first: ComfyUI's folder has a tests/ and must not shadow ours)
    sys.path.append(os.path.abspath(a.comfy))
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()  # ComfyUI parses its own CLI arguments at import: none, or --cpu
    sys.argv = sys.argv[:1] + ([] if torch.cuda.is_available() else ["--cpu"])
    print(json.dumps(build(os.path.abspath(a.comfy), a.models, a.variants.split(","), a.tiny)))


if __name__ == "__main__":
    main()
