#!/usr/bin/env python3
"""Massive activations on the CPU through ComfyUI's model code: the demo model and the same model with outlier
channels planted (scripts/massive_fixture.py, x100 and x300), every weight format, final-latent error against the
unquantized model with and without input centering (sd35fp8.core.centering); then the per-timestep study: how each
FP8 layer's input range moves over the sampling schedule, and what static scales per sigma bucket would buy.

    .venv/bin/python bench/studies/massive_activations.py [--size 128] [--steps 12] [--prompts 6] [--seeds 2]
        [--buckets 4] [--out bench/results/FILE.md]

Per-bucket scales are simulated: calibration observes each sigma bucket separately, and sampling installs the
bucket's scales before each denoiser call (what a runtime would pick from the sigma with no reduction); the error is
compared with the one static table of today, centering on in both.
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

import torch

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path[:0] = [REPO, os.path.join(REPO, "scripts"), os.path.join(REPO, "bench")]
import common  # noqa: E402
from tests.support.outliers import FORMATS, Fixture, rel_error  # noqa: E402


EDGES: list[float] = []  # the sigma bucket edges (set from the schedule: the same number of steps in each bucket)


def set_edges(model, steps: int, buckets: int) -> None:
    import comfy.samplers
    sig = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "sgm_uniform", steps)[:-1]
    per = len(sig) / buckets
    EDGES[:] = [float(sig[int(round(i * per))]) for i in range(1, buckets)]  # descending sigmas


def bucket_of(sigma, buckets: int) -> int:
    """The bucket of a step's sigma: 0 for the first (noisiest) steps."""
    return sum(1 for e in EDGES if float(sigma) <= e)


def bucket_tables(fx, path: str, fmt: str, buckets: int, centers: dict):
    """Per sigma bucket: ({layer: amax}, {layer: centered amax}) observed over the fixture's sampling runs."""
    import comfy.patcher_extension as pe

    import sd35fp8
    from sd35fp8.runtime.static import clear_static
    model = fx.adapter.checkpoints.load_sd35_fp8(path, fmt)[0]
    set_edges(model, fx.steps, buckets)
    sessions = [sd35fp8.CalibrationSession("max") for _ in range(buckets)]
    m = model.clone()
    m.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, "sd35fp8_autocast")
    fx.adapter.sampling.apply_runtime_options(m, None)

    def wrapper(executor, x, t, *a, **kw):
        clear_static(executor.class_obj.diffusion_model)
        with sd35fp8.fp8_autocast(enabled=False, calibrating=sessions[bucket_of(t.flatten()[0], buckets)]):
            return executor(x, t, *a, **kw)

    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "study", wrapper)
    fx.latents(m)
    out = []
    for s in sessions:
        amax, ranges = s.amax(), s.channel_ranges()
        cen = {}
        for n, e in centers.items():
            lo, hi = ranges[n]
            c = torch.zeros_like(lo)
            c[torch.tensor(e["channels"])] = torch.tensor(e["centers"])
            cen[n] = float(torch.maximum((hi - c).abs(), (lo - c).abs()).max())
        out.append((amax, cen))
    return out


def sample_per_bucket(fx, model, tables, buckets: int):
    """Final latents with each denoiser call running at its sigma bucket's static scales."""
    import comfy.patcher_extension as pe

    from sd35fp8.model import fp8_layers
    m = model.clone()

    def wrapper(executor, x, t, *a, **kw):
        dm = executor.class_obj.diffusion_model
        amax, cen = tables[bucket_of(t.flatten()[0], buckets)]
        for n, layer in fp8_layers(dm).items():
            layer.fp8_set_input_amax(amax[n])
            if n in cen and getattr(layer, "input_center", None) is not None:
                layer.fp8_set_input_center(layer.input_center, cen[n])
            if layer.fp8_static is not None:
                layer.fp8_set_static(layer.fp8_static, 0, layer.fp8_fast_accum)
        return executor(x, t, *a, **kw)

    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "study", wrapper)
    return fx.latents(m)


def fq(t: torch.Tensor, amax: float, int8: bool = False) -> torch.Tensor:
    """Fake quantization at one static per-tensor scale (E4M3, or a symmetric INT8 grid), clamped first."""
    from sd35fp8.core.formats import quantize_inv, quantize_inv_int8
    s = torch.tensor(max(amax, 1e-30) / (127.0 if int8 else 448.0))
    q = quantize_inv_int8(t, 1 / s) if int8 else quantize_inv(t, 1 / s)
    return q.float() * s


