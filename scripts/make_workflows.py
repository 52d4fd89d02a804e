#!/usr/bin/env python3
"""Generate the bundled workflows (UI format and API format) from one graph spec per model.

    python scripts/make_workflows.py          # rewrite workflows/*.json
    python scripts/make_workflows.py --check  # exit 1 if the committed files differ (tests run this)

One spec feeds both formats, so the UI workflow and the API workflow cannot drift apart.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT_DIR = os.path.join(REPO, "workflows")
if REPO not in sys.path:
    sys.path.insert(0, REPO)
from service.config import TEMPLATES, TOOLS  # noqa: E402  (the UI workflows' file names: the template browser's titles)

NEGATIVE = ""
POSITIVE = ("a professional photograph of a red fox sitting in a snowy birch forest at golden hour, "
            "sharp focus, detailed fur, 85mm lens")

# (class, output types) of every node type the workflows use; widget order = public widget order.
OUTPUTS = {
    "SD35FP8CheckpointLoader": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE"), ("info", "STRING")],
    "TripleCLIPLoader": [("CLIP", "CLIP")],
    "SD35FP8Calibrate": [("MODEL", "MODEL"), ("report", "STRING"), ("steps", "INT"), ("cfg", "FLOAT"),
                         ("sampler_name", "COMBO"), ("scheduler", "COMBO"), ("width", "INT"), ("height", "INT")],
    "SD35FP8Autocast": [("MODEL", "MODEL")],
    "CLIPTextEncode": [("CONDITIONING", "CONDITIONING")],
    "EmptySD3LatentImage": [("LATENT", "LATENT")],
    "KSampler": [("LATENT", "LATENT")],
    "VAEDecode": [("IMAGE", "IMAGE")],
    "SaveImage": [],
    "PreviewAny": [],
    "CheckpointLoaderSimple": [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")],
    "SD35FP8CompareImages": [("heatmap", "IMAGE"), ("report", "STRING")],
}
LINK_INPUT_TYPES = {"model": "MODEL", "clip": "CLIP", "vae": "VAE", "positive": "CONDITIONING",
                    "negative": "CONDITIONING", "latent_image": "LATENT", "samples": "LATENT",
                    "images": "IMAGE", "source": "*", "image_a": "IMAGE", "image_b": "IMAGE"}
# widgets fed by a link (Calibrate's settings outputs): one set of values for calibration and sampling
WIDGET_INPUT_TYPES = {"steps": "INT", "cfg": "FLOAT", "sampler_name": "COMBO", "scheduler": "COMBO", "width": "INT",
                      "height": "INT"}
CAL = 3  # the Calibrate node's id
SETTING = {name: (CAL, 2 + i) for i, name in enumerate(WIDGET_INPUT_TYPES)}

VARIANTS = {
    # name: (checkpoint, steps, cfg, sampler, scheduler, title)
    "sd35_large": ("sd3.5_large.safetensors", 28, 4.5, "euler", "sgm_uniform", "SD3.5 Large"),
    "sd35_large_turbo": ("sd3.5_large_turbo.safetensors", 4, 1.0, "euler", "sgm_uniform", "SD3.5 Large Turbo"),
    "sd35_medium": ("sd3.5_medium.safetensors", 40, 4.5, "euler", "sgm_uniform", "SD3.5 Medium"),
}
CLIPS = ("clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors")
# the official downloads (Stability AI's Hugging Face repositories; gated: accept the licence there first), in the
# UI workflows' node properties where the frontend's missing-models dialog reads them
HF = "https://huggingface.co/stabilityai"
REPOS = {"sd3.5_large.safetensors": "stable-diffusion-3.5-large",
         "sd3.5_large_turbo.safetensors": "stable-diffusion-3.5-large-turbo",
         "sd3.5_medium.safetensors": "stable-diffusion-3.5-medium"}


def model_links(cls: str, inputs: dict) -> list[dict]:
    if cls in ("SD35FP8CheckpointLoader", "CheckpointLoaderSimple"):
        name = inputs["ckpt_name"]
        return [{"name": name, "url": f"{HF}/{REPOS[name]}/resolve/main/{name}", "directory": "checkpoints"}]
    if cls == "TripleCLIPLoader":
        return [{"name": n, "url": f"{HF}/stable-diffusion-3.5-large/resolve/main/text_encoders/{n}",
                 "directory": "text_encoders"} for n in CLIPS]
    return []


def spec(variant: str, width: int = 1024, height: int = 1024, batch: int = 4, seed: int = 42):
    """Nodes as (id, class, {input: value or (src_id, slot)}, [widget names in order], column); ``layout`` places
    them."""
    ckpt, steps, cfg, sampler, sched, title = VARIANTS[variant]
    nodes = [
        (1, "SD35FP8CheckpointLoader", {"ckpt_name": ckpt, "weight_scaling": "fastest"},
         ["ckpt_name", "weight_scaling"], 0),
        (2, "TripleCLIPLoader", {"clip_name1": CLIPS[0], "clip_name2": CLIPS[1], "clip_name3": CLIPS[2]},
         ["clip_name1", "clip_name2", "clip_name3"], 0),
        (3, "SD35FP8Calibrate", {"model": (1, 0), "clip": (2, 0), "prompts": None,  # None: the shipped default set
                                 "steps": steps,
                                 "cfg": cfg, "sampler_name": sampler, "scheduler": sched, "width": width,
                                 "height": height, "seed": 0, "method": "max", "percentile": 99.99},
         ["prompts", "steps", "cfg", "sampler_name", "scheduler", "width", "height", "seed", "method",
          "percentile"], 1),
        (4, "SD35FP8Autocast", {"model": (3, 0), "enabled": True, "fp8_format": "E4M3", "amax_history_len": 16,
                                "margin": 0, "backend": "auto", "compile": True, "attention": "auto",
                                "cuda_graphs": False, "scaling": "delayed"},
         ["enabled", "fp8_format", "amax_history_len", "margin", "backend", "compile", "attention", "cuda_graphs",
          "scaling"],
         2),
        (5, "CLIPTextEncode", {"clip": (2, 0), "text": POSITIVE}, ["text"], 1),
        (6, "CLIPTextEncode", {"clip": (2, 0), "text": NEGATIVE}, ["text"], 1),
        (7, "EmptySD3LatentImage", {"width": SETTING["width"], "height": SETTING["height"], "batch_size": batch},
         ["width", "height", "batch_size"], 2),
        (8, "KSampler", {"model": (4, 0), "seed": seed, "steps": SETTING["steps"], "cfg": SETTING["cfg"],
                         "sampler_name": SETTING["sampler_name"], "scheduler": SETTING["scheduler"],
                         "positive": (5, 0), "negative": (6, 0), "latent_image": (7, 0), "denoise": 1.0},
         ["seed", "steps", "cfg", "sampler_name", "scheduler", "denoise"], 3),
        (9, "VAEDecode", {"samples": (8, 0), "vae": (1, 2)}, [], 4),
        (10, "SaveImage", {"images": (9, 0), "filename_prefix": f"sd35_fp8/{variant}"}, ["filename_prefix"], 4),
    ]
    return nodes, title


SAVE_WIDGETS = ["filename_prefix"]


def compare_spec(variant: str = "sd35_large", size: int = 1024, seed: int = 42):
    """One seed through stock ComfyUI in BF16 (CheckpointLoaderSimple of the same file) and through the pack, and
    the A/B compare node on the two images: what FP8 changes, on the user's own model."""
    nodes, title = spec(variant, size, size, batch=1, seed=seed)
    nodes = [n for n in nodes if n[0] != 10]
    ckpt = VARIANTS[variant][0]
    sampler = next(n for n in nodes if n[0] == 8)
    stock_inputs = dict(sampler[2], model=(11, 0))
    nodes += [
        (11, "CheckpointLoaderSimple", {"ckpt_name": ckpt}, ["ckpt_name"], 0),
        (12, "KSampler", stock_inputs, sampler[3], 3),
        (13, "VAEDecode", {"samples": (12, 0), "vae": (1, 2)}, [], 4),
        (14, "SD35FP8CompareImages", {"image_a": (13, 0), "image_b": (9, 0), "heatmap_scale": 0.0},
         ["heatmap_scale"], 4),
        (15, "SaveImage", {"images": (13, 0), "filename_prefix": "sd35_fp8/compare/stock_bf16"}, SAVE_WIDGETS, 5),
        (16, "SaveImage", {"images": (9, 0), "filename_prefix": "sd35_fp8/compare/fp8"}, SAVE_WIDGETS, 5),
        (17, "SaveImage", {"images": (14, 0), "filename_prefix": "sd35_fp8/compare/difference"}, SAVE_WIDGETS, 6),
        (18, "PreviewAny", {"source": (14, 1)}, [], 6),
    ]
    return nodes, f"{title}: stock BF16 vs FP8 (calibrated), one seed at {size}x{size}"


