"""ComfyUI glue: FP8 ops for model construction, loading, and the OUTER_SAMPLE autocast wrapper.

State travels on the ModelPatcher's ``model_options["sd35fp8"]`` (plain floats/strings, so clones
copy it and ComfyUI's caching keeps it): the calibrated per-layer input amax and the recipe. The
wrapper installs that clone's scales on the shared diffusion model at the start of every sampling
run, so two MODELs that share weights (uncalibrated loader output, calibrated clone) never see each
other's scales.
"""
from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import logging
import os
import re
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
from ..fp8.files import MappedSafetensors, file_metadata, fp8_layer_tensors, hybrid_state_dict, write_safetensors
from ..fp8.formats import E4M3_MAX
from ..fp8.policy import LayerDecision
from ..fp8.quant import dequantize_weight, qmax, quantize_to_scale
from ..fp8.runtime import RuntimeConfig, attention, clear_static, set_static, static_key
from ..fp8.attention import fp8_attention
from ..fp8.graphs import GraphedModule, quick_version
from ..fp8.te_backend import set_te, te_autocast, te_recipe, te_step

log = logging.getLogger("sd35fp8")
KEY = "sd35fp8"
AUTOCAST_KEY = "sd35fp8_autocast"
CALIBRATE_KEY = "sd35fp8_calibrate"
COMPILE_KEY = "sd35fp8_compile"
TE_KEY = "sd35fp8_te"
# The runtime every speed feature on (the SD35FP8Autocast defaults): static scales, fused casts,
# torch.compile, cuDNN attention. See fp8/runtime.py and bench/ for what each one buys.
DEFAULT_RUNTIME = {"static": True, "compile": True, "attention": "auto", "fast_accum": True,
                   "adaln": "weight_only", "cudagraphs": False, "backend": "torch", "scaling": "delayed",
                   "fuse_mlp": True, "fuse_attention": True, "attention_fp8_out": False}
MODEL_FOLDERS = ("checkpoints", "diffusion_models")
PACK_NAME = "ComfyUI-SD35-FP8"


