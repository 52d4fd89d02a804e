"""Calibration: sample the user's prompts with ComfyUI's own sampler and record every FP8 layer's input range."""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import tempfile
import time

import torch
from safetensors import safe_open

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from sd35fp8 import (CalibrationSession, QuantPolicy, bf16_bytes, calibrated_amax, describe_outliers, fp8_autocast,
                     fp8_layers, outlier_channels, report, weight_bytes)
from sd35fp8.core.centering import GAIN, choose_centers, describe_centers, weight_correction
from sd35fp8.core.quant import dequantize_weight
from sd35fp8.runtime.static import clear_static
from sd35fp8.runtime.te import set_te

from . import metrics
from . import state as st
from .sampling import (AUTOCAST_KEY, apply_runtime_options, check_finite, hp_source, require_fp8_model,
                       set_autocast)

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
        raise ValueError(f"{n} calibration prompts would sample {n} times over; the scales settle after a few dozen "
                         f"(8 by default). Give at most {MAX_PROMPTS}")


def calibrate(model, positives: list, negative, steps: int, cfg: float, sampler_name: str, scheduler: str,
              width: int, height: int, seed: int, method: str = "max", percentile: float = 99.99,
              progress=None, encode=None, center: bool = True):
    """Sample every positive conditioning with ComfyUI's own sampler (all steps; cond and uncond
    batched as ComfyUI does), observe every FP8 layer's input, and return ``(calibrated MODEL clone,
    report)``. The input MODEL is left uncalibrated. With ``encode``, ``positives`` are prompts, each encoded just
    before it is sampled (nothing held for the whole list); ``progress(done, total)`` counts an encoding as one
    step, from the first. ``center``: quantize input channels far off zero around their calibrated center
    (massive activations: sd35fp8.core.centering; False only to measure without it)."""
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
              "date": datetime.date.today().isoformat(), "seconds": round(secs, 2),
              # massive activations: the layers with input channels far above the rest (kept with the calibration)
              "outliers": [[n, round(med, 6), [[c, round(t, 1)] for c, t in chs]]
                           for n, med, chs in outlier_channels(session.channel_amax())[:32]]}
    if center:  # the layers whose centered input's range is at least 2x smaller than the method's amax
        record["centers"] = {n: e for n, e in choose_centers(session.channel_ranges()).items()
                             if e["amax"] * GAIN <= amax.get(n, 0.0)}
    passes = "cond+uncond" if cfg != 1.0 else "cond only: ComfyUI skips uncond at cfg 1"
    how = (f"calibrated with method={method}" + (f" ({percentile}th percentile)" if method == "percentile" else "")
           + f" over {len(positives)} prompt(s) x {steps} steps ({sampler_name}/{scheduler}, cfg {cfg}, "
             f"{width}x{height}, {passes}) in {secs:.1f} s")
    out, text = calibrated(model, amax, record, how)
    log.info("sd35fp8: calibration done\n%s", text)
    return out, text


def calibrated(model, amax: dict, record: dict, how: str):
    """``(a clone of model with these calibrated scales, its report)``; ``how``: the report's first line."""
    dm = require_fp8_model(model)
    corrections, note = weight_corrections(model, record.get("centers"))
    out = set_autocast(model, True, None, input_amax=amax, calibration=record, corrections=corrections)
    s = st.get(out)
    text = report(QuantPolicy.from_dict(s.policy), amax, bytes_before=bf16_bytes(dm), bytes_after=weight_bytes(dm, 2),
                  extra=[f"{s.variant}: {how}"])
    if "outliers" in record:  # calibrations recorded before 0.3 have no channel statistics
        text += "\n" + describe_outliers(record["outliers"], len(amax))
    if "centers" in record:
        text += "\n" + describe_centers(record["centers"], len(amax)) + note
    return out, text


