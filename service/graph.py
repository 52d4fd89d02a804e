"""ComfyUI API-format workflows as the pack's clients fill them: the nodes found by type and role (never by id), one
item's graph, several items in one sampler call, and what a finished prompt's history entry holds.

Pure Python (no ComfyUI, no torch): shared by the batch client (scripts/sd35_batch.py), which runs outside ComfyUI,
and by the generation service (nodes/routes.py), which runs inside it.
"""
from __future__ import annotations

import copy

SAMPLERS = ("KSampler", "KSamplerAdvanced")
LATENTS = ("EmptySD3LatentImage", "EmptyLatentImage")
TEXT_ENCODERS = ("CLIPTextEncode", "CLIPTextEncodeSD3")
TEXT_INPUTS = {"text", "clip_l", "clip_g", "t5xxl"}
# loader class -> its inputs that name model files (checked against the server's lists before queueing)
LOADERS = {"SD35FP8CheckpointLoader": ("ckpt_name",), "CheckpointLoaderSimple": ("ckpt_name",),
           "UNETLoader": ("unet_name",), "VAELoader": ("vae_name",), "CLIPLoader": ("clip_name",),
           "DualCLIPLoader": ("clip_name1", "clip_name2"),
           "TripleCLIPLoader": ("clip_name1", "clip_name2", "clip_name3"), "LoraLoader": ("lora_name",),
           "LoraLoaderModelOnly": ("lora_name",)}


class InputError(ValueError):
    """Bad input (a workflow that cannot be mapped, a bad item): reported before anything is queued."""


def model_problems(wf: dict, node_types, options_of) -> list[str]:
    """What the server lacks to run ``wf``: node types not in ``node_types`` and model files that ``options_of(cls,
    input)`` (the server's list for that input, or None when unknown) does not hold. Empty when all is there."""
    problems = []
    for k, v in wf.items():
        cls = v["class_type"]
        if cls not in node_types:
            problems.append(f"node {k}: the server has no node type {cls!r} (a missing custom node pack?)")
            continue
        for inp in LOADERS.get(cls, ()):
            val, options = v["inputs"].get(inp), options_of(cls, inp)
            if isinstance(val, str) and options is not None and val not in options:
                problems.append(f"node {k} ({cls}) {inp}: {val!r} is not in the server's model folders "
                                f"({len(options)} files there)")
    return problems


def combo_options(input_types: dict, inp: str) -> list | None:
    """The choices of combo input ``inp`` in a node's INPUT_TYPES / object_info "input" (old list form or V3's
    ``{"options": [...]}``), or None."""
    spec = (input_types.get("required", {}) | input_types.get("optional", {})).get(inp)
    if not spec:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    return spec[1].get("options") if len(spec) > 1 and isinstance(spec[1], dict) else None


MODELS_HINT = ("Put the files into ComfyUI's models/ folders (checkpoints, diffusion_models, text_encoders, vae) or "
               "pick ones that exist")


def _source(wf: dict, link) -> str | None:
    return str(link[0]) if isinstance(link, list) and len(link) == 2 and str(link[0]) in wf else None


def _trace(wf: dict, start, wanted: tuple, via: tuple) -> str | None:
    """Follow links upstream from ``start`` until a node of a ``wanted`` type, through inputs named in ``via``."""
    seen, node = set(), _source(wf, start)
    while node and node not in seen:
        seen.add(node)
        if wf[node]["class_type"] in wanted:
            return node
        ins = wf[node].get("inputs", {})
        node = next((_source(wf, ins[k]) for k in via if k in ins and _source(wf, ins[k])), None)
    return None


# SD35FP8Calibrate's outputs after MODEL and report: the settings it calibrated for, which the bundled workflows feed to
# KSampler and the latent image (one set of values); and ComfyUI's own primitive nodes
CALIBRATE_SETTINGS = ("steps", "cfg", "sampler_name", "scheduler", "width", "height")
SETTINGS_OUTPUTS = {"SD35FP8Calibrate": {2 + i: name for i, name in enumerate(CALIBRATE_SETTINGS)},
                    **{cls: {0: "value"} for cls in ("PrimitiveInt", "PrimitiveFloat", "PrimitiveString",
                                                     "PrimitiveBoolean")}}