def make_ops(policy: QuantPolicy, quant_device: torch.device, source: "MappedSafetensors | None" = None,
             place: torch.device | None = None):
    """ComfyUI ``custom_operations`` whose Linear takes its weight straight from the file: BF16/FP16
    weights of the policy's layers are quantized on ``quant_device`` one tensor at a time, weights
    already stored as FP8 (our files, stock scaled-FP8 files) are taken with their scales. No layer
    allocates its high-precision weight before loading (zero-size placeholders), and each consumed
    tensor's file pages are handed back (``source.release``), so neither the GPU nor host RAM ever
    holds the BF16 model. FP8 weights go to ``place`` (default: where ComfyUI builds the model).
    ``convert_weight``/``set_weight`` let ComfyUI merge LoRAs into FP8 weights."""
    base = comfy.ops.manual_cast

    class Linear(FP8LinearMixin, base.Linear):
        def __init__(self, in_features, out_features, bias=True, device=None, dtype=None, **kwargs):
            super().__init__(in_features, out_features, bias, device="meta", dtype=dtype, **kwargs)
            self._sd35_device = torch.device(device) if device is not None else torch.device("cpu")
            self._sd35_dtype = dtype or torch.get_default_dtype()
            empty = torch.empty(0, device=self._sd35_device, dtype=self._sd35_dtype)
            self.weight = torch.nn.Parameter(empty, requires_grad=False)
            if self.bias is not None:
                self.bias = torch.nn.Parameter(empty.clone(), requires_grad=False)

        def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                  unexpected_keys, error_msgs):
            w = state_dict.get(prefix + "weight")
            if w is None:
                missing_keys.append(prefix + "weight")
                return
            shape = (self.out_features, self.in_features)
            if tuple(w.shape) != shape:
                error_msgs.append(f"size mismatch for {prefix}weight: file {tuple(w.shape)}, model {shape}")
                return
            dev = self.weight.device
            name = prefix[:-1]
            fdev = place or dev
            if w.dtype == torch.float8_e4m3fn:  # stored FP8 (ours or stock scaled-FP8)
                ws, xs = fp8_layer_tensors(state_dict, prefix)
                self.fp8_set_weight(w.to(fdev, copy=True), ws.to(fdev), name)
                self._sd35_file_input_scale = xs
                policy.decisions.append(LayerDecision(name, shape, True, "stored FP8 in the file"))
            elif w.dtype.is_floating_point and w.dtype.itemsize == 1:
                error_msgs.append(f"{prefix}weight is {w.dtype}: only float8_e4m3fn FP8 weights are supported")
                return
            elif source is not None and source.stored_fp8:
                self.weight = torch.nn.Parameter(w.to(dev, self._sd35_dtype, copy=True), requires_grad=False)
                policy.decisions.append(LayerDecision(name, shape, False, "high precision in the file"))
            elif policy.decide(prefix, *shape):
                self.fp8_quantize_(policy.granularity_for(name), name=name, weight=w.to(quant_device))
                self.weight.data = self.weight.data.to(fdev)
                self.weight_scale = self.weight_scale.to(fdev)
            else:
                self.weight = torch.nn.Parameter(w.to(dev, self._sd35_dtype, copy=True), requires_grad=False)
            if source is not None:
                source.release(w)
            b = state_dict.get(prefix + "bias")
            if self.bias is not None:
                if b is None:
                    missing_keys.append(prefix + "bias")
                else:
                    bdt = self._sd35_dtype if self._sd35_dtype.itemsize > 1 else torch.bfloat16
                    self.bias = torch.nn.Parameter(b.to(fdev if self.fp8_quantized else dev, bdt, copy=True),
                                                   requires_grad=False)

        # ComfyUI's weight-patch hooks (ModelPatcher.patch_weight_to_device): LoRA deltas are merged
        # into the dequantized weight, then re-quantized with the layer's own scale (stochastic
        # rounding, as stock ComfyUI does for FP8); the calibrated input scale is untouched, and
        # unpatching restores the backed-up FP8 weight.
        def convert_weight(self, weight, inplace=False, **kwargs):
            if not self.fp8_quantized:
                return weight
            if inplace and weight.dtype == torch.float32:
                s = self.weight_scale.to(weight.device, torch.float32)
                return weight.mul_(s[:, None] if s.dim() == 1 else s)
            return dequantize_weight(weight, self.weight_scale, torch.float32)

        def set_weight(self, weight, inplace_update=False, seed=None, return_weight=False, **kwargs):
            if not self.fp8_quantized:
                w = weight.to(self.weight.dtype)
            else:
                s = self.weight_scale.to(weight.device, torch.float32)
                top = qmax(self.weight.dtype) * (s[:, None] if s.dim() == 1 else s)
                sat = float((weight.abs() > top).float().mean())
                if sat > 1e-3:
                    log.warning("sd35fp8: the LoRA pushes %.2f%% of %s's weights past its 8-bit range; they "
                                "saturate (a LoRA that large changes the layer a lot: compare with the BF16 model)",
                                100 * sat, self.fp8_name)
                w = quantize_to_scale(weight, self.weight_scale, seed=seed, dtype=self.weight.dtype)
            if return_weight:
                return w
            if inplace_update:
                self.weight.data.copy_(w)
            else:
                self.weight = torch.nn.Parameter(w, requires_grad=False)

        def forward(self, x):
            if self.fp8_quantized and (getattr(self, "weight_function", None)
                                       or getattr(self, "weight_lowvram_function", None) is not None):
                raise RuntimeError(
                    f"sd35fp8: ComfyUI loaded {self.fp8_name} only partially (low-VRAM mode) with a LoRA on it; "
                    "FP8 layers need the LoRA merged into their weights. Free VRAM (unload other models) or "
                    "start ComfyUI with --normalvram/--highvram.")
            return super().forward(x)

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


