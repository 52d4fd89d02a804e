"""Kernel configs for the fused MLP GEMMs other than the shipped ones (sd35fp8.kernels.mlp), for the sweeps and
benchmarks on a GPU other than the one the defaults were tuned on: ``--gemm-configs JSON`` (what
bench/tune/fc1_sweep.py prints). Not reachable from the product: the nodes always run the shipped configs."""
from __future__ import annotations

import json

from sd35fp8.kernels import mlp

OPTION = "--gemm-configs"
CONFIG_NAMES = ("FC1_CONFIG", "FC2_CONFIG", "FC1_CONFIG_FEW_TILES", "FC2_CONFIG_FEW_TILES", "FC1_CONFIG_INT8",
                "FC2_CONFIG_INT8", "FC1_CONFIG_FEW_TILES_INT8", "FC2_CONFIG_FEW_TILES_INT8")


def configs_from_env(text: str | None) -> dict:
    """Kernel configs overriding the defaults above, from ``--gemm-configs`` (JSON: name -> config list, e.g.
    ``{"FC1_CONFIG_INT8": [128, 256, 128, 8, 8, 4, true, false]}``; what bench/fc1_sweep.py prints for a GPU
    other than the one the defaults were tuned on). Unknown names and malformed configs are refused."""
    if not text:
        return {}
    try:
        got = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{OPTION} is not JSON: {e}") from None
    if not isinstance(got, dict):
        raise ValueError(f"{OPTION} must be a JSON object of config names, got {type(got).__name__}")
    out = {}
    for name, cfg in got.items():
        if name not in CONFIG_NAMES:
            raise ValueError(f"{OPTION}: unknown config {name!r}; known: {', '.join(CONFIG_NAMES)}")
        if not isinstance(cfg, list) or not 6 <= len(cfg) <= 8 or not all(isinstance(v, (int, bool)) for v in cfg) \
                or any(int(v) <= 0 for v in cfg[:6]):
            raise ValueError(f"{OPTION}: {name} must be [BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, "
                             f"num_stages] (positive integers) plus optional warp_specialize and halves, got {cfg!r}")
        out[name] = tuple(bool(v) if i >= 6 else int(v) for i, v in enumerate(cfg))
    return out




def apply(text: str | None) -> dict:
    """Set the configs ``text`` names on sd35fp8.kernels.mlp (the kernels read them at each launch); returns them."""
    got = configs_from_env(text)
    for name, cfg in got.items():
        setattr(mlp, name, cfg)
    return got
