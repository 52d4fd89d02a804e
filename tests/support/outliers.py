"""The massive-activation fixture through ComfyUI's model code, in-process on the CPU: the demo model (or any SD3.5
checkpoint), its FP8 formats calibrated and sampled by ComfyUI's own sampler, and the same model with outlier channels
planted (``scripts/massive_fixture.py``). Used by tests/e2e/test_massive_activations.py and
bench/studies/massive_activations.py."""
from __future__ import annotations

import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import REPO, import_adapter

sys.path[:0] = [os.path.join(REPO, "scripts")]
FORMATS = ("fastest", "finer weights (per channel)", "less error (INT8 adaLN)", "most faithful (INT8 MLP)")
PREFIX = "model.diffusion_model."


class Fixture:
    """Sampling settings and conditionings shared by every model of one comparison."""

    def __init__(self, comfy_dir: str, models_dir: str, prompts: list[str], size: int = 64, steps: int = 8,
                 cfg: float = 4.5, seeds: tuple[int, ...] = (0,)):
        import run_batch
        import train_demo
        self.adapter = import_adapter(comfy_dir, cpu=True)
        import comfy.sample
        import comfy.sd
        self.sample_mod, self.sd = comfy.sample, comfy.sd
        self.base = run_batch.make_demo_models(models_dir)
        clip = os.path.join(models_dir, "text_encoders", "tiny_clip_l.safetensors")
        ctx, pooled = train_demo.full_cond(*train_demo.encode_prompts(clip, prompts + [""]))
        self.conds = [[[ctx[i:i + 1], {"pooled_output": pooled[i:i + 1]}]] for i in range(len(prompts) + 1)]
        self.positives, self.negative = self.conds[:-1], self.conds[-1]
        self.size, self.steps, self.cfg, self.seeds = size, steps, cfg, seeds

    # -- models ---------------------------------------------------------------------------------------------------
    def reference(self, path: str):
        """The checkpoint's diffusion model as ComfyUI loads it unquantized (fp32 compute on the CPU)."""
        with safe_open(path, "pt") as f:
            sd = {k[len(PREFIX):]: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}
        return self.sd.load_diffusion_model_state_dict(sd)

    def fp8(self, path: str, fmt: str, **calibrate):
        """The pack's loader in format ``fmt``, calibrated on the fixture's prompts and settings (``calibrate``: extra
        keyword arguments of ``calibration.calibrate``)."""
        model = self.adapter.checkpoints.load_sd35_fp8(path, fmt)[0]
        return self.adapter.calibration.calibrate(model, self.positives, self.negative, self.steps, self.cfg, "euler",
                                                  "sgm_uniform", self.size, self.size, 0, **calibrate)

    def channel_amax(self, path: str) -> dict:
        """Each FP8 layer's per-input-channel range on ``path``'s model over the fixture's sampling runs."""
        import sd35fp8
        model = self.adapter.checkpoints.load_sd35_fp8(path)[0]
        session = sd35fp8.CalibrationSession("max")
        cal = self.adapter.calibration.calibrating_clone(model, session)
        self.latents(cal)
        return {k: v.cpu() for k, v in session.channel_amax().items()}

    def planted(self, dst: str, factor: float, channel_amax: dict, **kw) -> str:
        """The base checkpoint with outlier channels planted ``factor`` times its layers' median channel ranges."""
        import massive_fixture
        with safe_open(self.base, "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}
            md = f.metadata() or {}
        save_file(massive_fixture.plant(sd, channel_amax, factor, **kw), dst, metadata=md)
        return dst

    # -- sampling -------------------------------------------------------------------------------------------------
    def latents(self, patcher) -> torch.Tensor:
        """Final latents of every prompt x seed (ComfyUI's sampler, euler / sgm_uniform), stacked."""
        out = []
        for positive in self.positives:
            for seed in self.seeds:
                latent = torch.zeros(1, 16, self.size // 8, self.size // 8)
                noise = self.sample_mod.prepare_noise(latent, seed)
                out.append(self.sample_mod.sample(patcher, noise, self.steps, self.cfg, "euler", "sgm_uniform",
                                                  positive, self.negative, latent, disable_pbar=True, seed=seed))
        return torch.cat(out).float()


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error of final latents; inf for non-finite ones."""
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return float((x - ref).norm() / ref.norm())
