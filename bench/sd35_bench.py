#!/usr/bin/env python3
"""The benchmark of record: SD3.5 Large and Medium through ComfyUI's own model code, stock ComfyUI's
modes vs this pack, one process, one GPU, same weights, same inputs.

    python3 bench/sd35_bench.py [--variants large,medium] [--out bench/results/<file>.md]

For each variant: random weights (std 0.02) of the real shapes in the official key layout (BF16).
Stock rows load that state dict with ComfyUI's ``load_diffusion_model_state_dict`` (BF16 forced, as
the reference; ``fp8_e4m3fn``; ``fp8_e4m3fn`` + ``fp8_optimizations`` = ``fp8_e4m3fn_fast``), and
the compiled rows add ComfyUI's own ``set_torch_compile_wrapper`` (what TorchCompileModel does).
Our rows load a safetensors file of the same weights with the pack's loader (quantize on load),
calibrate with ``adapter.calibration.calibrate`` (8 prompts, the full 28-step schedule, CFG) and run as
SD35FP8Autocast configures them: eager (calibrated static scales, no compile) and with every speed
feature on (static scales fused by torch.compile, cuDNN attention, fast accumulation), with and
without CUDA graphs.

Per row: ms per denoiser call (``apply_model`` at 1024², CFG batch 2, 154 text tokens; median of
12 after warm-up, CUDA events) and at batch 8 (four images with CFG); first call (compile) seconds;
peak VRAM; weight VRAM; relative error of the denoiser output vs stock BF16 on the same inputs; the
relative error of the final latent after a 28-step euler/sgm_uniform run, CFG 4.5, same seed; NaN/Inf.
"""
from __future__ import annotations

import datetime
import gc
import importlib
import json
import os
import shlex
import sys
import tempfile
import time


def _early_aimdo():
    """ComfyUI 0.30+'s main.py loads comfy-aimdo (DynamicVRAM) before torch: so does this benchmark, unless
    --dynamic-vram off. Returns the control module or None."""
    import argparse
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument("--dynamic-vram", default="auto")
    if early.parse_known_args()[0].dynamic_vram == "off":
        return None
    try:
        import comfy_aimdo.control as control
        return control if control.init(nvml_pressure=True) else None  # main.py's default nvml pressure
    except Exception:  # noqa: BLE001  (not installed: ComfyUI before 0.30)
        return None


AIMDO = _early_aimdo()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from tune import gemm_configs  # noqa: E402

# ms b2: each call synced (CUDA events around one call, the GPU idle before it: host time before the first kernel
# counts); ms b2 back to back: 12 calls with one sync at the end (a sampling loop without host syncs); sampling
# ms/step: wall time of a 28-step sampling run (ComfyUI's sampler, CFG, euler) per step, read back at the end, from
# the second of two runs; first sampling run s: the first run's wall time (the sampler's calls differ from the
# benchmark's own in transformer_options, so compiled rows compile and capture once more there)
COLS = ("variant", "mode", "ms b2", "ms b2 back to back", "sampling ms/step", "first sampling run s", "ms b8",
        "first call s (b2/b8)",
        "peak VRAM GiB", "weights GiB", "denoiser err", "final latent err", "NaN/Inf")