def _comfy_load(fn, *args, **kwargs):
    """Call a ComfyUI loader with the classic ModelPatcher where the version has a dynamic one (FP8
    layers need LoRAs merged into their weights, not applied per call)."""
    if "disable_dynamic" in inspect.signature(fn).parameters:
        kwargs["disable_dynamic"] = True
    return fn(*args, **kwargs)


# The loader's weight_scaling options: FP8 weight scales per tensor or per output channel, or per tensor with the
# adaLN modulation weights as INT8 with per-channel scales (fp8.quant.INT8_ROWS: less weight error, same bytes),
# or that plus the MLP's fc1/fc2 as INT8 per channel, which the static runtime runs W8A8 (INT8 activations: per
# token into fc1, at a calibrated static scale into fc2) for about a third of E4M3's rounding error there
INT8_ADALN = "per_tensor_int8_adaln"
INT8_MLP = "per_tensor_int8_mlp"
WEIGHT_SCALINGS = ("per_tensor", "per_channel", INT8_ADALN, INT8_MLP)


def load_sd35_fp8(path: str, granularity: str = "per_tensor"):
    """Load an SD3.5 checkpoint with its MMDiT in FP8. Returns (model, clip, vae, info).

    A BF16/FP16 file is quantized tensor by tensor while loading (uncalibrated: weight-only until
    SD35FP8Calibrate). An FP8 file (ours, or a stock scaled-FP8 one) is loaded as stored; when it
    holds calibrated input scales the MODEL comes back calibrated and ready for the static runtime."""
    name = os.path.basename(path)
    info = inspect_checkpoint(path)  # header only: wrong family / truncated files fail here, fast
    src = MappedSafetensors(path)
    src.stored_fp8 = bool(info.fp8_tensors)
    if granularity not in WEIGHT_SCALINGS:
        raise ValueError(f"unknown weight_scaling {granularity!r}; use one of {', '.join(WEIGHT_SCALINGS)}")
    policy = (QuantPolicy(granularity="per_tensor", adaln_int8=True, mlp_int8=granularity == INT8_MLP)
              if granularity in (INT8_ADALN, INT8_MLP) else QuantPolicy(granularity=granularity))
    qdev = comfy.model_management.get_torch_device()
    place = fp8_placement(src, info, policy, qdev)
    ops = make_ops(policy, qdev if qdev.type == "cuda" else torch.device("cpu"), src, place=place)
    sd, metadata = src.state_dict(), src.metadata
    pe_key = info.prefix + "pos_embed_scale"  # ours (exact FP8 pos_embed); not a key ComfyUI's model has
    pe_scale = sd.pop(pe_key).clone() if pe_key in sd else None
    clip = vae = None
    opts = {"custom_operations": ops}
    if src.stored_fp8:  # never let ComfyUI pick FP8 as the model dtype: only the Linear weights are FP8
        opts["dtype"] = comfy.model_management.unet_dtype(
            model_params=comfy.utils.calculate_parameters(sd, info.prefix),
            supported_dtypes=[torch.float16, torch.bfloat16, torch.float32])
    try:
        if info.prefix == DIFFUSION_PREFIX:
            out = _comfy_load(comfy.sd.load_state_dict_guess_config, sd, output_vae=info.has_vae,
                              output_clip=bool(info.has_text_encoders),
                              embedding_directory=folder_paths.get_folder_paths("embeddings"), model_options=opts,
                              metadata=metadata)
            model, clip, vae = out[0], out[1], out[2]
        else:
            model = _comfy_load(comfy.sd.load_diffusion_model_state_dict, sd, model_options=opts, metadata=metadata)
    except CheckpointError as e:
        raise CheckpointError(f"{name}: {e}") from None
    except RuntimeError as e:  # size mismatches and the like: a file that does not fit its own header
        why = " ".join(str(e).split()).replace("Error(s) in loading state_dict for ", "")
        raise CheckpointError(f"{name}: does not load as {info.variant} ({why[:400]}); "
                              "the file is damaged or mixes layers of different models") from e
    finally:
        del sd
        src.release_all()
    if model is None:
        raise CheckpointError(f"{name}: ComfyUI did not recognise the diffusion model")
    dm = model.model.diffusion_model
    unloaded = [n for n, m in dm.named_modules() if isinstance(m, FP8LinearMixin) and m.weight.numel() == 0]
    if unloaded:
        raise CheckpointError(f"{name}: {len(unloaded)} Linear layer(s) have no weight in the file (first: "
                              f"{unloaded[0]}): the checkpoint is incomplete")
    quantize_pos_embed(dm, pe_scale)
    if getattr(model, "size", 0):  # a size ComfyUI cached before the table became FP8 would overstate the model
        model.size = 0  # (its memory planning and the benchmark's weights column read model_size())
    layers = fp8_layers(dm)
    if not layers:
        raise CheckpointError(f"{name}: no Linear layer was quantized (unexpected layout)")
    amax, scale_note, calibration = _file_input_scales(layers, metadata, src.stored_fp8)
    n_params = sum(p.numel() for p in dm.parameters())
    fp8_params = sum(m.weight.numel() for m in layers.values())
    lines = [info.describe()]
    if src.stored_fp8:
        lines.append(f"FP8 file ({_file_origin(metadata)}): {len(layers)} FP8 layers loaded as stored"
                     + (f" (weight_scaling={granularity} does not apply)" if granularity != "per_tensor" else ""))
        lines.append(scale_note)
    else:
        lines.append(policy.summary())
    lines.append(f"diffusion model weights: {bf16_bytes(dm) / 2**20:.1f} MiB in BF16 -> "
                 f"{weight_bytes(dm, 2) / 2**20:.1f} MiB with FP8; {fp8_params / max(n_params, 1):.1%} of parameters "
                 "in FP8")
    text = "\n".join(lines)
    model.model_options[KEY] = {"variant": info.variant, "policy": policy.to_dict(), "input_amax": None,
                                "recipe": None, "enabled": False, "load_info": text}
    # weight-only until calibrated/autocast; the wrapper also guards every sampling run
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, AUTOCAST_KEY, outer_sample_wrapper)
    if place is not None:  # the FP8 weights are on the GPU already: register the model as loaded there, so
        comfy.model_management.load_models_gpu([model])  # ComfyUI can offload it when others need the room
    if amax is not None:  # calibrated file: ready for the static runtime, as SD35FP8Calibrate's output is
        model = set_autocast(model, True, None)
        model.model_options[KEY] = dict(model.model_options[KEY], input_amax=amax, calibration=calibration)
    log.info("sd35fp8: loaded %s\n%s", name, text)
    return model, clip, vae, text


