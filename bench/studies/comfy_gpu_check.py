#!/usr/bin/env python3
"""SD3.5 FP8 through ComfyUI's own model code on a GPU: stock ComfyUI vs this pack, same file, same seed.

    python3 bench/comfy_gpu_check.py --comfy .comfyui [--variants medium,large] [--steps 8] [--size 1024]

For each variant it builds a random-weight checkpoint of the real SD3.5 shapes in the official layout,
then loads it twice. Once with stock ComfyUI (``load_diffusion_model_state_dict``, BF16). Once with
the pack's loader (``nodes/adapter.checkpoints.load_sd35_fp8``: FP8 while loading).
It calibrates with ``adapter.calibration.calibrate`` (ComfyUI's own sampler, 2 random conditionings) and samples one
1024² image with CFG (batch 2) through ``comfy.sample.sample`` for: stock BF16; ours weight-only
(autocast off); ours calibrated FP8.
It reports the final-latent and one-step (x0) error vs stock BF16, NaN/Inf, ms per step, peak VRAM
and the diffusion model's weight VRAM. No ComfyUI server or text encoders are needed: the
conditioning is random tensors of ComfyUI's shapes (154 tokens x 4096, pooled 2048).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import os
import sys
import tempfile
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
from common import REPO, import_adapter  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--comfy", default=os.path.join(REPO, ".comfyui"))
    ap.add_argument("--variants", default="medium,large")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out")
    ap.add_argument("--weight-scaling", default="per_tensor", help="per_tensor, per_channel or both (comma list)")
    ap.add_argument("--stock-fp8", action="store_true", help="also stock fp8_e4m3fn and fp8_e4m3fn_fast, same run")
    ap.add_argument("--cpu", action="store_true", help="smoke-test the script without a GPU")
    ap.add_argument("--depth", type=int, help="override the block count (smoke tests)")
    a = ap.parse_args()
    adapter = import_adapter(a.comfy, a.cpu)
    import torch
    from safetensors.torch import save_file

    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    import tiny_sd35

    def cond(seed):
        g = torch.Generator().manual_seed(seed)
        return [[torch.randn(1, 154, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]

    def run(model, steps, seed=123):
        lat = torch.zeros(1, 16, a.size // 8, a.size // 8)
        noise = comfy.sample.prepare_noise(lat, seed)
        if not a.cpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = comfy.sample.sample(model, noise, steps, 4.5, "euler", "sgm_uniform", cond(1), cond(2), lat,
                                  disable_pbar=True, seed=seed)
        if a.cpu:
            return out.float().cpu(), (time.perf_counter() - t0) * 1000 / steps, 0
        torch.cuda.synchronize()
        return out.float().cpu(), (time.perf_counter() - t0) * 1000 / steps, torch.cuda.max_memory_allocated()

    fp8 = importlib.import_module("sd35fp8")

    def denoiser(patcher, amax=None, enabled=False, n=10):
        """One denoiser call (apply_model) at CFG batch 2 on fixed inputs; returns (output, median ms)."""
        mm.load_models_gpu([patcher])
        dev = patcher.load_device
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 16, a.size // 8, a.size // 8, generator=g).to(dev)
        sigma = torch.full((2,), 0.8, device=dev)
        c1, c2 = cond(1)[0], cond(2)[0]
        ctx = torch.cat([c1[0], c2[0]]).to(dev)
        y = torch.cat([c1[1]["pooled_output"], c2[1]["pooled_output"]]).to(dev)
        dm = patcher.model.diffusion_model
        if fp8.fp8_layers(dm):
            adapter.sampling.install_scales(dm, amax)
        ts = []
        with torch.no_grad(), fp8.fp8_autocast(enabled=enabled):
            for _ in range(n + 2):
                if not a.cpu:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y)
                if not a.cpu:
                    torch.cuda.synchronize()
                ts.append((time.perf_counter() - t0) * 1000)
        ts = sorted(ts[2:])
        return out.float().cpu(), ts[len(ts) // 2]

    def rel(x, ref):
        return float((x - ref).norm() / ref.norm())

    rows = []
    tmp = tempfile.mkdtemp(prefix="sd35ck-", dir="/tmp")
    for variant in a.variants.split(","):
        depth, attn2, pos = {"medium": (24, 13, 384), "large": (38, 0, 192)}[variant]
        if a.depth:
            depth, attn2, pos = a.depth, min(attn2, a.depth), 64
        t0 = time.perf_counter()
        sd = tiny_sd35.mmdit_state_dict(depth=depth, variant="medium" if attn2 else "large", attn2_blocks=attn2,
                                        pos_embed_max_size=pos, seed=0)
        path = os.path.join(tmp, f"sd3.5_{variant}.safetensors")
        save_file(sd, path)
        n_params = sum(v.numel() for v in sd.values())
        del sd
        print(f"[{variant}] built {n_params / 1e9:.2f} B params in {time.perf_counter() - t0:.0f} s", flush=True)

        stock = comfy.sd.load_diffusion_model_state_dict(
            comfy.utils.load_torch_file(path, safe_load=True), model_options={})
        d_ref, d_ms_stock = denoiser(stock)
        run(stock, 1)  # warm-up (cuDNN/cuBLAS heuristics)
        ref1, _, _ = run(stock, 1)
        ref, ms_stock, peak_stock = run(stock, a.steps)
        rows.append((variant, "stock ComfyUI BF16", d_ms_stock, ms_stock, peak_stock, stock.model_size(),
                     0.0, 0.0, 0.0, False))
        del stock
        mm.unload_all_models()
        mm.soft_empty_cache()
        stock_modes = [("stock fp8_e4m3fn", {"dtype": torch.float8_e4m3fn}),
                       ("stock fp8_e4m3fn_fast", {"dtype": torch.float8_e4m3fn, "fp8_optimizations": True})]
        for name, opts in (stock_modes if a.stock_fp8 else []):
            m = comfy.sd.load_diffusion_model_state_dict(comfy.utils.load_torch_file(path, safe_load=True),
                                                         model_options=opts)
            d, d_ms = denoiser(m)
            run(m, 1)
            x1, _, _ = run(m, 1)
            x, ms, peak = run(m, a.steps)
            bad = not (torch.isfinite(x).all() and torch.isfinite(d).all())
            rows.append((variant, name, d_ms, ms, peak, m.model_size(), rel(d, d_ref), rel(x1, ref1), rel(x, ref), bad))
            del m
            mm.unload_all_models()
            mm.soft_empty_cache()

        for ws in a.weight_scaling.split(","):
            t0 = time.perf_counter()
            ours, _, _, info = adapter.checkpoints.load_sd35_fp8(path, ws)
            t_load = time.perf_counter() - t0
            w_ours = ours.model_size()
            t0 = time.perf_counter()
            cal, report = adapter.calibration.calibrate(ours, [cond(10), cond(11)], cond(12), a.steps, 4.5, "euler", "sgm_uniform",
                                         a.size, a.size, 0)
            t_cal = time.perf_counter() - t0
            wo = adapter.sampling.set_autocast(ours, False, None)
            res = {}
            amax = adapter.state.get(cal).input_amax
            for name, m, enabled in ((f"ours weight-only ({ws})", wo, False),
                                     (f"ours FP8 calibrated ({ws})", cal, True)):
                d, d_ms = denoiser(m, amax if enabled else None, enabled)
                run(m, 1)
                x1, _, _ = run(m, 1)
                x, ms, peak = run(m, a.steps)
                res[name] = (d, d_ms, x1, x, ms, peak)
            for name, (d, d_ms, x1, x, ms, peak) in res.items():
                bad = not (torch.isfinite(x).all() and torch.isfinite(x1).all() and torch.isfinite(d).all())
                rows.append((variant, name, d_ms, ms, peak, w_ours, rel(d, d_ref), rel(x1, ref1), rel(x, ref), bad))
            print(f"[{variant}] load+quantize {t_load:.1f} s, calibration (2 prompts x {a.steps} steps) {t_cal:.1f} s",
                  flush=True)
            print(report.splitlines()[0], flush=True)
            del ours, cal, wo
            mm.unload_all_models()
            mm.soft_empty_cache()
        os.remove(path)

    head = ("| model | mode | ms/denoiser call (eager) | ms/step in sampler | peak VRAM GiB | weight GiB | "
            "denoiser output err | 1-step latent err | final latent err | NaN/Inf |")
    lines = [head, "|" + "---|" * 10]
    for v, name, dms, ms, peak, w, ed, e1, e, bad in rows:
        lines.append(f"| {v} | {name} | {dms:.1f} | {ms:.1f} | {peak / 2**30:.2f} | {w / 2**30:.2f} | {ed:.4f} | "
                     f"{e1:.4f} | {e:.4f} | {bad} |")
    meta = (f"GPU: {'CPU smoke' if a.cpu else torch.cuda.get_device_name()}; torch {torch.__version__}; ComfyUI {a.comfy}; "
            f"date {datetime.date.today().isoformat()}; {a.size}x{a.size}, CFG 4.5 (batch 2), euler/sgm_uniform, "
            f"{a.steps} steps; command: python3 bench/comfy_gpu_check.py --variants {a.variants} --steps {a.steps} "
            f"--weight-scaling {a.weight_scaling}{' --stock-fp8' if a.stock_fp8 else ''}")
    table = "\n".join(lines)
    print(meta)
    print(table)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# SD3.5 FP8 through ComfyUI's model code on the GPU\n\n{meta}\n\n{table}\n")
    if any(r[-1] for r in rows):
        sys.exit("NaN/Inf in an output")


if __name__ == "__main__":
    main()
