"""ComfyUI glue: FP8 ops for model construction, loading, and the OUTER_SAMPLE autocast wrapper.

State travels on the ModelPatcher's ``model_options["sd35fp8"]`` (plain floats/strings, so clones
copy it and ComfyUI's caching keeps it): the calibrated per-layer input amax and the recipe. The
wrapper installs that clone's scales on the shared diffusion model at the start of every sampling
run, so two MODELs that share weights (uncalibrated loader output, calibrated clone) never see each
other's scales.
"""
from __future__ import annotations

import datetime
import logging
import os
import time

import torch

import comfy.model_management
import comfy.ops
import comfy.patcher_extension
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths

from ..fp8 import (CalibrationSession, CheckpointError, DelayedScaling, FP8LinearMixin, QuantPolicy,
                   bf16_bytes, calibrated_amax, fp8_autocast, fp8_layers, inspect_checkpoint, quantize_weight, report,
                   weight_bytes)
from ..fp8.checkpoint import DIFFUSION_PREFIX
from ..fp8.runtime import RuntimeConfig, attention, clear_static, set_static

log = logging.getLogger("sd35fp8")
KEY = "sd35fp8"
AUTOCAST_KEY = "sd35fp8_autocast"
CALIBRATE_KEY = "sd35fp8_calibrate"
COMPILE_KEY = "sd35fp8_compile"
# The runtime every speed feature on (the SD35FP8Autocast defaults): static scales, fused casts,
# torch.compile, cuDNN attention. See fp8/runtime.py and bench/ for what each one buys.
DEFAULT_RUNTIME = {"static": True, "compile": True, "attention": "auto", "fast_accum": True,
                   "adaln": "weight_only", "cudagraphs": False}
MODEL_FOLDERS = ("checkpoints", "diffusion_models")


def make_ops(policy: QuantPolicy, quant_device: torch.device):
    """ComfyUI ``custom_operations`` whose Linear quantizes the policy's layers while the state
    dict loads: the high-precision weight of a quantized layer is never copied into the model."""
    base = comfy.ops.manual_cast

    class Linear(FP8LinearMixin, base.Linear):
        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            w = state_dict.get(prefix + "weight")
            if w is None or w.dim() != 2 or not policy.decide(prefix, w.shape[0], w.shape[1]):
                return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                                     missing_keys, unexpected_keys, error_msgs)
            dev = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
            self.fp8_quantize_(policy.granularity, name=prefix[:-1], weight=w.to(quant_device))
            self.weight.data = self.weight.data.to(dev)
            self.weight_scale = self.weight_scale.to(dev)
            b = state_dict.get(prefix + "bias")
            if self.bias is not None:
                if b is None:
                    missing_keys.append(prefix + "bias")
                else:
                    self.bias = torch.nn.Parameter(b.to(device=dev, dtype=self.bias.dtype), requires_grad=False)

    return type("SD35FP8Ops", (base,), {"Linear": Linear})


def model_file_list() -> list[str]:
    names: list[str] = []
    for folder in MODEL_FOLDERS:
        for n in folder_paths.get_filename_list(folder):
            if n.endswith(".safetensors") and n not in names:
                names.append(n)
    return sorted(names)


def resolve_model_file(name: str) -> str:
    for folder in MODEL_FOLDERS:
        p = folder_paths.get_full_path(folder, name)
        if p:
            return p
    raise FileNotFoundError(f"model file {name!r} not found in {' or '.join(MODEL_FOLDERS)}")


