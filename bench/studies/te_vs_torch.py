"""Does the TransformerEngine backend compute what our torch backend computes? (GPU, with TE)

One process: random SD3.5 weights of the real shapes through ComfyUI's model code; stock BF16 (the
reference) and stock ``fp8_e4m3fn_fast`` (whose error sets the fidelity bound: one third of it); our
loader + calibration (8 prompts x 28 steps); then the same calibrated MODEL with backend=torch (static
runtime, eager) and backend=transformer_engine (delayed and current scaling). Reports the relative
difference TE vs torch for the denoiser output (1024², CFG batch 2) and the 28-step final latent,
against that bound, and NaN/Inf.

    python3 bench/te_vs_torch.py --variant large [--out bench/results/X.md]
"""
from __future__ import annotations

import datetime
import os
import sys
import tempfile

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", "..",), ("..", "..", "bench"), ("..", "..", "bench", "tune"), ("..", "..", "scripts"))]  # noqa: E501 the repo, bench/, bench/tune/, scripts/
import common  # noqa: E402


def main():
    ap = common.arg_parser()
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--out")
    a = ap.parse_args()
    adapter = common.import_adapter(a.comfy)
    import torch
    import comfy.model_management as mm
    import comfy.sample
    import comfy.sd
    from safetensors.torch import save_file

    te_ok, te_why = sys.modules["sd35fp8.runtime.te"].availability()
    if not te_ok:
        raise SystemExit(te_why)
    inp = common.denoiser_inputs(2, a.size, mm.get_torch_device())
    denoise = common.Denoiser(adapter)

    def run(p):
        mm.load_models_gpu([p], force_full_load=True)
        d = denoise(p, inp).float().cpu()
        lat = torch.zeros(1, 16, a.size // 8, a.size // 8)
        x = comfy.sample.sample(p, comfy.sample.prepare_noise(lat, 123), a.steps, 4.5, "euler", "sgm_uniform",
                                common.cond(1), common.cond(2), lat, disable_pbar=True, seed=123).float().cpu()
        denoise.clear()
        return d, x

    sd = {k: v.cpu() for k, v in common.state_dict(a.variant, "cuda").items()}
    path = os.path.join(tempfile.mkdtemp(prefix="te-vs-torch-", dir="/tmp"), f"sd3.5_{a.variant}.safetensors")
    save_file(sd, path)
    ref = run(comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": torch.bfloat16}))
    mm.unload_all_models()
    fast = run(comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={
        "dtype": torch.float8_e4m3fn, "fp8_optimizations": True}))
    mm.unload_all_models()
    del sd
    ours, _, _, _ = adapter.checkpoints.load_sd35_fp8(path)
    cal, _ = adapter.calibration.calibrate(ours, [common.cond(100 + i) for i in range(8)], common.cond(99), a.steps, 4.5, "euler",
                            "sgm_uniform", a.size, a.size, 0)
    rows = {}
    torch_out = run(adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(compile=False)))
    for scaling in ("delayed", "current"):
        rows[scaling] = run(adapter.sampling.set_autocast(cal, True, None, adapter.state.Runtime(compile=False,
                                                                    backend="transformer_engine", scaling=scaling)))
    bound = [common.rel(f, r) / 3 for f, r in zip(fast, ref)]
    lines = [f"# TransformerEngine backend vs our torch backend, SD3.5 {a.variant} shapes (random weights)", "",
             f"- command: `python3 bench/te_vs_torch.py --variant {a.variant}`",
             f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; "
             f"{sys.modules['sd35fp8.runtime.te'].availability()[1]}; date {datetime.date.today()}",
             f"- {a.size}², CFG batch 2 denoiser output; final latent after {a.steps} steps euler/sgm_uniform CFG 4.5",
             f"- fidelity bound (1/3 of stock fp8_e4m3fn_fast's error vs BF16): denoiser {bound[0]:.4f}, "
             f"final latent {bound[1]:.4f}", "",
             "| | denoiser: rel. diff vs torch backend | final latent: rel. diff vs torch backend | "
             "denoiser err vs BF16 | final latent err vs BF16 | within bound | NaN/Inf |", "|---|---|---|---|---|---|---|",
             f"| torch backend (reference) | 0 | 0 | {common.rel(torch_out[0], ref[0]):.4f} | "
             f"{common.rel(torch_out[1], ref[1]):.4f} | | "
             f"{not all(bool(torch.isfinite(t).all()) for t in torch_out)} |"]
    for scaling, (d, x) in rows.items():
        dd, dx = common.rel(d, torch_out[0]), common.rel(x, torch_out[1])
        bad = not (torch.isfinite(d).all() and torch.isfinite(x).all())
        lines.append(f"| TE, {scaling} scaling | {dd:.4f} | {dx:.4f} | {common.rel(d, ref[0]):.4f} | "
                     f"{common.rel(x, ref[1]):.4f} | {dd <= bound[0] and dx <= bound[1]} | {bad} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
