"""Loading, saving and LoRA on the GPU (issue: quantize once, reload fast).

Writes a random-weight SD3.5 file of the real shapes (BF16, official key layout), then runs each
step in a fresh process so peak host RSS (``ru_maxrss``) and peak VRAM belong to that step alone:

- ``stock_bf16``:  stock ComfyUI loads the BF16 file (UNETLoader path) onto the GPU;
- ``ours_bf16``:   our loader quantizes the BF16 file while loading; a short calibration; saves our
                   FP8 file (hybrid layout); records a denoiser output;
- ``ours_fp8``:    our loader reads that FP8 file (no calibration) and must reproduce the output exactly;
- ``stock_fp8``:   stock ComfyUI's UNETLoader reads our FP8 file;
- ``lora``:        our FP8 model, static runtime + torch.compile, ms per denoiser call (1024², CFG batch
                   2) without a LoRA, with a rank-32 LoRA on every FP8 layer merged by ComfyUI's own
                   LoraLoader code, and after unpatching.

Before each load the file's pages are dropped from the page cache (``posix_fadvise``), so load times
include reading the file. Usage: ``python bench/load_bench.py --variant large --out bench/results/X.md``.
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

GiB = 2**30


def rss_now() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def child(a) -> dict:
    adapter = common.import_adapter(a.comfy)
    import torch
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    fp8 = sys.modules["sd35fp8"]
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    folder_paths.add_model_folder_path("diffusion_models", a.workdir, is_default=True)
    bf16_path = os.path.join(a.workdir, f"sd3.5_{a.variant}_bf16.safetensors")
    fp8_name = f"sd3.5_{a.variant}_fp8_calibrated.safetensors"
    fp8_path = os.path.join(a.workdir, fp8_name)
    ref_path = os.path.join(a.workdir, f"ref_{a.variant}.pt")
    inp = common.denoiser_inputs(2, a.size, "cuda")
    res = {"mode": a.child}

    denoiser = common.Denoiser(adapter)

    def denoise(p):
        return denoiser(p, inp)

    def timed_load(path, fn):
        drop_cache(path)
        base = rss_now()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        p = fn(path)
        mm.load_models_gpu([p], force_full_load=True)
        torch.cuda.synchronize()
        res.update({"load s": time.perf_counter() - t0, "base RSS GiB": base / GiB,
                    "peak RSS GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
                    "peak VRAM GiB": torch.cuda.max_memory_allocated() / GiB,
                    "peak reserved GiB": torch.cuda.max_memory_reserved() / GiB,
                    "model VRAM GiB": torch.cuda.memory_allocated() / GiB,
                    "file GiB": os.path.getsize(path) / GiB})
        return p

    if a.child == "stock_bf16":
        p = timed_load(bf16_path, comfy.sd.load_diffusion_model)
    elif a.child == "stock_fp8":
        p = timed_load(fp8_path, comfy.sd.load_diffusion_model)
        out = denoise(p).float().cpu()
        ref = torch.load(ref_path)
        res.update({"err vs ours": common.rel(out, ref), "finite": bool(torch.isfinite(out).all())})
    elif a.child == "ours_bf16":
        p = timed_load(bf16_path, lambda path: adapter.checkpoints.load_sd35_fp8(path)[0])
        res["fp8 weight GiB"] = fp8.weight_bytes(p.model.diffusion_model) / GiB
        t0 = time.perf_counter()
        cal, _ = adapter.calibration.calibrate(p, [common.cond(1)], common.cond(2), 2, 4.5, "euler", "sgm_uniform",
                                               512, 512, 0)
        res["calibrate s (1 prompt x 2 steps, 512px)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if os.path.exists(fp8_path):
            os.unlink(fp8_path)
        adapter.checkpoints.save_fp8_checkpoint(cal, fp8_name.removesuffix(".safetensors"))
        res["save s"] = time.perf_counter() - t0
        eager = adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(compile=False))
        out = denoise(eager).float().cpu()
        torch.save(out, ref_path)
        res["finite"] = bool(torch.isfinite(out).all())
    elif a.child == "ours_fp8":
        p = timed_load(fp8_path, lambda path: adapter.checkpoints.load_sd35_fp8(path)[0])
        res["calibrated from file"] = adapter.state.get(p).input_amax is not None
        out = denoise(adapter.sampling.set_autocast(p, True, None, adapter.state.Runtime(compile=False))).float().cpu()
        res["identical to saved model"] = bool(torch.equal(out, torch.load(ref_path)))
    elif a.child == "lora":
        res.update(lora_speed(adapter, fp8_path, denoise, torch, mm, comfy.sd, fp8))
    return res


def lora_speed(adapter, fp8_path, denoise, torch, mm, sd_mod, fp8) -> dict:
    p, _, _, _ = adapter.checkpoints.load_sd35_fp8(fp8_path)
    p = adapter.sampling.set_autocast(p, True, None)  # every speed feature (static FP8, compile, cuDNN attention)
    mm.load_models_gpu([p], force_full_load=True)
    out = {}
    ms0, y0 = common.time_cuda(lambda: denoise(p), n=10, warmup=3)
    y0 = y0.float().cpu()
    g = torch.Generator(device="cuda").manual_seed(0)
    lora = {}
    for n, l in fp8.fp8_layers(p.model.diffusion_model).items():
        up = torch.randn(l.out_features, 32, generator=g, device="cuda")
        down = torch.randn(32, l.in_features, generator=g, device="cuda")
        lora[f"diffusion_model.{n}.lora_up.weight"] = up.cpu() * 0.01
        lora[f"diffusion_model.{n}.lora_down.weight"] = down.cpu() * 0.01
    t0 = time.perf_counter()
    pl, _ = sd_mod.load_lora_for_models(p, None, lora, 1.0, 0)
    mm.load_models_gpu([pl], force_full_load=True)
    torch.cuda.synchronize()
    out["lora patch s"] = time.perf_counter() - t0
    ms1, y1 = common.time_cuda(lambda: denoise(pl), n=10, warmup=3)
    y1 = y1.float().cpu()
    mm.load_models_gpu([p], force_full_load=True)  # ComfyUI unpatches the shared model
    ms2, y2 = common.time_cuda(lambda: denoise(p), n=10, warmup=2)
    out.update({"ms no LoRA": ms0, "ms with LoRA (rank 32, all FP8 layers)": ms1, "ms after unpatch": ms2,
                "LoRA changes output (rel)": common.rel(y1, y0),
                "unpatched identical": bool(torch.equal(y2.float().cpu(), y0)),
                "finite": bool(torch.isfinite(y1).all())})
    return out


def make_file(a) -> None:
    sys.path.insert(0, os.path.join(common.REPO, "scripts"))
    sys.path.insert(0, common.REPO)
    import torch
    from sd35fp8.io.files import write_safetensors
    path = os.path.join(a.workdir, f"sd3.5_{a.variant}_bf16.safetensors")
    if os.path.exists(path):
        return
    t0 = time.perf_counter()
    sd = common.state_dict(a.variant, "cuda", depth=a.depth or None)
    write_safetensors(path, sd)
    print(f"[{a.variant}] {sum(v.numel() for v in sd.values()) / 1e9:.2f} B params, BF16 file "
          f"{os.path.getsize(path) / GiB:.2f} GiB written in {time.perf_counter() - t0:.0f} s", flush=True)
    del sd
    torch.cuda.empty_cache()


def main():
    ap = common.arg_parser()
    ap.add_argument("--workdir", default="/tmp/sd35-load-bench")
    ap.add_argument("--modes", default="stock_bf16,ours_bf16,ours_fp8,stock_fp8,lora")
    ap.add_argument("--depth", type=int, default=0, help="smoke test: this many joint blocks")
    ap.add_argument("--child")
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    if a.child and a.child != "make":
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    if a.child == "make":
        make_file(a)
        return
    subprocess.run([sys.executable, __file__, "--variant", a.variant, "--workdir", a.workdir, "--depth",
                    str(a.depth), "--child", "make"], check=True)
    rows = [common.run_child([sys.executable, __file__, "--comfy", a.comfy, "--variant", a.variant, "--size",
                              str(a.size), "--workdir", a.workdir, "--depth", str(a.depth), "--child", mode], mode)
            for mode in a.modes.split(",")]
    import torch
    common.write_rows_report([
        f"# Load / save / LoRA benchmark: SD3.5 {a.variant} shapes, random weights",
        "", f"- command: `python bench/load_bench.py --variant {a.variant} --modes {a.modes}`",
        f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; date {datetime.date.today()}",
        "- each row is a fresh process; file pages dropped from the page cache before each load;",
        "  load s = file -> model resident on the GPU (ComfyUI load_models_gpu); RSS = ru_maxrss of that process"],
        rows, a.out)

if __name__ == "__main__":
    main()
