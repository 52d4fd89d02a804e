"""Checkpoint files: the model lists, loading an SD3.5 file into an FP8 MODEL, saving a calibrated one."""
from __future__ import annotations

import inspect
import logging
import os
import re

import torch

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths

from sd35fp8 import (CheckpointError, FP8LinearMixin, QuantPolicy, bf16_bytes, fp8_layers, quantize_pos_embed,
                     weight_bytes)
from sd35fp8.io.checkpoint import DIFFUSION_PREFIX
from sd35fp8.core.centering import describe_centers
from sd35fp8.core.quant import PerChannelWeightsError
from sd35fp8.io.diffusers_files import DiffusersShards, open_checkpoint, sibling_components
from sd35fp8.io.files import (ST_DTYPES, MappedSafetensors, file_calibration, file_fingerprint, file_input_amax,
                              file_metadata, file_origin, hybrid_state_dict, write_safetensors)

from . import state as st
from .ops import make_ops
from .sampling import hp_source, require_fp8_model, set_autocast, with_wrapper

log = logging.getLogger("sd35fp8")
MODEL_FOLDERS = ("checkpoints", "diffusion_models")
PACK_NAME = "ComfyUI-SD35-FP8"


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
# what the loader offers, named for what it gives -> the weight format. The formats' own names (the options before
# 0.3) stay accepted, so saved workflows and API prompts keep their choice.
WEIGHT_FORMATS = {"fastest": "per_tensor", "finer weights (per channel)": "per_channel",
                  "less error (INT8 adaLN)": INT8_ADALN, "most faithful (INT8 MLP)": INT8_MLP}
WEIGHT_SCALINGS = tuple(WEIGHT_FORMATS.values())
CHOICE_OF = {v: k for k, v in WEIGHT_FORMATS.items()}


def weight_format(choice: str) -> str:
    """The weight format of a loader choice: a goal name ("fastest", ...) or a format's own name ("per_tensor")."""
    if choice in WEIGHT_FORMATS:
        return WEIGHT_FORMATS[choice]
    if choice in WEIGHT_SCALINGS:
        return choice
    raise ValueError(f"unknown weight_scaling {choice!r}; use one of {', '.join(WEIGHT_FORMATS)} (or the formats' "
                     f"names {', '.join(WEIGHT_SCALINGS)})")