def fq_w(w: torch.Tensor, int8: bool) -> torch.Tensor:
    """A weight as the pack stores it: E4M3 per tensor, or INT8 per output row."""
    from sd35fp8.core.quant import dequantize_weight, quantize_weight
    return dequantize_weight(*quantize_weight(w, "int8_per_channel" if int8 else "per_tensor"), torch.float32)


def layer_methods(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, int8_in: bool, int8_w: bool,
                  ratio: float = 8.0) -> dict:
    """One layer's output error (relative to its exact fp32 output) on captured inputs ``x`` [M, K] under each way
    of handling the outlier channels (those ``ratio`` x the median channel range or more)."""
    exact = x @ w.T + b
    a = x.abs().amax(0)
    out_ch = torch.nonzero(a >= ratio * a.median()).flatten()
    lo, hi = x.amin(0), x.amax(0)
    m = torch.zeros_like(a)
    m[out_ch] = (lo[out_ch] + hi[out_ch]) / 2
    wq = fq_w(w, int8_w)

    def err(y):
        return float((y - exact).norm() / exact.norm())
    res = {"per-tensor (today)": err(fq(x, float(a.max()), int8_in) @ wq.T + b)}
    s = (a / w.abs().amax(0).clamp_min(1e-12)).sqrt().clamp_min(1e-6)  # SmoothQuant, alpha 0.5, every channel
    xs = x / s
    res["smoothing (SmoothQuant a=0.5)"] = err(fq(xs, float(xs.abs().max()), int8_in) @ fq_w(w * s, int8_w).T + b)
    xc = x - m
    res["centering"] = err(fq(xc, float(xc.abs().max()), int8_in) @ wq.T + b + wq @ m)
    res["centering + weight correction"] = err(fq(xc, float(xc.abs().max()), int8_in) @ wq.T + b + w @ m)
    inl = torch.ones_like(a, dtype=torch.bool)
    inl[out_ch] = False
    xi = x * inl
    res["side path (outliers in fp32)"] = err(fq(xi, float(xi.abs().max()), int8_in) @ wq.T
                                              + x[:, out_ch] @ w[:, out_ch].T + b)
    res["channels"] = len(out_ch)
    return res


