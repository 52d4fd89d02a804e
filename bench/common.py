"""Shared by the GPU benchmarks: ComfyUI import without its server, SD3.5 random-weight state dicts
of the real shapes built on the GPU, model loading (stock / ours), timing and error helpers."""
from __future__ import annotations

import importlib
import os
import statistics
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# name: (depth, MMDiT-X blocks with attn2, pos_embed_max_size)
SHAPES = {"large": (38, 0, 192), "medium": (24, 13, 384)}
TEXT_TOKENS = 154  # ComfyUI: 77 (CLIP-L/G) + max(77, T5)


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


def import_glue(comfy_dir: str, cpu: bool = False):
    """Import ComfyUI's model code (no server) and this pack's glue as package ``sd35pack``.
    TransformerEngine, when installed, is imported first (before torch loads cuDNN: fp8/te_backend.py)."""
    if not cpu:
        sys.path.insert(0, REPO)
        from fp8.te_backend import preload
        preload()
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.options
    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    import comfy.cli_args  # noqa: F401  (parse ComfyUI's defaults, not our flags)
    sys.argv = saved
    # the pack as a package without running nodes/__init__ (which needs comfy_api.latest and thus PyAV)
    for name, path in (("sd35pack", REPO), ("sd35pack.nodes", os.path.join(REPO, "nodes"))):
        m = types.ModuleType(name)
        m.__path__ = [path]
        sys.modules[name] = m
    sys.path.insert(0, os.path.join(REPO, "scripts"))
    return importlib.import_module("sd35pack.nodes.glue")


def set_attention_config(head_dim: int, spec: str) -> tuple:
    """Run the FP8 attention kernel with ``spec`` ("BLOCK_M,BLOCK_N,warps,stages,warp_spec,exp_mode") for
    ``head_dim`` instead of fp8.attention.ATTN_CONFIG's, in every import of the module (the pack is imported
    as ``fp8`` and as ``sd35pack.fp8``; the custom op runs the first one's code). Returns the config."""
    import importlib
    cfg = tuple(int(v) for v in spec.split(","))
    if len(cfg) != 6:
        raise SystemExit(f"--attn-config needs 6 comma-separated integers, got {spec!r}")
    cfg = (*cfg[:4], bool(cfg[4]), cfg[5])
    for name in ("fp8.attention", "sd35pack.fp8.attention"):
        try:
            importlib.import_module(name).ATTN_CONFIG[head_dim] = cfg
        except ImportError:
            pass
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


def cond(seed: int, batch: int = 1):
    import torch
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, TEXT_TOKENS, 4096, generator=g),
             {"pooled_output": torch.randn(batch, 2048, generator=g)}]]


def denoiser_inputs(batch: int, size: int, device, seed: int = 5):
    import torch
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, size // 8, size // 8, generator=g).to(device)
    sigma = torch.full((batch,), 0.8, device=device)
    ctx = torch.cat([cond(1 + i % 2)[0][0] for i in range(batch)]).to(device)
    y = torch.cat([cond(1 + i % 2)[0][1]["pooled_output"] for i in range(batch)]).to(device)
    return x, sigma, ctx, y


def call(patcher, x, sigma, ctx, y):
    """One denoiser call the way ComfyUI's sampler makes it (the patcher's transformer_options, so
    APPLY_MODEL wrappers and attention overrides apply)."""
    import copy
    to = copy.copy(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers  # the sampler puts them there (comfy.sampler_helpers)
    return patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y, transformer_options=to)


class Denoiser:
    """One denoiser call as sampling makes it; for our MODELs with the FP8 run state the sampling
    wrapper installs (``glue.prepare_run``), installed once per model as the wrapper does once per run."""

    def __init__(self, glue):
        self.glue = glue
        self.state: dict = {}

    def clear(self) -> None:
        self.state.clear()

    def __call__(self, p, inp):
        import torch
        with torch.no_grad():
            if self.glue.KEY not in p.model_options:
                return call(p, *inp)
            if self.state.get("p") is not p:
                self.state["p"], self.state["ctx"] = p, self.glue.prepare_run(p)
            enabled, recipe = self.state["ctx"]
            with self.glue.run_context(p, enabled, recipe):
                return call(p, *inp)


def quick_calibrate(glue, patcher, inputs) -> dict:
    """Calibrate ``patcher``'s FP8 layers from apply_model at 7 sigmas on ``inputs`` (x, sigma, ctx, y), max
    method, and install the scales; returns the amax table (the benchmarks' stand-in for a sampling run)."""
    import torch
    fp8 = sys.modules["sd35pack.fp8"]
    x, sigma, ctx, y = inputs
    session = fp8.CalibrationSession("max")
    with torch.no_grad(), fp8.fp8_autocast(enabled=False, calibrating=session):
        for s in (1.0, 0.9, 0.75, 0.6, 0.4, 0.2, 0.05):
            call(patcher, x, torch.full_like(sigma, s), ctx, y)
    dm = patcher.model.diffusion_model
    amax = fp8.calibrated_amax(session, dm)
    glue.install_scales(dm, amax)
    return amax


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


def write_rows_report(header: list[str], rows: list[dict], out: str | None) -> str:
    """Markdown: the header lines, then one section per row (4 significant digits); printed and written."""
    lines = list(header) + [""]
    for r in rows:
        lines.append(f"## {r['mode']}")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in r.items() if k != "mode"]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text)
    return text
