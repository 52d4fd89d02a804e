"""Many prompts in one sampler call: the batched conditioning, empty latent and per-item noise of
SD35FP8PromptBatch. Each item's noise is what KSampler draws for that seed alone, so a deterministic sampler
(euler, dpmpp_2m, ...) gives each image as the same prompt and seed would alone."""
from __future__ import annotations

import hashlib

import torch

import comfy.model_management
import comfy.sample

MAX_ITEMS = 64


def item_seeds(n: int, seeds: str, base: int) -> list[int]:
    """Seeds from ``seeds`` (comma or newline separated, one per prompt) or, when empty, derived from ``base`` and
    the item's position (as the batch client derives them)."""
    parts = [s.strip() for s in seeds.replace("\n", ",").split(",") if s.strip()]
    if not parts:
        return [int.from_bytes(hashlib.sha256(f"{base}:{i}".encode()).digest()[:8], "big") >> 11 for i in range(n)]
    if len(parts) != n:
        raise ValueError(f"SD35FP8PromptBatch: seeds: {len(parts)} seed(s) for {n} prompt(s); give one per prompt "
                         "or none (then they are derived from seed)")
    try:
        out = [int(s) for s in parts]
    except ValueError:
        raise ValueError(f"SD35FP8PromptBatch: seeds: {', '.join(parts)[:200]} are not all whole numbers") from None
    if any(not 0 <= s < 2**64 for s in out):
        raise ValueError("SD35FP8PromptBatch: seeds must be between 0 and 2^64-1")
    return out


class ItemNoise:
    """A NOISE for SamplerCustomAdvanced: item i of the latent batch gets the noise KSampler draws for seed i alone.
    ``seed`` (the first item's) is what ancestral/SDE samplers use for their per-step noise."""

    def __init__(self, seeds: list[int]):
        self.seeds = list(seeds)
        self.seed = self.seeds[0]

    def generate_noise(self, input_latent: dict) -> torch.Tensor:
        lat = input_latent["samples"]
        if lat.shape[0] != len(self.seeds):
            raise ValueError(f"SD35FP8PromptBatch's noise has {len(self.seeds)} seeds for a latent batch of "
                             f"{lat.shape[0]}: connect its own latent output to the sampler")
        return torch.cat([comfy.sample.prepare_noise(lat[i:i + 1], s) for i, s in enumerate(self.seeds)])


def _encode(clip, text: str, t5_min: int | None = None):
    c = clip
    if t5_min is not None:
        c = clip.clone()
        c.set_tokenizer_option("t5xxl_min_length", t5_min)
    return c.encode_from_tokens_scheduled(c.tokenize(text))


def batch_conditioning(clip, prompts: list[str]) -> tuple[list, list[str]]:
    """One CONDITIONING of N items (cond [N, T, C], pooled [N, P]). Prompts are encoded one by one as CLIPTextEncode
    does; when their token counts differ (a T5 part over 77 tokens), the shorter ones are encoded again with their
    T5 part padded by T5's own pad token to the longest. Returns (conditioning, notes)."""
    encoded = [_encode(clip, p) for p in prompts]
    lengths = [e[0][0].shape[1] for e in encoded]
    notes = []
    longest = max(lengths)
    if min(lengths) != longest:
        t5 = longest - 77  # ComfyUI's SD3 conditioning: 77 CLIP tokens, then the T5 part
        for i, n in enumerate(lengths):
            if n != longest:
                encoded[i] = _encode(clip, prompts[i], t5_min=t5)
                notes.append(f"item {i + 1}: T5 part padded from {n - 77} to {t5} tokens to batch with the longest "
                             "prompt (its image differs slightly from the prompt alone)")
        if any(e[0][0].shape[1] != longest for e in encoded):
            raise ValueError("SD35FP8PromptBatch: the prompts' conditionings cannot be padded to one length with "
                             "this text encoder; batch prompts of similar length together")
    cond = torch.cat([e[0][0] for e in encoded])
    extra = {}
    pooled = [e[0][1].get("pooled_output") for e in encoded]
    if all(p is not None for p in pooled):
        extra["pooled_output"] = torch.cat(pooled)
    return [[cond, extra]], notes


def prompt_batch(clip, prompts: list[str], negative: str, seeds: list[int], width: int, height: int):
    """(positive, negative, latent, noise, report) for one sampler call over all prompts."""
    if clip is None:
        raise ValueError("SD35FP8PromptBatch needs a CLIP (connect TripleCLIPLoader or the checkpoint's CLIP)")
    if not prompts:
        raise ValueError("SD35FP8PromptBatch: no prompts (one per line)")
    if len(prompts) > MAX_ITEMS:
        raise ValueError(f"SD35FP8PromptBatch: {len(prompts)} prompts; at most {MAX_ITEMS} per sampler call (split "
                         "the list: the batch client does)")
    positive, notes = batch_conditioning(clip, prompts)
    neg = _encode(clip, negative)
    lat = torch.zeros([len(prompts), 16, height // 8, width // 8],
                      device=comfy.model_management.intermediate_device())
    report = "\n".join([f"{len(prompts)} prompts in one sampler call, {width}x{height}; seeds "
                        + ", ".join(map(str, seeds[:8])) + (" ..." if len(seeds) > 8 else ""), *notes])
    return positive, neg, {"samples": lat}, ItemNoise(seeds), report