def report(rows: list, variants: list) -> tuple[list, list]:
    """The table's lines and the ratio lines (targets: ours vs stock BF16, the best stock mode, fast's error)."""
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) and "err" in c else
                                       f"{r[c]:.1f}" if isinstance(r[c], float) else str(r[c]) for c in COLS) + " |")
    ratios = []
    for v in variants:
        by = {r["mode"]: r for r in rows if r["variant"] == v}
        best_ours = min((r for m, r in by.items() if m.startswith("ours")), key=lambda r: r["ms b2"], default=None)
        stock = {m: r for m, r in by.items() if m.startswith("stock")}
        if best_ours and stock:
            best_stock = min(stock.values(), key=lambda r: r["ms b2"])
            fast = by.get("stock fp8_e4m3fn_fast")
            ratios.append(
                f"{v}: best ours ({best_ours['mode']}) {best_ours['ms b2']:.1f} ms = "
                f"{best_ours['ms b2'] / by['stock BF16']['ms b2']:.3f}x stock BF16, "
                f"{best_ours['ms b2'] / best_stock['ms b2']:.3f}x the best stock mode ({best_stock['mode']}); "
                f"weights {best_ours['weights GiB'] / by['stock BF16']['weights GiB']:.3f}x BF16"
                + (f"; error vs fast: denoiser {best_ours['denoiser err'] / fast['denoiser err']:.2f}x, final latent "
                   f"{best_ours['final latent err'] / fast['final latent err']:.2f}x" if fast else ""))
    for v in variants:  # the same ratios on the pipelined measures (host time hidden where it can be)
        by = {r["mode"]: r for r in rows if r["variant"] == v}
        ours = [r for m, r in by.items() if m.startswith("ours")]
        stock = [r for m, r in by.items() if m.startswith("stock")]
        if ours and stock and "stock BF16" in by:
            for col in ("ms b2 back to back", "sampling ms/step"):
                def key(r, c=col):
                    return r[c] if r[c] == r[c] else float("inf")  # rows that did not sample: NaN
                o, st = min(ours, key=key), min(stock, key=key)
                bf = by["stock BF16"][col]
                ratios.append(f"{v}: {col}: best ours ({o['mode']}) {o[col]:.1f} = {o[col] / bf:.3f}x stock BF16, "
                              f"{o[col] / st[col]:.3f}x the best stock mode ({st['mode']})")
    for v in variants:
        by = {r["mode"]: r for r in rows if r["variant"] == v}
        fast, bf16 = by.get("stock fp8_e4m3fn_fast"), by.get("stock BF16")
        stock = [r for m, r in by.items() if m.startswith("stock")]
        for m, r in by.items():  # every row of ours: speed and error against the targets' references
            if m.startswith("ours") and bf16 and fast:
                ratios.append(f"{v}: {m}: {r['ms b2'] / bf16['ms b2']:.3f}x stock BF16; error vs fast: denoiser "
                              f"{r['denoiser err'] / fast['denoiser err']:.2f}x, final latent "
                              f"{r['final latent err'] / fast['final latent err']:.2f}x")
        for m, r in by.items():
            if "TransformerEngine" in m and bf16 and stock:
                best_stock = min(stock, key=lambda x: x["ms b2"])
                ratios.append(f"{v}: {m} {r['ms b2']:.1f} ms = {r['ms b2'] / bf16['ms b2']:.3f}x stock BF16, "
                              f"{r['ms b2'] / best_stock['ms b2']:.3f}x the best stock mode"
                              + (f"; error vs fast: denoiser {r['denoiser err'] / fast['denoiser err']:.2f}x, final "
                                 f"latent {r['final latent err'] / fast['final latent err']:.2f}x" if fast else ""))
    return lines, ratios