def fp8_placement(src: MappedSafetensors, info, policy: QuantPolicy, dev: torch.device) -> torch.device | None:
    """Put the FP8 weights straight on the GPU when they fit there with 1 GiB to spare (ComfyUI would
    build a model whose BF16 size exceeds free VRAM in host RAM, and copy it over at the first
    sampling run): fewer copies, and host RAM never holds them. None: where ComfyUI builds it."""
    if dev.type != "cuda":
        return None
    mm = comfy.model_management
    if getattr(mm, "vram_state", None) in (getattr(mm.VRAMState, "NO_VRAM", None), getattr(mm.VRAMState, "LOW_VRAM", None)):
        return None
    n = 0
    for k, v in src.header.items():
        if not k.startswith(info.prefix + "joint_blocks.") or not k.endswith(".weight") or len(v["shape"]) != 2:
            continue
        if v["dtype"].startswith("F8") or (not src.stored_fp8 and policy.decide(
                k[len(info.prefix):-len(".weight")], *v["shape"], record=False)):
            n += v["shape"][0] * v["shape"][1]
    return dev if n + 2**30 < mm.get_free_memory(dev) else None


def _file_origin(metadata: dict) -> str:
    if metadata.get("sd35fp8.format"):
        return f"saved by {PACK_NAME} {metadata.get('sd35fp8.version', '?')}"
    return "not made by this pack"


