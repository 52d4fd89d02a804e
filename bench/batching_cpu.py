#!/usr/bin/env python3
"""Images per second of the batch client with 1, 2, 4, 8 prompts per sampler call (SD35FP8PromptBatch), on a real
ComfyUI with the tiny embedded model: a CPU figure of the dynamic batching's overhead and gain, not a GPU one.

    python3 bench/batching_cpu.py [--items 16] [--size 256] [--steps 8] [--out bench/results/<file>.md]
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))
from comfy_harness import ComfyServer  # noqa: E402
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
    models, wf_path, items = run_batch.tiny_batch(tmp, a.items, a.size, a.steps)
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
    sys.path.insert(0, HERE)
    import common
    base = rows[0][1]
    common.write_cpu_record(
        "Dynamic batching on the CPU (tiny model)", "bench/batching_cpu.py", "",
        f"the tiny embedded SD3.5 model (2 joint blocks, random weights), {a.items} prompts, {a.size}², {a.steps} "
        "steps, CFG 4.5, euler; images/s from the batch client's summary (queueing, sampling, VAE decode, PNG "
        "download), calibration cached before the measured runs",
        ["| prompts per sampler call | images/s | vs 1 per call |", "|---|---|---|"]
        + [f"| {n} | {v:.2f} | {v / base:.2f}x |" for n, v in rows], a.out)

if __name__ == "__main__":
    main()