def weight_corrections(model, centers) -> tuple[dict | None, str]:
    """``({layer: bias correction}, note)`` for the centered layers (sd35fp8.core.centering.weight_correction): their
    centered channels' weight columns read again from the high-precision file the model was quantized from. None
    where there is nothing to correct or no such file (an FP8 file: its stored biases already carry what the pack
    saved); the note says why for a report."""
    if not centers:
        return None, ""
    dm = require_fp8_model(model)
    hp = hp_source(dm)
    if hp is None:
        return None, "; weights from an FP8 file: its biases are used as stored"
    if model.patches:
        return None, ("; the MODEL carries weight patches (a LoRA): the centered channels' weight rounding is not "
                      "corrected")
    path, prefix = hp
    layers = fp8_layers(dm)
    out = {}
    with safe_open(path, "pt", device="cpu") as f:
        for name, e in centers.items():
            layer = layers.get(name)
            if layer is None:
                continue
            idx = torch.tensor([int(c) for c in e["channels"]], dtype=torch.long)
            hp_cols = f.get_tensor(f"{prefix}{name}.weight").float().index_select(1, idx)
            q_cols = dequantize_weight(layer.weight.index_select(1, idx.to(layer.weight.device)), layer.weight_scale,
                                       torch.float32).cpu()
            out[name] = weight_correction(hp_cols, q_cols, torch.tensor([float(v) for v in e["centers"]]))
    return out, (f"; the weight rounding at the centers corrected in {len(out)} layer biases (from "
                 f"{os.path.basename(path)})")


# -- the calibration cache ------------------------------------------------------------------------------------------
# bump when what calibration measures changes: entries of other versions are not used (2: input centers)
CACHE_VERSION = 2


def clip_fingerprint(clip) -> str:
    """A cheap fingerprint of a CLIP's weights: every tensor's name and shape, and the first 4 KiB of up to 32 of
    them spread over the model (another text encoder, or other weights, give another fingerprint)."""
    h = hashlib.sha256()
    sd = clip.get_sd()
    names = sorted(sd)
    for n in names:
        h.update(f"{n}:{tuple(sd[n].shape)}:{sd[n].dtype};".encode())
    for n in names[::max(1, len(names) // 32)]:
        t = sd[n].detach().reshape(-1)[:1024].to("cpu").contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def cache_key(model, conditioning_id: str, settings: dict) -> tuple[str | None, str]:
    """``(key, "")`` for a MODEL whose calibration can be reused: its weights' file (content fingerprint, weight
    format), the conditioning (text encoder and prompts: ``conditioning_id``) and the settings. ``(None, why)`` for one
    whose activations depend on more than that (LoRA or other weight patches, model patches)."""
    s = st.get(model)
    if s is None or not s.source:
        return None, "the MODEL's weights do not come from a file"
    to = model.model_options.get("transformer_options", {})
    if model.patches or to.get("patches") or to.get("patches_replace") \
            or set(getattr(model, "object_patches", {})) - {"model_sampling"}:
        return None, "the MODEL carries patches (a LoRA or a model patch): its calibration is not cached"
    # the noise schedule (ModelSamplingSD3's shift) sets which activations calibration sees
    ms = model.get_model_object("model_sampling")
    sampling = [type(ms).__name__] + [float(getattr(ms, a)) for a in ("shift", "multiplier") if hasattr(ms, a)]
    source = {k: v for k, v in s.source.items() if k != "file"}  # the content, not the file's name
    payload = {"version": CACHE_VERSION, "source": source, "conditioning": conditioning_id,
               "settings": settings, "sampling": sampling}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40], ""


class CalibrationCache:
    """Calibrations by :func:`cache_key`: in memory and as one JSON file each in ``folder`` (ComfyUI's user
    directory by default), so switching models, another graph with the same settings or a restart reuses them."""

    def __init__(self, folder: str | None):
        self.folder = folder
        self.memory: dict[str, dict] = {}

    def _path(self, key: str) -> str:
        return os.path.join(self.folder, f"{key}.json")

    def get(self, key: str, layers) -> tuple[dict, dict, str] | None:
        """``(amax, calibration record, where it came from)``, or None. An entry that does not cover exactly these
        FP8 layers with finite values, or of another version, is not used."""
        entry, where = self.memory.get(key), "memory"
        if entry is None and self.folder:
            where = self._path(key)
            try:
                with open(where, encoding="utf-8") as f:
                    entry = json.load(f)
            except (OSError, ValueError):
                return None
        if not isinstance(entry, dict) or entry.get("version") != CACHE_VERSION or entry.get("key") != key:
            return None
        amax, record = entry.get("amax"), entry.get("calibration")
        if not isinstance(amax, dict) or set(amax) != set(layers) or not isinstance(record, dict) or not all(
                isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in amax.values()):
            return None
        self.memory[key] = entry
        return {k: float(v) for k, v in amax.items()}, record, where

    def put(self, key: str, amax, record, source: str = "") -> str | None:
        """Keep a calibration; returns the file written (None: memory only; a failed write only logs)."""
        entry = {"version": CACHE_VERSION, "key": key, "file": source, "amax": {k: float(v) for k, v in amax.items()},
                 "calibration": dict(record)}
        self.memory[key] = entry
        if not self.folder:
            return None
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.folder)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f)
            os.replace(tmp, self._path(key))
            return self._path(key)
        except OSError as e:
            log.warning("sd35fp8: could not keep the calibration in %s (%s); it is kept in memory only", self.folder, e)
            return None