def main():
    ap = common.arg_parser(variant=False)
    ap.add_argument("--variants", default="large,medium")
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--cal-prompts", type=int, default=8)
    ap.add_argument("--skip", default="", help="comma list of rows to skip, each KEY or VARIANT:KEY (that variant "
                    "only): e4m3 (all our E4M3 rows, with their load and calibration), bf16_compile, fp8, fast, "
                    "fast_compile, te, eager (ours without compile), no_cudagraphs (ours default: compile, no CUDA "
                    "graphs), cudagraphs, fp8_attention, file (stock's UNETLoader on our saved calibrated file), "
                    "file_compile, int8_adaln, int8_mlp, int8_mlp_cudnn (the INT8 MLP row with cuDNN attention; its "
                    "FP8-attention row still runs)")
    ap.add_argument("--gemm-configs", help="JSON of MLP kernel configs to run instead of the shipped ones (what "
                    "bench/tune/fc1_sweep.py prints), e.g. "
                    "'{\"FC2_CONFIG_INT8\": [128, 128, 128, 8, 8, 4, true, true]}'")
    ap.add_argument("--attn-config", help="head-dim-64 FP8 attention config to run instead of ATTN_CONFIG's: "
                    "BLOCK_M,BLOCK_N,warps,stages,warp_spec,exp_mode (e.g. 64,128,4,3,0,1)")
    ap.add_argument("--host-profile", action="store_true",
                    help="for our CUDA-graph rows: host timestamps of 12 synced calls (where host time before the "
                    "GPU's work goes)")
    ap.add_argument("--dynamic-vram", choices=("auto", "on", "off"), default="auto",
                    help="ComfyUI 0.30+'s DynamicVRAM (comfy-aimdo), on by default on NVIDIA as main.py sets it up; "
                    "auto: on where comfy_aimdo is installed")
    ap.add_argument("--sample-compiled", action="store_true",
                    help="also run the 28-step sampling (final latent error) for stock's compiled rows (it compiles "
                    "once more there; their numerics are the eager row's)")
    ap.add_argument("--centered", type=int, default=0,
                    help="also run the fidelity rows with N input channels centered on every FP8 layer but adaLN "
                    "(synthetic centers of 1e-3 and zero bias corrections: the massive-activation handling's run-time "
                    "cost, sd35fp8.core.centering; random weights have no massive activations of their own)")
    ap.add_argument("--out")
    ap.add_argument("--json")
    a = ap.parse_args()
    skip = set(filter(None, a.skip.split(",")))
    aimdo = AIMDO
    if a.dynamic_vram == "on" and aimdo is None:
        raise SystemExit("--dynamic-vram on: comfy_aimdo is not installed or does not load")

    def skipped(key: str, variant: str) -> bool:
        """--skip KEY skips a row everywhere, --skip VARIANT:KEY for one variant only (e.g. large:bf16_compile)."""
        return key in skip or f"{variant}:{key}" in skip
    notes = []
    adapter = common.import_adapter(a.comfy)
    if aimdo is not None:  # main.py's DynamicVRAM set-up: the devices, the dynamic ModelPatcher for stock's loaders
        import comfy.memory_management
        import comfy.model_management
        import comfy.model_patcher
        if aimdo.init_devices(d.index for d in comfy.model_management.get_all_torch_devices()):
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
            notes.append("DynamicVRAM (comfy-aimdo) on, as ComfyUI's main.py sets it up on NVIDIA: stock rows load "
                         "through ModelPatcherDynamic (ours keep the classic ModelPatcher, as the pack's loader asks)")
        else:
            notes.append("DynamicVRAM: comfy-aimdo found no device; stock rows use the classic ModelPatcher")
        print(notes[-1], flush=True)
    if a.attn_config:
        notes.append(f"FP8 attention config (head dim 64): {common.set_attention_config(64, a.attn_config)}")
    import torch
    from safetensors.torch import save_file
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    dev = mm.get_torch_device()
    rows = []
    b2 = common.denoiser_inputs(2, a.size, dev)
    b8 = common.denoiser_inputs(8, a.size, dev)

    denoise = common.Denoiser(adapter)

    def sample(p, seed=123):
        lat = torch.zeros(1, 16, a.size // 8, a.size // 8)
        noise = comfy.sample.prepare_noise(lat, seed)
        return comfy.sample.sample(p, noise, a.steps, 4.5, "euler", "sgm_uniform", common.cond(1), common.cond(2),
                                   lat, disable_pbar=True, seed=seed).float().cpu()

    def first_call(p, inp):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = denoise(p, inp)
        torch.cuda.synchronize()
        return time.perf_counter() - t0, out

    attn_calls = sys.modules["sd35fp8.kernels.attention"].CALLS
    gemm_mod = importlib.import_module("sd35fp8.kernels.mlp")
    gemm_calls = gemm_mod.CALLS
    gemm_configs.apply(a.gemm_configs)
    notes.append("MLP kernel configs: " + ", ".join(f"{n} {getattr(gemm_mod, n)}" for n in gemm_configs.CONFIG_NAMES)
                 + f"; GELU_IMPL {gemm_mod.GELU_IMPL}")

    def measure(variant, name, p, ref=None):
        calls0, gemm0 = attn_calls.copy(), gemm_calls.copy()
        mm.load_models_gpu([p], force_full_load=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        f2, _ = first_call(p, b2)
        ms2, d = common.time_cuda(lambda: denoise(p, b2), n=12)
        b2b = common.back_to_back_ms(lambda: denoise(p, b2), 12)
        if a.host_profile and name.startswith("ours") and "all speed features" in name:
            notes.append(f"{variant}: {name}: " + host_trace(p))
            print(notes[-1], flush=True)  # now: a later row that crashes the process must not take it along
        d = d.float().cpu()
        torch.cuda.synchronize()
        x, t_first, per_step = None, float("nan"), float("nan")
        if a.sample_compiled or not (name.startswith("stock") and "compile" in name):
            t0 = time.perf_counter()
            x = sample(p)
            t_first = time.perf_counter() - t0
            t0 = time.perf_counter()
            sample(p)
            per_step = (time.perf_counter() - t0) * 1e3 / a.steps
        denoise.clear()
        f8, _ = first_call(p, b8)
        ms8, _ = common.time_cuda(lambda: denoise(p, b8), n=12)
        peak = torch.cuda.max_memory_allocated()
        bad = not (torch.isfinite(d).all() and (x is None or torch.isfinite(x).all()))
        row = {"variant": variant, "mode": name, "ms b2": ms2, "ms b2 back to back": b2b, "sampling ms/step": per_step,
               "first sampling run s": t_first,
               "ms b8": ms8, "first call s (b2/b8)": f"{f2:.1f} / {f8:.1f}",
               "peak VRAM GiB": peak / 2**30, "weights GiB": p.model_size() / 2**30,
               "denoiser err": common.rel(d, ref[0]) if ref else 0.0,
               "final latent err": (common.rel(x, ref[1]) if x is not None else float("nan")) if ref else 0.0,
               "NaN/Inf": bad}
        rows.append(row)
        # what really ran: the FP8 attention path (traced / launched from the host) and the CUDA graphs
        used = {k: v - calls0.get(k, 0) for k, v in attn_calls.items() if v - calls0.get(k, 0)}
        used.update({k: v - gemm0.get(k, 0) for k, v in gemm_calls.items() if v - gemm0.get(k, 0)})
        if name.startswith("ours"):
            notes.append(f"{variant}: {name}: weights " + weight_census(p))
            notes.append(f"{variant}: {name}: fp8_attention / fused MLP op calls {used or 'none'}; " + "; ".join(
                f"{what} CUDA graphs: {len(r.graphs)} captured, {r.replays} replays, {len(r.failed)} failed"
                for what, r in adapter.sampling.graph_runners(p.model.diffusion_model).items()))
            print("\n".join(notes[-2:]), flush=True)
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
        return d, x

    def centered(p, n: int):
        """A clone of calibrated MODEL ``p`` whose FP8 layers (but the weight-only adaLN) quantize ``n`` input channels
        around a center (1e-3: the numbers barely move) and add a bias correction (zeros): the centering's run-time
        work on every layer, an upper bound (a trained model centers a few layers)."""
        s = adapter.state.get(p)
        layers = sys.modules["sd35fp8"].fp8_layers(p.model.diffusion_model)
        centers, corr = {}, {}
        for name, m in layers.items():
            if "adaLN" in name:
                continue
            centers[name] = {"channels": list(range(0, m.in_features, m.in_features // n))[:n],
                             "centers": [1e-3] * n, "amax": s.input_amax[name], "was": s.input_amax[name]}
            corr[name] = torch.zeros(m.out_features)
        cal = dict(s.calibration or {})
        cal["centers"] = centers
        return adapter.sampling.set_autocast(p, True, None, calibration=cal, corrections=corr)

    def host_trace(p, n: int = 12) -> str:
        """Where a synced b2 call's host time goes, from timestamps (no profiler: cProfile's per-call overhead on
        the weight-version check's ~2300 data_ptr calls made it look like most of the call): the CUDA-graph
        runner's own steps (sd35fp8.runtime.graphs.GraphedModule.trace) between ComfyUI's part before it and after it.
        Medians over ``n`` calls, each from an idle GPU."""
        import statistics
        runners = adapter.sampling.graph_runners(p.model.diffusion_model)
        r = runners.get("compiled") or runners.get("TE")
        if r is None:
            return "host trace: no CUDA-graph runner on this model"
        r.__dict__["trace"] = []
        r.trace_events.clear()
        spans, gpu = [], []
        try:
            for _ in range(n):
                torch.cuda.synchronize()
                e_in, e_out = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t_in = time.perf_counter()
                e_in.record()
                denoise(p, b2)
                e_out.record()
                t_out = time.perf_counter()
                e_out.synchronize()
                if r.trace and r.trace_events:
                    t = r.trace[-1]
                    spans.append((t[0] - t_in, t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[5] - t[4],
                                  t_out - t[5]))
                    g0, g1 = r.trace_events[-1]
                    gpu.append((e_in.elapsed_time(g0), g0.elapsed_time(g1), g1.elapsed_time(e_out)))
                r.trace.clear()
                r.trace_events.clear()
            for _ in range(n):  # the same calls back to back: is the graph itself slower after an idle GPU?
                denoise(p, b2)
            torch.cuda.synchronize()
            b2b = statistics.median(a.elapsed_time(b) for a, b in r.trace_events) if r.trace_events else float("nan")
            r.trace_events.clear()
        finally:
            r.__dict__["trace"] = None
        torch.cuda.synchronize()
        if not spans:
            return "host trace: the runner replayed no graph in these calls"
        names = ("ComfyUI + wrappers before the runner", "weight version check", "signature + lookup",
                 "input copies", "graph replay launch", "output clone", "ComfyUI after the runner")
        med = [statistics.median(c) * 1e3 for c in zip(*spans)]
        gmed = [statistics.median(c) for c in zip(*gpu)]
        return ("host ms of a synced b2 call (median of %d): " % len(spans) + ", ".join(
            f"{k} {v:.3f}" for k, v in zip(names, med)) + f"; total {sum(med):.3f} (until the replay call returns: "
            f"{sum(med[:5]):.3f}); GPU ms (CUDA events): call start -> graph start {gmed[0]:.3f}, the graph "
            f"{gmed[1]:.3f} (back to back: {b2b:.3f}), graph end -> call end {gmed[2]:.3f}")

    def weight_census(p):
        """What the weights column counts: ComfyUI's (cached) model_size, the state dict now, and its largest
        non-FP8 tensors (on the H200 ours counted ~pos_embed's size more than on the H100: this finds why)."""
        sizes = [(t.numel() * t.element_size(), k, t) for k, t in p.model.state_dict().items()]
        big = sorted(((n, k, str(t.dtype).replace("torch.", "")) for n, k, t in sizes if t.element_size() > 1),
                     reverse=True)[:4]
        return (f"model_size {p.model_size() / 2**30:.3f} GiB, state dict {sum(n for n, _, _ in sizes) / 2**30:.3f} "
                "GiB; largest non-FP8: " + ", ".join(f"{k} {d} {n / 2**20:.0f} MiB" for n, k, d in big))

    def drop():
        """Free the GPU after the caller has deleted its references to the models."""
        mm.unload_all_models()
        gc.collect()
        mm.soft_empty_cache()
        torch._dynamo.reset()

    def e4m3_rows(variant, path, prompts, ref):
        """Our E4M3 loader's rows (weight_scaling=per_tensor): eager, TransformerEngine, compiled, CUDA graphs, FP8
        attention; skipped whole with --skip e4m3 (its load and calibration too)."""
        t0 = time.perf_counter()
        ours, _, _, _ = adapter.checkpoints.load_sd35_fp8(path, "per_tensor")
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        cal, _ = adapter.calibration.calibrate(ours, prompts, common.cond(99), a.steps, 4.5, "euler", "sgm_uniform",
                                a.size, a.size, 0)
        t_cal = time.perf_counter() - t0
        notes.append(f"{variant}: our loader (read + quantize on load) {t_load:.1f} s; calibration "
                     f"{a.cal_prompts} prompts x {a.steps} steps (CFG 4.5, {a.size}², max) {t_cal:.1f} s")
        print(notes[-1], flush=True)
        saved = None
        if not skipped("file", variant):  # our calibrated file, for stock's own loader (rows after ours)
            t0 = time.perf_counter()
            saved, _ = adapter.checkpoints.save_fp8_checkpoint(cal, f"sd35bench/{variant}_calibrated", overwrite=True)
            notes.append(f"{variant}: our calibrated FP8 file saved in {time.perf_counter() - t0:.1f} s "
                         f"({os.path.getsize(saved) / 2**30:.2f} GiB)")
        eager = None
        if not skipped("eager", variant):
            eager = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(compile=False,
                                                                                         attention="auto"))
            measure(variant, "ours FP8 calibrated, eager", eager, ref)
        te_ok, te_why = sys.modules["sd35fp8.runtime.te"].availability()
        if not skipped("te", variant) and not te_ok:
            notes.append(f"{variant}: TransformerEngine rows skipped: {te_why}")
        elif not skipped("te", variant):
            for scaling, graphs in (("delayed", False), ("current", False), ("delayed", True), ("current", True)):
                te = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(backend="transformer_engine",
                                                             scaling=scaling, cudagraphs=graphs))
                measure(variant, f"ours FP8, TransformerEngine backend ({scaling} scaling"
                                 + (", CUDA graphs)" if graphs else ")"), te, ref)
                del te
            sys.modules['sd35fp8.runtime.te'].set_te(cal.model.diffusion_model, None)
            adapter.sampling.drop_graphs(cal.model.diffusion_model)
        full = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime())
        if not skipped("no_cudagraphs", variant):
            measure(variant, "ours FP8, compile + cuDNN attn + fast accum", full, ref)
        if not skipped("cudagraphs", variant):
            torch._dynamo.reset()
            cg = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(cudagraphs=True))
            measure(variant, "ours FP8, all speed features (compile, cuDNN attn, fast accum, CUDA graphs)", cg, ref)
            del cg
        if not skipped("fp8_attention", variant):
            torch._dynamo.reset()
            fa = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(cudagraphs=True, attention="fp8"))
            measure(variant, "ours FP8, all speed features with FP8 attention (attention=fp8)", fa, ref)
            del fa
        del ours, cal, eager, full
        drop()
        if saved:  # stock ComfyUI's UNETLoader (weight_dtype default) on our file: its own static-scale FP8 path
            t0 = time.perf_counter()
            m = comfy.sd.load_diffusion_model(saved)
            notes.append(f"{variant}: stock UNETLoader read our calibrated file in {time.perf_counter() - t0:.1f} s")
            measure(variant, "stock: our calibrated file (UNETLoader)", m, ref)
            if not skipped("file_compile", variant):
                c = m.clone()
                set_torch_compile_wrapper(model=c, backend="inductor")
                measure(variant, "stock: our calibrated file (UNETLoader) + torch.compile", c, ref)
                del c
            del m
            drop()
            os.remove(saved)

    tmp = tempfile.mkdtemp(prefix="sd35bench-", dir="/tmp")
    for variant in a.variants.split(","):
        t0 = time.perf_counter()
        sd = {k: v.cpu() for k, v in common.state_dict(variant, "cuda").items()}
        torch.cuda.empty_cache()
        path = os.path.join(tmp, f"sd3.5_{variant}.safetensors")
        save_file(sd, path)
        print(f"[{variant}] {sum(v.numel() for v in sd.values()) / 1e9:.2f} B params, file written in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

        stock = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.bfloat16})
        ref = measure(variant, "stock BF16", stock)
        if not skipped("bf16_compile", variant):
            c = stock.clone()
            set_torch_compile_wrapper(model=c, backend="inductor")
            measure(variant, "stock BF16 + torch.compile", c, ref)
            del c
        del stock
        drop()
        for key, name, opts in (("fp8", "stock fp8_e4m3fn", {"dtype": torch.float8_e4m3fn}),
                                ("fast", "stock fp8_e4m3fn_fast", {"dtype": torch.float8_e4m3fn,
                                                                   "fp8_optimizations": True})):
            if skipped(key, variant):
                continue
            m = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=opts)
            measure(variant, name, m, ref)
            if key == "fast" and not skipped("fast_compile", variant):
                c = m.clone()
                set_torch_compile_wrapper(model=c, backend="inductor")
                measure(variant, name + " + torch.compile", c, ref)
                del c
            del m
            drop()
        del sd
        gc.collect()
        torch.cuda.empty_cache()

        prompts = [common.cond(100 + i) for i in range(a.cal_prompts)]
        if not skipped("e4m3", variant):
            e4m3_rows(variant, path, prompts, ref)
        # the loader's INT8 options (weight_scaling): adaLN weights as INT8 rows; that plus the MLP as W8A8 INT8 (the
        # fidelity rows, with cuDNN and with FP8 attention)
        for key, scaling, label, attns in (
                ("int8_adaln", adapter.checkpoints.INT8_ADALN,
                 "INT8 adaLN weights (weight_scaling=per_tensor_int8_adaln)", ("auto",)),
                ("int8_mlp", adapter.checkpoints.INT8_MLP,
                 "INT8 adaLN + W8A8 INT8 MLP (weight_scaling=per_tensor_int8_mlp)",
                 ("auto", "fp8"))):
            if skipped(key, variant):
                continue
            t0 = time.perf_counter()
            cal8, _ = adapter.calibration.calibrate(adapter.checkpoints.load_sd35_fp8(path, scaling)[0], prompts,
                                                    common.cond(99), a.steps, 4.5,
                                     "euler", "sgm_uniform", a.size, a.size, 0)
            notes.append(f"{variant}: {scaling}: load + calibration {a.cal_prompts} prompts x {a.steps} steps "
                         f"{time.perf_counter() - t0:.1f} s")
            print(notes[-1], flush=True)
            for attn in attns:
                if key == "int8_mlp" and attn == "auto" and skipped("int8_mlp_cudnn", variant):
                    continue
                torch._dynamo.reset()
                i8 = adapter.sampling.set_autocast(cal8, True, None,
                                                   adapter.state.Runtime(cudagraphs=True, attention=attn))
                measure(variant, f"ours FP8 with {label}, all speed features"
                                 + (" with FP8 attention" if attn == "fp8" else ""), i8, ref)
                if a.centered and key == "int8_mlp":
                    torch._dynamo.reset()
                    c8 = centered(i8, a.centered)
                    measure(variant, f"ours FP8 with {label}, all speed features"
                                     + (" with FP8 attention" if attn == "fp8" else "")
                                     + f", {a.centered} centered input channels on every layer", c8, ref)
                    del c8
                del i8
            del cal8
            drop()
        os.remove(path)

    meta = (f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; ComfyUI {a.comfy}; "
            f"date {datetime.date.today().isoformat()}; commit {common.commit()}; {a.size}², CFG batch 2 "
            "(b8 = 4 images), "
            "154 text tokens; "
            f"final latent: {a.steps} steps euler/sgm_uniform CFG 4.5 seed 123\n"
            f"command: python3 bench/sd35_bench.py {' '.join(shlex.quote(x) for x in sys.argv[1:])}")
    lines, ratios = report(rows, a.variants.split(","))
    text = "\n".join([meta, "", *lines, "", *ratios, *notes])
    print("\n" + text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# SD3.5 FP8 benchmark\n\n{text}\n")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": meta, "rows": rows, "notes": notes}, f, indent=1)


if __name__ == "__main__":
    main()