def capture(fx, path: str, names: list[str]) -> dict:
    """The inputs of layers ``names`` of the unquantized model over the fixture's sampling runs, [M, K] each."""
    ref = fx.reference(path)
    dm = ref.model.diffusion_model
    got = {n: [] for n in names}
    hooks = [dm.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: got[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in names]
    fx.latents(ref)
    for h in hooks:
        h.remove()
    return {n: (torch.cat(v), dm.get_submodule(n).weight.detach().float(), dm.get_submodule(n).bias.detach().float())
            for n, v in got.items()}


def movement(tables) -> tuple[float, float, str]:
    """(median, max over layers of max/min of the per-bucket amax, the layer with the max)."""
    names = list(tables[0][0])
    r = {n: max(t[0][n] for t in tables) / max(min(t[0][n] for t in tables), 1e-30) for n in names}
    vals = sorted(r.values())
    worst = max(r, key=r.get)
    return vals[len(vals) // 2], r[worst], worst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--models-dir", default=os.path.join(REPO, "output", "massive_study", "models"))
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    import demo_scenes
    _, held = demo_scenes.split()
    t0 = time.time()
    # held-out scenes; calibrated on the same prompts and settings (as the pack calibrates on the user's own)
    prompts = [demo_scenes.prompt_of(*s) for s in held[:a.prompts]]
    fx = Fixture(os.path.join(REPO, ".comfyui"), a.models_dir, prompts, a.size, a.steps, seeds=tuple(range(a.seeds)))
    ch = fx.channel_amax(fx.base)
    d = os.path.dirname(a.models_dir)
    paths = {"clean": fx.base, **{f"x{k}": fx.planted(os.path.join(d, f"planted_{k}.safetensors"), k, ch)
                                  for k in (100, 300)}}
    lines = []
    err = {}
    study = []
    for name, path in paths.items():
        ref = fx.latents(fx.reference(path))
        for fmt in FORMATS:
            for center in (False, True):
                cal, text = fx.fp8(path, fmt, center=center)
                err[name, fmt, center] = rel_error(fx.latents(cal), ref)
                print(name, fmt, center, f"{err[name, fmt, center]:.4f}", flush=True)
            if fmt in (FORMATS[0], FORMATS[3]):  # per-bucket study on the fastest and the fidelity format
                centers = dict(fx.adapter.state.get(cal).calibration.get("centers") or {})
                tables = bucket_tables(fx, path, fmt, a.buckets, centers)
                e_b = rel_error(sample_per_bucket(fx, cal, tables, a.buckets), ref)
                med, mx, worst = movement(tables)
                study.append((name, fmt, err[name, fmt, True], e_b, med, mx, worst))
                print("buckets", study[-1], flush=True)
    # the alternatives, layer by layer on the x300 model's captured inputs (fake quantization, exact fp32 matmul)
    names = ["joint_blocks.1.x_block.attn.qkv", "joint_blocks.1.x_block.mlp.fc1", "joint_blocks.1.x_block.mlp.fc2"]
    caps = capture(fx, paths["x300"], names)
    methods = []
    for n in names:
        x, w, b = caps[n]
        x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:8192]]
        for fmt, i8_in, i8_w in (("E4M3", False, False), ("INT8 static input, INT8 rows" if n.endswith("fc2") else
                                                        "INT8 per-token input, INT8 rows", True, True)):
            if i8_in and not n.endswith("fc2"):
                continue  # the INT8 MLP's fc1 is per token (dynamic): not a static-scale question
            methods.append((n, fmt, layer_methods(x, w, b, i8_in, i8_w)))
            print("methods", methods[-1], flush=True)
    commit = common.commit()
    import comfyui_version
    lines += [f"# Massive activations: planted outliers, centering and per-timestep scales (CPU) — "
              f"{datetime.date.today().isoformat()}", "",
              f"- Machine: this CPU ({os.cpu_count()} cores), no GPU; torch {torch.__version__}; ComfyUI "
              f"{comfyui_version.__version__} (`.comfyui`); commit {commit}; {time.time() - t0:.0f} s.",
              f"- Command: `.venv/bin/python bench/studies/massive_activations.py --size {a.size} --steps {a.steps} "
              f"--prompts {a.prompts} --seeds {a.seeds} --buckets {a.buckets}`",
              f"- Demo model (`demo/sd3.5_demo.safetensors`), {a.prompts} held-out prompts x {a.seeds} seeds, "
              f"{a.size}x{a.size}, {a.steps} steps euler/sgm_uniform, cfg 4.5; calibrated on the same prompts and "
              "settings; error = relative L2 of the final latents against the unquantized model (fp32 on the CPU).",
              "- Planted (scripts/massive_fixture.py): 2 residual channels (the adaLN shifts into qkv and fc1, "
              "±0.5x the median range moved by the conditioning) and 2 MLP hidden channels per block, 100x / 300x "
              "the layer's median channel range; offsets cancelled by the biases.", "",
              "| model | format | error, today (no centering) | error, centered | x clean (centered) |",
              "|---|---|---|---|---|"]
    for name in paths:
        for fmt in FORMATS:
            off, on = err[name, fmt, False], err[name, fmt, True]
            lines.append(f"| {name} | {fmt} | {off:.4f} | {on:.4f} | {on / err['clean', fmt, True]:.2f} |")
    lines += ["", f"## Per-timestep: static scales per sigma bucket ({a.buckets} buckets), centering on", "",
              "| model | format | error, one static table | error, a table per bucket | change | layer range "
              "max/min over buckets: median, max (layer) |", "|---|---|---|---|---|---|"]
    for name, fmt, e1, eb, med, mx, worst in study:
        lines.append(f"| {name} | {fmt} | {e1:.4f} | {eb:.4f} | {100 * (eb - e1) / e1:+.1f}% | {med:.2f}, "
                     f"{mx:.2f} ({worst}) |")
    keys = [k for k in methods[0][2] if k != "channels"]
    lines += ["", "## The alternatives, layer by layer (x300 model, captured inputs, fake quantization)", "",
              "Output error of one layer against its exact fp32 output, on 8192 of its inputs captured from the "
              "unquantized model's sampling; the layer's outlier channels are those 8x its median channel range.", "",
              "| layer | format | outlier channels | " + " | ".join(keys) + " |",
              "|---|---|---|" + "---|" * len(keys)]
    for n, fmt, r in methods:
        lines.append(f"| {n} | {fmt} | {r['channels']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    common.emit("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
