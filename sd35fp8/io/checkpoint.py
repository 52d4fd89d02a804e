"""Checkpoint inspection: safetensors header checks and SD3/SD3.5 variant detection.

Everything here reads only the header (and file size) so a wrong or damaged file is rejected in
milliseconds, before any tensor is loaded, with an error that names the problem.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import struct

DIFFUSION_PREFIX = "model.diffusion_model."


class CheckpointError(ValueError):
    """A file that is not a usable SD3.5 checkpoint; the message says why."""


def read_safetensors_header(path: str) -> tuple[dict, dict]:
    """Return ``(tensors, metadata)`` from a safetensors header, verifying the file is complete."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    size = os.path.getsize(path)
    name = os.path.basename(path)
    if not name.endswith(".safetensors"):
        ext = os.path.splitext(name)[1] or "no extension"
        raise CheckpointError(f"{name}: only .safetensors checkpoints are supported (got {ext})")
    if size < 8:
        raise CheckpointError(f"{name}: file is {size} bytes, too short to be a safetensors file (truncated?)")
    with open(path, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        if hlen > min(size - 8, 100 * 2**20):
            raise CheckpointError(f"{name}: header length {hlen} exceeds the file ({size} bytes): "
                                  "truncated or not a safetensors file")
        raw = f.read(hlen)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{name}: unreadable safetensors header ({e}); the file is damaged") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: the safetensors header is a JSON {type(header).__name__}, not an object: "
                              "the file is damaged or not a safetensors file")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{name}: the header's __metadata__ is not a table of strings: the file is damaged")
    for key, v in header.items():
        _check_entry(name, key, v)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + hlen + end > size:
        raise CheckpointError(f"{name}: truncated: tensors need {8 + hlen + end} bytes but the file has "
                              f"{size} ({(8 + hlen + end - size) / 2**20:.1f} MiB missing); download it again")
    return header, meta


def _check_entry(name: str, key: str, v) -> None:
    """One tensor's header entry: ``{"dtype": str, "shape": [int, ...], "data_offsets": [start, end]}``."""
    ok = (isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list)
          and all(isinstance(d, int) and d >= 0 for d in v["shape"]) and isinstance(v.get("data_offsets"), list)
          and len(v["data_offsets"]) == 2 and all(isinstance(o, int) for o in v["data_offsets"])
          and 0 <= v["data_offsets"][0] <= v["data_offsets"][1])
    if not ok:
        raise CheckpointError(f"{name}: tensor {key!r} has a malformed header entry ({json.dumps(v)[:120]}): the "
                              "file is damaged")


@dataclasses.dataclass
class SD3Info:
    variant: str          # "SD3.5 Large", "SD3.5 Large Turbo", "SD3.5 Medium", "SD3 Medium", or a custom label
    depth: int
    hidden: int
    mmdit_x: bool
    qk_norm: bool
    prefix: str           # key prefix of the diffusion model ("model.diffusion_model." or "")
    has_vae: bool
    has_text_encoders: tuple[str, ...]
    standard: bool        # a published size (Large/Medium) rather than a custom/tiny MMDiT
    fp8_tensors: int = 0  # diffusion-model tensors already stored in FP8 (a pre-quantized file)

    def describe(self) -> str:
        kind = "MMDiT-X" if self.mmdit_x else "MMDiT"
        parts = [f"{self.variant}: {kind}, {self.depth} joint blocks, hidden {self.hidden}"]
        if not self.standard:
            parts.append("non-standard size (not a published SD3.5 model)")
        parts.append("VAE included" if self.has_vae else "no VAE in file")
        parts.append(f"text encoders: {', '.join(self.has_text_encoders)}" if self.has_text_encoders
                     else "no text encoders in file")
        return "; ".join(parts)