def _file_input_scales(layers: dict, metadata: dict, stored: bool):
    """``(input_amax or None, note, calibration metadata)`` from the input scales an FP8 file carried."""
    if not stored:
        return None, "", None
    calibration = None
    if metadata.get("sd35fp8.calibration"):
        try:
            calibration = json.loads(metadata["sd35fp8.calibration"])
        except json.JSONDecodeError:
            calibration = None
    scales = {n: getattr(m, "_sd35_file_input_scale", None) for n, m in layers.items()}
    missing = sorted(n for n, x in scales.items() if x is None)
    if missing:
        return None, (f"the file has no calibrated input_scale for {len(missing)} of {len(layers)} FP8 layers "
                      f"(first: {missing[0]}): run SD35FP8Calibrate for static FP8 activations (until then "
                      "weight-only FP8)"), calibration
    if calibration is None and all(float(x) == 1.0 for x in scales.values()):
        return None, ("the file's input scales are all 1.0 (ComfyUI's value for 'not calibrated'): run "
                      "SD35FP8Calibrate for static FP8 activations (until then weight-only FP8)"), None
    amax = {n: float(x) * E4M3_MAX for n, x in scales.items()}
    if calibration:
        how = ", ".join(f"{k} {calibration[k]}" for k in ("method", "prompts", "steps", "date") if k in calibration)
        note = f"calibrated input scales from the file ({how}): no re-calibration needed"
    else:
        note = "input scales from the file (calibration not recorded): used as static activation scales"
    return amax, note, calibration


def pack_version() -> str:
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"),
                  encoding="utf-8") as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


def save_target(filename: str, all_in_one: bool) -> str:
    """Where ``filename`` goes: ``checkpoints/`` for an all-in-one file, else ``diffusion_models/``
    (ComfyUI's first folder of that kind); sub-folders allowed, nothing outside it."""
    folder = "checkpoints" if all_in_one else "diffusion_models"
    name = (filename or "").strip().replace("\\", "/")
    if not name or name.endswith("/"):
        raise ValueError("give a file name for the FP8 checkpoint (e.g. sd35_fp8/sd3.5_large_fp8_calibrated)")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{filename!r} points outside models/{folder}: give a name relative to that folder")
    return path


def save_fp8_checkpoint(model, filename: str, overwrite: bool = False, clip=None, vae=None) -> tuple[str, str]:
    """Write this calibrated FP8 MODEL (LoRA/patches merged, as stock ComfyUI saves) in the hybrid
    FP8 layout; with ``clip``/``vae`` an all-in-one checkpoint. Returns ``(path, report)``."""
    dm = require_fp8_model(model)
    cfg = model.model_options.get(KEY) or {}
    amax = cfg.get("input_amax")
    if amax is None:
        raise ValueError("this MODEL is not calibrated: put SD35FP8Calibrate before the save node (a file without "
                         "calibrated input scales would run with input scale 1.0 in stock ComfyUI)")
    all_in_one = clip is not None or vae is not None
    path = save_target(filename, all_in_one)
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists: nothing was written. Choose another file name or set "
                              "overwrite=true to replace it")
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)  # merge LoRAs, as stock saving does
    prefix = DIFFUSION_PREFIX if all_in_one else ""
    tensors = hybrid_state_dict(dm, prefix, amax)
    mc = model.model.model_config
    if clip is not None:
        tensors.update(mc.process_clip_state_dict_for_saving(clip.get_sd()))
    if vae is not None:
        tensors.update(mc.process_vae_state_dict_for_saving(vae.get_sd()))
    md = file_metadata(cfg.get("calibration"), cfg.get("policy"), cfg.get("variant", "SD3"), pack_version())
    size = write_safetensors(path, tensors, md, overwrite=overwrite)
    for folder in ("checkpoints", "diffusion_models"):
        getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    cal = cfg.get("calibration") or {}
    text = (f"saved {path} ({size / 2**20:.1f} MiB): {len(fp8_layers(dm))} FP8 layers with calibrated input scales"
            + (f" ({cal.get('method')}, {cal.get('prompts')} prompts x {cal.get('steps')} steps)" if cal else "")
            + ("; all-in-one with " + " and ".join(x for x, o in (("text encoders", clip), ("VAE", vae)) if o is not None)
               if all_in_one else "; diffusion model only"))
    log.info("sd35fp8: %s", text)
    return path, text


