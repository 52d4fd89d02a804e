"""Peak host RSS of our loader when the FP8 weights stay in host RAM (ComfyUI on --cpu: the path a
GPU too small for the FP8 weights, or CPU offload, takes). No GPU needed.

Writes a random-weight SD3.5 file of the real shapes tensor by tensor (never the whole model in RAM),
then in fresh processes: our loader quantizing it (``ours_bf16``, then saving our FP8 file with
placeholder input scales) and our loader reading that FP8 file (``ours_fp8``). Stock loading is not
run here: it holds the BF16 model plus the mapped file (2.06x the file on the H100 record).

    python3 bench/cpu_load_rss.py --variant large --workdir /tmp/cpu-rss [--out bench/results/X.md]
"""
from __future__ import annotations

import datetime
import json
import os
import resource
import sys
import time

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
import common  # noqa: E402
from load_bench import GiB, drop_cache, rss_now  # noqa: E402


def write_random(path: str, variant: str) -> None:
    import torch
    sys.path.insert(0, os.path.join(common.REPO, "scripts"))
    sys.path.insert(0, common.REPO)
    import tiny_sd35
    from sd35fp8.io.files import write_safetensors
    depth, attn2, pos = common.SHAPES[variant]
    real = torch.randn
    torch.randn = lambda *s, generator=None, **kw: real(*s, **dict(kw, device="meta"))
    try:
        meta = tiny_sd35.mmdit_state_dict(depth=depth, variant="medium" if attn2 else "large", attn2_blocks=attn2,
                                          pos_embed_max_size=pos, seed=0)
    finally:
        torch.randn = real
    g = torch.Generator().manual_seed(0)

    def random(name, t):
        return (torch.randn(t.shape, generator=g) * 0.02).to(t.dtype) if t.is_floating_point() else torch.zeros(
            t.shape, dtype=t.dtype)

    write_safetensors(path, meta, materialize=random)


def child(a) -> dict:
    if os.environ.get("SD35_BENCH_MMAP_THRESHOLD"):  # experiment: large allocations via mmap (no heap reuse)
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-3, int(os.environ["SD35_BENCH_MMAP_THRESHOLD"]))  # M_MMAP_THRESHOLD
    adapter = common.import_adapter(a.comfy, cpu=True)
    import folder_paths
    folder_paths.add_model_folder_path("diffusion_models", a.workdir, is_default=True)
    fp8 = sys.modules["sd35fp8"]
    src = os.path.join(a.workdir, f"sd3.5_{a.variant}_bf16.safetensors")
    out = os.path.join(a.workdir, f"sd3.5_{a.variant}_fp8.safetensors")
    path = src if a.child == "ours_bf16" else out
    drop_cache(path)
    base = rss_now()
    t0 = time.perf_counter()
    model, _, _, _ = adapter.checkpoints.load_sd35_fp8(path)
    res = {"mode": a.child, "load s": time.perf_counter() - t0, "base RSS GiB": base / GiB,
           "peak RSS GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GiB,
           "file GiB": os.path.getsize(path) / GiB,
           "FP8 model weights GiB": fp8.weight_bytes(model.model.diffusion_model) / GiB,
           "weights device": str(next(iter(fp8.fp8_layers(model.model.diffusion_model).values())).weight.device)}
    res["peak RSS / file"] = res["peak RSS GiB"] / res["file GiB"]
    if a.child == "ours_bf16":
        layers = fp8.fp8_layers(model.model.diffusion_model)
        import dataclasses  # placeholder scales
        adapter.state.put(model, dataclasses.replace(adapter.state.get(model), input_amax={n: 4.0 for n in layers}))
        if os.path.exists(out):
            os.unlink(out)
        adapter.checkpoints.save_fp8_checkpoint(model, os.path.basename(out).removesuffix(".safetensors"))
    return res


def main():
    ap = common.arg_parser(size=False)
    ap.add_argument("--workdir", default="/tmp/cpu-rss")
    ap.add_argument("--child")
    ap.add_argument("--out")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    src = os.path.join(a.workdir, f"sd3.5_{a.variant}_bf16.safetensors")
    if not os.path.exists(src):
        t0 = time.perf_counter()
        write_random(src, a.variant)
        print(f"wrote {src} ({os.path.getsize(src) / GiB:.2f} GiB) in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [common.run_child([sys.executable, __file__, "--comfy", a.comfy, "--variant", a.variant, "--workdir",
                              a.workdir, "--child", mode], mode) for mode in ("ours_bf16", "ours_fp8")]
    import platform
    common.write_rows_report([
        f"# Our loader with FP8 weights in host RAM (ComfyUI --cpu), SD3.5 {a.variant} shapes, random weights",
        "", f"- command: `python3 bench/cpu_load_rss.py --variant {a.variant}`",
        f"- machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; date {datetime.date.today()}",
        "- fresh process per row; the file's pages dropped from the page cache first; RSS = ru_maxrss"], rows, a.out)

if __name__ == "__main__":
    main()
