#!/usr/bin/env python3
"""The main job: start a real ComfyUI with this pack and generate a batch through a bundled workflow
via ``POST /prompt``.

    scripts/run_batch.py                                   # the embedded demo model, CPU is fine
    scripts/run_batch.py --ckpt /models/sd3.5_large.safetensors --text-encoders /models/text_encoders

Without ``--ckpt`` it runs the embedded demo model (``demo/sd3.5_demo.safetensors``: an SD3.5 Large-layout MMDiT
and a TAESD-layout VAE trained by ``scripts/train_demo.py`` to draw simple scenes such as "a red circle top left,
white background" at 128x128) and, as full-size text encoders cannot be embedded, swaps the workflow's
TripleCLIPLoader for a CLIPLoader on the random CLIP-L the demo model was trained with (type sd3). Everything else
in the graph runs as bundled: loader -> calibrate -> autocast -> KSampler -> VAEDecode -> SaveImage. Prints where
the images are.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_harness import REPO, ComfyServer  # noqa: E402

TINY_CKPT = "tiny_sd3.5_large.safetensors"
TINY_CLIP = "tiny_clip_l.safetensors"
DEMO_CKPT = "sd3.5_demo.safetensors"  # the embedded default: a small SD3.5-layout model trained by the project
DEMO_PATH = os.path.join(REPO, "demo", DEMO_CKPT)
DEMO_PROMPT = "a red circle top left, white background"
DEMO_SIZE, DEMO_STEPS = 128, 20


def demo_calibration_prompts(n: int = 6) -> list[str]:
    """Calibration prompts for the demo model: some of its training scenes (never the held-out ones)."""
    import demo_scenes
    train, _ = demo_scenes.split()
    return [demo_scenes.prompt_of(*s) for s in train[::len(train) // n][:n]]


def load_workflow(path: str) -> dict:
    with open(path) as f:
        wf = json.load(f)
    if not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise SystemExit(f"{path} is not an API-format workflow (export with 'Save (API)')")
    return wf


def nodes_of(wf: dict, cls: str) -> list[str]:
    return [k for k, v in wf.items() if v["class_type"] == cls]


def adapt(wf: dict, ckpt_name: str | None = None, tiny_clip: str | None = None, width=None, height=None,
          batch=None, steps=None, calib_prompts: int | None = None, seed=None, prefix=None, prompt=None,
          calib_text: list[str] | None = None) -> dict:
    """Return a copy of an API workflow with model files, sizes and (``prompt``: the KSamplers' positive text,
    ``calib_text``: Calibrate's prompts) texts replaced."""
    wf = copy.deepcopy(wf)
    for k in nodes_of(wf, "SD35FP8CheckpointLoader") + nodes_of(wf, "CheckpointLoaderSimple"):
        if ckpt_name:
            wf[k]["inputs"]["ckpt_name"] = ckpt_name
    if prompt is not None:
        for k in nodes_of(wf, "KSampler"):
            src = wf[k]["inputs"]["positive"][0]
            if wf[src]["class_type"] == "CLIPTextEncode":
                wf[src]["inputs"]["text"] = prompt
    if calib_text:
        for k in nodes_of(wf, "SD35FP8Calibrate"):
            wf[k]["inputs"]["prompts"] = "\n".join(calib_text)
    if tiny_clip:
        for k in nodes_of(wf, "TripleCLIPLoader"):
            wf[k] = {"class_type": "CLIPLoader", "inputs": {"clip_name": tiny_clip, "type": "sd3"}}
    for k, v in wf.items():
        ins = v["inputs"]
        if v["class_type"] in ("EmptySD3LatentImage", "SD35FP8Calibrate"):
            if width:
                ins["width"] = width
            if height:
                ins["height"] = height
        if v["class_type"] == "EmptySD3LatentImage" and batch:
            ins["batch_size"] = batch
        if v["class_type"] in ("KSampler", "SD35FP8Calibrate") and steps:
            ins["steps"] = steps
        if v["class_type"] == "SD35FP8Calibrate" and calib_prompts:
            ins["prompts"] = "\n".join(ins["prompts"].splitlines()[:calib_prompts])
        if v["class_type"] == "KSampler" and seed is not None:
            ins["seed"] = seed
        if v["class_type"] == "SaveImage" and prefix:
            ins["filename_prefix"] = prefix
    return wf


def make_tiny_models(models_dir: str) -> None:
    import tiny_sd35
    ck = os.path.join(models_dir, "checkpoints", TINY_CKPT)
    if not os.path.exists(ck):
        tiny_sd35.write_checkpoint(ck, depth=2, variant="large")
    tiny_sd35.write_clip_l(os.path.join(models_dir, "text_encoders", TINY_CLIP))


def make_demo_models(models_dir: str) -> str:
    """The embedded demo model (``demo/``, trained by ``scripts/train_demo.py``) and the random CLIP-L it was
    trained with, linked into ``models_dir``; the CLIP-L this torch generates must be the training one (a hash of its
    tensors is in the checkpoint), else the prompts would be noise to the model. Returns the checkpoint's path."""
    import tiny_sd35
    from safetensors import safe_open
    from train_demo import tensors_sha256
    if not os.path.isfile(DEMO_PATH):
        raise SystemExit(f"{DEMO_PATH} is missing: check out the repository with its demo/ folder, or train it "
                         "with scripts/train_demo.py")
    ck = os.path.join(models_dir, "checkpoints", DEMO_CKPT)
    os.makedirs(os.path.dirname(ck), exist_ok=True)
    if os.path.realpath(ck) != os.path.realpath(DEMO_PATH):
        if os.path.lexists(ck):
            os.remove(ck)
        os.symlink(DEMO_PATH, ck)
    # the CLIP-L is 250 MB: written once per checkout, linked into other model folders (the tests')
    clip = tiny_sd35.write_clip_l(os.path.join(REPO, ".cache", "models", "text_encoders", TINY_CLIP))
    link = os.path.join(models_dir, "text_encoders", TINY_CLIP)
    if os.path.realpath(link) != os.path.realpath(clip):
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(clip, link)
    with safe_open(DEMO_PATH, "pt") as f:
        want = (f.metadata() or {}).get("sd35fp8.demo.clip_l_tensors_sha256")
    got = tensors_sha256(clip)
    if want and got != want:
        raise SystemExit(f"{clip}: this CLIP-L (sha256 {got[:16]}) is not the one the demo model was trained with "
                         f"({want[:16]}): delete it to have it written again; if it comes out the same, this torch "
                         "draws different random numbers: retrain with scripts/train_demo.py")
    return ck


def tiny_batch(tmp: str, n_items: int, size: int, steps: int) -> tuple[str, str, str]:
    """(models folder, API workflow file, prompt list file) for a batch on the tiny model at ``size``² and ``steps``
    (the benchmarks' CPU setup)."""
    models = os.path.join(REPO, ".cache", "models")
    make_tiny_models(models)
    wf = adapt(load_workflow(os.path.join(REPO, "workflows", "api", "sd35_large_fp8_api.json")), ckpt_name=TINY_CKPT,
               tiny_clip=TINY_CLIP, width=size, height=size, batch=1, steps=steps, calib_prompts=2)
    wf_path, items = os.path.join(tmp, "wf.json"), os.path.join(tmp, "items.txt")
    with open(wf_path, "w") as f:
        json.dump(wf, f)
    with open(items, "w") as f:
        f.write("\n".join(f"a red circle on a blue background, variant {i}" for i in range(n_items)) + "\n")
    return models, wf_path, items


def link_models(models_dir: str, ckpt: str, text_encoders: str | None) -> None:
    """Make a user's checkpoint (and text-encoder folder) visible to the started ComfyUI through links."""
    if not os.path.isfile(ckpt):
        raise SystemExit(f"--ckpt {ckpt}: no such file")
    os.makedirs(os.path.join(models_dir, "checkpoints"), exist_ok=True)
    dst = os.path.join(models_dir, "checkpoints", os.path.basename(ckpt))
    if not os.path.exists(dst):
        os.symlink(os.path.abspath(ckpt), dst)
    if text_encoders:
        te = os.path.join(models_dir, "text_encoders")
        os.makedirs(te, exist_ok=True)
        for n in os.listdir(text_encoders):
            if not os.path.exists(os.path.join(te, n)):
                os.symlink(os.path.join(os.path.abspath(text_encoders), n), os.path.join(te, n))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workflow", default=os.path.join(REPO, "workflows", "api", "sd35_large_fp8_api.json"))
    ap.add_argument("--ckpt", help="an SD3.5 .safetensors (checkpoints/ layout); default: the tiny model")
    ap.add_argument("--text-encoders", help="folder holding the workflow's clip_l/clip_g/t5xxl files")
    ap.add_argument("--out", default=os.path.join(REPO, "output"), help="where the images go")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--calib-prompts", type=int, help="use only the first N calibration prompts")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--prompt", help="the positive prompt (default: the workflow's; on the demo model "
                                     f"{DEMO_PROMPT!r}: shapes, colours, positions as in scripts/demo_scenes.py)")
    ap.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (default: --cpu unless CUDA)")
    ap.add_argument("--port", type=int, help="the port of the started ComfyUI (default: a free one)")
    a = ap.parse_args(argv)

    work = os.path.join(REPO, ".cache", "run")
    models = os.path.join(REPO, ".cache", "models")
    os.makedirs(work, exist_ok=True)
    wf = load_workflow(a.workflow)
    if a.ckpt:
        link_models(models, a.ckpt, a.text_encoders)
        graph = adapt(wf, ckpt_name=os.path.basename(a.ckpt), width=a.width, height=a.height, batch=a.batch,
                      steps=a.steps, calib_prompts=a.calib_prompts, seed=a.seed)
        what = os.path.basename(a.ckpt)
    else:
        print("[run] no --ckpt: the embedded demo model (trained by this project on simple shapes, 128x128; "
              "TripleCLIPLoader -> its random CLIP-L)")
        make_demo_models(models)
        graph = adapt(wf, ckpt_name=DEMO_CKPT, tiny_clip=TINY_CLIP, width=a.width or DEMO_SIZE,
                      height=a.height or DEMO_SIZE, batch=a.batch, steps=a.steps or DEMO_STEPS,
                      calib_prompts=a.calib_prompts, seed=a.seed, prompt=a.prompt or DEMO_PROMPT,
                      calib_text=demo_calibration_prompts())
        what = f"the demo model, prompt {a.prompt or DEMO_PROMPT!r}"
    import torch
    on_gpu = a.gpu or torch.cuda.is_available()
    dev = [] if on_gpu else ["--cpu"]
    t0 = time.time()
    with ComfyServer(models, workdir=work, device_args=dev, port=a.port) as srv:
        print(f"[run] ComfyUI up at {srv.base} (log: {srv.log_path}); queueing {os.path.basename(a.workflow)} "
              f"on {what}")
        entry = srv.run(graph, timeout=3600)
        files = srv.output_images(entry)
        report = [o for o in entry["outputs"].values() if "text" in o]
        if report:
            print("[run] calibration report:\n" + "\n".join(report[0]["text"]))
        os.makedirs(a.out, exist_ok=True)
        final = []
        for f in files:
            d = os.path.join(a.out, os.path.basename(f))
            shutil.copy2(f, d)
            final.append(d)
    if not final:
        print("[run] the workflow finished but produced no image", file=sys.stderr)
        return 1
    print(f"[run] {len(final)} images in {time.time() - t0:.0f} s:")
    for f in final:
        print("   ", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