def load_sd35_fp8(path: str, granularity: str = "per_tensor"):
    """Load an SD3.5 checkpoint with its MMDiT quantized to FP8. Returns (model, clip, vae, info)."""
    info = inspect_checkpoint(path)  # header only: wrong family / truncated files fail here, fast
    if info.fp8_tensors:
        raise CheckpointError(
            f"{os.path.basename(path)} is already quantized ({info.fp8_tensors} FP8 tensors, e.g. a *_fp8_scaled "
            "file): this loader quantizes BF16/FP16 SD3.5 checkpoints itself and cannot re-calibrate stored FP8 "
            "weights yet. Use the BF16 release of the model.")
    policy = QuantPolicy(granularity=granularity)
    qdev = comfy.model_management.get_torch_device()
    ops = make_ops(policy, qdev if qdev.type == "cuda" else torch.device("cpu"))
    try:
        sd, metadata = comfy.utils.load_torch_file(path, safe_load=True, return_metadata=True)
    except Exception as e:  # a header that passed but data that does not read
        raise CheckpointError(f"{os.path.basename(path)}: cannot read tensors ({e})") from e
    clip = vae = None
    opts = {"custom_operations": ops}
    if info.prefix == DIFFUSION_PREFIX:
        out = comfy.sd.load_state_dict_guess_config(
            sd, output_vae=info.has_vae, output_clip=bool(info.has_text_encoders),
            embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options=opts,
            metadata=metadata)
        model, clip, vae = out[0], out[1], out[2]
    else:
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options=opts, metadata=metadata)
    del sd
    if model is None:
        raise CheckpointError(f"{os.path.basename(path)}: ComfyUI did not recognise the diffusion model")
    dm = model.model.diffusion_model
    quantize_pos_embed(dm)
    layers = fp8_layers(dm)
    if not layers:
        raise CheckpointError(f"{os.path.basename(path)}: no Linear layer was quantized (unexpected layout)")
    n_params = sum(p.numel() for p in dm.parameters())
    fp8_params = sum(m.weight.numel() for m in layers.values())
    text = "\n".join([
        info.describe(),
        policy.summary(),
        f"diffusion model weights: {bf16_bytes(dm) / 2**20:.1f} MiB in BF16 -> "
        f"{weight_bytes(dm, 2) / 2**20:.1f} MiB with FP8; {fp8_params / max(n_params, 1):.1%} of parameters in FP8",
    ])
    model.model_options[KEY] = {"variant": info.variant, "policy": policy.to_dict(), "input_amax": None,
                                "recipe": None, "enabled": False, "load_info": text}
    # weight-only until calibrated/autocast; the wrapper also guards every sampling run (LoRA check)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY, outer_sample_wrapper)
    log.info("sd35fp8: loaded %s\n%s", os.path.basename(path), text)
    return model, clip, vae, text


def quantize_pos_embed(dm: torch.nn.Module) -> None:
    """Store the MMDiT's positional-embedding table (226 M values in Medium: 9% of its weights) as
    FP8 with a per-tensor scale; the per-resolution crop is dequantized when ComfyUI asks for it."""
    pe = getattr(dm, "pos_embed", None)
    if not isinstance(pe, torch.Tensor) or pe.dtype == torch.float8_e4m3fn or not hasattr(dm, "cropped_pos_embed"):
        return
    w8, scale = quantize_weight(pe.data.reshape(-1, pe.shape[-1]), "per_tensor")
    dm.pos_embed = torch.nn.Parameter(w8.reshape(pe.shape), requires_grad=False)
    dm.register_buffer("pos_embed_scale", scale.to(w8.device))
    crop = type(dm).cropped_pos_embed

    def cropped_pos_embed(hw, device=None):
        t = crop(dm, hw, device=device)
        return t.to(torch.float32) * dm.pos_embed_scale.to(t.device) if t.dtype == torch.float8_e4m3fn else t

    dm.cropped_pos_embed = cropped_pos_embed


def refuse_weight_patches(patcher) -> None:
    """LoRA (or any weight patch) on an FP8 layer would be merged by ComfyUI into the raw FP8 values
    without our scales: refuse clearly before sampling touches the weights."""
    fp8_keys = {f"diffusion_model.{n}.weight" for n in fp8_layers(patcher.model.diffusion_model)}
    hit = sorted(k for k in patcher.patches if k in fp8_keys)
    if hit:
        raise ValueError(
            f"a LoRA/weight patch targets {len(hit)} FP8 layer(s) (first: {hit[0]}); this version of the pack "
            "cannot merge LoRAs into FP8 weights yet and would produce wrong images. Remove the LoRA, or load "
            "the model with a stock loader for LoRA work.")


def install_scales(diffusion_model: torch.nn.Module, amax: dict[str, float] | None) -> None:
    """Set every FP8 layer's static input scale from ``amax`` (None: uncalibrated). A no-op when this
    very table is already installed (re-queues of the same MODEL), so no per-run rebuild of scales."""
    if amax is not None and getattr(diffusion_model, "_sd35fp8_amax", None) is amax:
        return
    for name, layer in fp8_layers(diffusion_model).items():
        layer.fp8_set_input_amax(None if amax is None else amax.get(name))
    diffusion_model._sd35fp8_amax = amax


