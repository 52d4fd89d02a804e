"""The generation service's requests and answers, apart from any server: field checks with errors that name the
field, AUTOMATIC1111's txt2img fields mapped onto ComfyUI's sampler and scheduler names, and A1111's answer shape
(``info`` with the seeds actually used, the infotext). Pure Python: nodes/routes.py serves it inside ComfyUI.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

SEED_MAX = 2**64 - 1

# A1111 sampler name -> ComfyUI sampler (the names of A1111 1.x; the old "<name> Karras" ones also pick a scheduler)
A1111_SAMPLERS = {
    "Euler": "euler", "Euler a": "euler_ancestral", "Heun": "heun", "DPM2": "dpm_2", "DPM2 a": "dpm_2_ancestral",
    "LMS": "lms", "DPM fast": "dpm_fast", "DPM adaptive": "dpm_adaptive", "DPM++ 2S a": "dpmpp_2s_ancestral",
    "DPM++ SDE": "dpmpp_sde", "DPM++ 2M": "dpmpp_2m", "DPM++ 2M SDE": "dpmpp_2m_sde",
    "DPM++ 2M SDE Heun": "dpmpp_2m_sde_heun", "DPM++ 3M SDE": "dpmpp_3m_sde", "UniPC": "uni_pc", "LCM": "lcm",
    "DDIM": "ddim", "DDPM": "ddpm", "Restart": "restart",
}
A1111_ALIASES = {"Euler": ["k_euler"], "Euler a": ["k_euler_a", "k_euler_ancestral"], "Heun": ["k_heun"],
                 "DPM2": ["k_dpm_2"], "DPM2 a": ["k_dpm_2_a"], "LMS": ["k_lms"], "DPM fast": ["k_dpm_fast"],
                 "DPM adaptive": ["k_dpm_ad"], "DPM++ 2S a": ["k_dpmpp_2s_a"], "DPM++ SDE": ["k_dpmpp_sde"],
                 "DPM++ 2M": ["k_dpmpp_2m"], "DPM++ 2M SDE": ["k_dpmpp_2m_sde"], "DPM++ 3M SDE": ["k_dpmpp_3m_sde"]}
# A1111 schedule type (label or name) -> ComfyUI scheduler; "Automatic" keeps the configured workflow's
A1111_SCHEDULERS = {"Uniform": "normal", "Karras": "karras", "Exponential": "exponential", "SGM Uniform": "sgm_uniform",
                    "KL Optimal": "kl_optimal", "Simple": "simple", "Normal": "normal", "DDIM": "ddim_uniform",
                    "Beta": "beta", "Linear Quadratic": "linear_quadratic"}
A1111_SCHEDULER_NAMES = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
                         "sgm_uniform": "SGM Uniform", "kl_optimal": "KL Optimal", "simple": "Simple",
                         "normal": "Normal", "ddim": "DDIM", "beta": "Beta", "linear_quadratic": "Linear Quadratic"}
# A1111 request fields whose non-default value changes the image in ways this server does not do: refused, named
A1111_UNSUPPORTED = {"enable_hr": (False, None), "restore_faces": (False, None), "tiling": (False, None),
                     "script_name": (None, ""), "init_images": (None, [])}
A1111_IGNORED = ("styles", "override_settings", "override_settings_restore_afterwards", "subseed",
                 "seed_resize_from_h", "seed_resize_from_w", "eta", "s_churn", "s_tmax", "s_tmin", "s_noise",
                 "do_not_save_samples", "do_not_save_grid", "send_images", "save_images", "sampler_index",
                 "denoising_strength", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                 "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
                 "hr_scheduler", "hr_prompt", "hr_negative_prompt", "script_args", "alwayson_scripts", "comments",
                 "disable_extra_networks", "firstpass_image", "force_task_id", "infotext", "refiner_checkpoint",
                 "refiner_switch_at", "s_min_uncond", "subseed_strength", "batch_count")


class FieldError(ValueError):
    """A request field that cannot be served: answered 422 with the field's name."""

    def __init__(self, field: str, message: str, kind: str = "value_error"):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.kind = field, message, kind


