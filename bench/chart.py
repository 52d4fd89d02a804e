#!/usr/bin/env python3
"""The README's results chart, drawn from a benchmark record (its main table), so chart and record cannot differ:

    python bench/chart.py bench/results/<record>.md docs/results.png

For each variant in the record: milliseconds per denoiser call (1024², CFG batch 2) and peak VRAM of stock BF16,
the best stock mode (the fastest stock row) and ours (the fastest "ours" row), with "ours vs BF16" on the bars.
"""
from __future__ import annotations

import argparse
import os
import re
import sys


def read_table(path: str) -> list[dict]:
    """The record's first markdown table with the columns variant, mode, ms b2 and peak VRAM GiB."""
    rows, header = [], None
    with open(path, encoding="utf-8") as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else None
            if cells is None:
                if header and rows:
                    break
                header = None
                continue
            if header is None:
                header = cells
                continue
            if set("".join(cells)) <= set("-: "):
                continue
            rows.append(dict(zip(header, cells)))
    need = {"variant", "mode", "ms b2", "peak VRAM GiB"}
    if not rows or not need <= rows[0].keys():
        raise SystemExit(f"{path}: no table with the columns {', '.join(sorted(need))}")
    return rows


def number(cell: str) -> float:
    return float(re.sub(r"[^0-9.]", "", cell))


def pick(rows: list[dict]) -> dict[str, dict[str, tuple[str, float, float]]]:
    """{variant: {"stock BF16" | "best stock" | "ours": (mode, ms, GiB)}}."""
    out: dict[str, dict] = {}
    for r in rows:
        v, mode = r["variant"], r["mode"]
        entry = (mode, number(r["ms b2"]), number(r["peak VRAM GiB"]))
        d = out.setdefault(v, {})
        if mode == "stock BF16":
            d["stock BF16"] = entry
        if mode.startswith("stock") and ("best stock" not in d or entry[1] < d["best stock"][1]):
            d["best stock"] = entry
        if mode.startswith("ours") and ("ours" not in d or entry[1] < d["ours"][1]):
            d["ours"] = entry
    return {v: d for v, d in out.items() if {"stock BF16", "best stock", "ours"} <= d.keys()}


def draw(picked: dict, title: str, out: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = ("stock BF16", "best stock", "ours")
    colors = ("#9e9e9e", "#5c85d6", "#e8772e")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, idx, label in ((axes[0], 1, "ms per denoiser call (lower is faster)"),
                           (axes[1], 2, "peak VRAM, GiB (lower is smaller)")):
        variants = list(picked)
        width = 0.26
        for k, (key, color) in enumerate(zip(keys, colors)):
            vals = [picked[v][key][idx] for v in variants]
            xs = [i + (k - 1) * width for i in range(len(variants))]
            bars = ax.bar(xs, vals, width, color=color, label=key if key != "best stock" else "best stock mode")
            for x, v, val in zip(xs, variants, vals):
                ratio = val / picked[v]["stock BF16"][idx]
                ax.annotate(f"{val:.3g}\n{ratio:.2f}x" if key != "stock BF16" else f"{val:.3g}",
                            (x, val), ha="center", va="bottom", fontsize=7.5)
            del bars
        ax.set_xticks(range(len(variants)), [f"SD3.5 {v.capitalize()}" for v in variants])
        ax.set_title(label, fontsize=10)
        ax.margins(y=0.25)
        ax.spines[["top", "right"]].set_visible(False)
    axes[0].legend(fontsize=8, frameon=False, loc="upper right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("record")
    ap.add_argument("out")
    a = ap.parse_args(argv)
    picked = pick(read_table(a.record))
    if not picked:
        raise SystemExit(f"{a.record}: no variant with stock BF16, a stock mode and one of ours")
    with open(a.record, encoding="utf-8") as f:
        text = f.read()
    gpu = re.search(r"GPU:\s*([^;\n]+)", text)
    date = re.search(r"\b(20\d\d-\d\d-\d\d)\b", text)
    title = (f"{gpu.group(1).strip() if gpu else 'GPU ?'}, {date.group(1) if date else 'date ?'}, 1024², CFG batch 2, "
             f"random weights of the real shapes\nrecord: bench/results/{os.path.basename(a.record)}")
    draw(picked, title, a.out)
    for v, d in picked.items():
        print(v, {k: e for k, e in d.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
