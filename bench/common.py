"""Shared by the GPU benchmarks: ComfyUI import without its server, SD3.5 random-weight state dicts
of the real shapes built on the GPU, model loading (stock / ours), timing and error helpers."""
from __future__ import annotations

import importlib
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _p in (REPO, os.path.join(REPO, "scripts")):  # the library as ``sd35fp8`` (one import name), the tools
    if _p not in sys.path:
        sys.path.insert(0, _p)

# the in-process adapter and denoiser calls are the tests' helpers (tests/support/adapter.py)
from tests.support.adapter import (Denoiser, call, cond, denoiser_inputs, import_adapter,  # noqa: E402,F401
                                   quick_calibrate)

# name: (depth, MMDiT-X blocks with attn2, pos_embed_max_size)
SHAPES = {"large": (38, 0, 192), "medium": (24, 13, 384)}
TEXT_TOKENS = 154  # ComfyUI: 77 (CLIP-L/G) + max(77, T5)


def commit() -> str:
    """The code's commit for a record: SD35FP8_COMMIT when the caller knows it (a copied tree's git metadata can be
    stale), else git's HEAD, marked ``+changes`` when the tree differs from it."""
    import subprocess
    if os.environ.get("SD35FP8_COMMIT"):
        return os.environ["SD35FP8_COMMIT"]
    git = ["git", "-C", REPO]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return (head or "unknown") + (" +changes" if dirty else "")


def arg_parser(variant: bool = True, size: bool = True):
    """The arguments every benchmark takes: ``--comfy`` (ComfyUI source), ``--variant``, ``--size``."""
    import argparse
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", default=os.path.join(REPO, ".comfyui"))
    if variant:
        ap.add_argument("--variant", default="large")
    if size:
        ap.add_argument("--size", type=int, default=1024)
    return ap


def set_attention_config(head_dim: int, spec: str) -> tuple:
    """Run the FP8 attention kernel with ``spec`` ("BLOCK_M,BLOCK_N,warps,stages,warp_spec,exp_mode") for
    ``head_dim`` instead of sd35fp8.kernels.attention.ATTN_CONFIG's. Returns the config."""
    cfg = tuple(int(v) for v in spec.split(","))
    if len(cfg) != 6:
        raise SystemExit(f"--attn-config needs 6 comma-separated integers, got {spec!r}")
    cfg = (*cfg[:4], bool(cfg[4]), cfg[5])
    importlib.import_module("sd35fp8.kernels.attention").ATTN_CONFIG[head_dim] = cfg
    return cfg


def state_dict(variant: str, device: str = "cuda", seed: int = 0, depth: int | None = None):
    """Random weights (std 0.02) in the official key layout, generated on ``device`` (fast on a GPU)."""
    import torch
    import tiny_sd35
    d, attn2, pos = SHAPES[variant]
    if depth:
        d, attn2, pos = depth, min(attn2, depth), 64
    with torch.device(device):
        g = torch.Generator(device).manual_seed(seed)
        real_randn = torch.randn

        def randn(*shape, generator=None, **kw):  # tiny_sd35 passes a CPU generator: use ours
            return real_randn(*shape, generator=g, device=device, **kw)

        torch.randn = randn
        try:
            sd = tiny_sd35.mmdit_state_dict(depth=d, variant="medium" if attn2 else "large", attn2_blocks=attn2,
                                            pos_embed_max_size=pos, seed=seed)
        finally:
            torch.randn = real_randn
    return sd


def time_cuda(fn, n: int = 10, warmup: int = 2):
    """Median ms of ``n`` calls after ``warmup``, CUDA events; returns (median_ms, last_output)."""
    import torch
    out = None
    for _ in range(warmup):
        out = fn()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts), out


def back_to_back_ms(fn, n: int) -> float:
    """ms per call of ``n`` calls issued back to back with one sync at the end (CUDA events): what a loop
    without host syncs gets, host time hidden wherever the GPU is the slower side."""
    import torch
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(n):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) / n


def rel(x, ref) -> float:
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm())


def run_child(cmd: list[str], mode: str) -> dict:
    """Run one measurement in a fresh process (its own peak RSS/VRAM); it prints ``RESULT <json>``."""
    import json
    import subprocess
    r = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
    if r.returncode or line is None:
        print(f"[{mode}] FAILED rc={r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}", flush=True)
        return {"mode": mode, "error": (r.stderr.strip().splitlines() or ["?"])[-1][:300]}
    row = json.loads(line[7:])
    print(f"[{mode}] " + json.dumps(row), flush=True)
    return row


def emit(text: str, out: str | None) -> str:
    """Print a record's text and write it to ``out`` (when given)."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text


def write_rows_report(header: list[str], rows: list[dict], out: str | None) -> str:
    """Markdown: the header lines, then one section per row (4 significant digits); printed and written."""
    lines = list(header) + [""]
    for r in rows:
        lines.append(f"## {r['mode']}")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in r.items() if k != "mode"]
        lines.append("")
    return emit("\n".join(lines), out)


def write_cpu_record(title: str, script: str, versions: str, setup: str, table: list[str], out: str | None,
                     notes: str = "") -> str:
    """A CPU benchmark record (bench/results/): the machine, torch, ComfyUI and ``versions`` of other tools, the date,
    commit and command line, the ``setup`` sentence, the ``table`` lines; printed, and written to ``out``."""
    import datetime
    import platform
    import shlex
    import torch
    from comfy_harness import comfy_dir
    with open(os.path.join(comfy_dir(), "comfyui_version.py")) as f:
        version = f.read().split('"')[1]
    lines = [f"- machine: CPU only ({os.cpu_count()} cores, {platform.processor() or platform.machine()}), no GPU; "
             f"torch {torch.__version__}; ComfyUI {version}{versions}; date {datetime.date.today()}; commit {commit()}",
             f"- command: `python3 {script} {' '.join(shlex.quote(x) for x in sys.argv[1:])}`", f"- {setup}", "",
             *table]
    return emit(f"# {title}\n\n" + "\n".join(lines) + "\n" + (f"\n{notes}\n" if notes else ""), out)
