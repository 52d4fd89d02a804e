"""A diffusers-format SD3 transformer on disk (``transformer/diffusion_pytorch_model.safetensors``, or its shards
with ``diffusion_pytorch_model.safetensors.index.json``) read as the single-file MMDiT layout, tensor by tensor.

:class:`DiffusersShards` offers what the loader reads of a :class:`~sd35fp8.io.files.MappedSafetensors` (a header
of single-file names with their shapes and dtypes, ``tensor``, ``state_dict``, ``release``, ``check_finite``):
tensors that keep their shape are zero-copy views of the memory-mapped shards (their pages handed back as the loader
consumes them); only the attention projections, which diffusers stores as separate q, k and v, become new ``qkv``
tensors (about a sixth of the weights), held until the loader has quantized them. No full copy is made.
"""
from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from .checkpoint import CheckpointError, read_safetensors_header
from .diffusers_keys import build, is_diffusers_sd3, plan
from .files import MappedSafetensors, file_fingerprint

INDEX_SUFFIX = ".safetensors.index.json"


def looks_like_diffusers(header: dict) -> bool:
    """Whether one file's header (maybe one shard of several) holds diffusers SD3 transformer tensors."""
    # at the top of the names (diffusers saves the transformer alone; some exports prefix "transformer."): UNets have
    # transformer_blocks deep inside (input_blocks.4.1.transformer_blocks.0...), never at the top
    rx = re.compile(r"^(transformer\.)?(transformer_blocks\.\d+\.|time_text_embed\.|pos_embed\.proj\."
                    r"|norm_out\.linear\.)")
    return not any("joint_blocks." in k for k in header) and any(rx.search(k) for k in header)


def shard_files(path: str) -> list[str]:
    """The files of the transformer ``path`` belongs to: every shard its folder's index lists (when it lists this
    file), else ``path`` alone."""
    folder = os.path.dirname(os.path.abspath(path))
    for name in sorted(os.listdir(folder)):
        if not name.endswith(INDEX_SUFFIX):
            continue
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{name}: the shard index cannot be read ({e}): the download is incomplete") from None
        if os.path.basename(path) in files:
            missing = [f for f in files if not os.path.isfile(os.path.join(folder, f))]
            if missing:
                raise CheckpointError(f"{os.path.basename(path)}: shard {missing[0]} of {len(files)} (listed in "
                                      f"{name}) is not in the folder: download every shard")
            return [os.path.join(folder, f) for f in files]
    return [path]


class DiffusersShards:
    """The shards of a diffusers SD3 transformer as one single-file-layout source (prefix ``""``)."""

    stored_fp8 = False

    def __init__(self, path: str):
        self.path = path
        self.files = shard_files(path)
        self.shards = [MappedSafetensors(f) for f in self.files]
        self.metadata: dict = {}
        self.where = {k: s for s in self.shards for k in s.header}
        if not is_diffusers_sd3(self.where):
            raise CheckpointError(f"{os.path.basename(path)}: diffusers tensors, but not an SD3 transformer's (or "
                                  "shards are missing)")
        try:
            self.recipes = plan(self.where)
        except ValueError as e:
            raise CheckpointError(f"{os.path.basename(path)}: {e}") from None
        self.header = {}
        for k, (op, srcs) in self.recipes.items():
            hs = [self.where[s].header[s] for s in srcs]
            shape = list(hs[0]["shape"])
            if op == "concat":
                if len({h["dtype"] for h in hs}) != 1 or any(h["shape"][1:] != shape[1:] for h in hs):
                    raise CheckpointError(f"{os.path.basename(path)}: {srcs[0]} and its k/v do not match in shape or "
                                          "dtype: the file is damaged")
                shape[0] = sum(h["shape"][0] for h in hs)
            self.header[k] = {"dtype": hs[0]["dtype"], "shape": shape}

    def _get(self, key: str) -> torch.Tensor:
        return self.where[key].tensor(key)

    def tensor(self, name: str) -> torch.Tensor:
        return build(self.recipes[name], self._get)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.header}

    def release(self, t: torch.Tensor | None) -> None:
        for s in self.shards:  # a view of one shard's map (the others ignore it); a joined qkv is freed by Python
            s.release(t)

    check_finite = MappedSafetensors.check_finite

    def release_all(self) -> None:
        for s in self.shards:
            s.release_all()

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for f in self.files:
            h.update(os.path.basename(f).encode() + file_fingerprint(f).encode())
        return h.hexdigest()


def open_source(path: str):
    """The loader's view of a checkpoint file: the file itself, or the diffusers transformer it is (a shard of)."""
    header, _ = read_safetensors_header(path)
    return DiffusersShards(path) if looks_like_diffusers(header) else MappedSafetensors(path)


def open_checkpoint(path: str):
    """(source, :class:`~sd35fp8.io.checkpoint.SD3Info`) of a checkpoint file: a single-file SD3 checkpoint, or a
    diffusers SD3 transformer (its single file or any of its shards), classified from the header alone."""
    from .checkpoint import detect_sd3, inspect_checkpoint
    header, _ = read_safetensors_header(path)
    if not looks_like_diffusers(header):
        return MappedSafetensors(path), inspect_checkpoint(path)
    src = DiffusersShards(path)
    return src, detect_sd3({k: v["shape"] for k, v in src.header.items()}, {}, path)


# a diffusers SD3 repository: the transformer's siblings the ComfyUI loader takes when they are there
TEXT_ENCODER_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3")  # CLIP-L, CLIP-G, T5-XXL


def _weights(folder: str) -> list[str]:
    """A component folder's safetensors files (all shards), or [] when it has none."""
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def sibling_components(path: str) -> dict[str, list]:
    """For a transformer file in ``<repo>/transformer/``: ``{"vae": [files], "text_encoders": [[files], ...]}`` of
    ``<repo>/vae/`` and ``<repo>/text_encoder*/`` (each component's shards together); empty where absent."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) != "transformer":
        return {"vae": [], "text_encoders": []}
    repo = os.path.dirname(folder)
    tes = [w for w in (_weights(os.path.join(repo, t)) for t in TEXT_ENCODER_FOLDERS) if w]
    return {"vae": _weights(os.path.join(repo, "vae")), "text_encoders": tes}
