"""Calibration: sample the user's prompts with ComfyUI's own sampler and record every FP8 layer's input range."""
from __future__ import annotations

import datetime
import logging
import time

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from sd35fp8 import CalibrationSession, QuantPolicy, bf16_bytes, calibrated_amax, fp8_autocast, report, weight_bytes
from sd35fp8.runtime.static import clear_static
from sd35fp8.runtime.te import set_te

from . import state as st
from .sampling import AUTOCAST_KEY, apply_runtime_options, check_finite, require_fp8_model, set_autocast

log = logging.getLogger("sd35fp8")
CALIBRATE_KEY = "sd35fp8_calibrate"


def calibrating_clone(model, session: CalibrationSession):
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY)
    apply_runtime_options(m, None)  # observers need the eager autocast path: no compile

    def wrapper(executor, *args, **kwargs):
        clear_static(executor.class_obj.model_patcher.model.diffusion_model)
        set_te(executor.class_obj.model_patcher.model.diffusion_model, None)
        with fp8_autocast(enabled=False, calibrating=session):
            out = executor(*args, **kwargs)
        check_finite(out, "calibration sampling")
        return out

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CALIBRATE_KEY, wrapper)
    return m


MAX_PROMPTS = 1000  # calibration saturates after a few dozen prompts; thousands would sample for hours


def check_prompt_count(n: int) -> None:
    if n == 0:
        raise ValueError("the calibration prompt list is empty: give at least one prompt (one per line)")
    if n > MAX_PROMPTS:
        raise ValueError(f"SD35FP8Calibrate: {n} calibration prompts would sample {n} times over; the scales settle "
                         f"after a few dozen (8 by default). Give at most {MAX_PROMPTS}")


def calibrate(model, positives: list, negative, steps: int, cfg: float, sampler_name: str, scheduler: str,
              width: int, height: int, seed: int, method: str = "max", percentile: float = 99.99,
              progress=None, encode=None):
    """Sample every positive conditioning with ComfyUI's own sampler (all steps; cond and uncond
    batched as ComfyUI does), observe every FP8 layer's input, and return ``(calibrated MODEL clone,
    report)``. The input MODEL is left uncalibrated. With ``encode``, ``positives`` are prompts, each encoded just
    before it is sampled (nothing held for the whole list); ``progress(done, total)`` counts an encoding as one
    step, from the first."""
    dm = require_fp8_model(model)
    check_prompt_count(len(positives))
    session = CalibrationSession(method, percentile)
    cal = calibrating_clone(model, session)
    per = steps + (1 if encode is not None else 0)
    total = len(positives) * per
    t0 = time.perf_counter()
    if progress is not None:
        progress(0, total)
    for i, positive in enumerate(positives):
        if encode is not None:
            positive = encode(positive)
            if progress is not None:
                progress(i * per + 1, total)
        latent = torch.zeros([1, 16, height // 8, width // 8], device="cpu")
        latent = comfy.sample.fix_empty_latent_channels(cal, latent)
        seed_i = (seed + i) % 2**64  # the widget allows seeds up to 2^64 - 1: the next prompt's wraps around
        noise = comfy.sample.prepare_noise(latent, seed_i)

        def cb(step, x0, x, n, i=i):
            if progress is not None:
                progress(i * per + (per - steps) + step + 1, total)

        comfy.sample.sample(cal, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                            callback=cb, disable_pbar=True, seed=seed_i)
        del positive
        comfy.model_management.throw_exception_if_processing_interrupted()
    amax = calibrated_amax(session, dm)
    secs = time.perf_counter() - t0
    record = {"method": method, "percentile": percentile if method == "percentile" else None,
              "prompts": len(positives), "steps": steps, "cfg": cfg, "sampler": sampler_name,
              "scheduler": scheduler, "width": width, "height": height, "seed": seed,
              "date": datetime.date.today().isoformat(), "seconds": round(secs, 2)}
    out = set_autocast(model, True, None, input_amax=amax, calibration=record)
    s = st.get(out)
    passes = "cond+uncond" if cfg != 1.0 else "cond only: ComfyUI skips uncond at cfg 1"
    text = report(QuantPolicy.from_dict(s.policy), amax, bytes_before=bf16_bytes(dm),
                  bytes_after=weight_bytes(dm, 2), extra=[
        f"{s.variant}: calibrated with method={method}"
        + (f" ({percentile}th percentile)" if method == "percentile" else "")
        + f" over {len(positives)} prompt(s) x {steps} steps ({sampler_name}/{scheduler}, cfg {cfg}, "
          f"{width}x{height}, {passes}) in {secs:.1f} s"])
    log.info("sd35fp8: calibration done\n%s", text)
    return out, text