def load_sd35_fp8(path: str, granularity: str = "per_tensor"):
    """Load an SD3.5 checkpoint with its MMDiT in FP8. Returns (model, clip, vae, info).

    A BF16/FP16 file is quantized tensor by tensor while loading (uncalibrated: weight-only until
    SD35FP8Calibrate). An FP8 file (ours, or a stock scaled-FP8 one) is loaded as stored; when it
    holds calibrated input scales the MODEL comes back calibrated and ready for the static runtime."""
    name = os.path.basename(path)
    # header only: wrong family / truncated files fail here, fast; a diffusers transformer (its file or a shard)
    # is read through its shards in the single-file layout
    src, info = open_checkpoint(path)
    src.stored_fp8 = bool(info.fp8_tensors)
    granularity = weight_format(granularity)
    policy = (QuantPolicy(granularity="per_tensor", adaln_int8=True, mlp_int8=granularity == INT8_MLP)
              if granularity in (INT8_ADALN, INT8_MLP) else QuantPolicy(granularity=granularity))
    # every tensor checked for NaN/Inf before anything is built (the FP8 layers' weights as the ops read them, so the
    # file is not read twice): a damaged file is named here, not as a NaN of the sampling much later
    check_complete(src, info)
    fp8_keys = fp8_weight_keys(src, info, policy)
    src.check_finite(skip=fp8_keys)  # the Linear weights (most of the bytes): checked as the ops load them
    qdev = comfy.model_management.get_torch_device()
    place = fp8_placement(src, fp8_keys, qdev)
    ops = make_ops(policy, qdev if qdev.type == "cuda" else torch.device("cpu"), src, place=place,
                   key_prefix=info.prefix)
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
    if not src.stored_fp8 and not isinstance(src, DiffusersShards):  # calibration reads centered columns from it
        hp_source(dm, (os.path.abspath(path), info.prefix))
    if getattr(model, "size", 0):  # a size ComfyUI cached before the table became FP8 would overstate the model
        model.size = 0  # (its memory planning and the benchmark's weights column read model_size())
    layers = fp8_layers(dm)
    if not layers:
        raise CheckpointError(f"{name}: no Linear layer was quantized (unexpected layout)")
    amax, scale_note = None, ""
    if src.stored_fp8:
        amax, scale_note = file_input_amax({n: m.file_input_scale for n, m in layers.items()}, metadata)
        if amax is None:
            scale_note += ": run SD35FP8Calibrate for static FP8 activations (until then weight-only FP8)"
    n_params = sum(p.numel() for p in dm.parameters())
    fp8_params = sum(m.weight.numel() for m in layers.values())
    lines = [info.describe()]
    if isinstance(src, DiffusersShards):
        clip, vae, note = diffusers_siblings(path)
        lines.append(f"diffusers transformer ({len(src.files)} file(s)); {note}")
    if src.stored_fp8:
        lines.append(f"FP8 file ({file_origin(metadata, PACK_NAME)}): {len(layers)} FP8 layers loaded as stored"
                     + (f" (weight_scaling={granularity} does not apply)" if granularity != "per_tensor" else ""))
        lines.append(scale_note)
        centers = (file_calibration(metadata) or {}).get("centers") if amax is not None else None
        if centers:
            lines.append(describe_centers(centers, len(layers)) + "; from the file's calibration record (its biases "
                         "carry the weight correction; stock ComfyUI reads the same file without the centering)")
    else:
        lines.append(policy.summary())
    lines.append(f"diffusion model weights: {bf16_bytes(dm) / 2**20:.1f} MiB in BF16 -> "
                 f"{weight_bytes(dm, 2) / 2**20:.1f} MiB with FP8; {fp8_params / max(n_params, 1):.1%} of parameters "
                 "in FP8")
    text = "\n".join(lines)
    fingerprint = src.fingerprint() if isinstance(src, DiffusersShards) else file_fingerprint(path)
    source = {"file": name, "fingerprint": fingerprint, "weight_scaling": granularity}
    st.put(model, st.FP8State(variant=info.variant, policy=policy.to_dict(), load_info=text, source=source))
    # weight-only until calibrated/autocast; the wrapper also guards every sampling run
    with_wrapper(model)
    if place is not None:  # the FP8 weights are on the GPU already: register the model as loaded there, so
        comfy.model_management.load_models_gpu([model])  # ComfyUI can offload it when others need the room
    if amax is not None:  # calibrated file: ready for the static runtime, as SD35FP8Calibrate's output is
        model = set_autocast(model, True, None, input_amax=amax, calibration=file_calibration(metadata))
    log.info("sd35fp8: loaded %s\n%s", name, text)
    return model, clip, vae, text


def diffusers_siblings(path: str):
    """(clip, vae, what was found) from the diffusers repository a transformer file sits in (``vae/``,
    ``text_encoder*/`` beside ``transformer/``); ComfyUI converts their key layouts itself."""
    comp = sibling_components(path)

    def merged(files):
        return {k: v for f in files for k, v in comfy.utils.load_torch_file(f, safe_load=True).items()}
    clip = vae = None
    found = []
    try:
        if comp["vae"]:
            vae = comfy.sd.VAE(sd=merged(comp["vae"]))
            found.append("VAE from vae/")
        if comp["text_encoders"]:
            clip = comfy.sd.load_text_encoder_state_dicts(
                state_dicts=[merged(fs) for fs in comp["text_encoders"]], clip_type=comfy.sd.CLIPType.SD3,
                embedding_directory=folder_paths.get_folder_paths("embeddings"))
            found.append(f"text encoders from {len(comp['text_encoders'])} text_encoder*/ folder(s)")
    except Exception as e:  # noqa: BLE001 - a broken sibling folder is named, the transformer is not at fault
        raise CheckpointError(f"{os.path.basename(path)}: the diffusers folder beside transformer/ does not load "
                              f"({type(e).__name__}: {str(e)[:300]}): fix or remove it, or use ComfyUI's "
                              "loaders") from e
    if not found:
        return None, None, "no vae/ or text_encoder*/ beside transformer/: take them with ComfyUI's loaders"
    return clip, vae, "; ".join(found)