@dataclass(frozen=True)
class Limits:
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16
    max_prompt_chars: int = 4000
    max_timeout: float = 3600.0


@dataclass(frozen=True)
class Defaults:
    """What a request leaves out: the configured workflow's own values."""
    negative: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 28
    cfg: float = 4.5
    sampler_name: str = "euler"
    scheduler: str = "sgm_uniform"


def _int(body: dict, field: str, lo: int, hi: int, default=None) -> int:
    v = default if body.get(field) is None else body[field]
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise FieldError(field, f"must be a whole number, got {v!r}", "type_error.integer")
    if not lo <= v <= hi:
        raise FieldError(field, f"must be in {lo}..{hi}, got {v}", "value_error.number.not_in_range")
    return v


def _float(body: dict, field: str, lo: float, hi: float, default=None) -> float:
    v = default if body.get(field) is None else body[field]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FieldError(field, f"must be a finite number, got {v!r}", "type_error.float")
    if not lo <= v <= hi:
        raise FieldError(field, f"must be in {lo}..{hi}, got {v}", "value_error.number.not_in_range")
    return float(v)


def _str(body: dict, field: str, limit: int, default: str | None = None, required: bool = False) -> str:
    v = body.get(field, default)
    if v is None and not required:
        v = ""
    if not isinstance(v, str):
        raise FieldError(field, f"must be a string, got {type(v).__name__}", "type_error.str")
    if required and not v.strip():
        raise FieldError(field, "must not be empty", "value_error.missing")
    if len(v) > limit:
        raise FieldError(field, f"is {len(v)} characters; the limit is {limit}", "value_error.any_str.max_length")
    if "\x00" in v:
        raise FieldError(field, "must not contain NUL characters")
    return v


def _size(body: dict, field: str, hi: int, default: int) -> int:
    v = _int(body, field, 64, hi, default)
    if v % 16:
        raise FieldError(field, f"must be a multiple of 16 (SD3.5's latent patches), got {v}; "
                                f"try {max(64, v // 16 * 16)}")
    return v


def random_seed() -> int:
    return random.SystemRandom().randrange(0, 2**32)


def check_choice(field: str, value, choices) -> str:
    if not isinstance(value, str) or value not in choices:
        shown = ", ".join(list(choices)[:30])
        raise FieldError(field, f"{value!r} is not one of this server's: {shown}")
    return value


def simple_items(body, limits: Limits, d: Defaults, samplers, schedulers, allow: tuple = ()) -> tuple[list, dict]:
    """The simple routes' JSON body (``/v1/txt2img``, ``/v1/jobs``) -> (one item per image, the job's extras).
    Unknown fields are refused, so a misspelt one is not silently ignored."""
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object", "type_error.dict")
    known = {"prompt", "negative", "width", "height", "steps", "cfg", "seed", "sampler", "scheduler", *allow}
    for k in body:
        if k not in known:
            raise FieldError(k, f"unknown field; the fields are {', '.join(sorted(known))}", "value_error.extra")
    base = body.get("seed")
    base = random_seed() if base is None or base == -1 else _int(body, "seed", 0, SEED_MAX)
    count = _int(body, "count", 1, limits.max_images, 1) if "count" in allow else 1
    item = {"prompt": _str(body, "prompt", limits.max_prompt_chars, required=True),
            "negative": _str(body, "negative", limits.max_prompt_chars, d.negative),
            "width": _size(body, "width", limits.max_width, d.width),
            "height": _size(body, "height", limits.max_height, d.height),
            "steps": _int(body, "steps", 1, limits.max_steps, d.steps),
            "cfg": _float(body, "cfg", 0.0, 30.0, d.cfg),
            "sampler_name": check_choice("sampler", body.get("sampler", d.sampler_name), samplers),
            "scheduler": check_choice("scheduler", body.get("scheduler", d.scheduler), schedulers), "count": 1}
    check_combination(item)
    extras = {}
    if "webhook" in allow and body.get("webhook") is not None:
        extras["webhook"] = check_url("webhook", body["webhook"])
    if "timeout" in allow and body.get("timeout") is not None:
        extras["timeout"] = _float(body, "timeout", 1.0, limits.max_timeout)
    return [dict(item, seed=(base + i) % (SEED_MAX + 1)) for i in range(count)], extras


