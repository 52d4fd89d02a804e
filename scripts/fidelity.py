#!/usr/bin/env python3
"""The fidelity protocol: what FP8 changes in the images, against stock ComfyUI in BF16, in one command.

    .venv/bin/python scripts/fidelity.py                       # the demo model on the CPU (a few minutes)
    .venv/bin/python scripts/fidelity.py --ckpt /models/sd3.5_large.safetensors \\
        --text-encoders /models/text_encoders --gpu --prompts my_prompts.txt    # your own model on a GPU

The same prompts and seeds run through one real ComfyUI (started here, with this pack) in every configuration:
stock BF16 (CheckpointLoaderSimple, the reference), stock ``fp8_e4m3fn`` and ``fp8_e4m3fn_fast`` (UNETLoader's
weight_dtype), and the pack in every weight format and attention choice (loader -> Calibrate -> Autocast). Each
run saves its final latent (SaveLatent) and its image. Reported per configuration, against BF16: PSNR and SSIM of
the images, the relative error of the final latents, LPIPS when the ``lpips`` package and its network weights are
present locally (they are never downloaded), and, on the demo model, how many images follow their prompt. Writes
``report.md``, ``report.json`` and ``grid.png`` (rows: prompts; columns: BF16 | ours | stock FP8 | stock FP8 fast)
into ``--out``. Exit 1 when a configuration of the pack misses the target (>= 35 dB PSNR and better than both
stock FP8 modes on every metric), 0 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path[:0] = [HERE, REPO]
from comfy_harness import ComfyServer  # noqa: E402

import demo_scenes  # noqa: E402
from run_batch import DEMO_CKPT, TINY_CLIP, make_demo_models  # noqa: E402

FORMATS = ("fastest", "finer weights (per channel)", "less error (INT8 adaLN)", "most faithful (INT8 MLP)")
STOCK = {"stock BF16": None, "stock fp8_e4m3fn": "fp8_e4m3fn", "stock fp8_e4m3fn_fast": "fp8_e4m3fn_fast"}
TARGET_DB = 35.0
REAL_PROMPTS = ["a professional photograph of a red fox sitting in a snowy birch forest at golden hour",
                "a product shot of a glass perfume bottle on black marble, studio lighting",
                "an isometric game asset of a medieval blacksmith's hut, hand painted",
                "a watercolor painting of a harbour town at dawn with fishing boats"]


def text_nodes(clip_src: list, prompt: str, negative: str) -> dict:
    return {"pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_src, "text": prompt}},
            "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip_src, "text": negative}}}


def graph(cfg: dict, a, prompt: str, seed: int, tag: str) -> dict:
    """One API graph: the configuration's model path -> KSampler -> SaveLatent + VAEDecode -> SaveImage."""
    g = {"vae": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": a.ckpt_name}}}
    if a.clip_names:
        g["clip"] = {"class_type": "TripleCLIPLoader", "inputs": dict(zip(("clip_name1", "clip_name2", "clip_name3"),
                                                                          a.clip_names))}
    else:
        g["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": TINY_CLIP, "type": "sd3"}}
    g.update(text_nodes(["clip", 0], prompt, a.negative))
    sampling = {"steps": a.steps, "cfg": a.cfg, "sampler_name": a.sampler, "scheduler": a.scheduler}
    if cfg["kind"] == "stock":
        if cfg["dtype"] is None:
            model = ["vae", 0]
        else:
            g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": a.unet_name,
                                                                 "weight_dtype": cfg["dtype"]}}
            model = ["unet", 0]
    else:
        g["load"] = {"class_type": "SD35FP8CheckpointLoader", "inputs": {"ckpt_name": a.ckpt_name,
                                                                         "weight_scaling": cfg["format"]}}
        g["cal"] = {"class_type": "SD35FP8Calibrate", "inputs": {
            "model": ["load", 0], "clip": ["clip", 0], "prompts": "\n".join(a.calib_prompts), **sampling,
            "width": a.size, "height": a.size, "seed": 0, "method": "max", "percentile": 99.99}}
        g["fp8"] = {"class_type": "SD35FP8Autocast", "inputs": {
            "model": ["cal", 0], "enabled": True, "fp8_format": "E4M3", "amax_history_len": 16, "margin": 0,
            "backend": "auto", "compile": a.gpu, "attention": cfg["attention"], "cuda_graphs": False,
            "scaling": "delayed"}}
        model = ["fp8", 0]
    g["latent"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": a.size, "height": a.size,
                                                                   "batch_size": 1}}
    g["sample"] = {"class_type": "KSampler", "inputs": {"model": model, "seed": seed, **sampling,
                                                        "positive": ["pos", 0], "negative": ["neg", 0],
                                                        "latent_image": ["latent", 0], "denoise": 1.0}}
    g["save_latent"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                               "filename_prefix": f"fidelity/{tag}"}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 2]}}
    g["save"] = {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"fidelity/{tag}"}}
    return g