def check_complete(src: MappedSafetensors, info) -> None:
    """Refuse an incomplete or mis-shaped diffusion model before anything is built: ComfyUI's own MMDiT for the
    file's configuration is built on the meta device (no memory) and every tensor it holds (norms, embedders,
    pos_embed, biases, the final layer, not only Linear weights) must be in the file with that shape and a float
    dtype. ComfyUI itself loads such files with the missing tensors left uninitialised: wrong, non-repeatable
    images."""
    import comfy.model_detection
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.mmdit import OpenAISignatureMMDITWrapper
    name = os.path.basename(src.path)
    have = {k[len(info.prefix):]: v for k, v in src.header.items() if k.startswith(info.prefix)}
    meta = {k: torch.empty(v["shape"], dtype=ST_DTYPES.get(v["dtype"], torch.float32), device="meta")
            for k, v in have.items()}
    cfg = comfy.model_detection.detect_unet_config(meta, "")
    if not cfg:
        raise CheckpointError(f"{name}: ComfyUI does not recognise the diffusion model's configuration")
    params = inspect.signature(OpenAISignatureMMDITWrapper.__init__).parameters
    kwargs = {k: v for k, v in cfg.items() if k in params}
    expect = OpenAISignatureMMDITWrapper(**kwargs, device="meta", dtype=torch.bfloat16,
                                         operations=comfy.ops.disable_weight_init).state_dict()
    # without a pos_embed table ComfyUI builds a model without one (no error, a 22% different latent): every SD3 and
    # SD3.5 checkpoint has it
    missing = [k for k in ["pos_embed"] + list(expect) if k not in have]
    if missing:
        raise CheckpointError(f"{name}: {len(missing)} tensor(s) of the {info.variant} diffusion model are missing "
                              f"(first: {info.prefix}{missing[0]}): the file is incomplete; download it again")
    for k, t in expect.items():
        shape, dtype = tuple(have[k]["shape"]), have[k]["dtype"]
        if shape != tuple(t.shape):
            raise CheckpointError(f"{name}: tensor {info.prefix}{k} has shape {list(shape)}, the model needs "
                                  f"{list(t.shape)}: the file is damaged or mixes layers of different models")
        if dtype not in ("F32", "F16", "BF16", "F64") and not dtype.startswith("F8"):
            raise CheckpointError(f"{name}: tensor {info.prefix}{k} is {dtype}, not a floating-point tensor: the file "
                                  "is damaged")


def fp8_weight_keys(src: MappedSafetensors, info, policy: QuantPolicy) -> dict[str, bool]:
    """The file's joint-block Linear weights that will be FP8 in the model, each with whether it is quantized while
    loading (True: high precision in the file, selected by the policy) or stored as FP8 already (False)."""
    out = {}
    for k, v in src.header.items():
        if not k.startswith(info.prefix + "joint_blocks.") or not k.endswith(".weight") or len(v["shape"]) != 2:
            continue
        if v["dtype"].startswith("F8"):
            out[k] = False
        elif not src.stored_fp8 and policy.decide(k[len(info.prefix):-len(".weight")], *v["shape"], record=False):
            out[k] = True
    return out


def fp8_placement(src: MappedSafetensors, fp8_keys, dev: torch.device) -> torch.device | None:
    """Put the FP8 weights (``fp8_keys``: :func:`fp8_weight_keys`) straight on the GPU when they fit there with 1 GiB
    to spare (ComfyUI would build a model whose BF16 size exceeds free VRAM in host RAM, and copy it over at the first
    sampling run): fewer copies, and host RAM never holds them. None: where ComfyUI builds it."""
    if dev.type != "cuda":
        return None
    mm = comfy.model_management
    low = (getattr(mm.VRAMState, "NO_VRAM", None), getattr(mm.VRAMState, "LOW_VRAM", None))
    if getattr(mm, "vram_state", None) in low:
        return None
    n = sum(src.header[k]["shape"][0] * src.header[k]["shape"][1] for k in fp8_keys)
    return dev if n + 2**30 < mm.get_free_memory(dev) else None


def pack_version() -> str:
    try:
        with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pyproject.toml"),
                  encoding="utf-8") as f:
            m = re.search(r'^version\s*=\s*"([^"]+)"', f.read(), re.M)
        return m.group(1) if m else "unknown"
    except OSError:
        return "unknown"


NAME_MAX = 255  # bytes in one file or folder name (Linux, macOS and Windows file systems)