_OTHER_FAMILIES = [
    (r"(^|\.)double_blocks\.\d+\.img_attn", "a Flux model"),
    (r"(^|\.)input_blocks\.\d+\.\d+\.transformer_blocks", "a Stable Diffusion 1.x/2.x/SDXL UNet"),
    (r"(^|\.)input_blocks\.\d+\.\d+\.", "a UNet diffusion model (SD1.x/SD2.x/SDXL family)"),
    (r"(^|\.)transformer_blocks\.\d+\.attn\.to_q",
     "a diffusers-format transformer (Load SD3.5 Checkpoint (FP8) reads it; in code: sd35fp8.io.diffusers_files)"),
    (r"(^|\.)blocks\.\d+\.self_attn\.", "a video/transformer model (e.g. Wan/HunyuanVideo)"),
]


def _family_hint(keys) -> str:
    for pat, what in _OTHER_FAMILIES:
        rx = re.compile(pat)
        if any(rx.search(k) for k in keys):
            return what
    if any(k.startswith(("first_stage_model.", "encoder.", "decoder.")) for k in keys) and not any(
            "joint_blocks" in k for k in keys):
        return "a VAE or text-encoder file, not a diffusion model"
    return "not an SD3-family MMDiT"


def detect_sd3(keys_shapes: dict[str, list[int]], metadata: dict | None = None, filename: str = "") -> SD3Info:
    """Classify a checkpoint from its tensor names/shapes. Raises :class:`CheckpointError` if it is
    not an SD3-family MMDiT (naming what it looks like instead)."""
    keys = list(keys_shapes)
    prefix = None
    for p in (DIFFUSION_PREFIX, ""):
        if f"{p}x_embedder.proj.weight" in keys_shapes and any(k.startswith(f"{p}joint_blocks.") for k in keys):
            prefix = p
            break
    name = os.path.basename(filename) or "checkpoint"
    if prefix is None:
        raise CheckpointError(f"{name} is {_family_hint(keys)}: this loader only takes SD3.5 Large, Large Turbo "
                              "or Medium (MMDiT) checkpoints. Use ComfyUI's own loader for other models.")
    xw = keys_shapes[f"{prefix}x_embedder.proj.weight"]
    if len(xw) != 4 or xw[1] != 16:
        raise CheckpointError(f"{name}: MMDiT with {xw[1] if len(xw) > 1 else '?'} latent channels is not SD3 "
                              "(SD3 uses 16)")
    hidden = int(xw[0])
    blocks = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"joint_blocks\.(\d+)\.", k))}
    if blocks != set(range(len(blocks))):
        raise CheckpointError(f"{name}: joint blocks {sorted(set(range(max(blocks) + 1)) - blocks)[:5]} are "
                              "missing: the checkpoint is incomplete")
    mmdit_x = any(re.match(re.escape(prefix) + r"joint_blocks\.\d+\.x_block\.attn2\.qkv\.weight$", k) for k in keys)
    qk_norm = f"{prefix}joint_blocks.0.x_block.attn.ln_q.weight" in keys_shapes
    n_blocks = len(blocks)
    text = tuple(t for t in ("clip_l", "clip_g", "t5xxl") if any(k.startswith(f"text_encoders.{t}.") for k in keys))
    has_vae = any(k.startswith("first_stage_model.") for k in keys)
    hint = " ".join([name.lower(), json.dumps(metadata or {}).lower()])
    standard = True
    if n_blocks == 38 and hidden == 2432 and not mmdit_x:
        variant = "SD3.5 Large Turbo" if "turbo" in hint else "SD3.5 Large"
    elif n_blocks == 24 and hidden == 1536 and mmdit_x:
        variant = "SD3.5 Medium"
    elif n_blocks == 24 and hidden == 1536 and not qk_norm:
        variant = "SD3 Medium"
    else:
        standard = False
        kind = "Medium-type (MMDiT-X)" if mmdit_x else "Large-type"
        variant = f"SD3.5 {kind} custom MMDiT"
    return SD3Info(variant, n_blocks, hidden, mmdit_x, qk_norm, prefix, has_vae, text, standard)


def inspect_checkpoint(path: str) -> SD3Info:
    header, meta = read_safetensors_header(path)
    info = detect_sd3({k: v["shape"] for k, v in header.items()}, meta, path)
    info.fp8_tensors = sum(1 for k, v in header.items()
                           if k.startswith(info.prefix + "joint_blocks.") and str(v.get("dtype", "")).startswith("F8"))
    return info