def quantize_pos_embed(dm: torch.nn.Module, scale: torch.Tensor | None = None) -> None:
    """Store the MMDiT's positional-embedding table (226 M values in Medium: 9% of its weights) as
    FP8 with a per-tensor scale (``scale``: the one an FP8 file recorded, which recovers the saved
    FP8 values exactly); the per-resolution crop is dequantized when ComfyUI asks for it."""
    pe = getattr(dm, "pos_embed", None)
    if not isinstance(pe, torch.Tensor) or pe.dtype == torch.float8_e4m3fn or not hasattr(dm, "cropped_pos_embed"):
        return
    shape = pe.shape
    w8, scale = quantize_weight(pe.data.reshape(-1, shape[-1]), "per_tensor", scale=scale)
    del pe
    dm.pos_embed = torch.nn.Parameter(w8.reshape(shape), requires_grad=False)
    dm.register_buffer("pos_embed_scale", scale.to(w8.device))
    crop = type(dm).cropped_pos_embed

    def cropped_pos_embed(hw, device=None):
        t = crop(dm, hw, device=device)
        return t.to(torch.float32) * dm.pos_embed_scale.to(t.device) if t.dtype == torch.float8_e4m3fn else t

    dm.cropped_pos_embed = cropped_pos_embed


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
    static runtime or the TransformerEngine backend when enabled. Returns ``(enabled, recipe)``;
    :func:`run_context` turns them into the context the sampling runs in."""
    cfg = patcher.model_options.get(KEY) or {}
    recipe = DelayedScaling(**cfg["recipe"]) if cfg.get("recipe") else DelayedScaling()
    enabled = bool(cfg.get("enabled", True))
    dm = patcher.model.diffusion_model
    install_scales(dm, cfg.get("input_amax"))
    rt = cfg.get("runtime") or {}
    te = enabled and rt.get("backend") == "transformer_engine"
    if dm.__dict__.pop(TE_ON, False):  # a walk over every module: only where a run put TE on
        set_te(dm, None)
    graphs = bool(rt.get("cudagraphs")) and enabled
    # graphs this run will not replay hold a memory pool each: free them
    drop_graphs(dm, te=not (te and graphs), compiled=not (not te and graphs and rt.get("compile")))
    if rt.get("static") and enabled and not te and cfg.get("input_amax") is not None:
        set_static(dm, RuntimeConfig(fast_accum=rt.get("fast_accum", True), adaln=rt.get("adaln", "weight_only"),
                                     margin=recipe.margin, fp32_accum=rt.get("fp32_accum", ""),
                                     fuse_mlp=rt.get("fuse_mlp", True),
                                     fuse_attention=rt.get("fuse_attention", True),
                                     # fp8.norm's kernels cost a Python custom-op call each: only where the
                                     # model replays as CUDA graphs (see RuntimeConfig)
                                     fuse_norm=bool(rt.get("cudagraphs")) and rt.get("fuse_norm", True),
                                     attention_fp8_out=bool(rt.get("attention_fp8_out", False))))
    else:
        clear_static(dm)
    if te:
        set_te(dm, recipe, rt.get("scaling", "delayed"), rt.get("adaln", "weight_only"))
        dm.__dict__[TE_ON] = True
    # the graphs check every weight's address once per run, on the first call (the sampler loads and patches the
    # model after this, before that call), and per call only cheaply (fp8.graphs.quick_version)
    for runner in graph_runners(dm).values():
        runner.recheck()
    if cfg.get("input_amax") is None and enabled and cfg.get("recipe") is not None:
        log.warning("sd35fp8: this MODEL is not calibrated; its FP8 layers use delayed scaling from their own "
                    "amax history. Put SD35FP8Calibrate before SD35FP8Autocast for static calibrated scales.")
    return enabled, recipe


@contextlib.contextmanager
def run_context(patcher, enabled: bool, recipe: DelayedScaling):
    """``fp8_autocast`` with this MODEL's recipe, inside TransformerEngine's autocast for that backend."""
    rt = (patcher.model_options.get(KEY) or {}).get("runtime") or {}
    with contextlib.ExitStack() as stack:
        if enabled and rt.get("backend") == "transformer_engine":
            stack.enter_context(te_autocast(te_recipe(recipe, rt.get("scaling", "delayed"))))
        stack.enter_context(fp8_autocast(enabled=enabled, recipe=recipe))
        yield


def outer_sample_wrapper(executor, *args, **kwargs):
    """OUTER_SAMPLE wrapper: run the whole sampling call inside ``fp8_autocast`` with this MODEL's
    calibrated scales, recipe and runtime; fail clearly if the result holds NaN/Inf."""
    patcher = executor.class_obj.model_patcher
    enabled, recipe = prepare_run(patcher)
    with run_context(patcher, enabled, recipe):
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


def on_gpu(t: torch.Tensor) -> bool:
    """Whether the attention override handles this call (on CPU ComfyUI's own attention is as good)."""
    return t.device.type == "cuda"


def attention_override(backend: str):
    """ComfyUI ``optimized_attention_override``: SDPA with ``backend`` (or our FP8 kernel) for the plain
    [B, S, H*D] calls (the MMDiT's joint attention); anything else goes to ComfyUI's own function."""
    def override(func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                 skip_output_reshape=False, **kwargs):
        if mask is not None or skip_reshape or skip_output_reshape or q.dim() != 3 or not on_gpu(q):
            return func(q, k, v, heads, mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape,
                        skip_output_reshape=skip_output_reshape, **kwargs)
        if backend == "fp8":  # ComfyUI's [B, S, H*D] layout in and out; cuDNN SDPA where FP8 cannot run
            return fp8_attention(q, k, v, heads)
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
    m.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TE_KEY)
    if rt.get("backend", "torch") == "transformer_engine":  # TE modules run eager (no torch.compile)
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, TE_KEY,
                               te_wrapper(bool(rt.get("cudagraphs"))))
    elif rt.get("compile"):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, COMPILE_KEY,
                               compile_wrapper(bool(rt.get("cudagraphs"))))