def configurations(attentions: list[str], formats: list[str]) -> list[dict]:
    out = [{"name": n, "kind": "stock", "dtype": d} for n, d in STOCK.items()]
    for att in attentions:
        for f in formats:
            out.append({"name": f"ours {f}" + (f", attention {att}" if len(attentions) > 1 else ""), "kind": "ours",
                        "format": f, "attention": att})
    return out


def outputs(srv: ComfyServer, entry: dict) -> tuple[str, str]:
    """(latent file, image file) a run wrote."""
    lat = img = None
    for o in entry.get("outputs", {}).values():
        for x in o.get("latents", []):
            lat = os.path.join(srv.output_dir, x.get("subfolder", ""), x["filename"])
        for x in o.get("images", []):
            img = os.path.join(srv.output_dir, x.get("subfolder", ""), x["filename"])
    if not (lat and img):
        raise RuntimeError(f"a fidelity run wrote no latent or image: {json.dumps(entry.get('outputs'))[:500]}")
    return lat, img


def lpips_model():
    """LPIPS (AlexNet) when the package and the torchvision weights are on this machine; None otherwise."""
    try:
        import lpips
        import torch
    except ImportError:
        return None, "LPIPS not measured: the lpips package is not installed"
    hub = os.path.join(torch.hub.get_dir(), "checkpoints")
    if not os.path.isdir(hub) or not any(f.startswith("alexnet") for f in os.listdir(hub)):
        return None, f"LPIPS not measured: AlexNet's weights are not in {hub} (they are never downloaded here)"
    return lpips.LPIPS(net="alex", verbose=False), "LPIPS (AlexNet)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="an SD3.5 checkpoint (.safetensors, checkpoints/ layout); default: the demo model")
    ap.add_argument("--text-encoders", help="a folder with clip_l, clip_g and t5xxl files (with --ckpt)")
    ap.add_argument("--prompts", help="a text file, one prompt per line (default: the demo's held-out prompts)")
    ap.add_argument("--calib-prompts", help="a text file of calibration prompts (default: the node's own set; the "
                                            "demo's training prompts on the demo model)")
    ap.add_argument("--negative", default="")
    ap.add_argument("--seeds", default="1,2", help="comma separated")
    ap.add_argument("--max-prompts", type=int, default=12)
    ap.add_argument("--size", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--cfg", type=float)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--scheduler", default="sgm_uniform")
    ap.add_argument("--formats", default=",".join(FORMATS), help="the pack's weight formats (loader options)")
    ap.add_argument("--attention", help="comma separated attention choices (default: auto; auto,fp8 with --gpu)")
    ap.add_argument("--gpu", action="store_true", help="run ComfyUI on the GPU (default: --cpu)")
    ap.add_argument("--out", default=os.path.join(REPO, "output", "fidelity"))
    ap.add_argument("--record", help="also write a bench/results record (machine, torch, ComfyUI, date, commit, "
                                     "command) with the table to this path")
    a = ap.parse_args(argv)

    models = os.path.join(REPO, ".cache", "models")
    demo = not a.ckpt
    if demo:
        make_demo_models(models)
        ckpt = DEMO_CKPT
        a.clip_names = None
        train, held = demo_scenes.split()
        prompts = [demo_scenes.prompt_of(*s) for s in held]
        calib = [demo_scenes.prompt_of(*s) for s in train[::37]]
        a.size, a.steps, a.cfg = a.size or demo_scenes.SIZE, a.steps or 20, a.cfg if a.cfg is not None else 4.5
    else:
        if not os.path.isfile(a.ckpt):
            raise SystemExit(f"--ckpt {a.ckpt}: no such file")
        from run_batch import link_models
        link_models(models, a.ckpt, a.text_encoders)
        ckpt = a.ckpt
        names = sorted(os.listdir(os.path.join(models, "text_encoders")))
        pick = [next((n for n in names if n.startswith(k)), None) for k in ("clip_l", "clip_g", "t5xxl")]
        if None in pick:
            raise SystemExit(f"--text-encoders {a.text_encoders}: needs clip_l*, clip_g* and t5xxl* files")
        a.clip_names = pick
        prompts, calib = list(REAL_PROMPTS), None
        a.size, a.steps, a.cfg = a.size or 1024, a.steps or 28, a.cfg if a.cfg is not None else 4.5
    if a.prompts:
        prompts = [ln.strip() for ln in open(a.prompts, encoding="utf-8") if ln.strip() and not ln.startswith("#")]
    if a.calib_prompts:
        calib = [ln.strip() for ln in open(a.calib_prompts, encoding="utf-8") if ln.strip()]
    if calib is None:
        with open(os.path.join(REPO, "nodes", "calibration_prompts.txt"), encoding="utf-8") as f:
            calib = [ln.strip() for ln in f if ln.strip()]
    prompts = prompts[:a.max_prompts]
    a.calib_prompts = calib
    a.ckpt_name = os.path.basename(ckpt)
    # UNETLoader lists diffusion_models/: the same file, linked there for the stock FP8 modes
    unet = os.path.join(models, "diffusion_models", a.ckpt_name)
    os.makedirs(os.path.dirname(unet), exist_ok=True)
    if not os.path.exists(unet):
        os.symlink(os.path.realpath(os.path.join(models, "checkpoints", a.ckpt_name)), unet)
    a.unet_name = a.ckpt_name
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    formats = [f.strip() for f in a.formats.split(",") if f.strip()]
    attentions = [x.strip() for x in (a.attention or ("auto,fp8" if a.gpu else "auto")).split(",")]
    configs = configurations(attentions, formats)
    return run(a, configs, prompts, seeds, demo, models)


