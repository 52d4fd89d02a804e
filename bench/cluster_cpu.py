#!/usr/bin/env python3
"""Images per second of a batch through the cluster's queue (Redis + RQ workers, service/worker.py) with 1 and 2
workers, each beside its own CPU ComfyUI on the tiny embedded model, and the same batch sent straight to one
ComfyUI (``--server``) for the queue's overhead. A CPU figure (2 cores shared by everything), not a GPU one.

    python3 bench/cluster_cpu.py [--items 24] [--size 128] [--steps 6] [--out bench/results/<file>.md]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "scripts"))
sys.path.insert(0, REPO)
from comfy_harness import ComfyServer, free_port  # noqa: E402
import run_batch  # noqa: E402


def batch(items, out, *target, wf_path):
    r = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "sd35_batch.py"), items, "--workflow", wf_path,
                        "--out", out, *target], capture_output=True, text=True)
    m = re.search(r"done in (\d+) s: (\d+)/(\d+) items ok.*?\(([\d.]+) images/s\)", r.stderr)
    if r.returncode or not m:
        raise SystemExit(f"{target} failed:\n{r.stderr[-2000:]}")
    return float(m.group(4))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=24)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", default="default,1",
                    help="torch threads per ComfyUI, one run each: 'default' (all cores each) and/or a number")
    ap.add_argument("--out")
    a = ap.parse_args()
    redis_bin = shutil.which("redis-server")
    if not redis_bin:
        raise SystemExit("needs redis-server (Debian: apt-get install redis-server)")
    tmp = tempfile.mkdtemp(prefix="cluster-bench-")
    models, wf_path, items = run_batch.tiny_batch(tmp, a.items, a.size, a.steps)
    rows = []
    for threads in a.threads.split(","):
        rows += [(threads, *r) for r in run(a, redis_bin, tmp, models, wf_path, items, threads)]
    write(a, rows, redis_bin)


def run(a, redis_bin, tmp, models, wf_path, items, threads):
    tmp = os.path.join(tmp, f"t{threads}")
    os.makedirs(tmp)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    redis = subprocess.Popen([redis_bin, "--port", str(port), "--dir", tmp, "--save", ""], stdout=subprocess.DEVNULL)
    env = {"SD35FP8_API_WORKFLOW": wf_path, "SD35FP8_API_WARMUP": "1"}
    if threads != "default":
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    comfys = [ComfyServer(models, workdir=os.path.join(tmp, f"comfy{i}"), env=env) for i in range(2)]
    workers, rows = [], []
    try:
        for c in comfys:
            c.start()
        for c in comfys:  # warm: model loaded and calibrated
            while True:
                try:
                    if c.get("/v1/health/ready", timeout=5).get("ready"):
                        break
                except Exception:  # noqa: BLE001 - 503 until warm
                    pass
                time.sleep(1)
        rows.append(("one ComfyUI, no queue (`--server`)", batch(items, os.path.join(tmp, "direct"), "--server",
                                                                  comfys[0].base, wf_path=wf_path)))
        for n in (1, 2):
            workers.append(subprocess.Popen([sys.executable, "-m", "service.worker", "--queue", url, "--comfy",
                                             comfys[n - 1].base, "--name", f"w{n}"], cwd=REPO,
                                            stdout=open(os.path.join(tmp, f"w{n}.log"), "w"),
                                            stderr=subprocess.STDOUT, start_new_session=True))
            time.sleep(3)
            rows.append((f"queue, {n} worker{'s' if n > 1 else ''}",
                         batch(items, os.path.join(tmp, f"queue{n}"), "--queue", url, wf_path=wf_path)))
            print(rows[-1], flush=True)
    finally:
        for w in workers:
            os.killpg(w.pid, signal.SIGTERM)
        for c in comfys:
            c.stop()
        redis.terminate()
    return rows


def write(a, rows, redis_bin):
    sys.path.insert(0, HERE)
    import common
    base = {t: v for t, n, v in rows if n.startswith("one")}
    redis_v = subprocess.run([redis_bin, "--version"], capture_output=True, text=True).stdout.split()[2]
    common.write_cpu_record(
        "The cluster's queue on the CPU (tiny model): 1 vs 2 workers", "bench/cluster_cpu.py",
        f"; redis-server {redis_v}",
        f"the tiny embedded SD3.5 model (2 joint blocks, random weights), {a.items} prompts, {a.size}², {a.steps} "
        "steps; two ComfyUIs warmed up (loaded, calibrated) before the runs; images/s from the batch client's summary "
        "(queueing, sampling, VAE decode, PNG transfer through Redis, files and manifest)",
        ["| torch threads per ComfyUI | route | images/s | vs one ComfyUI |", "|---|---|---|---|"]
        + [f"| {t} | {n} | {v:.2f} | {v / base[t]:.2f}x |" for t, n, v in rows], a.out)

if __name__ == "__main__":
    main()