_compile_broken: set[str] = set()
COMPILED, GRAPHS = "compiled", "cuda_graphs"  # keys of a diffusion model's compile cache
TE_GRAPHS = "_sd35fp8_graphed"  # the TE backend's GraphedModule, on the diffusion model
TE_ON = "_sd35fp8_te_on"  # set where prepare_run routed the layers through TE (the next run without TE undoes it)


def graph_runners(dm: torch.nn.Module) -> dict:
    """This diffusion model's CUDA-graph runners (``fp8.graphs.GraphedModule``) that exist: "compiled"
    (the torch runtime's) and "TE"."""
    found = {"compiled": dm.__dict__.get("_sd35fp8_compiled", {}).get(GRAPHS), "TE": dm.__dict__.get(TE_GRAPHS)}
    return {k: v for k, v in found.items() if v is not None}


def drop_graphs(dm: torch.nn.Module, te: bool = True, compiled: bool = True) -> None:
    """Free captured CUDA graphs (and their memory pools) of this diffusion model: the TE backend's
    and/or those of the compiled torch runtime."""
    if te:
        dm.__dict__.pop(TE_GRAPHS, None)
    if compiled:
        dm.__dict__.get("_sd35fp8_compiled", {}).pop(GRAPHS, None)


@contextlib.contextmanager
def _swapped(base, module: torch.nn.Module):
    """ComfyUI's model runs ``module`` as its diffusion model for one call only, so its loading and
    offloading always see the plain module."""
    dm = base.diffusion_model
    base.diffusion_model = module
    try:
        yield
    finally:
        base.diffusion_model = dm


