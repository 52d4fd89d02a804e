#!/usr/bin/env python3
"""End to end through ``POST /prompt`` on a real ComfyUI server: seconds per image and images per hour of the
bundled workflow (text encoders, model, 28 steps, VAE decode, PNGs written), stock ComfyUI's modes against the
pack's, on random weights of the real shapes (bench/e2e_models.py builds the files). One server per run; each
mode's graph is queued twice: the first run pays the loads, the calibration (ours) and the compile, the second
is the steady state a batch job sees (the same graph with another seed: ComfyUI re-runs only the sampler and
what follows it).

    python3 bench/e2e_bench.py --comfy /path/to/ComfyUI --models /tmp/e2e-models --variant large \\
        --modes stock_bf16,ours,stock_file_compile,stock_fast_compile [--vram-cap-gib 16] [--out FILE.md]

Modes:
- ``stock_bf16``: UNETLoader (BF16 file, weight_dtype default) -> KSampler, the reference;
- ``stock_fast_compile``: UNETLoader weight_dtype fp8_e4m3fn_fast -> TorchCompileModel (inductor);
- ``stock_file`` / ``stock_file_compile``: stock UNETLoader reading **our saved calibrated FP8 file** (the newest
  ComfyUI runs its static input scales itself), without / with TorchCompileModel. ``ours`` must run first: its
  graph also saves that file (SD35FP8SaveCheckpoint);
- ``ours``: the bundled workflow as shipped (SD35FP8CheckpointLoader -> SD35FP8Calibrate -> SD35FP8Autocast),
  with the VAE from a VAELoader (the model file holds none).

``--vram-cap-gib N`` emulates an N GiB card: ComfyUI is started with ``--reserve-vram (total - N)`` (its memory
planning sees N GiB) and every torch allocation of the server process is capped at N GiB
(``torch.cuda.set_per_process_memory_fraction``, through bench/vram_cap/launch.py); the device-level peak
(NVML, every allocation of every process) is reported beside it. ``--workdir`` keeps ComfyUI's user folder (and
so the pack's calibration cache) between runs. Per mode: first run s, steady s per batch, s per image, images per
hour, device peak VRAM GiB, PSNR of its images against stock BF16's (same seeds), NaN-free images.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shlex
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, HERE)
from comfy_harness import ComfyServer  # noqa: E402
from sd35_batch import image_metrics  # noqa: E402
import e2e_models  # noqa: E402

WORKFLOW = {"large": "sd35_large_fp8_api.json", "medium": "sd35_medium_fp8_api.json"}
MODES = ("stock_bf16", "stock_fast_compile", "stock_file", "stock_file_compile", "ours")
SAVED = "sd35_fp8/e2e_calibrated"  # where the ours graph saves the calibrated file (diffusion_models/)


class PeakVRAM:
    """Device-level memory in use (NVML: every process, every allocator), sampled every 50 ms."""

    def __init__(self):
        self.ok, self.peak, self._stop = False, 0, threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self._h = pynvml.nvmlDeviceGetHandleByIndex(0)
            self._read = lambda: pynvml.nvmlDeviceGetMemoryInfo(self._h).used
            self.total = pynvml.nvmlDeviceGetMemoryInfo(self._h).total
            self.name = pynvml.nvmlDeviceGetName(self._h)
            self.name = self.name.decode() if isinstance(self.name, bytes) else self.name
            self.ok = True
        except Exception as e:  # no NVML (the CPU dry run)
            self.why = str(e)

    def __enter__(self):
        if self.ok:
            self.peak = self._read()
            self._stop.clear()
            self._t = threading.Thread(target=self._poll, daemon=True)
            self._t.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._read())

    def __exit__(self, *exc):
        if self.ok:
            self._stop.set()
            self._t.join()
            self.peak = max(self.peak, self._read())

    def gib(self):
        return self.peak / 2**30 if self.ok else float("nan")


def nodes(wf: dict, cls: str) -> list[str]:
    return [k for k, v in wf.items() if v["class_type"] == cls]


def one(wf: dict, cls: str) -> str:
    ks = nodes(wf, cls)
    if len(ks) != 1:
        raise SystemExit(f"the bundled workflow should have one {cls} node, it has {len(ks)}")
    return ks[0]


def graphs(variant: str, a) -> dict:
    """The mode's API graphs, built from the bundled workflow by node type (never by id)."""
    with open(os.path.join(REPO, "workflows", "api", WORKFLOW[variant])) as f:
        base = json.load(f)
    loader, cal = one(base, "SD35FP8CheckpointLoader"), one(base, "SD35FP8Calibrate")
    auto = one(base, "SD35FP8Autocast")
    ks, dec, lat, save = one(base, "KSampler"), one(base, "VAEDecode"), one(base, "EmptySD3LatentImage"), \
        one(base, "SaveImage")
    clips = one(base, "TripleCLIPLoader")
    model_file = e2e_models.mmdit_file(variant, a.tiny)
    base[lat]["inputs"].update(width=a.size, height=a.size, batch_size=a.batch)
    base[ks]["inputs"]["steps"] = a.steps
    base[cal]["inputs"].update(width=a.size, height=a.size, steps=a.steps)
    if a.calib_prompts:
        base[cal]["inputs"]["prompts"] = "\n".join(base[cal]["inputs"]["prompts"].splitlines()[:a.calib_prompts])
    base["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": e2e_models.VAE_FILE}}
    base[dec]["inputs"]["vae"] = ["vae", 0]
    if a.tiny:  # no T5-XXL in the CPU dry run
        base[clips] = {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": e2e_models.CLIP_FILES["clip_l"], "clip_name2": e2e_models.CLIP_FILES["clip_g"],
            "type": "sd3"}}
    else:
        base[clips]["inputs"].update(clip_name1=e2e_models.CLIP_FILES["clip_l"],
                                     clip_name2=e2e_models.CLIP_FILES["clip_g"],
                                     clip_name3=e2e_models.CLIP_FILES["t5xxl"])
    out = {}
    ours = copy.deepcopy(base)
    ours[loader]["inputs"]["ckpt_name"] = model_file
    ours[save]["inputs"]["filename_prefix"] = f"e2e/{variant}_ours"
    out["ours"] = ours
    # queued after ours' runs: only the loader, the text encoders, the (cached) calibration and the save execute
    out["ours_save"] = {k: ours[k] for k in (loader, clips, cal)}
    out["ours_save"]["save"] = {"class_type": "SD35FP8SaveCheckpoint",
                                "inputs": {"model": [cal, 0], "filename": f"{SAVED}_{variant}", "overwrite": True}}

    def stock(name, unet, dtype, compile_):
        g = copy.deepcopy(base)
        for k in (loader, cal, auto):
            del g[k]
        g["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": dtype}}
        src = ["unet", 0]
        if compile_:
            g["compile"] = {"class_type": "TorchCompileModel", "inputs": {"model": src, "backend": "inductor"}}
            src = ["compile", 0]
        g[ks]["inputs"]["model"] = src
        g[save]["inputs"]["filename_prefix"] = f"e2e/{variant}_{name}"
        return g

    out["stock_bf16"] = stock("stock_bf16", model_file, "default", False)
    out["stock_fast_compile"] = stock("stock_fast_compile", model_file, "fp8_e4m3fn_fast", True)
    saved = f"{SAVED}_{variant}.safetensors"
    out["stock_file"] = stock("stock_file", saved, "default", False)
    out["stock_file_compile"] = stock("stock_file_compile", saved, "default", True)
    return out, ks


