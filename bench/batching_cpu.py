#!/usr/bin/env python3
"""Images per second of the batch client with 1, 2, 4, 8 prompts per sampler call (SD35FP8PromptBatch), on a real
ComfyUI with the tiny embedded model: a CPU figure of the dynamic batching's overhead and gain, not a GPU one.

    python3 bench/batching_cpu.py [--items 16] [--size 256] [--steps 8] [--out bench/results/<file>.md]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_harness import ComfyServer, comfy_dir  # noqa: E402
import run_batch  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--per-call", default="1,2,4,8")
    ap.add_argument("--out")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="batching-")
    models = os.path.join(REPO, ".cache", "models")
    run_batch.make_tiny_models(models)
    wf = run_batch.adapt(run_batch.load_workflow(os.path.join(REPO, "workflows", "api", "sd35_large_fp8_api.json")),
                         ckpt_name=run_batch.TINY_CKPT, tiny_clip=run_batch.TINY_CLIP, width=a.size, height=a.size,
                         batch=1, steps=a.steps, calib_prompts=2)
    wf_path = os.path.join(tmp, "wf.json")
    with open(wf_path, "w") as f:
        json.dump(wf, f)
    items = os.path.join(tmp, "items.txt")
    with open(items, "w") as f:
        f.write("\n".join(f"a red circle on a blue background, variant {i}" for i in range(a.items)) + "\n")
    rows = []
    with ComfyServer(models, workdir=os.path.join(tmp, "comfy")) as srv:
        for n in ["1"] + a.per_call.split(","):  # the first run of 1 warms up (calibration, first loads)
            r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sd35_batch.py"), items, "--server",
                                srv.base, "--workflow", wf_path, "--out", os.path.join(tmp, f"out{n}-{len(rows)}"),
                                "--per-call", n], capture_output=True, text=True)
            m = re.search(r"done in (\d+) s: (\d+)/(\d+) items ok.*?\(([\d.]+) images/s\)", r.stderr)
            if r.returncode or not m:
                raise SystemExit(f"per-call {n} failed:\n{r.stderr[-2000:]}")
            rows.append((n, float(m.group(4))))
            print(f"per call {n}: {m.group(4)} images/s", flush=True)
    rows = rows[1:]
    import torch
    sys.path.insert(0, HERE)
    import common
    commit = common.commit()
    with open(os.path.join(comfy_dir(), "comfyui_version.py")) as f:
        version = f.read().split('"')[1]
    base = rows[0][1]
    lines = [f"- machine: CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no GPU; "
             f"torch {torch.__version__}; ComfyUI {version}; date {datetime.date.today()}; commit {commit}",
             f"- command: `python3 bench/batching_cpu.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}`",
             f"- the tiny embedded SD3.5 model (2 joint blocks, random weights), {a.items} prompts, {a.size}², "
             f"{a.steps} steps, CFG 4.5, euler; images/s from the batch client's summary (queueing, sampling, VAE "
             "decode, PNG download), calibration cached before the measured runs", "",
             "| prompts per sampler call | images/s | vs 1 per call |", "|---|---|---|"]
    lines += [f"| {n} | {v:.2f} | {v / base:.2f}x |" for n, v in rows]
    text = "# Dynamic batching on the CPU (tiny model)\n\n" + "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