def _on_cuda(dm: torch.nn.Module) -> bool:
    return torch.cuda.is_available() and next(dm.parameters()).device.type == "cuda"


def te_wrapper(graphs: bool):
    """APPLY_MODEL wrapper for the TransformerEngine backend: TE's delayed-scaling update after every
    denoiser call (``te_step``) and, with ``graphs``, the whole diffusion model replayed as CUDA graphs,
    one per resolution/batch (``fp8.graphs``; TE modules cannot go through torch.compile, and eager
    they spend ~150 µs of host time per Linear call). Graphs are re-captured when ComfyUI replaces
    weights (LoRA merge, offload/reload); a model that cannot be captured runs eager with a warning."""
    def wrapper(executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        if not graphs or not _on_cuda(dm):
            out = executor(*args, **kwargs)
            te_step()
            return out
        runner = dm.__dict__.get(TE_GRAPHS)
        if runner is None:
            runner = dm.__dict__[TE_GRAPHS] = GraphedModule(dm, after=te_step, quick=quick_version)
        with _swapped(executor.class_obj, runner):
            return executor(*args, **kwargs)
    return wrapper


def compile_wrapper(graphs: bool):
    """APPLY_MODEL wrapper running the diffusion model through ``torch.compile`` (swapped in per call, as
    ComfyUI's TorchCompileModel does). One compiled module per diffusion model, specialised per shape
    (``dynamic=False``: each resolution/batch compiles once). With ``graphs`` and the static FP8 runtime
    (calibrated scales, no run-time state on the host), the compiled model is replayed whole as CUDA
    graphs (``fp8.graphs.GraphedModule``, one per resolution/batch): a denoiser call is then one graph
    launch, with no guard checks and no per-kernel launches on the host (cheaper than torch.compile's
    reduce-overhead mode: see bench/results). If compilation is impossible here (no Triton, no C
    compiler, an unsupported GPU), it warns once and runs eager: same results, slower."""
    def wrapper(executor, *args, **kwargs):
        dm = executor.class_obj.diffusion_model
        if COMPILED in _compile_broken or not _on_cuda(dm):
            return executor(*args, **kwargs)
        cache = dm.__dict__.setdefault("_sd35fp8_compiled", {})
        run = cache.get(COMPILED)
        if run is None:
            run = cache[COMPILED] = torch.compile(dm, dynamic=False)
        if graphs and static_key(dm) is not None:  # the static FP8 runtime only
            if GRAPHS not in cache:
                cache[GRAPHS] = GraphedModule(run, quick=quick_version)
            run = cache[GRAPHS]
        try:
            with _swapped(executor.class_obj, run):
                return executor(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            import torch._dynamo.exc as dexc
            if not isinstance(e, (dexc.BackendCompilerFailed, dexc.TorchRuntimeError, dexc.Unsupported,
                                  ImportError, OSError)) and "triton" not in str(e).lower():
                raise
            _compile_broken.add(COMPILED)
            cache.pop(GRAPHS, None)
            log.warning("sd35fp8: torch.compile is not usable here (%s: %s); running the FP8 model eager "
                        "(same results, slower)", type(e).__name__, str(e).splitlines()[0][:300])
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
        clear_static(executor.class_obj.model_patcher.model.diffusion_model)
        set_te(executor.class_obj.model_patcher.model.diffusion_model, None)
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
