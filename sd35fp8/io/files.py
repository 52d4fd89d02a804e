"""FP8 checkpoint files: a memory-mapped safetensors reader that gives pages back as tensors are
consumed, a streaming (atomic) safetensors writer, and the hybrid FP8 layout both old and new
ComfyUI read.

Hybrid layout, per quantized Linear ``L`` (``../shared/ENVIRONMENT.md``): ``L.weight`` float8_e4m3fn,
``L.weight_scale`` / ``L.input_scale`` fp32 scalars and ``L.comfy_quant`` (uint8 JSON) for ComfyUI
>= 0.4, plus the legacy ``scaled_fp8`` marker with ``L.scale_weight`` / ``L.scale_input`` for older
ComfyUI. Dequantized weight = ``weight.float() * weight_scale``; ``input_scale = amax|x| / 448``.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import struct
import tempfile
import time
from typing import Callable, Mapping

import torch

from ..core.formats import E4M3, E4M3_MAX, scale_from_amax
from ..core.quant import PerChannelWeightsError, dequantize_weight, quantize_weight
from ..model import fp8_layers
from .checkpoint import CheckpointError, read_safetensors_header

class NotCalibratedError(ValueError):
    """Saving needs calibrated input scales for every FP8 layer."""


ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
COMFY_QUANT = {"format": "float8_e4m3fn"}
MARKER = "scaled_fp8"
FORMAT_NAME = "sd35fp8-hybrid-v1"


class MappedSafetensors:
    """A safetensors file as zero-copy tensors over a private memory map.

    Reading a tensor faults its pages in (they count as this process's RSS); :meth:`release` hands
    them back once the tensor was consumed (quantized, copied), so loading a file tensor by tensor
    never holds the whole file in memory. Released tensors stay valid: touching them again re-reads
    the file. The header is validated first (truncated/damaged files fail before anything loads).
    """

    def __init__(self, path: str):
        self.path = path
        self.header, self.metadata = read_safetensors_header(path)
        with open(path, "rb") as f:
            (hlen,) = struct.unpack("<Q", f.read(8))
            self._base = 8 + hlen
            size = os.path.getsize(path)
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._ptr = torch.frombuffer(self._map, dtype=torch.uint8, count=1).data_ptr() if self._map else 0
        self._page = mmap.PAGESIZE

    def tensor(self, name: str) -> torch.Tensor:
        info = self.header[name]
        dtype = ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"{os.path.basename(self.path)}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = (int(x) for x in info["data_offsets"])
        shape = [int(s) for s in info["shape"]]
        n = 1
        for s in shape:
            n *= s
        if n * dtype.itemsize != end - start:
            raise CheckpointError(f"{os.path.basename(self.path)}: tensor {name} has {end - start} bytes for shape "
                                  f"{shape} {info['dtype']}: the file is damaged")
        if n == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._map, dtype=dtype, count=n, offset=self._base + start).view(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.tensor(k) for k in self.header}

    def release(self, t: torch.Tensor | None) -> None:
        """Drop ``t``'s pages from this process (no-op for tensors that are not views of this file)."""
        if t is None or self._map is None or t.device.type != "cpu" or t.numel() == 0:
            return
        off = t.data_ptr() - self._ptr
        n = t.numel() * t.element_size()
        if off < 0 or off + n > len(self._map):
            return
        lo = off // self._page * self._page
        hi = min(len(self._map), -(-(off + n) // self._page) * self._page)
        self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def check_finite(self, skip=frozenset(), chunk: int = 1 << 24) -> None:
        """Refuse the file if any tensor (but those in ``skip``, which the caller checks as it reads them) holds
        NaN/Inf: a :class:`CheckpointError` naming the file and the first such tensor. Reads each tensor once (its
        pages handed back after), at memory speed: the absolute maximum per chunk, NaN and Inf propagate into it."""
        for name in self.header:
            if name in skip:
                continue
            t = self.tensor(name)
            bad = nonfinite_count(t, chunk)
            self.release(t)
            if bad:
                raise CheckpointError(f"{os.path.basename(self.path)}: tensor {name} holds {bad} NaN/Inf value(s) of "
                                      f"{t.numel()}: the file is damaged; download it again or save it again from a "
                                      "good model")

    def release_all(self) -> None:
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, 0, len(self._map))


def file_fingerprint(path: str, samples: int = 64, block: int = 1 << 16) -> str:
    """A content fingerprint of a safetensors file in milliseconds: SHA-256 over its size, its whole header and
    ``samples`` blocks of ``block`` bytes spread evenly over the tensor data (first and last included). Any edit of
    shapes, names or metadata changes it, and so does a change of weights (re-saved or fine-tuned) anywhere the
    samples fall; an edit confined to bytes between samples does not (a full hash of 16 GB would take a minute)."""
    h = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(struct.pack("<Q", size) + head)
        (hlen,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
        h.update(f.read(min(hlen, max(size - 8, 0))))
        start, span = 8 + hlen, max(size - 8 - hlen, 0)
        n = min(samples, max(1, -(-span // block)))
        for i in range(n):
            off = start + (span - block) * i // max(n - 1, 1) if span > block else start
            f.seek(max(off, start))
            h.update(f.read(block))
    return h.hexdigest()


def nonfinite_count(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """How many NaN/Inf values ``t`` holds (FP8: its NaN encodings; integers: none)."""
    if t.numel() == 0:
        return 0
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # E4M3: S.1111.111 is NaN; E5M2: exponent all ones
        v = t.reshape(-1).view(torch.uint8)
        mask = 0x7F if t.dtype == torch.float8_e4m3fn else 0x7C
        return int(((v & mask) == mask).sum())
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if not torch.isfinite(flat[i:i + chunk].abs().amax()):  # fast; NaN and Inf propagate into the maximum
            return int((~torch.isfinite(flat)).sum())
    return 0


def _raw_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


# A save in progress writes ``.<name>.<pid>-<random>.sd35fp8-partial`` beside its target: a dot file with an
# extension no model loader lists (ComfyUI lists model folders by extension), renamed over the target when complete.
PARTIAL = ".sd35fp8-partial"
_LEGACY_PARTIAL = re.compile(r"^\.partial-[A-Za-z0-9_]{8}\.safetensors$")  # temp names of the writer until 2026-12-05
_PARTIAL = re.compile(r"^\..+\.(\d+)-[A-Za-z0-9_]+" + re.escape(PARTIAL) + "$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_partial_files(folder: str, legacy_age_s: float = 3600.0) -> list[str]:
    """Delete the temp files that interrupted saves (a kill, a power loss, an out-of-memory) left in ``folder``: ours
    whose writing process is gone, and the earlier writer's ``.partial-XXXXXXXX.safetensors`` (which loaders list)
    once older than ``legacy_age_s``. Returns the paths deleted. A save in progress is never touched."""
    gone = []
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    now = time.time()
    for n in names:
        p = os.path.join(folder, n)
        m = _PARTIAL.match(n)
        try:
            stale = (m is not None and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))) or (
                _LEGACY_PARTIAL.match(n) is not None and now - os.path.getmtime(p) > legacy_age_s)
            if stale and os.path.isfile(p) and not os.path.islink(p):
                os.unlink(p)
                gone.append(p)
        except OSError:
            continue
    return gone


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (the file's data was synced before the rename)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
                      overwrite: bool = False,
                      materialize: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> int:
    """Write ``tensors`` (any device; moved to the CPU one at a time) as a safetensors file.

    The file appears atomically and durably: it is written next to ``path`` under a name no model loader lists
    (:data:`PARTIAL`), synced, renamed over ``path``, and the folder synced; an interrupted save never leaves a
    truncated checkpoint where a loader would list it (and the next save into that folder deletes what it left:
    :func:`clean_partial_files`). An existing file is kept unless ``overwrite``. With ``materialize``, ``tensors``
    only give names, shapes and dtypes (e.g. meta tensors) and ``materialize(name, t)`` produces each tensor's data
    when it is written. Returns bytes written.
    """
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; enable overwrite to replace it")
    header: dict = {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in ST_NAMES:
            raise TypeError(f"cannot store tensor {name} of dtype {t.dtype} in safetensors")
        n = t.numel() * t.element_size()
        header[name] = {"dtype": ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    clean_partial_files(folder)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)[:64]}.{os.getpid()}-", suffix=PARTIAL, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, t in tensors.items():
                f.write(_raw_bytes(materialize(name, t) if materialize else t))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(folder)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return 8 + len(raw) + offset


def quant_tag() -> torch.Tensor:
    return torch.tensor(list(json.dumps(COMFY_QUANT).encode()), dtype=torch.uint8)


def hybrid_state_dict(model: torch.nn.Module, prefix: str = "", input_amax: Mapping[str, float] | None = None,
                      hp_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in the hybrid FP8 layout (tensors stay where they are; nothing is copied
    except dtype conversions). ``input_amax``: calibrated amax per FP8 layer (all layers required).
    Non-FP8 floating tensors are stored in ``hp_dtype`` (default: BF16 for fp32 models, else as-is);
    an FP8 positional-embedding table is stored dequantized (stock ComfyUI reads it) next to its
    ``pos_embed_scale``, from which :func:`quantize_pos_embed`-style code recovers the FP8 values exactly."""
    layers = fp8_layers(model)
    if not layers:
        raise ValueError("the model has no FP8 layers to save")
    if input_amax is None:
        raise NotCalibratedError("the model has no calibrated input scales (a file without them would run with an "
                                 "input scale of 1.0 in stock ComfyUI): calibrate it before saving")
    missing = sorted(set(layers) - set(input_amax))
    if missing:
        raise ValueError(f"no calibrated input scale for {len(missing)} FP8 layer(s), first: {missing[0]}")
    per_channel = [n for n, m in layers.items() if m.weight_scale.dim() != 0 and not m.fp8_int8]
    if per_channel:
        raise PerChannelWeightsError(f"{len(per_channel)} layer(s) use per-channel weight scales (first: "
                                     f"{per_channel[0]}); the ComfyUI FP8 file format has one scale per tensor: "
                                     "quantize the weights per tensor to save them")
    skip = {f"{n}.{s}" for n in layers for s in ("weight", "bias", "weight_scale", "input_scale")}
    out: dict[str, torch.Tensor] = {}
    sd = model.state_dict()
    pe_scale = sd.get("pos_embed_scale")
    for k, t in sd.items():
        if k in skip or t is None:
            continue
        if k == "pos_embed" and t.dtype == E4M3 and pe_scale is not None:
            t = t.float() * pe_scale.to(t.device)
        if k == "pos_embed_scale":
            t = t.float()
        elif t.is_floating_point() and t.dtype != E4M3:
            dt = hp_dtype or (torch.bfloat16 if t.dtype == torch.float32 else t.dtype)
            t = t.to(dt)
        out[prefix + k] = t
    for name, m in sorted(layers.items()):
        p = f"{prefix}{name}."
        w8, ws = m.weight.detach(), m.weight_scale.detach()
        if m.fp8_int8:  # the file format is E4M3 with one scale per tensor: INT8 rows are re-quantized to it
            w8, ws = quantize_weight(dequantize_weight(w8, ws, torch.float32), "per_tensor")
        ws = ws.float().reshape(()).cpu()
        xs = scale_from_amax(float(input_amax[name])).reshape(())
        out[p + "weight"] = w8
        if m.bias is not None:  # with the layer's bias correction folded in (centered massive activations), in fp32
            corrected = getattr(m, "bias_correction", None) is not None  # (a few KiB: no second rounding of it)
            out[p + "bias"] = m.fp8_bias().detach().to(torch.float32 if corrected else hp_dtype or (
                torch.bfloat16 if m.bias.dtype == torch.float32 else m.bias.dtype))
        out[p + "weight_scale"] = ws
        out[p + "input_scale"] = xs.clone()
        out[p + "comfy_quant"] = quant_tag()
        out[p + "scale_weight"] = ws.clone()
        out[p + "scale_input"] = xs.clone()
    out[prefix + MARKER] = torch.empty(0, dtype=E4M3)
    return out


def fp8_layer_tensors(state_dict: Mapping[str, torch.Tensor], prefix: str):
    """``(weight_scale, input_scale or None)`` of a stored FP8 Linear at ``prefix`` ("L.") in either the
    new (``weight_scale``/``input_scale``) or the legacy (``scale_weight``/``scale_input``) naming.
    A missing weight scale means raw FP8 (scale 1)."""
    ws = state_dict.get(prefix + "weight_scale", state_dict.get(prefix + "scale_weight"))
    xs = state_dict.get(prefix + "input_scale", state_dict.get(prefix + "scale_input"))
    ws = torch.ones((), dtype=torch.float32) if ws is None else ws.detach().float().clone()
    if ws.numel() != 1 and ws.dim() != 1:
        raise CheckpointError(f"{prefix}weight_scale has shape {list(ws.shape)}; expected a scalar or one per row")
    ws = ws.reshape(()) if ws.numel() == 1 else ws
    if xs is not None:
        xs = xs.detach().float().reshape(-1)
        if xs.numel() != 1 or not bool(torch.isfinite(xs).all()) or float(xs) <= 0:
            raise CheckpointError(f"{prefix}input_scale is not a positive finite scalar ({xs.tolist()[:4]})")
        xs = xs.reshape(()).clone()
    return ws, xs


def file_metadata(calibration: dict | None, policy: dict | None, variant: str, version: str) -> dict[str, str]:
    md = {"format": "pt", "sd35fp8.format": FORMAT_NAME, "sd35fp8.version": version, "sd35fp8.variant": variant,
          "sd35fp8.weight_format": "float8_e4m3fn, per-tensor fp32 weight_scale",
          "sd35fp8.input_scale": "calibrated amax/448 (static activation scale), fp32"}
    if calibration:
        md["sd35fp8.calibration"] = json.dumps(calibration, sort_keys=True)
    if policy:
        md["sd35fp8.policy"] = json.dumps({k: policy[k] for k in ("include", "exclude", "granularity", "multiple_of")
                                           if k in policy})
    return md


def file_origin(metadata: dict, pack_name: str) -> str:
    """Who wrote a file, from its metadata (:func:`file_metadata`'s keys)."""
    if metadata.get("sd35fp8.format"):
        return f"saved by {pack_name} {metadata.get('sd35fp8.version', '?')}"
    return "not made by this pack"


def file_calibration(metadata: dict) -> dict | None:
    """The calibration record :func:`file_metadata` wrote (None: none, or unreadable)."""
    raw = metadata.get("sd35fp8.calibration")
    if not raw:
        return None
    try:
        cal = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return cal if isinstance(cal, dict) else None


def file_input_amax(scales: Mapping[str, torch.Tensor | None], metadata: dict) -> tuple[dict | None, str]:
    """``(input amax per layer or None, note)`` from the input scales an FP8 file carried for its FP8 layers (None
    where a layer had none). None means the file is not calibrated (a layer without a scale, or every scale 1.0:
    stock ComfyUI's "not calibrated" value, with no calibration record); the note says which."""
    missing = sorted(n for n, x in scales.items() if x is None)
    calibration = file_calibration(metadata)
    if missing:
        return None, (f"the file has no calibrated input_scale for {len(missing)} of {len(scales)} FP8 layers "
                      f"(first: {missing[0]})")
    if calibration is None and all(float(x) == 1.0 for x in scales.values()):
        return None, "the file's input scales are all 1.0 (ComfyUI's value for 'not calibrated')"
    amax = {n: float(x) * E4M3_MAX for n, x in scales.items()}
    if calibration:
        how = ", ".join(f"{k} {calibration[k]}" for k in ("method", "prompts", "steps", "date") if k in calibration)
        return amax, f"calibrated input scales from the file ({how}): no re-calibration needed"
    return amax, "input scales from the file (calibration not recorded): used as static activation scales"