def inline_settings(wf: dict) -> dict:
    """A copy of ``wf`` in which every input fed by a settings output (Calibrate's steps, cfg, sampler, scheduler,
    size; a primitive node's value) holds that value itself, so the clients read and replace plain values."""
    g, changed = copy.deepcopy(wf), True
    while changed:  # a Calibrate fed by a primitive node feeds the KSampler the primitive's value
        changed = False
        for v in g.values():
            ins = v.get("inputs", {})
            for k, val in ins.items():
                src = _source(g, val)
                name = SETTINGS_OUTPUTS.get(g[src]["class_type"], {}).get(val[1]) if src else None
                lit = g[src].get("inputs", {}).get(name) if name else None
                if lit is not None and _source(g, lit) is None:
                    ins[k], changed = lit, True
    return g


def map_workflow(wf: dict, where: str) -> dict:
    """The nodes the client fills, found by type and role. Raises InputError naming what is missing."""
    if not isinstance(wf, dict) or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise InputError(f"{where}: not an API-format workflow (in ComfyUI: Workflow -> Export (API))")
    samplers = [k for k, v in wf.items() if v["class_type"] in SAMPLERS]
    missing = []
    if len(samplers) != 1:
        raise InputError(f"{where}: needs exactly one sampler node ({' or '.join(SAMPLERS)}) to fill seeds, steps "
                         f"and cfg; it has {len(samplers)}")
    ks = samplers[0]
    ins = wf[ks]["inputs"]
    cond_via = ("conditioning", "conditioning_1", "conditioning_to", "positive", "cond")
    pos = _trace(wf, ins.get("positive"), TEXT_ENCODERS, cond_via)
    neg = _trace(wf, ins.get("negative"), TEXT_ENCODERS, cond_via)
    lat = _trace(wf, ins.get("latent_image"), LATENTS, ("samples", "latent", "latent_image"))
    saves = [k for k, v in wf.items() if v["class_type"] == "SaveImage"]
    if not pos:
        missing.append(f"a text encoder ({' or '.join(TEXT_ENCODERS)}) feeding the sampler's positive input")
    if not lat:
        missing.append(f"an empty latent ({' or '.join(LATENTS)}) feeding the sampler's latent_image")
    if not saves:
        missing.append("a SaveImage node")
    if pos and neg == pos:
        missing.append("separate text encoders for the positive and the negative prompt (both lead to one node)")
    if missing:
        raise InputError(f"{where}: cannot map the workflow: it lacks " + "; ".join(missing))
    cal = [k for k, v in wf.items() if v["class_type"] == "SD35FP8Calibrate"]
    return {"sampler": ks, "positive": pos, "negative": neg, "latent": lat, "saves": saves,
            "calibrate": cal[0] if cal else None,
            "loader": next((k for k, v in wf.items() if v["class_type"] == "SD35FP8CheckpointLoader"), None)}


def item_graph(wf: dict, m: dict, item: dict, prefix: str) -> dict:
    """The workflow with this item's prompt, seed, size, steps, cfg and count, saving under ``prefix``."""
    g = copy.deepcopy(wf)
    texts = {"positive": item["prompt"], "negative": item["negative"]}
    for role, text in texts.items():
        if text is not None and m[role]:
            ins = g[m[role]]["inputs"]
            for k in TEXT_INPUTS & ins.keys():  # CLIPTextEncode's text, CLIPTextEncodeSD3's three
                ins[k] = text
    s = g[m["sampler"]]["inputs"]
    s["noise_seed" if "noise_seed" in s else "seed"] = item["seed"]
    for f in ("steps", "cfg", "sampler_name", "scheduler"):
        if item.get(f) is not None:
            s[f] = item[f]
    lat = g[m["latent"]]["inputs"]
    for f in ("width", "height"):
        if item[f] is not None:
            lat[f] = item[f]
    lat["batch_size"] = item["count"] or 1
    for k in m["saves"]:
        g[k]["inputs"]["filename_prefix"] = f"{prefix}/{item['name']}"
    return g


def settings_of(g: dict, m: dict) -> dict:
    s, lat = g[m["sampler"]]["inputs"], g[m["latent"]]["inputs"]
    out = {k: s.get(k) for k in ("steps", "cfg", "sampler_name", "scheduler")}
    out.update(width=lat.get("width"), height=lat.get("height"), count=lat.get("batch_size"))
    return out


def can_group(wf: dict, m: dict) -> bool:
    """Whether several items can share one sampler call (:func:`group_graph`): a KSampler fed by two
    CLIPTextEncode nodes."""
    return bool(wf[m["sampler"]]["class_type"] == "KSampler" and m["negative"]
                and wf[m["positive"]]["class_type"] == "CLIPTextEncode" == wf[m["negative"]]["class_type"])


