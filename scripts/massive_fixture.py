#!/usr/bin/env python3
"""Plant "massive activations" into an SD3.5 checkpoint: the test fixture of the outlier handling (docs/fidelity.md).

Trained diffusion transformers carry a few channels hundreds of times larger than the rest, nearly constant over the
tokens and moved by the timestep (the residual stream, as LayerNorm + adaLN hand it to ``attn.qkv`` and ``mlp.fc1``),
and a few MLP hidden channels that dominate ``mlp.fc2``'s input after the GELU. A random-weight or small trained model
has none, so this plants them, ``factor`` times the median channel range of the layer's input (measured on the same
model by a calibration: ``channel_amax``), in every joint block with an MLP:

- **residual channels** (``channels`` of them, the same for both inputs of a block): the adaLN shift of ``norm1``
  (→ qkv) and of ``norm2`` (→ fc1) gets ``+B`` on them, plus a conditioning-dependent part of about ``variation``
  times the median range (a random row added to the modulation weights: the timestep moves real ones); the
  consumer's bias gets ``-W[:, c]·B``;
- **MLP hidden channels** (``channels`` of them): fc1's bias gets ``+B`` (GELU is the identity that far out), fc2's
  bias ``-W[:, h]·B``.

The offsets cancel in exact arithmetic, so the planted model computes (nearly: GELU's channel becomes linear) what the
base model does, while its FP8 layers see channels ``factor`` times the rest, as in a trained model. Planted tensors
keep the checkpoint's dtypes. CLI: ``massive_fixture.py SRC DST --factor 300 --amax CALIBRATION.json`` (a JSON
{layer: [channel amax, ...]}); the tests and ``bench/studies/massive_activations.py`` call :func:`plant`.
"""
from __future__ import annotations

import argparse
import json
import re

import torch

BLOCK = re.compile(r"^(?P<p>.*?)joint_blocks\.(?P<i>\d+)\.(?P<s>x_block|context_block)\.mlp\.fc1\.weight$")


def _f32(sd, key):
    return sd[key].float()


def plant(sd: dict, channel_amax: dict, factor: float, channels: int = 2, seed: int = 0,
          kinds: tuple[str, ...] = ("residual", "hidden"), variation: float = 0.5) -> dict:
    """A copy of the state dict ``sd`` (any key prefix) with outlier channels planted; ``channel_amax``: each FP8
    layer's per-input-channel range on the base model ({"joint_blocks.0.x_block.attn.qkv": tensor [in], ...}, as
    ``CalibrationSession.channel_amax()`` gives it). Returns the new state dict (the channels are drawn from
    ``seed``)."""
    unknown = set(kinds) - {"residual", "hidden"}
    if unknown:
        raise ValueError(f"unknown outlier kind(s) {sorted(unknown)}: use 'residual' and/or 'hidden'")
    out = dict(sd)
    g = torch.Generator().manual_seed(seed)
    blocks = [(m["p"], m["i"], m["s"]) for k in sd if (m := BLOCK.match(k))]
    if not blocks:
        raise ValueError("no joint block with an MLP found: not an SD3 MMDiT state dict")
    for p, i, s in sorted(blocks):
        b = f"{p}joint_blocks.{i}.{s}"
        name = f"joint_blocks.{i}.{s}"

        def med(layer):
            a = channel_amax.get(f"{name}.{layer}")
            if a is None:
                raise KeyError(f"no channel ranges for {name}.{layer}: calibrate the base model first")
            return float(torch.as_tensor(a).float().median())

        if "residual" in kinds:
            w_ada, b_ada = _f32(out, f"{b}.adaLN_modulation.1.weight"), _f32(out, f"{b}.adaLN_modulation.1.bias")
            d = w_ada.shape[1]
            n_mods = w_ada.shape[0] // d
            cs = torch.randperm(d, generator=g)[:channels]
            silu = med("adaLN_modulation.1")
            for chunk, layer in ((0, "attn.qkv"), (3, "mlp.fc1")):
                big = factor * med(layer)
                rows = chunk * d + cs
                b_ada[rows] += big
                # the conditioning-dependent part (not cancelled: it changes the model a little, as a channel the
                # model uses would): about ``variation`` times the layer's median channel range
                w_ada[rows] += variation * med(layer) * torch.randn(len(cs), d, generator=g) / (
                    d ** 0.5 * max(silu, 1e-6))
                w = _f32(out, f"{b}.{layer}.weight")
                out[f"{b}.{layer}.bias"] = _f32(out, f"{b}.{layer}.bias") - w[:, cs].sum(1) * big
            assert n_mods >= 6
            out[f"{b}.adaLN_modulation.1.weight"], out[f"{b}.adaLN_modulation.1.bias"] = w_ada, b_ada
        if "hidden" in kinds:
            w2 = _f32(out, f"{b}.mlp.fc2.weight")
            hs = torch.randperm(w2.shape[1], generator=g)[:channels]
            big = factor * med("mlp.fc2")
            b1 = _f32(out, f"{b}.mlp.fc1.bias")
            b1[hs] += big
            out[f"{b}.mlp.fc1.bias"] = b1
            out[f"{b}.mlp.fc2.bias"] = _f32(out, f"{b}.mlp.fc2.bias") - w2[:, hs].sum(1) * big
    # stored as the checkpoint stores them (a BF16 file stays BF16: the offsets' rounding is part of the model)
    return {k: v.to(sd[k].dtype).contiguous() for k, v in out.items()}


def main(argv=None):
    from safetensors import safe_open
    from safetensors.torch import save_file
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--amax", required=True, help="JSON {layer: [channel amax, ...]} of the base model")
    ap.add_argument("--factor", type=float, default=300.0)
    ap.add_argument("--channels", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    with safe_open(a.src, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
        md = f.metadata() or {}
    with open(a.amax) as f:
        amax = {k: torch.tensor(v) for k, v in json.load(f).items()}
    save_file(plant(sd, amax, a.factor, a.channels, a.seed), a.dst, metadata=md)


if __name__ == "__main__":
    main()