def default_prompts() -> str:
    # the node's default calibration prompt set (the same file the node reads)
    with open(os.path.join(REPO, "nodes", "calibration_prompts.txt"), encoding="utf-8") as f:
        return f.read().strip()


def to_api(nodes) -> dict:
    prompts = default_prompts()
    api = {}
    for nid, cls, inputs, _w, _p in nodes:
        ins = {}
        for k, v in inputs.items():
            if k == "prompts" and v is None:
                v = prompts
            ins[k] = [str(v[0]), v[1]] if isinstance(v, tuple) else v
        api[str(nid)] = {"class_type": cls, "inputs": ins}
    return api


MULTILINE = {("SD35FP8Calibrate", "prompts"), ("CLIPTextEncode", "text")}
COLUMN_X = (40, 470, 960, 1390, 1820, 2250, 2740)
WIDE = {"SD35FP8Calibrate": 440, "CLIPTextEncode": 440, "SaveImage": 440, "KSampler": 380}
TITLE, GAP = 30, 40  # the frontend draws the title bar above a node's pos


def node_size(cls: str, inputs: dict, widgets: list) -> list[int]:
    """A generous estimate of the box the frontend draws (it grows a node to fit its slots and widgets, never
    shrinks it): slot rows, one row per widget (the seed's control widget too), multiline text boxes, an image
    preview for SaveImage."""
    links = sum(isinstance(v, tuple) and k not in widgets for k, v in inputs.items())
    rows = max(links, len(OUTPUTS[cls]))
    n_widgets = len(widgets) + (1 if cls == "KSampler" else 0)
    multiline = sum((cls, w) in MULTILINE for w in widgets)
    h = 12 + 22 * rows + 26 * (n_widgets - multiline) + 150 * multiline + (360 if cls == "SaveImage" else 0)
    return [WIDE.get(cls, 360), max(h, 60)]