def with_seed(g: dict, ks: str, seed: int) -> dict:
    g = copy.deepcopy(g)
    g[ks]["inputs"]["seed"] = seed
    return g


def exec_seconds(entry: dict) -> float:
    """ComfyUI's own execution time of a prompt (execution_start -> execution_success timestamps)."""
    ts = {m[0]: m[1].get("timestamp") for m in entry.get("status", {}).get("messages", [])}
    if ts.get("execution_start") and ts.get("execution_success"):
        return (ts["execution_success"] - ts["execution_start"]) / 1000
    return float("nan")


def load_images(paths: list[str]):
    import numpy as np
    from PIL import Image
    return [np.asarray(Image.open(p).convert("RGB"), dtype=np.float64) for p in sorted(paths)]


def node_text(entry: dict, node: str) -> str:
    out = entry.get("outputs", {}).get(node, {})
    t = out.get("text") or out.get("string") or []
    return t[0] if t else ""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--comfy", required=True, help="the ComfyUI folder to run (its main.py)")
    ap.add_argument("--models", required=True, help="where the random-weight model files are (built if missing)")
    ap.add_argument("--variant", default="large", choices=sorted(WORKFLOW))
    ap.add_argument("--modes", default="stock_bf16,ours,stock_file_compile,stock_fast_compile")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--calib-prompts", type=int, help="the first N prompts of the shipped calibration set")
    ap.add_argument("--steady-runs", type=int, default=1, help="steady-state runs per mode (median)")
    ap.add_argument("--vram-cap-gib", type=float)
    ap.add_argument("--workdir", help="ComfyUI's work folder (user/, output/); kept between runs")
    ap.add_argument("--comfy-arg", action="append", default=[],
                    help="one more argument for ComfyUI's main.py (repeat), e.g. --comfy-arg=--front-end-root=DIR")
    ap.add_argument("--tiny", action="store_true", help="2-block model, no T5, on the CPU: a dry run")
    ap.add_argument("--out")
    ap.add_argument("--json")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {bad}; choose from {', '.join(MODES)}")
    if any(m.startswith("stock_file") for m in modes) and "ours" in modes and \
            modes.index("ours") > min(modes.index(m) for m in modes if m.startswith("stock_file")):
        raise SystemExit("stock_file modes read the file the ours mode saves: put ours before them")

    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, os.path.join(HERE, "e2e_models.py"), "--comfy", a.comfy, "--models",
                        a.models, "--variants", a.variant] + (["--tiny"] if a.tiny else []), text=True)
    if r.returncode:
        raise SystemExit("building the model files failed")
    notes = [f"model files ready in {time.perf_counter() - t0:.0f} s"]

    g, ks = graphs(a.variant, a)
    extra, launcher = [], None
    device_args = ["--cpu"] if a.tiny else []
    gpu = PeakVRAM()  # NVML, not torch: a CUDA context in this process would count in the device's peak
    if a.vram_cap_gib:
        if not gpu.ok:
            raise SystemExit(f"--vram-cap-gib needs NVML to read the GPU's size: {gpu.why}")
        total = gpu.total / 2**30
        extra = ["--reserve-vram", f"{max(total - a.vram_cap_gib, 0):.2f}"]
        os.environ["SD35FP8_VRAM_CAP_GIB"] = str(a.vram_cap_gib)
        launcher = os.path.join(HERE, "vram_cap", "launch.py")
        notes.append(f"VRAM cap {a.vram_cap_gib:g} GiB: ComfyUI started with --reserve-vram {extra[1]} (device "
                     f"{total:.1f} GiB; DynamicVRAM takes it as its headroom too) and every torch allocation of the "
                     f"server capped at {a.vram_cap_gib:g} GiB (bench/vram_cap/launch.py)")
    os.environ["COMFYUI_DIR"] = os.path.abspath(a.comfy)  # the server the harness starts
    srv = ComfyServer(a.models, workdir=a.workdir, extra_args=extra + a.comfy_arg, device_args=device_args,
                      launcher=launcher)
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
    t0 = time.perf_counter()
    srv.start(timeout=300)
    system = srv.get("/system_stats")["system"]
    notes.append(f"server start {time.perf_counter() - t0:.1f} s; ComfyUI {system.get('comfyui_version')}, python "
                 f"{system.get('python_version', '').split()[0]}, torch {system.get('pytorch_version')}")
    print(notes[-1], flush=True)
    rows, ref_images = [], None
    try:
        for mode in modes:
            row = {"mode": mode}
            try:
                with gpu as peak:
                    t0 = time.perf_counter()
                    e1 = srv.run(with_seed(g[mode], ks, 1000), timeout=1800)
                    row["first run s"] = time.perf_counter() - t0
                    steady = []
                    for i in range(a.steady_runs):
                        t0 = time.perf_counter()
                        e2 = srv.run(with_seed(g[mode], ks, 2000 + i), timeout=1800)
                        steady.append((time.perf_counter() - t0, exec_seconds(e2)))
                steady.sort()
                wall, execd = steady[len(steady) // 2]
                row.update({"steady s/batch": wall, "ComfyUI exec s": execd, "s/image": wall / a.batch,
                            "images/hour": 3600 * a.batch / wall, "device peak GiB": peak.gib()})
                row["first-run extra s"] = row["first run s"] - wall
                imgs = load_images(srv.output_images(e2))
                import numpy as np
                row["finite, not flat"] = all(np.isfinite(x).all() and x.std() > 0 for x in imgs)
                if mode == "stock_bf16":
                    ref_images = imgs
                row["PSNR vs stock BF16 dB"] = (min(image_metrics(zip(imgs, ref_images))[0])
                                               if ref_images and mode != "stock_bf16" else float("nan"))
                if mode == "ours":
                    cal = one(g["ours"], "SD35FP8Calibrate")
                    notes.append(f"{mode}: calibration report: " + " ".join(node_text(e1, cal).split())[:600])
                    if any(m.startswith("stock_file") for m in modes):
                        t0 = time.perf_counter()
                        e3 = srv.run(g["ours_save"], timeout=1800)
                        notes.append(f"ours: the calibrated FP8 file saved in {time.perf_counter() - t0:.1f} s: "
                                     + " ".join(node_text(e3, "save").split())[:300])
            except Exception as e:  # one mode failing must not lose the others
                row["error"] = " ".join(str(e).split())[:500]
                notes.append(f"{mode}: FAILED: {row['error']}\n{srv.log_tail(30)}")
            rows.append(row)
            print(json.dumps(row), flush=True)
            srv.post("/free", {"unload_models": True, "free_memory": True})
            time.sleep(2)
    finally:
        log = srv.log_text()
        srv.stop()
    for line in log.splitlines():  # what ComfyUI said about memory and loading (offloading shows here)
        if any(w in line for w in ("loaded completely", "loaded partially", "Requested to load", "DynamicVRAM",
                                   "offload", "lowvram", "Prompt executed", "sd35fp8:", "compile")):
            notes.append("log: " + line.strip()[:300])

    import torch  # its version only (no CUDA context here)
    comfy_version = system.get("comfyui_version", "?")
    import common
    commit = common.commit()
    gpu_name = gpu.name if gpu.ok else "none (CPU)"
    meta = (f"GPU: {gpu_name}; torch {torch.__version__}; ComfyUI {comfy_version}; date {datetime.date.today()}; "
            f"commit "
            f"{commit}; {a.variant}, {a.size}², batch {a.batch}, {a.steps} steps"
            + (f"; calibration: first {a.calib_prompts} prompts of the shipped set" if a.calib_prompts else "")
            + f"\ncommand: python3 bench/e2e_bench.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}")
    cols = ["mode", "first run s", "steady s/batch", "ComfyUI exec s", "s/image", "images/hour", "first-run extra s",
            "device peak GiB", "PSNR vs stock BF16 dB", "finite, not flat", "error"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.2f}" if isinstance(row.get(c), float) else str(row.get(c, ""))
                                       for c in cols) + " |")
    by = {r["mode"]: r for r in rows if "error" not in r}
    if "stock_bf16" in by:
        for m, r in by.items():
            if m != "stock_bf16":
                lines.append(f"\n{m}: {by['stock_bf16']['steady s/batch'] / r['steady s/batch']:.2f}x stock BF16's "
                             "images per hour")
    text = "\n".join([meta, "", *lines, "", *notes])
    print("\n" + text, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# End to end through /prompt\n\n{text}\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
