import json
import os
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

import tiny_sd35
from sd35fp8 import CheckpointError, detect_sd3, inspect_checkpoint


def shapes(sd):
    return {k: list(v.shape) for k, v in sd.items()}


def fake_header_file(path, keys_shapes, metadata=None):
    """A *valid* safetensors header + zero data for real-size shapes, written sparsely (no RAM)."""
    header, off = {}, 0
    for k, shp in keys_shapes.items():
        n = 2
        for d in shp:
            n *= d
        header[k] = {"dtype": "BF16", "shape": shp, "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + off)
    return path


def real_layout(depth, hidden, mmdit_x_blocks=0):
    # the real SD3.5 key layout at full size: shapes only (the tiny builder at the real hidden size)
    keys = {}
    D = hidden
    keys["model.diffusion_model.x_embedder.proj.weight"] = [D, 16, 2, 2]
    keys["model.diffusion_model.pos_embed"] = [1, 192 * 192, D]
    for i in range(depth):
        for s in ("context_block", "x_block"):
            keys[f"model.diffusion_model.joint_blocks.{i}.{s}.attn.qkv.weight"] = [3 * D, D]
            keys[f"model.diffusion_model.joint_blocks.{i}.{s}.attn.ln_q.weight"] = [64]
        if i < mmdit_x_blocks:
            keys[f"model.diffusion_model.joint_blocks.{i}.x_block.attn2.qkv.weight"] = [3 * D, D]
    keys["first_stage_model.decoder.conv_in.weight"] = [512, 16, 3, 3]
    return keys


def test_tiny_large_and_medium_are_recognised(tmp_path):
    p = tiny_sd35.write_checkpoint(str(tmp_path / "a.safetensors"), variant="large")
    info = inspect_checkpoint(p)
    assert (info.depth, info.hidden, info.mmdit_x, info.qk_norm, info.has_vae) == (2, 128, False, True, True)
    assert not info.standard and "Large-type" in info.variant
    p = tiny_sd35.write_checkpoint(str(tmp_path / "b.safetensors"), variant="medium", depth=4)
    info = inspect_checkpoint(p)
    assert info.mmdit_x and info.depth == 4 and "Medium-type" in info.variant
    p = tiny_sd35.write_checkpoint(str(tmp_path / "c.safetensors"), diffusion_only=True)
    assert inspect_checkpoint(p).prefix == "" and inspect_checkpoint(p).fp8_tensors == 0
    sd = {k: (v.to(torch.float8_e4m3fn) if k.endswith("qkv.weight") else v)
          for k, v in tiny_sd35.mmdit_state_dict().items()}
    save_file(sd, str(tmp_path / "q.safetensors"))
    assert inspect_checkpoint(str(tmp_path / "q.safetensors")).fp8_tensors == 4  # 2 blocks x 2 streams


def test_published_sizes_are_named(tmp_path):
    large = fake_header_file(str(tmp_path / "sd3.5_large.safetensors"), real_layout(38, 2432))
    assert inspect_checkpoint(large).variant == "SD3.5 Large"
    turbo = fake_header_file(str(tmp_path / "sd3.5_large_turbo.safetensors"), real_layout(38, 2432))
    assert inspect_checkpoint(turbo).variant == "SD3.5 Large Turbo"
    renamed = fake_header_file(str(tmp_path / "model.safetensors"), real_layout(38, 2432),
                               {"modelspec.title": "Stable Diffusion 3.5 Large Turbo"})
    assert inspect_checkpoint(renamed).variant == "SD3.5 Large Turbo"
    med = fake_header_file(str(tmp_path / "m.safetensors"), real_layout(24, 1536, mmdit_x_blocks=13))
    info = inspect_checkpoint(med)
    assert info.variant == "SD3.5 Medium" and info.standard and info.has_vae


def test_other_families_are_rejected_by_name():
    sdxl = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": [640, 640],
            "conditioner.embedders.1.model.ln_final.weight": [1280]}
    with pytest.raises(CheckpointError, match="SDXL"):
        detect_sd3(sdxl, filename="sdxl.safetensors")
    flux = {"double_blocks.0.img_attn.qkv.weight": [9216, 3072], "img_in.weight": [3072, 64]}
    with pytest.raises(CheckpointError, match="Flux"):
        detect_sd3(flux)
    vae = {"decoder.conv_in.weight": [512, 16, 3, 3], "encoder.conv_in.weight": [128, 3, 3, 3]}
    with pytest.raises(CheckpointError, match="VAE or text-encoder"):
        detect_sd3(vae)
    wrong_ch = {"x_embedder.proj.weight": [128, 4, 2, 2], "joint_blocks.0.x_block.attn.qkv.weight": [384, 128]}
    with pytest.raises(CheckpointError, match="16"):
        detect_sd3(wrong_ch)


def test_truncated_and_damaged_files(tmp_path):
    p = tiny_sd35.write_checkpoint(str(tmp_path / "t.safetensors"))
    size = os.path.getsize(p)
    with open(p, "r+b") as f:
        f.truncate(size - 100_000)
    with pytest.raises(CheckpointError, match="truncated"):
        inspect_checkpoint(p)
    g = tmp_path / "garbage.safetensors"
    g.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + b"\0" * 64)
    with pytest.raises(CheckpointError, match="damaged"):
        inspect_checkpoint(str(g))
    short = tmp_path / "short.safetensors"
    short.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="too short"):
        inspect_checkpoint(str(short))
    huge = tmp_path / "hdr.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        inspect_checkpoint(str(huge))
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"0" * 100)
    with pytest.raises(CheckpointError, match="only .safetensors"):
        inspect_checkpoint(str(ckpt))
    with pytest.raises(CheckpointError, match="no such file"):
        inspect_checkpoint(str(tmp_path / "missing.safetensors"))