def check_combination(it: dict, steps_field: str = "steps") -> None:
    """Settings ComfyUI accepts one by one but cannot sample together."""
    if it["scheduler"] == "kl_optimal" and it["steps"] < 2:  # its sigmas divide by steps - 1: NaN at one step
        raise FieldError(steps_field, "the kl_optimal scheduler needs at least 2 steps")


def check_url(field: str, v) -> str:
    if not isinstance(v, str) or len(v) > 2000:
        raise FieldError(field, "must be an http(s) URL string", "type_error.str")
    try:
        u = urlsplit(v)
        ok = u.scheme in ("http", "https") and bool(u.hostname) and (u.port is None or u.port > 0)
    except ValueError:
        ok = False
    if not ok:
        raise FieldError(field, f"must be an http:// or https:// URL, got {v!r}")
    return v


def a1111_sampler(name, samplers, default: str) -> tuple[str, str | None]:
    """A1111's sampler_name (or ComfyUI's own name) -> (ComfyUI sampler, scheduler implied by an old "... Karras"
    name or None)."""
    if name is None or name == "":
        return default, None
    if not isinstance(name, str):
        raise FieldError("sampler_name", f"must be a string, got {type(name).__name__}", "type_error.str")
    implied = None
    for suffix, sched in ((" Karras", "karras"), (" Exponential", "exponential")):
        if name.endswith(suffix) and name[:-len(suffix)] in A1111_SAMPLERS:
            name, implied = name[:-len(suffix)], sched
    alias = {a: n for n, al in A1111_ALIASES.items() for a in al}
    comfy = A1111_SAMPLERS.get(alias.get(name, name), name)
    if comfy not in samplers:
        offered = [n for n, c in A1111_SAMPLERS.items() if c in samplers]
        raise FieldError("sampler_name", f"{name!r} is not a sampler of this server; use one of {', '.join(offered)}")
    return comfy, implied


def a1111_scheduler(name, schedulers, default: str) -> str:
    if name is None or name == "" or (isinstance(name, str) and name.lower() == "automatic"):
        return default
    if not isinstance(name, str):
        raise FieldError("scheduler", f"must be a string, got {type(name).__name__}", "type_error.str")
    comfy = A1111_SCHEDULERS.get(name, name.lower() if name.lower() in schedulers else name)
    if comfy == "uniform":
        comfy = "normal"
    if comfy not in schedulers:
        raise FieldError("scheduler", f"{name!r} is not a scheduler of this server; use Automatic or one of "
                                      f"{', '.join(A1111_SCHEDULER_NAMES.get(s, s) for s in schedulers)}")
    return comfy