def prepare_run(patcher):
    """Put this MODEL's FP8 state on the (shared) diffusion model: its calibrated scales, and the
    static runtime when enabled. Returns ``(enabled, recipe)`` for ``fp8_autocast``."""
    refuse_weight_patches(patcher)
    cfg = patcher.model_options.get(KEY) or {}
    recipe = DelayedScaling(**cfg["recipe"]) if cfg.get("recipe") else DelayedScaling()
    enabled = bool(cfg.get("enabled", True))
    dm = patcher.model.diffusion_model
    install_scales(dm, cfg.get("input_amax"))
    rt = cfg.get("runtime") or {}
    if rt.get("static") and enabled and cfg.get("input_amax") is not None:
        set_static(dm, RuntimeConfig(fast_accum=rt.get("fast_accum", True), adaln=rt.get("adaln", "weight_only"),
                                     margin=recipe.margin, fp32_accum=rt.get("fp32_accum", "")))
    else:
        clear_static(dm)
    if cfg.get("input_amax") is None and enabled and cfg.get("recipe") is not None:
        log.warning("sd35fp8: this MODEL is not calibrated; its FP8 layers use delayed scaling from their own "
                    "amax history. Put SD35FP8Calibrate before SD35FP8Autocast for static calibrated scales.")
    return enabled, recipe


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: run the whole sampling call inside ``fp8_autocast`` with this MODEL's
    calibrated scales, recipe and runtime; fail clearly if the result holds NaN/Inf."""
    enabled, recipe = prepare_run(executor.class_obj.model_patcher)
    with fp8_autocast(enabled=enabled, recipe=recipe):
        out = executor(*args, **kwargs)
    check_finite(out, "FP8 sampling")
    return out


def check_finite(t, what: str) -> None:
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise FloatingPointError(
                f"{what} produced {bad} NaN/Inf values out of {t.numel()} in the latent. The image would be "
                "black. Re-run SD35FP8Calibrate with these sampler settings (method 'max'), raise the "
                "autocast margin, or disable FP8 in SD35FP8Autocast to compare.")


def set_autocast(model, enabled: bool, recipe: DelayedScaling | None, runtime: dict | None = None):
    """Clone ``model`` with the autocast wrapper (replacing ours if present), the given recipe and
    runtime options (keys of ``DEFAULT_RUNTIME``; None keeps the clone's, else the defaults)."""
    m = model.clone()
    cfg = dict(m.model_options.get(KEY) or {})
    cfg["enabled"] = bool(enabled)
    r = recipe or DelayedScaling()
    cfg["recipe"] = {"fp8_format": r.fp8_format.value, "amax_history_len": r.amax_history_len, "margin": r.margin}
    rt = dict(DEFAULT_RUNTIME)
    rt.update(runtime if runtime is not None else (cfg.get("runtime") or {}))
    cfg["runtime"] = rt
    m.model_options[KEY] = cfg
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY, outer_sample_wrapper)
    apply_runtime_options(m, rt if enabled else {})
    return m


def attention_override(backend: str):
    """ComfyUI ``optimized_attention_override``: SDPA with ``backend`` for the plain [B, S, H*D] calls
    (the MMDiT's joint and MMDiT-X attention); anything else goes to ComfyUI's own function."""
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if mask is not None or skip_reshape or skip_output_reshape or q.dim() != 3 or q.device.type != "cuda":
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        b, _, hd = q.shape
        d = hd // heads
        q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        return attention(q, k, v, backend).transpose(1, 2).reshape(b, -1, hd)
    override.sd35fp8_backend = backend
    return override


def apply_runtime_options(m, rt: dict) -> None:
    """Install (or remove) the attention override and the torch.compile APPLY_MODEL wrapper on ``m``."""
    to = m.model_options.setdefault("transformer_options", {})
    if getattr(to.get("optimized_attention_override"), "sd35fp8_backend", None) is not None:
        del to["optimized_attention_override"]
    backend = rt.get("attention", "auto")
    if backend == "auto":
        backend = "cudnn" if torch.cuda.is_available() and torch.backends.cudnn.is_available() else "auto"
    if backend != "auto" and "optimized_attention_override" not in to:
        to["optimized_attention_override"] = attention_override(backend)
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY)
    if rt.get("compile"):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               compile_wrapper("reduce-overhead" if rt.get("cudagraphs") else None))


_compile_broken: set[str] = set()


