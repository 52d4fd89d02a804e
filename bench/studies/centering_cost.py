#!/usr/bin/env python3
"""What input centering (sd35fp8.core.centering, the massive-activation handling) costs on the GPU, at SD3.5 Large
shapes, on the static runtime's kernels: per joint-block stream the qkv and proj GEMMs (static E4M3 input) and the
fused MLP (fc1 + GELU + fc2's input quantization in one kernel, fc2 with the gated residual in its epilogue), in E4M3
and in the fidelity mode's INT8 W8A8 MLP, each sequence captured as one CUDA graph and replayed (as the runtime
replays the model). "centered" puts a center on ``--channels`` input channels of every one of those layers (more than
a trained model needs: an upper bound) and a bias correction on each: the extra work is the center subtraction before
each quantization, ``W·center`` gathered from the centered weight columns, and fc1's epilogue shift.

    python3 bench/studies/centering_cost.py [--channels 16] [--compile] [--out FILE.md]

Without ``--compile`` the ops run eager inside the graphs: the runtime compiles the model, so the subtraction fuses
into its producer (``--compile`` measures that); eager is an upper bound. Printed per stream and for 38 blocks (image + text stream).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys

import torch

sys.path[:0] = [os.path.abspath(os.path.join(os.path.dirname(__file__), *p)) for p in (("..", ".."), ("..",))]
import common  # noqa: E402
from sd35fp8 import FP8Linear  # noqa: E402
from sd35fp8.runtime.mlp import fused_mlp_residual  # noqa: E402

D, H = 2432, 9728  # SD3.5 Large hidden and MLP width
BLOCKS = 38


class Mlp(torch.nn.Module):
    """timm/ComfyUI's Mlp layout (the fused runtime recognises it by name)."""

    def __init__(self, fc1, fc2):
        super().__init__()
        self.fc1, self.act, self.fc2 = fc1, torch.nn.GELU(approximate="tanh"), fc2


def layer(k, n, gran, g):
    lin = torch.nn.Linear(k, n, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02, generator=g)
        lin.bias.normal_(0, 0.02, generator=g)
    m = FP8Linear.from_linear(lin, gran)
    m.fp8_set_input_amax(4.0)
    return m


def stream(m_tokens: int, int8: bool, centered: bool, channels: int, g):
    """(run, layers): one stream's qkv, proj and fused MLP on [m_tokens, D] activations."""
    qkv, proj = layer(D, 3 * D, "per_tensor", g), layer(D, D, "per_tensor", g)
    mg = "int8_per_channel" if int8 else "per_tensor"
    mlp = Mlp(layer(D, H, mg, g), layer(H, D, mg, g))
    modes = {qkv: "fp8", proj: "fp8", mlp.fc1: "int8_token" if int8 else "fp8",
             mlp.fc2: "int8_static" if int8 else "fp8"}
    for lin, mode in modes.items():
        if centered:
            c = torch.zeros(lin.in_features, device="cuda")
            c[torch.randperm(lin.in_features, generator=g, device="cuda")[:channels]] = 3.0
            lin.fp8_set_input_center(c, 1.0)
            lin.fp8_set_bias_correction(torch.randn(lin.out_features, generator=g, device="cuda") * 1e-3)
        lin.fp8_set_static(mode, 0, fast_accum=True)
    x = torch.randn(m_tokens, D, device="cuda", dtype=torch.bfloat16, generator=g)
    res = torch.randn(1, m_tokens, D, device="cuda", dtype=torch.bfloat16, generator=g)
    gate = torch.randn(1, D, device="cuda", dtype=torch.bfloat16, generator=g) * 0.1

    def run():
        a = qkv.fp8_static_matmul(qkv.fp8_static_input(x)[0], torch.bfloat16)
        b = proj.fp8_static_matmul(proj.fp8_static_input(x)[0], torch.bfloat16)
        h8, hs = mlp.fc1.fp8_static_input(x)
        return a, b, fused_mlp_residual(mlp, h8, res, gate, None if not int8 else hs)
    return run


def graph_ms(run, n=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        run()
    for _ in range(5):
        gr.replay()
    ts = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        gr.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--compile", action="store_true", help="torch.compile each stream first (as the runtime does)")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    rows = []
    for int8 in (False, True):
        for tokens, what in ((8192, "image (4096 tokens x CFG 2)"), (308, "text (154 x 2)")):
            ms = {}
            for centered in (False, True):
                g = torch.Generator(device="cuda").manual_seed(0)
                run = stream(tokens, int8, centered, a.channels, g)
                ms[centered] = graph_ms(torch.compile(run) if a.compile else run)
            rows.append((("INT8 W8A8 MLP" if int8 else "E4M3"), what, ms[False], ms[True]))
            print(rows[-1], flush=True)
    commit = common.commit()
    lines = [f"# Input centering's cost on the fused runtime, SD3.5 Large shapes — {torch.cuda.get_device_name()}",
             "", f"- GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}; date "
             f"{datetime.date.today().isoformat()}; commit {commit}; no ComfyUI (the layers of the pack's runtime "
             "alone).", f"- Command: `python3 bench/studies/centering_cost.py --channels {a.channels}"
             f"{' --compile' if a.compile else ''}`",
             f"- Each stream: qkv + proj (static E4M3) + fused MLP, one CUDA graph, median of 50 replays; centered: "
             f"{a.channels} centered input channels and a bias correction on every one of the 4 layers.", "",
             "| MLP format | stream | ms plain | ms centered | cost |", "|---|---|---|---|---|"]
    tot = {}
    for fmt, what, p, c in rows:
        lines.append(f"| {fmt} | {what} | {p:.4f} | {c:.4f} | {100 * (c - p) / p:+.2f}% |")
        tp, tc = tot.get(fmt, (0.0, 0.0))
        tot[fmt] = (tp + p * BLOCKS, tc + c * BLOCKS)
    lines.append("")
    for fmt, (p, c) in tot.items():
        lines.append(f"- {fmt}, {BLOCKS} blocks (image + text streams): {p:.2f} ms plain, {c:.2f} ms centered: "
                     f"**{c - p:+.3f} ms ({100 * (c - p) / p:+.2f}% of these layers' time)**")
    common.emit("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