def a1111_items(body, limits: Limits, d: Defaults, samplers, schedulers) -> tuple[list, dict]:
    """A1111's txt2img request -> (one item per image: batch_size x n_iter, seeds seed, seed+1, ...; the
    ``parameters`` A1111 answers with). Fields that do not apply are accepted and ignored; ones whose set value
    would change the image in a way this server does not do are refused, named."""
    if not isinstance(body, dict):
        raise FieldError("body", "must be a JSON object", "type_error.dict")
    for f, (off, alt) in A1111_UNSUPPORTED.items():
        v = body.get(f)
        if v not in (off, alt) and v is not None and v is not False:
            raise FieldError(f, f"is not supported by this server (SD3.5 FP8 txt2img); send {off!r} or leave it out")
    if body.get("subseed_strength") not in (None, 0, 0.0):
        raise FieldError("subseed_strength", "variation seeds are not supported by this server; send 0")
    batch = _int(body, "batch_size", 1, limits.max_images, 1)
    n_iter = _int(body, "n_iter", 1, limits.max_images, 1)
    if batch * n_iter > limits.max_images:
        raise FieldError("n_iter", f"batch_size x n_iter = {batch * n_iter} images; this server's limit per request "
                                   f"is {limits.max_images}")
    seed = body.get("seed", -1)
    seed = random_seed() if seed is None or seed == -1 else _int(body, "seed", 0, SEED_MAX)
    sampler, implied = a1111_sampler(body.get("sampler_name") or body.get("sampler_index"), samplers, d.sampler_name)
    scheduler = a1111_scheduler(body.get("scheduler"), schedulers, implied or d.scheduler)
    item = {"prompt": _str(body, "prompt", limits.max_prompt_chars, ""),
            "negative": _str(body, "negative_prompt", limits.max_prompt_chars, d.negative),
            "width": _size(body, "width", limits.max_width, 512),
            "height": _size(body, "height", limits.max_height, 512),
            "steps": _int(body, "steps", 1, limits.max_steps, d.steps),
            "cfg": _float(body, "cfg_scale", 0.0, 30.0, 7.0), "sampler_name": sampler, "scheduler": scheduler,
            "count": 1}
    check_combination(item)
    items = [dict(item, seed=(seed + i) % (SEED_MAX + 1)) for i in range(batch * n_iter)]
    params = dict(body)
    params.update(prompt=item["prompt"], negative_prompt=item["negative"], seed=seed, width=item["width"],
                  height=item["height"], steps=item["steps"], cfg_scale=item["cfg"], batch_size=batch, n_iter=n_iter,
                  sampler_name=body.get("sampler_name") or body.get("sampler_index") or sampler,
                  scheduler=body.get("scheduler") or "Automatic")
    return items, params


def a1111_sampler_label(comfy: str) -> str:
    return next((n for n, c in A1111_SAMPLERS.items() if c == comfy), comfy)


def infotext(it: dict, model: str, version: str) -> str:
    """A1111's "parameters" text of one image."""
    neg = f"\nNegative prompt: {it['negative']}" if it["negative"] else ""
    sched = A1111_SCHEDULER_NAMES.get(it["scheduler"], it["scheduler"])
    return (f"{it['prompt']}{neg}\nSteps: {it['steps']}, Sampler: {a1111_sampler_label(it['sampler_name'])}, "
            f"Schedule type: {sched}, CFG scale: {it['cfg']:g}, Seed: {it['seed']}, "
            f"Size: {it['width']}x{it['height']}, Model: {model}, Version: {version}")


def a1111_info(items: list[dict], params: dict, model: str, version: str, started: float) -> dict:
    """A1111's ``info`` (sent as a JSON string): the seeds actually used, one per image."""
    first = items[0]
    return {"prompt": first["prompt"], "all_prompts": [i["prompt"] for i in items],
            "negative_prompt": first["negative"], "all_negative_prompts": [i["negative"] for i in items],
            "seed": first["seed"], "all_seeds": [i["seed"] for i in items], "subseed": first["seed"],
            "all_subseeds": [i["seed"] for i in items], "subseed_strength": 0, "width": first["width"],
            "height": first["height"], "sampler_name": a1111_sampler_label(first["sampler_name"]),
            "cfg_scale": first["cfg"], "steps": first["steps"], "batch_size": params["batch_size"],
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": model, "sd_model_hash": None,
            "sd_vae_name": None, "sd_vae_hash": None, "seed_resize_from_w": -1, "seed_resize_from_h": -1,
            "denoising_strength": None,
            "extra_generation_params": {"Schedule type": A1111_SCHEDULER_NAMES.get(first["scheduler"],
                                                                                   first["scheduler"])},
            "index_of_first_image": 0, "infotexts": [infotext(i, model, version) for i in items], "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)), "clip_skip": 1,
            "is_using_inpainting_conditioning": False, "version": version}


def a1111_validation_error(e: FieldError) -> dict:
    """FastAPI's 422 body, as A1111 answers a bad field."""
    return {"detail": [{"loc": ["body", e.field], "msg": e.message, "type": e.kind}]}


def a1111_error(kind: str, message: str) -> dict:
    """A1111's body for other errors (its API's exception handler)."""
    return {"error": kind, "detail": "", "body": "", "errors": message}