_cache: CalibrationCache | None = None


def default_cache() -> CalibrationCache:
    """The server's cache: ``<ComfyUI user directory>/sd35fp8/calibrations``."""
    global _cache
    if _cache is None:
        import folder_paths
        _cache = CalibrationCache(os.path.join(folder_paths.get_user_directory(), "sd35fp8", "calibrations"))
    return _cache


def calibrate_cached(model, prompts: list, negative, steps: int, cfg: float, sampler_name: str, scheduler: str,
                     width: int, height: int, seed: int, method: str = "max", percentile: float = 99.99,
                     progress=None, encode=None, conditioning_id: str = "", cache: CalibrationCache | None = None):
    """:func:`calibrate`, reusing an earlier calibration of the same weights with the same conditioning and settings
    (``cache``, default :func:`default_cache`); the report says whether and from where it was reused."""
    cache = cache or default_cache()
    dm = require_fp8_model(model)
    settings = {"prompts": list(prompts) if encode is not None else len(prompts), "steps": steps, "cfg": cfg,
                "sampler": sampler_name, "scheduler": scheduler, "width": width, "height": height, "seed": seed,
                "method": method, "percentile": percentile if method == "percentile" else None}
    key, why = cache_key(model, conditioning_id, settings)
    hit = cache.get(key, fp8_layers(dm)) if key else None
    if hit is not None:
        amax, record, where = hit
        out, text = calibrated(model, amax, record, (
            f"calibration reused from {where} (calibrated {record.get('date', '?')} with method "
            f"{record.get('method')} over {record.get('prompts')} prompt(s) x {record.get('steps')} steps): "
            "no sampling"))
        log.info("sd35fp8: %s", text.splitlines()[0])
        metrics.count_calibration(reused=True)
        return out, text + f"\ncalibration id {key[:16]}"
    t0 = time.perf_counter()
    out, text = calibrate(model, prompts, negative, steps, cfg, sampler_name, scheduler, width, height, seed, method,
                          percentile, progress=progress, encode=encode)
    metrics.count_calibration(reused=False, seconds=time.perf_counter() - t0)
    if key:
        s = st.get(out)
        where = cache.put(key, s.input_amax, s.calibration, (s.source or {}).get("file", ""))
        text += f"\ncalibration kept for reuse ({where or 'in memory'})\ncalibration id {key[:16]}"
    else:
        text += f"\ncalibration not kept for reuse: {why}"
    return out, text
