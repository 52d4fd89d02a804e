"""Drive the pack's ComfyUI adapter in-process (no server): import ComfyUI's model code and the adapter's modules,
build conditioning and denoiser inputs, make denoiser calls the way ComfyUI's sampler makes them. Used by the tests
that need ComfyUI's model code and by the benchmarks."""
from __future__ import annotations

import copy
import importlib
import os
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEXT_TOKENS = 154  # ComfyUI: 77 (CLIP-L/G) + max(77, T5)
PACKAGE = "sd35pack"  # the pack's folder as a package, as ComfyUI imports it under the folder's name


def import_adapter(comfy_dir: str, cpu: bool = False) -> types.SimpleNamespace:
    """ComfyUI's model code (no server, ``--cpu`` with ``cpu``) and the adapter's modules, as a namespace:
    ``checkpoints``, ``calibration``, ``sampling``, ``state``, ``ops``. The library is ``sd35fp8``, as everywhere.
    TransformerEngine, when installed, is imported first (before torch loads cuDNN: sd35fp8/runtime/te.py)."""
    if REPO not in sys.path:
        sys.path.insert(0, REPO)
    if not cpu:
        from sd35fp8.runtime.te import preload
        preload()
    sys.path.insert(0, os.path.abspath(comfy_dir))
    import comfy.options
    comfy.options.enable_args_parsing()
    saved, sys.argv = sys.argv, [sys.argv[0]] + (["--cpu"] if cpu else [])
    import comfy.cli_args  # noqa: F401  (parse ComfyUI's defaults, not our flags)
    sys.argv = saved
    # the pack as a package without running its __init__ (the node schemas need comfy_api.latest and thus PyAV)
    if PACKAGE not in sys.modules:
        m = types.ModuleType(PACKAGE)
        m.__path__ = [REPO]
        sys.modules[PACKAGE] = m
    return types.SimpleNamespace(**{n: importlib.import_module(f"{PACKAGE}.nodes.{n}")
                                    for n in ("state", "ops", "sampling", "calibration", "checkpoints")})


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
    to = copy.copy(patcher.model_options.get("transformer_options", {}))
    to["wrappers"] = patcher.wrappers  # the sampler puts them there (comfy.sampler_helpers)
    return patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y, transformer_options=to)


class Denoiser:
    """One denoiser call as sampling makes it; for our MODELs with the FP8 run state the sampling
    wrapper installs (``sampling.prepare_run``), installed once per model as the wrapper does once per run."""

    def __init__(self, adapter):
        self.adapter = adapter
        self.state: dict = {}

    def clear(self) -> None:
        self.state.clear()

    def __call__(self, p, inp):
        import torch
        sampling = self.adapter.sampling
        with torch.no_grad():
            if self.adapter.state.get(p) is None:
                return call(p, *inp)
            if self.state.get("p") is not p:
                self.state["p"], self.state["ctx"] = p, sampling.prepare_run(p)
            enabled, recipe = self.state["ctx"]
            with sampling.run_context(p, enabled, recipe):
                return call(p, *inp)


def quick_calibrate(adapter, patcher, inputs) -> dict:
    """Calibrate ``patcher``'s FP8 layers from apply_model at 7 sigmas on ``inputs`` (x, sigma, ctx, y), max
    method, and install the scales; returns the amax table (the benchmarks' stand-in for a sampling run)."""
    import torch

    import sd35fp8
    x, sigma, ctx, y = inputs
    session = sd35fp8.CalibrationSession("max")
    with torch.no_grad(), sd35fp8.fp8_autocast(enabled=False, calibrating=session):
        for s in (1.0, 0.9, 0.75, 0.6, 0.4, 0.2, 0.05):
            call(patcher, x, torch.full_like(sigma, s), ctx, y)
    dm = patcher.model.diffusion_model
    amax = sd35fp8.calibrated_amax(session, dm)
    adapter.sampling.install_scales(dm, amax)
    return amax