def layout(nodes) -> dict[int, tuple[list[int], list[int]]]:
    """{node id: (pos, size)}: columns left to right in data-flow order, nodes stacked in each with a gap, so no
    two boxes (title bar included) overlap and no node hides another's links (tests/e2e/test_frontend.py checks
    the boxes the real frontend draws)."""
    out, y = {}, {}
    for nid, cls, inputs, widgets, col in nodes:
        size = node_size(cls, inputs, widgets)
        top = y.get(col, 60)
        out[nid] = ([COLUMN_X[col], top + TITLE], size)
        y[col] = top + TITLE + size[1] + GAP
    return out


def to_ui(nodes, title: str) -> dict:
    prompts = default_prompts()
    links, ui_nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for nid, cls, inputs, _w, _p in nodes:
        for k, v in inputs.items():
            if isinstance(v, tuple):
                lid = len(links) + 1
                src_type = OUTPUTS[dict((n[0], n[1]) for n in nodes)[v[0]]][v[1]][1]
                links.append([lid, v[0], v[1], nid, None, src_type, k])
                out_links.setdefault((v[0], v[1]), []).append(lid)
    boxes = layout(nodes)
    for order, (nid, cls, inputs, widgets, _col) in enumerate(nodes):
        link_inputs = [(k, v) for k, v in inputs.items() if isinstance(v, tuple)]
        ui_inputs = []
        for slot, (k, v) in enumerate(link_inputs):
            lid = next(l[0] for l in links if l[3] == nid and l[6] == k)
            links[lid - 1][4] = slot
            if k in widgets:  # a widget fed by a link: the frontend keeps the widget (and its value)
                ui_inputs.append({"name": k, "type": WIDGET_INPUT_TYPES[k], "widget": {"name": k}, "link": lid})
            else:
                ui_inputs.append({"name": k, "type": LINK_INPUT_TYPES[k], "link": lid})
        ui_outputs = []
        for slot, (name, typ) in enumerate(OUTPUTS[cls]):
            ui_outputs.append({"name": name, "type": typ, "links": out_links.get((nid, slot), []),
                               "slot_index": slot})
        wv = []
        for w in widgets:
            v = inputs[w]
            if isinstance(v, tuple):  # linked: the value the source node holds
                v = next(n[2] for n in nodes if n[0] == v[0])[w]
            if w == "prompts" and v is None:
                v = prompts
            wv.append(v)
            if cls == "KSampler" and w == "seed":
                wv.append("fixed")  # the frontend's control_after_generate widget value
        links_out = model_links(cls, inputs)
        ui_nodes.append({"id": nid, "type": cls, "pos": boxes[nid][0], "size": boxes[nid][1],
                         "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs, "outputs": ui_outputs,
                         "properties": {"Node name for S&R": cls, **({"models": links_out} if links_out else {})},
                         "widgets_values": wv})
    return {"last_node_id": max(n[0] for n in nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": [l[:6] for l in links], "groups": [], "config": {},
            "extra": {"sd35fp8": {"title": title}}, "version": 0.4}


def render() -> dict[str, str]:
    files = {}
    for variant in VARIANTS:
        nodes, title = spec(variant)
        # API format in a subfolder: ComfyUI offers */workflows/*.json (not recursive) as UI templates
        files[f"api/{variant}_fp8_api.json"] = json.dumps(to_api(nodes), indent=2) + "\n"
        ui = to_ui(nodes, f"{title} FP8 (calibrated), 1024x1024 batch 4")
        files[TEMPLATES[variant.removeprefix("sd35_")] + ".json"] = json.dumps(ui, indent=2) + "\n"
    nodes, title = compare_spec()
    files[f"api/{TOOLS['compare']}_api.json"] = json.dumps(to_api(nodes), indent=2) + "\n"
    files[TEMPLATES["compare"] + ".json"] = json.dumps(to_ui(nodes, title), indent=2) + "\n"
    return files


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true")
    a = ap.parse_args(argv)
    files = render()
    stale = []
    for name, text in files.items():
        path = os.path.join(OUT_DIR, name)
        old = open(path).read() if os.path.exists(path) else None
        if old != text:
            stale.append(name)
            if not a.check:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(text)
    if a.check and stale:
        print("stale workflows (run scripts/make_workflows.py):", ", ".join(stale))
        return 1
    print(("checked" if a.check else "wrote"), len(files), "workflows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