def run(a, configs, prompts, seeds, demo: bool, models: str) -> int:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from sd35fp8.core import fidelity

    os.makedirs(a.out, exist_ok=True)
    work = os.path.join(REPO, ".cache", "fidelity")
    shutil.rmtree(os.path.join(work, "output", "fidelity"), ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    results: dict[str, dict] = {}
    t0 = time.time()
    with ComfyServer(models, workdir=work, device_args=[] if a.gpu else ["--cpu"]) as srv:
        print(f"[fidelity] ComfyUI at {srv.base}: {len(configs)} configurations x {len(prompts)} prompts x "
              f"{len(seeds)} seeds, {a.size}x{a.size}, {a.steps} steps, cfg {a.cfg}", flush=True)
        for ci, cfg in enumerate(configs):
            runs = []
            for pi, p in enumerate(prompts):
                for s in seeds:
                    entry = srv.run(graph(cfg, a, p, s, f"c{ci}/p{pi}_s{s}"), timeout=3600)
                    if entry.get("status", {}).get("status_str") != "success":
                        raise SystemExit(f"[fidelity] {cfg['name']}: the run failed: "
                                         f"{json.dumps(entry.get('status'))[:1500]}")
                    lat, img = outputs(srv, entry)
                    runs.append({"prompt": p, "seed": s, "latent": load_file(lat)["latent_tensor"].float(),
                                 "image": np.asarray(Image.open(img).convert("RGB")), "file": img})
            results[cfg["name"]] = {"cfg": cfg, "runs": runs}
            print(f"[fidelity] {cfg['name']}: done ({time.time() - t0:.0f} s)", flush=True)
    ref = results["stock BF16"]["runs"]
    lp, lp_note = lpips_model()

    def t(img):
        return torch.from_numpy(img.astype(np.float32) / 255.0)
    table = []
    for name, r in results.items():
        runs = r["runs"]
        row = {"configuration": name}
        if name != "stock BF16":
            ps = [fidelity.psnr(t(x["image"]), t(y["image"]))[0] for x, y in zip(runs, ref)]
            row["per_image"] = [{"prompt": x["prompt"], "seed": x["seed"], "psnr_db": round(min(v, 99.0), 3)}
                                for x, v in zip(runs, ps)]
            row["psnr_db"] = float(np.mean([min(v, 99.0) for v in ps]))
            row["psnr_min_db"] = float(min(ps))
            row["ssim"] = float(np.mean([fidelity.ssim(t(x["image"]), t(y["image"]))[0] for x, y in zip(runs, ref)]))
            row["latent_rel_error"] = float(np.mean([fidelity.relative_error(x["latent"], y["latent"])
                                                     for x, y in zip(runs, ref)]))
            if lp is not None:
                with torch.no_grad():
                    row["lpips"] = float(np.mean([float(lp(t(x["image"]).permute(2, 0, 1)[None] * 2 - 1,
                                                           t(y["image"]).permute(2, 0, 1)[None] * 2 - 1))
                                                  for x, y in zip(runs, ref)]))
        if demo:
            ok = [demo_scenes.judge(x["image"], x["prompt"]) for x in runs]
            row["follows_prompt"] = sum(o["colour_ok"] and o["position_ok"] for o in ok) / len(ok)
        table.append(row)
    stock = [row for row in table if row["configuration"].startswith("stock fp8")]
    verdicts = []
    for row in table:
        if not row["configuration"].startswith("ours"):
            continue
        why = []
        if row["psnr_db"] < TARGET_DB:
            why.append(f"PSNR {row['psnr_db']:.2f} dB < {TARGET_DB:.0f} dB")
        for s in stock:
            for k, better in (("psnr_db", 1), ("ssim", 1), ("latent_rel_error", -1), ("lpips", -1)):
                if k in row and k in s and (row[k] - s[k]) * better <= 0 and not (k == "ssim" and row[k] == 1.0):
                    why.append(f"{k} {row[k]:.4g} not better than {s['configuration']}'s {s[k]:.4g}")
        row["target_met"] = not why
        row["misses"] = why
        verdicts.append((row["configuration"], why))
    write_reports(a, table, verdicts, results, prompts, seeds, lp_note, demo)
    return 1 if any(why for _, why in verdicts) else 0


def write_reports(a, table, verdicts, results, prompts, seeds, lp_note, demo) -> None:
    import numpy as np
    from PIL import Image
    cols = ["psnr_db", "psnr_min_db", "ssim", "latent_rel_error"] + (["lpips"] if "lpips" in table[-1] else []) \
        + (["follows_prompt"] if demo else [])
    heads = {"psnr_db": "PSNR dB (mean)", "psnr_min_db": "PSNR dB (min)", "ssim": "SSIM",
             "latent_rel_error": "final-latent rel. error", "lpips": "LPIPS", "follows_prompt": "follows prompt"}
    lines = [f"# Fidelity against stock ComfyUI BF16 ({'demo model' if demo else a.ckpt_name})", "",
             f"{len(prompts)} prompts x seeds {','.join(map(str, seeds))}; {a.size}x{a.size}, {a.steps} steps, "
             f"cfg {a.cfg}, {a.sampler}/{a.scheduler}; device: {'GPU' if a.gpu else 'CPU'}; {lp_note}.", "",
             "| configuration | " + " | ".join(heads[c] for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for row in table:
        cells = []
        for c in cols:
            v = row.get(c)
            cells.append("reference" if v is None and c != "follows_prompt" else
                         f"{v:.0%}" if c == "follows_prompt" else f"{v:.2f}" if c.startswith("psnr") else f"{v:.4f}")
        lines.append(f"| {row['configuration']} | " + " | ".join(cells) + " |")
    lines += ["", f"Target: the pack >= {TARGET_DB:.0f} dB PSNR and better than both stock FP8 modes on every metric."]
    for name, why in verdicts:
        lines.append(f"- {name}: " + ("met" if not why else "MISSED: " + "; ".join(why)))
    if not a.gpu:
        lines.append("- On a CPU ComfyUI computes in FP32: stock BF16 is the BF16 weights in FP32 arithmetic, and "
                     "stock `fp8_e4m3fn` and `fp8_e4m3fn_fast` are both weight-only FP8 (FP8 weights, FP32 "
                     "arithmetic, activations never quantized: ComfyUI uses FP8 matmuls only on GPUs that have "
                     "them), while the pack quantizes the activations to FP8 as well (W8A8, as on a GPU, through "
                     "its reference path). On a CPU the stock modes are therefore not the W8A8 FP8 that "
                     "`fp8_e4m3fn_fast` runs on a GPU, and the comparison favours them.")
    with open(os.path.join(a.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(a.out, "report.json"), "w") as f:
        json.dump({"table": table, "settings": {"size": a.size, "steps": a.steps, "cfg": a.cfg, "seeds": seeds,
                                                "prompts": prompts, "device": "gpu" if a.gpu else "cpu"}}, f,
                  indent=1)
    # grid: rows = the first prompts (first seed); columns = BF16 | best of ours | stock fp8 | stock fast
    ours = max((r for r in table if r["configuration"].startswith("ours")), key=lambda r: r["psnr_db"])
    columns = ["stock BF16", ours["configuration"], "stock fp8_e4m3fn", "stock fp8_e4m3fn_fast"]
    rows = [i for i, r in enumerate(results["stock BF16"]["runs"]) if r["seed"] == seeds[0]][:6]
    tiles = [[results[c]["runs"][i]["image"] for c in columns] for i in rows]
    h, w = tiles[0][0].shape[:2]
    pad = 4
    grid = np.full((len(rows) * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, np.uint8)
    for ri, row in enumerate(tiles):
        for cj, img in enumerate(row):
            y, x = pad + ri * (h + pad), pad + cj * (w + pad)
            grid[y:y + h, x:x + w] = img
    Image.fromarray(grid).save(os.path.join(a.out, "grid.png"))
    with open(os.path.join(a.out, "grid.txt"), "w") as f:
        f.write("columns: " + " | ".join(columns) + "\nrows: " + "\n      ".join(
            results["stock BF16"]["runs"][i]["prompt"] for i in rows) + "\n")
    print("\n".join(lines))
    print(f"[fidelity] wrote {a.out}/report.md, report.json, grid.png")
    if a.record:
        sys.path.insert(0, os.path.join(REPO, "bench"))
        from common import write_cpu_record
        setup = (f"{'the demo model' if demo else a.ckpt_name}, {len(prompts)} prompts x seeds "
                 f"{','.join(map(str, seeds))}, {a.size}x{a.size}, {a.steps} steps, cfg {a.cfg}; {lp_note}")
        body = lines[next(i for i, x in enumerate(lines) if x.startswith("| configuration")):]
        if a.gpu:
            import torch
            body = [f"- GPU: {torch.cuda.get_device_name(0)} (the table's runs; the header's machine line is the "
                    "host's)", ""] + body
        write_cpu_record("Fidelity protocol: stock ComfyUI BF16 vs stock FP8 vs the pack", "scripts/fidelity.py",
                         "", setup, body, a.record)


if __name__ == "__main__":
    sys.exit(main())