def groupable(item: dict) -> bool:
    """An item that can share a sampler call: one image, a one-line non-empty prompt (SD35FP8PromptBatch takes one
    prompt per line)."""
    return (item.get("count") or 1) == 1 and bool(item["prompt"].strip()) and "\n" not in item["prompt"]


def batch_key(item: dict) -> tuple:
    """Items with equal keys (and one image each) can share a sampler call."""
    return tuple(item.get(f) for f in ("width", "height", "steps", "cfg", "sampler_name", "scheduler", "negative"))


def group_graph(wf: dict, m: dict, items: list[dict], prefix: str) -> dict:
    """One sampler call for ``items``: the workflow's KSampler becomes SamplerCustomAdvanced (same node id, so what
    follows it is unchanged) fed by SD35FP8PromptBatch, CFGGuider, KSamplerSelect and BasicScheduler."""
    g = item_graph(wf, m, items[0], prefix)
    ks = m["sampler"]
    s = g[ks]["inputs"]
    pb = "sd35fp8_prompt_batch"
    lat = g[m["latent"]]["inputs"]
    g[pb] = {"class_type": "SD35FP8PromptBatch", "inputs": {
        "clip": g[m["positive"]]["inputs"]["clip"], "prompts": "\n".join(it["prompt"] for it in items),
        "negative": g[m["negative"]]["inputs"]["text"], "seeds": ", ".join(str(it["seed"]) for it in items),
        "seed": 0, "width": lat["width"], "height": lat["height"]}}
    g["sd35fp8_guider"] = {"class_type": "CFGGuider", "inputs": {"model": s["model"], "positive": [pb, 0],
                                                                 "negative": [pb, 1], "cfg": s["cfg"]}}
    g["sd35fp8_sampler"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": s["sampler_name"]}}
    g["sd35fp8_sigmas"] = {"class_type": "BasicScheduler", "inputs": {
        "model": s["model"], "scheduler": s["scheduler"], "steps": s["steps"], "denoise": s.get("denoise", 1.0)}}
    g[ks] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": [pb, 3], "guider": ["sd35fp8_guider", 0], "sampler": ["sd35fp8_sampler", 0],
        "sigmas": ["sd35fp8_sigmas", 0], "latent_image": [pb, 2]}}
    for n in (m["positive"], m["negative"], m["latent"]):
        used = any(isinstance(v, list) and len(v) == 2 and str(v[0]) == n for k, node in g.items() if k != n
                   for v in node["inputs"].values())
        if not used:
            del g[n]
    for k in m["saves"]:
        g[k]["inputs"]["filename_prefix"] = f"{prefix}/{items[0]['name']}-batch"
    return g


def saved_images(entry: dict, m: dict) -> list[dict]:
    return [img for k in m["saves"] for img in (entry.get("outputs", {}).get(k) or {}).get("images", [])]


def error_of(entry: dict) -> str:
    """ComfyUI's own message for a prompt that did not succeed."""
    msgs = entry.get("status", {}).get("messages", [])
    err = next((msg[1] for msg in msgs if msg[0] == "execution_error"), {})
    return (err.get("exception_message") or "interrupted or failed (see the server log)").strip()


# UI-format widget positions of the nodes the client changes (control_after_generate follows a seed)
UI_WIDGETS = {"CLIPTextEncode": {"text": 0}, "SD35FP8CheckpointLoader": {"ckpt_name": 0, "weight_scaling": 1},
               "KSampler": {"seed": 0, "steps": 2, "cfg": 3},
              "KSamplerAdvanced": {"noise_seed": 1, "steps": 3, "cfg": 4},
              "EmptySD3LatentImage": {"width": 0, "height": 1, "batch_size": 2},
              "EmptyLatentImage": {"width": 0, "height": 1, "batch_size": 2}, "SaveImage": {"filename_prefix": 0}}


def ui_for(ui: dict | None, g: dict) -> dict | None:
    """The UI workflow (same node ids as the API one) with this item's widget values, for the PNG's metadata."""
    if not ui:
        return None
    ui = copy.deepcopy(ui)
    for node in ui.get("nodes", []):
        api = g.get(str(node.get("id")))
        pos = UI_WIDGETS.get(node.get("type"), {})
        if api is None or not pos or not isinstance(node.get("widgets_values"), list):
            continue
        for k, i in pos.items():
            if k in api["inputs"] and not isinstance(api["inputs"][k], list) and i < len(node["widgets_values"]):
                node["widgets_values"][i] = api["inputs"][k]
    return ui
