"""The generation service's configuration: a JSON file (``SD35FP8_API_CONFIG``) and ``SD35FP8_API_<KEY>``
environment variables over the defaults below; the workflow it runs, with the model files and calibration settings
the configuration names. Pure Python; errors name the file or variable and the key.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields

from . import graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = {"large": "sd35_large_fp8", "large_turbo": "sd35_large_turbo_fp8", "medium": "sd35_medium_fp8"}
# the UI twins' file names: ComfyUI's template browser shows a pack's template by its file name (title and
# description), so the name says what the workflow does
TEMPLATES = {"large": "SD3.5 Large FP8 (28 steps, 1024px, batch of 4)",
             "large_turbo": "SD3.5 Large Turbo FP8 (4 steps, 1024px, batch of 4)",
             "medium": "SD3.5 Medium FP8 (40 steps, 1024px, batch of 4)",
             "compare": "SD3.5 Large - stock BF16 vs FP8, one seed (A-B compare)"}
# bundled workflows that are tools, not production graphs (not offered to the batch client and the service)
TOOLS = {"compare": "sd35_large_compare"}


def bundled_ui_path(name: str) -> str:
    """The UI-format twin of bundled workflow ``name`` (large, large_turbo, medium)."""
    return os.path.join(REPO, "workflows", TEMPLATES[name] + ".json")
ENV_PREFIX = "SD35FP8_API_"


class ConfigError(ValueError):
    pass


@dataclass
class Config:
    enabled: bool = True           # SD35FP8_API_ENABLED=0 registers no route
    workflow: str = "large"        # large | large_turbo | medium | path of an API-format workflow
    ui_workflow: str = ""          # its UI-format twin (same node ids), embedded in the PNGs; bundled: automatic
    ckpt_name: str = ""            # the checkpoint loader's file (default: the workflow's)
    text_encoders: str = ""        # comma-separated: TripleCLIPLoader's three files, or CLIPLoader's one
    weight_format: str = ""        # SD35FP8CheckpointLoader's weight_scaling
    calibration: dict = field(default_factory=dict)   # SD35FP8Calibrate inputs, e.g. {"steps": 20}
    overrides: dict = field(default_factory=dict)     # {"<node id or class_type>": {"<input>": value}}
    token: str = ""                # bearer token for the pack's routes ("" = open)
    protect_metrics: bool = True   # /metrics needs the token too (health routes never do)
    warmup: bool = False           # render one image at start, so readiness means loaded and calibrated
    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 150
    max_images: int = 16           # images per request
    max_prompt_chars: int = 4000
    max_queue: int = 64            # images waiting: readiness says no at this depth, new requests get 429
    request_timeout: float = 600.0  # a synchronous request's limit, seconds (jobs: their own "timeout" or none)
    max_per_call: int = 0          # images of compatible requests per sampler call; 0 = 4 on CUDA, 1 on CPU
    batch_window: float = 0.05     # seconds a lone request waits for compatible ones
    inflight: int = 2              # the service's prompts in ComfyUI's queue at a time (graph-editor users interleave)
    job_ttl: float = 3600.0        # finished jobs are kept this long (seconds)
    max_jobs_kept: int = 1000
    webhook_retries: int = 3
    webhook_backoff: float = 1.0   # seconds, doubled per retry
    webhook_timeout: float = 10.0
    output_prefix: str = "sd35fp8-api"  # images are saved under ComfyUI's output/<prefix>/
    queue: str = ""                # redis://...: a gateway: jobs go to the cluster's workers (docs/scale-out.md)
    retries: int = 2               # with queue: deliveries of a failing job beyond the first, then dead-lettered
    source: str = "defaults"

    def limits(self):
        from .api import Limits
        return Limits(self.max_width, self.max_height, self.max_steps, self.max_images, self.max_prompt_chars,
                      max(self.request_timeout, 3600.0))


def _coerce(name: str, default, value, where: str):
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).strip().lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).strip().lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if kind is dict:
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if kind is int and (isinstance(value, bool) or isinstance(value, float) and not value.is_integer()):
            raise ValueError
        out = kind(value)
        if kind in (int, float) and out < 0:
            raise ValueError
        return out
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name} must be {'a JSON object' if kind is dict else kind.__name__}"
                          f"{' >= 0' if kind in (int, float) else ''}, got {value!r}") from None


def load(env=None) -> Config:
    """Defaults, then the JSON file named by SD35FP8_API_CONFIG, then SD35FP8_API_<KEY> variables."""
    env = os.environ if env is None else env
    cfg = Config()
    known = {f.name: f for f in fields(Config) if f.name != "source"}
    path = env.get("SD35FP8_API_CONFIG", "")
    sources = []
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path} (SD35FP8_API_CONFIG): cannot read it as JSON: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} (SD35FP8_API_CONFIG): must hold a JSON object of settings")
        for k, v in data.items():
            if k not in known:
                raise ConfigError(f"{path}: unknown setting {k!r}; the settings are {', '.join(sorted(known))}")
            setattr(cfg, k, _coerce(k, getattr(cfg, k), v, path))
        sources.append(path)
    for k in known:
        var = ENV_PREFIX + k.upper()
        if var in env:
            setattr(cfg, k, _coerce(k, getattr(cfg, k), env[var], var))
            sources.append(var)
    if cfg.max_width < 64 or cfg.max_height < 64 or cfg.max_steps < 1 or cfg.max_images < 1 or cfg.inflight < 1:
        raise ConfigError(f"{', '.join(sources) or 'defaults'}: max_width/max_height >= 64, max_steps, max_images "
                          "and inflight >= 1")
    cfg.source = ", ".join(sources) or "defaults"
    return cfg


def workflow_path(cfg: Config) -> str:
    if cfg.workflow in BUNDLED:
        return os.path.join(REPO, "workflows", "api", BUNDLED[cfg.workflow] + "_api.json")
    return cfg.workflow


def ui_workflow(cfg: Config) -> dict | None:
    """The UI-format workflow whose widgets the PNGs' metadata fills (ComfyUI opens a PNG dropped on the editor as
    that workflow): ``ui_workflow``, else the bundled twin of a bundled workflow, else none."""
    path = cfg.ui_workflow or (bundled_ui_path(cfg.workflow) if cfg.workflow in BUNDLED else "")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            ui = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"ui_workflow {path} ({cfg.source}): cannot read it: {e}") from None
    if not isinstance(ui, dict) or not isinstance(ui.get("nodes"), list):
        raise ConfigError(f"ui_workflow {path}: not a UI-format workflow (ComfyUI's Workflow -> Save)")
    return ui


def build_workflow(cfg: Config) -> dict:
    """The configured API workflow with the configuration's model files, weight format and calibration settings."""
    path = workflow_path(cfg)
    try:
        with open(path, encoding="utf-8") as f:
            wf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"workflow {path} ({cfg.source}): cannot read it: {e}") from None
    if not isinstance(wf, dict) or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise ConfigError(f"workflow {path}: not an API-format workflow (in ComfyUI: Workflow -> Export (API))")
    wf = graph.inline_settings(wf)

    def nodes(*classes):
        return [v for v in wf.values() if v["class_type"] in classes]
    if cfg.ckpt_name:
        for v in nodes("SD35FP8CheckpointLoader", "CheckpointLoaderSimple"):
            v["inputs"]["ckpt_name"] = cfg.ckpt_name
        for v in nodes("UNETLoader"):
            v["inputs"]["unet_name"] = cfg.ckpt_name
    if cfg.text_encoders:
        names = [n.strip() for n in cfg.text_encoders.split(",") if n.strip()]
        for v in nodes("TripleCLIPLoader", "DualCLIPLoader", "CLIPLoader"):
            slots = [k for k in ("clip_name", "clip_name1", "clip_name2", "clip_name3") if k in v["inputs"]]
            if len(slots) != len(names):
                raise ConfigError(f"text_encoders ({cfg.source}): {v['class_type']} takes {len(slots)} files, "
                                  f"{len(names)} given ({cfg.text_encoders!r})")
            v["inputs"].update(zip(slots, names))
    if cfg.weight_format:
        for v in nodes("SD35FP8CheckpointLoader"):
            v["inputs"]["weight_scaling"] = cfg.weight_format
    for v in nodes("SD35FP8Calibrate"):
        v["inputs"].update(cfg.calibration)
    for key, values in cfg.overrides.items():
        targets = [wf[key]] if key in wf else nodes(key)
        if not targets or not isinstance(values, dict):
            raise ConfigError(f"overrides ({cfg.source}): {key!r} is neither a node id nor a node type of {path}, or "
                              "its value is not an object of inputs")
        for v in targets:
            v["inputs"].update(values)
    return wf