@pytest.mark.parametrize("header,message", [
    ([1, 2], "header is a JSON list, not an object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "tensor 'w' has a malformed header entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "tensor 'w' has a malformed header entry"),
    ({"w": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, "tensor 'w' has a malformed header entry"),
    ({"w": "F32"}, "tensor 'w' has a malformed header entry"),
    ({"__metadata__": {"a": 1}}, "__metadata__ is not a table of strings"),
])
def test_malformed_headers_are_checkpoint_errors_naming_the_file_and_tensor(tmp_path, header, message):
    """A header of the wrong JSON shape (a list, an entry without data_offsets, ...) was a raw TypeError/KeyError."""
    import json
    raw = json.dumps(header).encode()
    p = tmp_path / "odd.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match=f"odd.safetensors: .*{re.escape(message)}"):
        inspect_checkpoint(str(p))


def test_missing_blocks_detected(tmp_path):
    sd = tiny_sd35.mmdit_state_dict(depth=3)
    sd = {k: v for k, v in sd.items() if ".joint_blocks.1." not in k}
    p = str(tmp_path / "holes.safetensors")
    save_file(sd, p)
    with pytest.raises(CheckpointError, match="incomplete"):
        inspect_checkpoint(p)


def test_file_metadata_is_read_back_by_the_same_module_that_writes_it():
    """sd35fp8.io.files writes the pack's metadata and reads it back: the calibration record, who made the file, and
    the input scales as calibrated amax (or why the file counts as uncalibrated)."""
    import torch

    from sd35fp8.io.files import file_calibration, file_input_amax, file_metadata, file_origin
    cal = {"method": "max", "prompts": 8, "steps": 28, "date": "2026-12-05"}
    md = file_metadata(cal, {"include": ["a"], "exclude": [], "granularity": "per_tensor", "multiple_of": 16,
                             "layers": ["not written"]}, "SD3.5 Large", "0.2.0")
    assert file_calibration(md) == cal and "layers" not in md["sd35fp8.policy"]
    assert file_origin(md, "Pack") == "saved by Pack 0.2.0" and file_origin({}, "Pack") == "not made by this pack"
    assert file_calibration({"sd35fp8.calibration": "{broken"}) is None
    s = {"a": torch.tensor(0.5), "b": torch.tensor(0.25)}
    amax, note = file_input_amax(s, md)
    assert amax == {"a": 224.0, "b": 112.0} and "method max, prompts 8, steps 28, date 2026-12-05" in note
    amax, note = file_input_amax({"a": torch.tensor(0.5), "b": None}, md)
    assert amax is None and "no calibrated input_scale for 1 of 2 FP8 layers (first: b)" in note
    amax, note = file_input_amax({"a": torch.tensor(1.0)}, {})  # stock ComfyUI's "not calibrated"
    assert amax is None and "all 1.0" in note
    amax, note = file_input_amax({"a": torch.tensor(0.5)}, {})
    assert amax == {"a": 224.0} and "calibration not recorded" in note


LOADER_EXTENSIONS = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}  # ComfyUI lists these


def test_a_save_killed_mid_write_leaves_nothing_a_loader_lists_and_the_next_save_cleans_up(tmp_path):
    """A process killed while writing (kill, power loss, OOM) leaves its temp file under a name no loader lists, the
    old file intact; the next save into that folder deletes the dead writer's temp file (and an old-style
    ``.partial-*.safetensors`` once it is an hour old), never a save in progress."""
    import os
    import subprocess
    import sys
    import time

    import torch

    from sd35fp8.io.files import PARTIAL, clean_partial_files, write_safetensors
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    target = tmp_path / "model.safetensors"
    write_safetensors(str(target), {"w": torch.ones(4)})
    before = target.read_bytes()
    code = f"""
import os, sys, torch
sys.path.insert(0, {repo!r})
from sd35fp8.io.files import write_safetensors
def half(name, t):
    if name == "b":
        os._exit(9)  # killed after the first tensor was written
    return torch.ones(t.shape)
write_safetensors({str(target)!r}, {{"a": torch.empty(1 << 20, device="meta"), "b": torch.empty(8, device="meta")}},
                  overwrite=True, materialize=half)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 9, r.stderr[-2000:]
    left = sorted(os.listdir(tmp_path), key=lambda n: n.endswith(PARTIAL))
    assert left[0] == "model.safetensors" and len(left) == 2 and left[1].endswith(PARTIAL), left
    assert os.path.getsize(tmp_path / left[1]) >= 4 << 20  # a real half-written file...
    assert not [n for n in left[1:] if os.path.splitext(n)[1] in LOADER_EXTENSIONS]  # ...that no loader lists
    assert target.read_bytes() == before  # the old file is intact
    legacy = tmp_path / ".partial-abcd1234.safetensors"
    legacy.write_bytes(b"x")
    fresh = tmp_path / ".partial-efgh5678.safetensors"
    fresh.write_bytes(b"x")
    os.utime(legacy, (time.time() - 7200, time.time() - 7200))
    mine = tmp_path / f".other.safetensors.{os.getpid()}-abc{PARTIAL}"  # this process's: a save in progress
    mine.write_bytes(b"x")
    write_safetensors(str(tmp_path / "other.safetensors"), {"w": torch.zeros(2)})
    assert sorted(os.listdir(tmp_path)) == sorted([".partial-efgh5678.safetensors", mine.name, "model.safetensors",
                                                   "other.safetensors"])
    assert clean_partial_files(str(tmp_path)) == []