def save_target(filename: str, all_in_one: bool) -> str:
    """Where ``filename`` goes: ``checkpoints/`` for an all-in-one file, else ``diffusion_models/``
    (ComfyUI's first folder of that kind); sub-folders allowed, nothing outside it. A name a loader would not list
    (hidden, empty parts, ``..``), control characters and over-long parts are refused before anything is written."""
    folder = "checkpoints" if all_in_one else "diffusion_models"
    raw = filename or ""
    if any(ord(c) < 32 or ord(c) == 127 for c in raw):
        raise ValueError(f"SD35FP8SaveCheckpoint: the file name {raw!r} holds control characters (a newline, tab or "
                         "NUL): use a plain name, with '/' between sub-folders")
    name = raw.strip().replace("\\", "/")
    if not name or name.endswith("/"):
        raise ValueError("give a file name for the FP8 checkpoint (e.g. sd35_fp8/sd3.5_large_fp8_calibrated)")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.abspath(folder_paths.get_folder_paths(folder)[0])
    path = os.path.abspath(os.path.join(root, name))
    if os.path.isabs(name) or os.path.commonpath([root, path]) != root:
        raise ValueError(f"{filename!r} points outside models/{folder}: give a name relative to that folder")
    for part in name.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise ValueError(f"SD35FP8SaveCheckpoint: {raw!r} has a part ({part!r}) that is empty, '.', '..' or starts "
                             "with a dot: loaders do not list such files. Use visible names")
        if len(part.encode()) > NAME_MAX:
            raise ValueError(f"SD35FP8SaveCheckpoint: {part[:40]!r}... is {len(part.encode())} bytes long; file "
                             f"systems allow {NAME_MAX} per name. Use a shorter name")
    return path


def _new_folders(path: str) -> list[str]:
    """The folders above ``path`` that do not exist yet, deepest first (made by the save; removed if it fails)."""
    out, d = [], os.path.dirname(path)
    while not os.path.isdir(d):
        out.append(d)
        d = os.path.dirname(d)
    return out


def save_fp8_checkpoint(model, filename: str, overwrite: bool = False, clip=None, vae=None) -> tuple[str, str]:
    """Write this calibrated FP8 MODEL (LoRA/patches merged, as stock ComfyUI saves) in the hybrid
    FP8 layout; with ``clip``/``vae`` an all-in-one checkpoint. Returns ``(path, report)``."""
    dm = require_fp8_model(model)
    s = st.get(model)
    amax = s.input_amax
    if amax is None:
        raise ValueError("this MODEL is not calibrated: put SD35FP8Calibrate before the save node (a file without "
                         "calibrated input scales would run with input scale 1.0 in stock ComfyUI)")
    all_in_one = clip is not None or vae is not None
    path = save_target(filename, all_in_one)
    if os.path.lexists(path) and not overwrite:  # lexists: a dangling link is a file too
        raise FileExistsError(f"{path} already exists: nothing was written. Choose another file name or set "
                              "overwrite=true to replace it")
    comfy.model_management.load_models_gpu([model], force_patch_weights=True)  # merge LoRAs, as stock saving does
    prefix = DIFFUSION_PREFIX if all_in_one else ""
    try:
        tensors = hybrid_state_dict(dm, prefix, amax)
    except PerChannelWeightsError as e:  # the library speaks of scales; the user chooses the loader's widget
        raise ValueError(f"SD35FP8SaveCheckpoint: {e}. Load the model with SD35FP8CheckpointLoader's "
                         "weight_scaling=fastest (per-tensor scales) to save it.") from None
    mc = model.model.model_config
    if clip is not None:
        tensors.update(mc.process_clip_state_dict_for_saving(clip.get_sd()))
    if vae is not None:
        tensors.update(mc.process_vae_state_dict_for_saving(vae.get_sd()))
    md = file_metadata(None if s.calibration is None else dict(s.calibration), s.policy, s.variant, pack_version())
    made = _new_folders(path)
    try:
        size = write_safetensors(path, tensors, md, overwrite=overwrite)
    except BaseException:
        for d in made:  # a failed save leaves no empty sub-folder behind
            try:
                os.rmdir(d)
            except OSError:
                break
        raise
    for folder in ("checkpoints", "diffusion_models"):
        getattr(folder_paths, "filename_list_cache", {}).pop(folder, None)
    cal = s.calibration or {}
    text = (f"saved {path} ({size / 2**20:.1f} MiB): {len(fp8_layers(dm))} FP8 layers with calibrated input scales"
            + (f" ({cal.get('method')}, {cal.get('prompts')} prompts x {cal.get('steps')} steps)" if cal else "")
            + ("; all-in-one with " + " and ".join(x for x, o in (("text encoders", clip), ("VAE", vae))
                                                     if o is not None)
               if all_in_one else "; diffusion model only"))
    log.info("sd35fp8: %s", text)
    return path, text