def compile_wrapper(mode: str | None):
    """APPLY_MODEL wrapper running the diffusion model through ``torch.compile`` (as ComfyUI's
    TorchCompileModel does: the compiled module is swapped in only for the call, so ComfyUI's
    loading/offloading always sees the plain module). One compiled module per diffusion model and
    mode, specialised per shape (``dynamic=False``: each resolution/batch compiles once). If
    compilation is impossible here (no Triton, no C compiler, an unsupported GPU), it warns once and
    runs eager: same results, slower."""
    key = f"mode={mode}"

    def wrapper(executor, *args, **kwargs):
        base = executor.class_obj
        dm = base.diffusion_model
        if key in _compile_broken or not torch.cuda.is_available() or next(dm.parameters()).device.type != "cuda":
            return executor(*args, **kwargs)
        cache = dm.__dict__.setdefault("_sd35fp8_compiled", {})
        compiled = cache.get(key)
        if compiled is None:
            compiled = cache[key] = torch.compile(dm, mode=mode, dynamic=False)
        base.diffusion_model = compiled
        try:
            return executor(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            import torch._dynamo.exc as dexc
            if not isinstance(e, (dexc.BackendCompilerFailed, dexc.TorchRuntimeError, dexc.Unsupported,
                                  ImportError, OSError)) and "triton" not in str(e).lower():
                raise
            _compile_broken.add(key)
            log.warning("sd35fp8: torch.compile is not usable here (%s: %s); running the FP8 model eager "
                        "(same results, slower)", type(e).__name__, str(e).splitlines()[0][:300])
        finally:
            base.diffusion_model = dm
        return executor(*args, **kwargs)
    return wrapper


def require_fp8_model(model) -> torch.nn.Module:
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if dm is None or KEY not in model.model_options or not fp8_layers(dm):
        raise ValueError("this MODEL has no FP8 layers: load it with SD35FP8CheckpointLoader "
                         "(stock loaders give a BF16/FP16 model)")
    return dm


def calibrating_clone(model, session: CalibrationSession):
    m = model.clone()
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY)
    apply_runtime_options(m, {})  # observers need the eager autocast path: no compile, stock attention

    def wrapper(executor, *args, **kwargs):
        refuse_weight_patches(executor.class_obj.model_patcher)
        clear_static(executor.class_obj.model_patcher.model.diffusion_model)
        with fp8_autocast(enabled=False, calibrating=session):
            out = executor(*args, **kwargs)
        check_finite(out, "calibration sampling")
        return out

    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, CALIBRATE_KEY, wrapper)
    return m


def calibrate(model, positives: list, negative, steps: int, cfg: float, sampler_name: str, scheduler: str,
              width: int, height: int, seed: int, method: str = "max", percentile: float = 99.99,
              progress=None):
    """Sample every positive conditioning with ComfyUI's own sampler (all steps; cond and uncond
    batched as ComfyUI does), observe every FP8 layer's input, and return ``(calibrated MODEL clone,
    report)``. The input MODEL is left uncalibrated."""
    dm = require_fp8_model(model)
    if not positives:
        raise ValueError("the calibration prompt list is empty: give at least one prompt (one per line)")
    session = CalibrationSession(method, percentile)
    cal = calibrating_clone(model, session)
    total = len(positives) * steps
    t0 = time.perf_counter()
    for i, positive in enumerate(positives):
        latent = torch.zeros([1, 16, height // 8, width // 8], device="cpu")
        latent = comfy.sample.fix_empty_latent_channels(cal, latent)
        noise = comfy.sample.prepare_noise(latent, seed + i)

        def cb(step, x0, x, n, i=i):
            if progress is not None:
                progress(i * steps + step + 1, total)

        comfy.sample.sample(cal, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                            callback=cb, disable_pbar=True, seed=seed + i)
        comfy.model_management.throw_exception_if_processing_interrupted()
    amax = calibrated_amax(session, dm)
    secs = time.perf_counter() - t0
    out = set_autocast(model, True, None)
    cfg_ = dict(out.model_options[KEY])
    cfg_["input_amax"] = amax
    cfg_["calibration"] = {"method": method, "percentile": percentile if method == "percentile" else None,
                           "prompts": len(positives), "steps": steps, "cfg": cfg, "sampler": sampler_name,
                           "scheduler": scheduler, "width": width, "height": height, "seed": seed,
                           "date": datetime.date.today().isoformat(), "seconds": round(secs, 2)}
    out.model_options[KEY] = cfg_
    passes = "cond+uncond" if cfg != 1.0 else "cond only: ComfyUI skips uncond at cfg 1"
    text = report(QuantPolicy.from_dict(cfg_["policy"]), amax, bytes_before=bf16_bytes(dm),
                  bytes_after=weight_bytes(dm, 2), extra=[
        f"{cfg_.get('variant', 'SD3')}: calibrated with method={method}"
        + (f" ({percentile}th percentile)" if method == "percentile" else "")
        + f" over {len(positives)} prompt(s) x {steps} steps ({sampler_name}/{scheduler}, cfg {cfg}, "
          f"{width}x{height}, {passes}) in {secs:.1f} s"])
    log.info("sd35fp8: calibration done\n%s", text)
    return out, text
