"""FP8 checkpoint files and LoRA on FP8 layers, in-process against a real ComfyUI (``COMFYUI_DIR``,
default the CI one) on the CPU: our save -> stock loaders, our save -> our loader, stock scaled-FP8
files, damaged files, and LoRA merged by ComfyUI's own patcher."""
import hashlib
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_sd35
from comfy_harness import REPO, comfy_dir

from tests.support.adapter import call, cond, denoiser_inputs, import_adapter  # noqa: E402

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    adapter = import_adapter(comfy_dir(), cpu=True)
    import comfy.model_management as mm
    import comfy.sd
    import folder_paths
    d = tmp_path_factory.mktemp("fp8files")
    for f in ("checkpoints", "diffusion_models"):
        os.makedirs(d / f, exist_ok=True)
        folder_paths.add_model_folder_path(f, str(d / f), is_default=True)
    src = str(d / "checkpoints" / "tiny_bf16.safetensors")
    tiny_sd35.write_checkpoint(src, variant="large", seed=0)
    model, _, vae, _ = adapter.checkpoints.load_sd35_fp8(src)
    cal, _ = adapter.calibration.calibrate(model, [cond(1)], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64, 0)
    unet_path, _ = adapter.checkpoints.save_fp8_checkpoint(cal, "sub/tiny_fp8")
    aio_path, _ = adapter.checkpoints.save_fp8_checkpoint(cal, "tiny_fp8_aio", vae=vae)
    return type("Env", (), dict(adapter=adapter, mm=mm, sd=comfy.sd, dir=d, src=src, model=model, cal=cal, vae=vae,
                                unet=unet_path, aio=aio_path, fp8=sys.modules["sd35fp8"]))


def denoise(env, p, static=True):
    """One denoiser call the way the sampling wrapper runs it (FP8 state installed, fp8_autocast)."""
    x, sig, ctx, y = denoiser_inputs(2, 64, "cpu")
    env.mm.load_models_gpu([p])
    with torch.no_grad():
        if env.adapter.state.get(p) is None:
            return call(p, x, sig, ctx, y)
        enabled, recipe = env.adapter.sampling.prepare_run(p)
        with env.fp8.fp8_autocast(enabled=enabled, recipe=recipe):
            return call(p, x, sig, ctx, y)


def stock_dequantized(layer) -> torch.Tensor:
    """A stock-loaded layer's weight as ComfyUI computes with it (legacy scale_weight or QuantizedTensor)."""
    w = layer.weight
    if hasattr(layer, "scale_weight") and layer.scale_weight is not None:
        return w.float() * layer.scale_weight.float()
    return (w.dequantize() if hasattr(w, "dequantize") else w).float()


def stock_input_scale(layer) -> float:
    s = getattr(layer, "input_scale", None)
    if s is None:
        s = getattr(layer, "scale_input", None)
    return float(s)


def check_stock_model(env, stock):
    ours = env.cal.model.diffusion_model
    dm = stock.model.diffusion_model
    amax = env.adapter.state.get(env.cal).input_amax
    layers = env.fp8.fp8_layers(ours)
    assert len(layers) == 17
    for name, l in layers.items():
        s = dm.get_submodule(name)
        assert torch.equal(stock_dequantized(s), l.fp8_dequantized_weight(torch.float32)), name
        assert stock_input_scale(s) == pytest.approx(amax[name] / 448.0, rel=1e-6), name
    # high-precision layers: exact in ComfyUI >= 0.4; ComfyUI 0.3.x's scaled-FP8 loader casts every Linear to FP8
    for name in ("context_embedder", "final_layer.linear", "t_embedder.mlp.0"):
        a, b = stock_dequantized(dm.get_submodule(name)).detach(), ours.get_submodule(name).weight.detach().float()
        assert float((a - b).norm() / b.norm()) < 0.07, name
    out_stock, out_ours = denoise(env, stock), denoise(env, env.cal)
    assert torch.isfinite(out_stock).all()
    assert float((out_stock - out_ours).norm() / out_ours.norm()) < 0.02


def test_saved_file_loads_in_stock_unet_loader_with_our_weights_and_scales(env):
    hdr = load_file(env.unet)
    assert hdr["scaled_fp8"].dtype == torch.float8_e4m3fn
    k = "joint_blocks.0.x_block.mlp.fc1."
    assert hdr[k + "weight"].dtype == torch.float8_e4m3fn
    assert hdr[k + "weight_scale"].dtype == torch.float32 and hdr[k + "weight_scale"].dim() == 0
    assert torch.equal(hdr[k + "weight_scale"], hdr[k + "scale_weight"])
    assert torch.equal(hdr[k + "input_scale"], hdr[k + "scale_input"])
    assert json.loads(bytes(hdr[k + "comfy_quant"].tolist())) == {"format": "float8_e4m3fn"}
    check_stock_model(env, env.sd.load_diffusion_model(env.unet))


def test_all_in_one_file_loads_in_stock_checkpoint_loader(env):
    out = env.sd.load_checkpoint_guess_config(env.aio, output_vae=True, output_clip=False)
    check_stock_model(env, out[0])
    vae_ours, vae_stock = env.vae.get_sd(), out[2].get_sd()
    assert vae_ours.keys() == vae_stock.keys()
    assert all(torch.equal(vae_ours[k].float(), vae_stock[k].float()) for k in vae_ours)


def test_all_in_one_file_with_text_encoders_and_vae(env):
    """CLIP given too: the text encoders go in under ComfyUI's SD3 prefixes and come back out of stock
    CheckpointLoaderSimple and of our loader with the same weights."""
    from run_batch import TINY_CLIP
    clip_file = tiny_sd35.write_clip_l(os.path.join(REPO, ".cache", "test-models", TINY_CLIP))
    clip = env.sd.load_clip([clip_file], clip_type=env.sd.CLIPType.SD3)
    path, text = env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "tiny_fp8_aio_clip", clip=clip, vae=env.vae)
    assert path.startswith(str(env.dir / "checkpoints")) and "all-in-one with text encoders and VAE" in text
    keys = env.fp8.read_safetensors_header(path)[0]
    assert any(k.startswith("text_encoders.clip_l.") for k in keys) and any(k.startswith("first_stage_model.")
                                                                             for k in keys)
    want = {k: v.float() for k, v in clip.get_sd().items()}
    out = env.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
    check_stock_model(env, out[0])
    for got in (out[1].get_sd(), env.adapter.checkpoints.load_sd35_fp8(path)[1].get_sd()):
        common_keys = set(want) & set(got)
        assert len(common_keys) > 100
        assert all(torch.equal(want[k], got[k].float()) for k in common_keys)


def test_round_trip_through_our_loader_gives_identical_outputs(env):
    for path in (env.unet, env.aio):
        m, _, vae, text = env.adapter.checkpoints.load_sd35_fp8(path)
        assert (vae is not None) == (path == env.aio)
        assert "calibrated input scales from the file (method max, prompts 1, steps 2" in text
        assert "no re-calibration needed" in text
        cfg = env.adapter.state.get(m)
        ref = env.adapter.state.get(env.cal).input_amax
        assert cfg.input_amax.keys() == ref.keys()
        assert all(cfg.input_amax[n] == pytest.approx(ref[n], rel=1e-6) for n in ref)
        dm, odm = m.model.diffusion_model, env.cal.model.diffusion_model
        assert torch.equal(dm.pos_embed, odm.pos_embed) and torch.equal(dm.pos_embed_scale, odm.pos_embed_scale)
        assert torch.equal(denoise(env, m), denoise(env, env.cal))
    _, meta = env.fp8.read_safetensors_header(env.unet)
    cal = json.loads(meta["sd35fp8.calibration"])
    assert cal["method"] == "max" and cal["prompts"] == 1 and cal["steps"] == 2 and cal["date"]
    assert meta["sd35fp8.version"] and meta["sd35fp8.format"] == "sd35fp8-hybrid-v1"


def test_save_refuses_overwrite_uncalibrated_models_and_paths_outside(env):
    digest = hashlib.sha256(open(env.unet, "rb").read()).hexdigest()
    with pytest.raises(FileExistsError, match="already exists: nothing was written"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "sub/tiny_fp8")
    assert hashlib.sha256(open(env.unet, "rb").read()).hexdigest() == digest
    with pytest.raises(ValueError, match="not calibrated"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.model, "uncalibrated")
    with pytest.raises(ValueError, match="outside models/diffusion_models"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "../escape")
    assert not os.path.exists(env.dir / "escape.safetensors")
    env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "sub/tiny_fp8", overwrite=True)
    assert hashlib.sha256(open(env.unet, "rb").read()).hexdigest() == digest  # deterministic
    assert not [f for f in os.listdir(os.path.dirname(env.unet)) if f.startswith(".partial-") or "partial" in f]


def legacy_file(env, path, scale_input=None):
    """A stock-style scaled-FP8 file (legacy keys only, e.g. the public *_fp8_scaled releases)."""
    sd = {k: v for k, v in load_file(env.src).items() if k.startswith("model.diffusion_model.")}
    for k in [k for k in sd if ".joint_blocks." in k and k.endswith(".weight") and sd[k].dim() == 2]:
        w8, s = env.fp8.quantize_weight(sd[k])
        sd[k] = w8
        sd[k[:-len("weight")] + "scale_weight"] = s
        if scale_input is not None:
            sd[k[:-len("weight")] + "scale_input"] = torch.tensor(scale_input)
    sd["model.diffusion_model.scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, path)
    return sd


def test_the_models_state_is_one_immutable_record_with_its_defaults_in_one_place(env):
    """A MODEL carries one FP8State; nodes put a new record on a clone (the input MODEL keeps its own), ComfyUI's deep
    copy of model_options keeps the very record, and nothing in it can be changed in place."""
    import copy
    import dataclasses
    state = env.adapter.state
    s = state.get(env.cal)
    assert isinstance(s, state.FP8State) and s.calibrated and s.enabled and s.runtime == state.Runtime()
    assert copy.deepcopy(env.cal.model_options)[state.KEY] is s  # ComfyUI's clone keeps the record
    assert env.cal.clone().model_options[state.KEY] is s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.enabled = False
    with pytest.raises(TypeError):
        s.input_amax["x"] = 1.0
    with pytest.raises(TypeError):
        s.calibration["steps"] = 99
    off = env.adapter.sampling.set_autocast(env.cal, False, None, state.Runtime(compile=False, cudagraphs=True))
    assert state.get(off).enabled is False and state.get(off).runtime.cudagraphs
    assert state.get(env.cal) is s and s.enabled  # the input MODEL is untouched
    assert state.get(off).input_amax is s.input_amax  # the scales table is shared (installed once per run)
    with pytest.raises(ValueError, match="attention must be one of"):
        state.Runtime(attention="flash3")
    with pytest.raises(ValueError, match="backend must be 'torch' or 'transformer_engine'"):
        state.Runtime(backend="auto")  # resolved by the node before it reaches the record
    stock = env.sd.load_diffusion_model(env.unet)  # a stock loader's MODEL has no record: the nodes refuse it
    assert state.get(stock) is None
    with pytest.raises(ValueError, match="load it with SD35FP8CheckpointLoader"):
        env.adapter.sampling.require_fp8_model(stock)


@pytest.mark.parametrize("name,message", [
    ("bad\nname", "holds control characters"), ("nul\0name", "holds control characters"),
    ("..", "starts with a dot"), ("sub/.hidden", "starts with a dot"), ("a//b", "is empty"),
    ("x" * 300, "is 312 bytes long"), ("newsub/" + "y" * 260, "is 272 bytes long"),
])
def test_save_names_a_loader_would_not_list_are_refused_before_anything_is_written(env, name, message):
    before = sorted(os.listdir(env.dir / "diffusion_models"))
    with pytest.raises(ValueError, match=message):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, name)
    assert sorted(os.listdir(env.dir / "diffusion_models")) == before


def test_save_keeps_a_dangling_link_and_leaves_no_empty_folder_when_it_fails(env, monkeypatch):
    link = env.dir / "diffusion_models" / "dangling.safetensors"
    os.symlink(env.dir / "nowhere.safetensors", link)
    with pytest.raises(FileExistsError, match="already exists: nothing was written"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "dangling")
    assert os.path.islink(link) and not os.path.exists(env.dir / "nowhere.safetensors")

    def disk_full(path, *a, **k):  # as the writer does: make the folders, then run out of space
        os.makedirs(os.path.dirname(path), exist_ok=True)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(env.adapter.checkpoints, "write_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "new/deeper/model")
    assert not os.path.exists(env.dir / "diffusion_models" / "new")
    with pytest.raises(OSError, match="No space left"):
        env.adapter.checkpoints.save_fp8_checkpoint(env.cal, "sub/model_in_existing_folder")
    assert os.path.isdir(env.dir / "diffusion_models" / "sub")  # a folder that was there stays


def test_calibration_takes_the_largest_seed_the_widget_allows_with_several_prompts(env):
    """seed = 2^64 - 1 with two prompts: the second prompt's seed wraps around (it overflowed: "Overflow when unpacking
    long long")."""
    top = 0xFFFFFFFFFFFFFFFF
    cal, text = env.adapter.calibration.calibrate(env.model, [cond(1), cond(3)], cond(2), 1, 4.0, "euler",
                                                  "sgm_uniform", 64, 64, top)
    assert env.adapter.state.get(cal).calibration["seed"] == top and "over 2 prompt(s)" in text


def test_calibration_encodes_each_prompt_as_it_goes_with_progress_from_the_start(env):
    """300 prompts were all encoded before the first sample (116 s with no progress, +440 MiB). Each is encoded just
    before it is sampled, the progress counts from the first moment, and thousands of prompts are refused."""
    events = []

    def encode(text):
        events.append(("encode", text))
        return cond(int(text))

    def progress(done, total):
        events.append(("progress", done, total))

    env.adapter.calibration.calibrate(env.model, ["1", "3", "5"], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64,
                                      0, progress=progress, encode=encode)
    assert events[0] == ("progress", 0, 9) and events[1] == ("encode", "1")
    enc = [i for i, e in enumerate(events) if e[0] == "encode"]
    assert [events[i][1] for i in enc] == ["1", "3", "5"]
    # prompt 1 is sampled (its 2 steps reported) before prompt 3 is encoded, and so on
    assert [e[1] for e in events[enc[0] + 1:enc[1]]] == [1, 2, 3] and [e[1] for e in events[enc[2] + 1:]] == [7, 8, 9]
    with pytest.raises(ValueError, match="1001 calibration prompts .* at most 1000"):
        env.adapter.calibration.calibrate(env.model, ["1"] * 1001, cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64,
                                          0, encode=encode)


def test_calibrations_are_reused_by_weights_conditioning_and_settings_never_when_stale(env, tmp_path):
    """Alternating two checkpoints re-calibrated at every switch. Calibrations are kept by the weights' content, the
    conditioning and the settings, in memory and on disk (a restart reuses them); other weights, settings, prompts,
    a LoRA or a damaged cache entry calibrate afresh; the report says which happened."""
    cal = env.adapter.calibration
    folder = str(tmp_path / "calibrations")
    cache = cal.CalibrationCache(folder)

    def run(model, cid="clip-a", steps=2, c=None):
        return cal.calibrate_cached(model, [cond(1)], cond(2), steps, 4.0, "euler", "sgm_uniform", 64, 64, 0,
                                    conditioning_id=cid, cache=c or cache)

    first, text = run(env.model)
    assert "calibration kept for reuse (" + folder in text and len(os.listdir(folder)) == 1
    again, text = run(env.model)
    assert "calibration reused from memory" in text and "no sampling" in text
    amax = env.adapter.state.get(first).input_amax
    assert dict(env.adapter.state.get(again).input_amax) == dict(amax)
    restarted, text = run(env.model, c=cal.CalibrationCache(folder))  # a new server process
    assert "calibration reused from " + folder in text and dict(env.adapter.state.get(restarted).input_amax) == amax
    assert torch.equal(denoise(env, restarted), denoise(env, first))
    for other in (dict(steps=3), dict(cid="clip-b")):
        assert "kept for reuse" in run(env.model, **other)[1]
    # other weights under the same name: the fingerprint of the content differs
    sd = load_file(env.src)
    k = "model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    sd[k] = sd[k] * 1.5
    path = str(env.dir / "checkpoints" / "retrained.safetensors")
    save_file(sd, path)
    retrained = env.adapter.checkpoints.load_sd35_fp8(path)[0]
    assert "kept for reuse" in run(retrained)[1]
    assert env.adapter.state.get(retrained).source["fingerprint"] != env.adapter.state.get(env.model).source[
        "fingerprint"]
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    shifted = ModelSamplingSD3().patch(env.model, 6.0)[0]  # another noise schedule: other activations
    assert "kept for reuse" in run(shifted)[1] and "reused" in run(shifted)[1]
    lk = "diffusion_model.joint_blocks.0.x_block.attn.qkv"
    lora = {f"{lk}.lora_up.weight": torch.randn(384, 4) * 0.1, f"{lk}.lora_down.weight": torch.randn(4, 128) * 0.1}
    patched = env.sd.load_lora_for_models(env.model, None, lora, 1.0, 0)[0]
    assert "not kept for reuse: the MODEL carries patches" in run(patched)[1]
    for f in os.listdir(folder):  # a damaged entry is not used
        open(os.path.join(folder, f), "w").write("{not json")
    assert "kept for reuse" in run(env.model, c=cal.CalibrationCache(folder))[1]


def test_library_errors_about_per_channel_scales_become_node_messages(env):
    """A per-channel model: the library refuses to save it or run it under TransformerEngine in terms of scales;
    the adapter says which node and which option to change, and nothing is written or routed."""
    model, _, _, _ = env.adapter.checkpoints.load_sd35_fp8(env.src, "per_channel")
    cal, _ = env.adapter.calibration.calibrate(model, [cond(1)], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64, 0)
    with pytest.raises(ValueError, match=r"SD35FP8SaveCheckpoint: \d+ layer\(s\) use per-channel weight scales .*"
                                         r"weight_scaling=fastest \(per-tensor scales\)") as e:
        env.adapter.checkpoints.save_fp8_checkpoint(cal, "per_channel_model")
    assert not isinstance(e.value, env.fp8.core.quant.PerChannelWeightsError)  # the node's message, not the library's
    assert not os.path.exists(env.dir / "diffusion_models" / "per_channel_model.safetensors")
    te = env.adapter.sampling.set_autocast(cal, True, None, env.adapter.state.Runtime(backend="transformer_engine"))
    with pytest.raises(ValueError, match=r"SD35FP8Autocast backend=transformer_engine: .*per-channel weight scales.*"
                                         r"weight_scaling=fastest \(per-tensor scales\), or choose backend=torch"):
        env.adapter.sampling.prepare_run(te)
    assert not any(m.fp8_backend for m in env.fp8.fp8_layers(cal.model.diffusion_model).values())


@pytest.mark.parametrize("scale_input,message", [(None, "no calibrated input_scale for 17 of 17"),
                                                 (1.0, "input scales are all 1.0")])
def test_stock_scaled_fp8_file_loads_and_says_it_is_not_calibrated(env, scale_input, message):
    path = str(env.dir / "checkpoints" / f"stock_scaled_{scale_input}.safetensors")
    sd = legacy_file(env, path, scale_input)
    m, _, _, text = env.adapter.checkpoints.load_sd35_fp8(path)
    assert "not made by this pack" in text and message in text and "SD35FP8Calibrate" in text
    assert env.adapter.state.get(m).input_amax is None
    for name, l in env.fp8.fp8_layers(m.model.diffusion_model).items():
        k = f"model.diffusion_model.{name}."
        assert torch.equal(l.weight, sd[k + "weight"]) and torch.equal(l.weight_scale, sd[k + "scale_weight"])
    cal, _ = env.adapter.calibration.calibrate(m, [cond(1)], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64, 0)
    assert torch.isfinite(denoise(env, cal)).all()


def damaged(env, name, edit):
    sd = load_file(env.unet)
    edit(sd)
    path = str(env.dir / "diffusion_models" / name)
    save_file(sd, path)
    return path


def _poison(t: torch.Tensor) -> torch.Tensor:
    """``t`` with one NaN (FP8: the E4M3 NaN byte 0x7F)."""
    t = t.clone()
    if t.dtype == torch.float8_e4m3fn:
        t.view(torch.uint8).reshape(-1)[min(3, t.numel() - 1)] = 0x7F
    else:
        t.reshape(-1)[min(3, t.numel() - 1)] = float("nan")
    return t


@pytest.mark.parametrize("source,tensor", [
    ("bf16", "joint_blocks.0.x_block.attn.qkv.bias"),
    ("bf16", "joint_blocks.0.x_block.attn.ln_q.weight"),
    ("bf16", "context_embedder.weight"),
    ("bf16", "pos_embed"),
    ("bf16", "joint_blocks.0.context_block.mlp.fc2.weight"),  # quantized while loading: checked as it is read
    ("fp8", "joint_blocks.0.x_block.mlp.fc1.weight"),  # a stored E4M3 weight byte
    ("fp8", "joint_blocks.0.x_block.mlp.fc1.weight_scale"),
])
def test_nan_anywhere_in_a_file_is_refused_at_load_naming_file_and_tensor(env, source, tensor):
    """NaN/Inf in a bias, a norm, an embedder, pos_embed, a weight or a scale was reported much later as "calibration
    sampling produced NaN ... raise the autocast margin". The loader names the file and the tensor instead."""
    if source == "bf16":
        sd = load_file(env.src)
        key = "model.diffusion_model." + tensor
    else:
        sd = load_file(env.unet)
        key = tensor
    sd[key] = _poison(sd[key])
    path = str(env.dir / "checkpoints" / f"nan_{source}_{tensor.replace('.', '_')}.safetensors")
    save_file(sd, path)
    name = os.path.basename(path)
    with pytest.raises(env.fp8.CheckpointError, match=rf"{re.escape(name)}: tensor {re.escape(key)}\b.*NaN/Inf"):
        env.adapter.checkpoints.load_sd35_fp8(path)


def test_loaded_model_reports_its_fp8_size_even_if_comfyui_sized_it_while_loading(env, monkeypatch):
    """ComfyUI caches ModelPatcher.model_size() (its memory planning reads it). A version or code path that
    sizes the patcher as it builds it would cache the BF16 pos_embed table; the loader makes the size follow
    the FP8 table it installs afterwards."""
    import comfy.model_patcher as mp
    init = mp.ModelPatcher.__init__

    def eager_init(self, *a, **k):
        init(self, *a, **k)
        self.model_size()
    monkeypatch.setattr(mp.ModelPatcher, "__init__", eager_init)
    model, _, _, _ = env.adapter.checkpoints.load_sd35_fp8(env.src)
    dm = model.model.diffusion_model
    assert dm.pos_embed.dtype == torch.float8_e4m3fn
    assert model.model_size() == env.mm.module_size(model.model)  # the FP8 table, at 1 byte a value


def test_truncated_foreign_and_mismatched_fp8_files_fail_clearly(env):
    CheckpointError = env.fp8.CheckpointError
    trunc = str(env.dir / "diffusion_models" / "trunc_fp8.safetensors")
    data = open(env.unet, "rb").read()
    open(trunc, "wb").write(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        env.adapter.checkpoints.load_sd35_fp8(trunc)
    foreign = str(env.dir / "diffusion_models" / "flux_fp8.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(48, 16).to(torch.float8_e4m3fn),
               "double_blocks.0.img_attn.qkv.weight_scale": torch.tensor(1.0)}, foreign)
    with pytest.raises(CheckpointError, match="Flux"):
        env.adapter.checkpoints.load_sd35_fp8(foreign)
    k = "joint_blocks.1.x_block.mlp.fc2."
    bad_shape = damaged(env, "shape_fp8.safetensors",
                        lambda sd: sd.update({k + "weight": sd[k + "weight"][:, :-16].contiguous()}))
    with pytest.raises(CheckpointError, match=r"shape_fp8.safetensors: tensor joint_blocks.1.x_block.mlp.fc2.weight "
                                              r"has shape \[128, 496\], the model needs \[128, 512\]"):
        env.adapter.checkpoints.load_sd35_fp8(bad_shape)
    bad_scale = damaged(env, "scale_fp8.safetensors", lambda sd: sd.update({k + "weight_scale": torch.ones(3, 3)}))
    with pytest.raises(CheckpointError, match="weight_scale has shape"):
        env.adapter.checkpoints.load_sd35_fp8(bad_scale)
    missing = damaged(env, "missing_fp8.safetensors", lambda sd: sd.pop(k + "weight"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) .* are missing \(first: "
                                              r"joint_blocks.1.x_block.mlp.fc2.weight\).*incomplete"):
        env.adapter.checkpoints.load_sd35_fp8(missing)


@pytest.mark.parametrize("edit,message", [
    (lambda sd, p: sd.pop(p + "joint_blocks.0.x_block.attn.ln_q.weight"),
     r"missing \(first: model.diffusion_model.joint_blocks.0.x_block.attn.ln_q.weight\)"),
    (lambda sd, p: sd.pop(p + "pos_embed"), r"missing \(first: model.diffusion_model.pos_embed\)"),
    (lambda sd, p: sd.pop(p + "joint_blocks.0.x_block.mlp.fc2.bias"),
     r"missing \(first: model.diffusion_model.joint_blocks.0.x_block.mlp.fc2.bias\)"),
    (lambda sd, p: sd.update({p + "joint_blocks.0.x_block.mlp.fc2.bias": sd[p + "joint_blocks.0.x_block.mlp.fc2.bias"]
                              .reshape(1, -1)}), r"fc2.bias has shape \[1, 128\], the model needs \[128\]"),
    (lambda sd, p: sd.update({p + "final_layer.linear.bias": torch.zeros(64, dtype=torch.int32)}),
     r"final_layer.linear.bias is I32, not a floating-point tensor"),
])
def test_incomplete_or_misshaped_files_are_refused_before_anything_is_built(env, edit, message):
    """Only Linear weights were checked: a file without ``ln_q.weight`` loaded and gave a different latent at each
    load (uninitialised memory), one without ``pos_embed`` a 22% different one, a bias [1, 512] was accepted."""
    sd = load_file(env.src)
    edit(sd, "model.diffusion_model.")
    path = str(env.dir / "checkpoints" / "incomplete.safetensors")
    save_file(sd, path)
    with pytest.raises(env.fp8.CheckpointError, match="incomplete.safetensors: .*" + message):
        env.adapter.checkpoints.load_sd35_fp8(path)


def test_lora_is_merged_into_fp8_weights_keeps_scales_and_unpatches_cleanly(env):
    fp8_model = env.cal
    stock = env.sd.load_checkpoint_guess_config(env.src, output_vae=False, output_clip=False)[0]
    dm = fp8_model.model.diffusion_model
    g = torch.Generator().manual_seed(3)
    lora = {}
    for n, l in env.fp8.fp8_layers(dm).items():  # weights have std 0.02; rank 4: delta std 0.005
        lora[f"diffusion_model.{n}.lora_up.weight"] = torch.randn(l.out_features, 4, generator=g) * 0.05
        lora[f"diffusion_model.{n}.lora_down.weight"] = torch.randn(4, l.in_features, generator=g) * 0.05
    layer = dm.get_submodule("joint_blocks.0.x_block.attn.qkv")
    a0 = denoise(env, fp8_model)
    w0, s0, ws0 = layer.weight.clone(), layer.input_scale.clone(), layer.weight_scale.clone()
    a1 = denoise(env, env.sd.load_lora_for_models(fp8_model, None, lora, 1.0, 0)[0])
    layer = dm.get_submodule("joint_blocks.0.x_block.attn.qkv")
    assert layer.weight.dtype == torch.float8_e4m3fn and not torch.equal(layer.weight, w0)
    assert torch.equal(layer.input_scale, s0) and torch.equal(layer.weight_scale, ws0)
    b0 = denoise(env, stock)
    b1 = denoise(env, env.sd.load_lora_for_models(stock, None, lora, 1.0, 0)[0])
    d8, d16 = (a1 - a0).flatten(), (b1 - b0).flatten()
    assert float(d16.norm() / b0.norm()) > 1e-4  # the LoRA has an effect (deltas ~25% of the weights' std)
    assert float(torch.nn.functional.cosine_similarity(d8, d16, dim=0)) > 0.95
    assert 0.85 < float(d8.norm() / d16.norm()) < 1.15
    assert torch.equal(denoise(env, fp8_model), a0)  # unpatched: back to the exact FP8 weights
    assert torch.equal(dm.get_submodule("joint_blocks.0.x_block.attn.qkv").weight, w0)


def test_bf16_load_never_materialises_high_precision_weights_of_fp8_layers(env):
    """Quantize-on-load: every FP8 layer holds only its FP8 weight (no BF16 copy left behind) and the
    loader read the file through a memory map (pages handed back per tensor)."""
    dm = env.model.model.diffusion_model
    for name, l in env.fp8.fp8_layers(dm).items():
        assert l.weight.dtype == torch.float8_e4m3fn
        tensors = [t for t in list(l.parameters()) + list(l.buffers()) if t is not None]
        assert sum(t.numel() * t.element_size() for t in tensors) < l.weight.numel() * 1.1 + 4096, name


def test_writer_streams_materialized_tensors_and_never_leaves_a_partial_file(tmp_path):
    from sd35fp8.io.files import MappedSafetensors, write_safetensors
    shapes = {"a": torch.empty(3, 4, device="meta", dtype=torch.bfloat16),
              "b": torch.empty(5, device="meta", dtype=torch.float8_e4m3fn)}
    data = {"a": torch.randn(3, 4).bfloat16(), "b": torch.randn(5).to(torch.float8_e4m3fn)}
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, shapes, {"k": "v"}, materialize=lambda name, t: data[name])
    got = load_file(path)
    assert all(torch.equal(got[k].float(), data[k].float()) for k in data)
    src = MappedSafetensors(path)
    assert src.metadata == {"k": "v"} and torch.equal(src.tensor("a"), data["a"])

    def broken(name, t):
        if name == "b":
            raise RuntimeError("disk full")
        return data[name]
    with pytest.raises(RuntimeError, match="disk full"):
        write_safetensors(path, shapes, overwrite=True, materialize=broken)
    assert torch.equal(load_file(path)["a"], data["a"])  # the old file is intact
    assert os.listdir(tmp_path) == ["x.safetensors"]


def test_int8_adaln_option_quantizes_runs_merges_loras_and_saves_as_e4m3(env):
    """weight_scaling=per_tensor_int8_adaln: the adaLN modulation layers hold INT8 weights with per-channel
    scales (less rounding error than E4M3, same bytes) and run weight-only; everything else is E4M3 per
    tensor. Saved files store E4M3 throughout (the format stock ComfyUI reads)."""
    import tiny_sd35
    model, _, _, text = env.adapter.checkpoints.load_sd35_fp8(env.src, env.adapter.checkpoints.INT8_ADALN)
    dm, base = model.model.diffusion_model, env.model.model.diffusion_model
    layers = env.fp8.fp8_layers(dm)
    ada = {n: m for n, m in layers.items() if "adaLN_modulation" in n}
    assert len(ada) == 4 and len(layers) == 17 and "4 adaLN layers with INT8 per-channel weights" in text
    assert all(m.weight.dtype == torch.int8 and m.weight_scale.shape == (m.out_features,) for m in ada.values())
    assert all(m.weight.dtype == torch.float8_e4m3fn for n, m in layers.items() if n not in ada)
    src = load_file(env.src)
    for n, m in ada.items():
        w = src[tiny_sd35.P + n + ".weight"].float()
        e8 = float((m.fp8_dequantized_weight(torch.float32) - w).norm() / w.norm())
        e_fp8 = float((base.get_submodule(n).fp8_dequantized_weight(torch.float32) - w).norm() / w.norm())
        assert e8 < 0.5 * e_fp8, (n, e8, e_fp8)
    with pytest.raises(ValueError, match="per_tensor_int8_adaln"):
        env.adapter.checkpoints.load_sd35_fp8(env.src, "int8")
    cal, _ = env.adapter.calibration.calibrate(model, [cond(1)], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64, 0)
    out, ref = denoise(env, cal), denoise(env, env.cal)
    assert torch.isfinite(out).all()
    assert next(iter(ada.values())).fp8_static == "weight_only"  # no INT8 matmul: weight-only in the static path
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.05
    # a LoRA delta merged by ComfyUI's patch hooks stays INT8 with the layer's scales
    layer = next(iter(ada.values()))
    w = layer.convert_weight(layer.weight)
    merged = layer.set_weight(w + 0.3 * layer.weight_scale[:, None], return_weight=True, seed=1)
    assert merged.dtype == torch.int8
    assert float((merged.float() - layer.weight.float()).mean()) == pytest.approx(0.3, abs=0.02)
    path, _ = env.adapter.checkpoints.save_fp8_checkpoint(cal, "tiny_int8_adaln")
    hdr = load_file(path)
    for n, m in ada.items():
        assert hdr[n + ".weight"].dtype == torch.float8_e4m3fn and hdr[n + ".weight_scale"].dim() == 0
        saved = hdr[n + ".weight"].float() * hdr[n + ".weight_scale"]
        ours = m.fp8_dequantized_weight(torch.float32)
        assert float((saved - ours).norm() / ours.norm()) < 0.04
    stock = env.sd.load_diffusion_model(path)
    assert torch.isfinite(denoise(env, stock)).all()


def test_int8_mlp_option_runs_w8a8_closer_to_bf16_and_saves_as_e4m3(env):
    """weight_scaling=per_tensor_int8_mlp: adaLN and MLP weights INT8 per channel; after calibration the static
    runtime runs the MLPs W8A8 (fc1 per token, fc2 at its static scale). Through ComfyUI's model the denoiser
    output is closer to the BF16 model's than the E4M3 (per_tensor) model's, and INT8 adaLN alone does not get
    there. Saved files store E4M3 throughout."""
    model, _, _, text = env.adapter.checkpoints.load_sd35_fp8(env.src, env.adapter.checkpoints.INT8_MLP)
    layers = env.fp8.fp8_layers(model.model.diffusion_model)
    mlp = {n: m for n, m in layers.items() if ".mlp.fc" in n}
    assert len(mlp) == 6 and all(m.weight.dtype == torch.int8 for m in mlp.values())  # last context: no MLP
    assert "6 MLP layers with INT8 per-channel weights (W8A8)" in text
    assert all(m.weight.dtype == torch.float8_e4m3fn for n, m in layers.items() if ".attn" in n)

    def calibrated(p):
        return env.adapter.calibration.calibrate(p, [cond(1)], cond(2), 2, 4.0, "euler", "sgm_uniform", 64, 64, 0)[0]

    cal = calibrated(model)
    out = denoise(env, cal)
    assert {m.fp8_static for n, m in mlp.items() if n.endswith("fc1")} == {"int8_token"}
    assert {m.fp8_static for n, m in mlp.items() if n.endswith("fc2")} == {"int8_static"}
    bf16 = env.sd.load_diffusion_model_state_dict(
        {k[len("model.diffusion_model."):]: v for k, v in load_file(env.src).items()
         if k.startswith("model.diffusion_model.")}, model_options={"dtype": torch.bfloat16})

    def first_mlp_output(p):
        """The first image block's MLP output in one denoiser call (its input differs between the models only
        by the attention's error: the MLP's own error shows), and the denoised latent."""
        seen = []
        hook = p.model.diffusion_model.joint_blocks[0].x_block.mlp.register_forward_hook(
            lambda mod, args, y: seen.append(y.detach().float()))
        try:
            return seen, denoise(env, p)
        finally:
            hook.remove()

    (ref,), ref_out = first_mlp_output(bf16)
    adaln8 = calibrated(env.adapter.checkpoints.load_sd35_fp8(env.src, env.adapter.checkpoints.INT8_ADALN)[0])
    errs = [float((first_mlp_output(p)[0][0] - ref).norm() / ref.norm()) for p in (cal, adaln8, env.cal)]
    assert torch.isfinite(out).all() and float((out - ref_out).norm() / ref_out.norm()) < 0.05
    assert errs[0] < 0.6 * min(errs[1:]), errs  # W8A8 INT8: about a third of E4M3's rounding error
    path, _ = env.adapter.checkpoints.save_fp8_checkpoint(cal, "tiny_int8_mlp")
    hdr = load_file(path)
    assert all(hdr[n + ".weight"].dtype == torch.float8_e4m3fn and hdr[n + ".input_scale"].dim() == 0 for n in mlp)
    assert torch.isfinite(denoise(env, env.sd.load_diffusion_model(path))).all()


def test_sampling_state_installs_the_joint_forward_and_norm_kernels_only_with_cuda_graphs(env):
    """prepare_run (what every sampling run calls) puts the fused joint-block forward (sd35fp8.runtime.joint) on every
    block of a calibrated static model; sd35fp8.kernels.norm's LayerNorm kernels (a Python custom-op call each) only
    where the model replays as CUDA graphs; without the static runtime neither."""
    from sd35fp8.core.marks import installed, peek
    from sd35fp8.runtime.joint import JOINT
    dm = env.cal.model.diffusion_model
    blocks = list(dm.joint_blocks)
    for graphs in (False, True):
        p = env.adapter.sampling.set_autocast(env.cal, True, None, env.adapter.state.Runtime(cudagraphs=graphs))
        env.adapter.sampling.prepare_run(p)
        assert all(installed(b) == JOINT and peek(b).joint_norm is graphs for b in blocks)
    p = env.adapter.sampling.set_autocast(env.cal, True, None, env.adapter.state.Runtime(static=False))
    env.adapter.sampling.prepare_run(p)
    assert not any(installed(b) or "forward" in b.__dict__ for b in blocks)
    # and the model still runs after all that
    out = denoise(env, env.adapter.sampling.set_autocast(env.cal, True, None))
    assert torch.isfinite(out).all()


def test_every_sampling_run_asks_the_cuda_graphs_for_a_full_weight_check(env):
    """The graph runners check every weight's address only on a run's first call (per call only a quick
    fingerprint: sd35fp8.runtime.graphs.quick_version); prepare_run, which every sampling run calls before ComfyUI loads
    and patches the model, must request that check on the runners that exist."""
    from sd35fp8.runtime.graphs import GraphedModule, quick_version
    dm = env.cal.model.diffusion_model
    runner = GraphedModule(dm, quick=quick_version)
    from sd35fp8.core.marks import marks
    marks(dm).adapter.setdefault(env.adapter.sampling.COMPILED, {})[env.adapter.sampling.GRAPHS] = runner
    try:
        assert env.adapter.sampling.graph_runners(dm)["compiled"] is runner
        runner.__dict__["stale"] = False
        p = env.adapter.sampling.set_autocast(env.cal, True, None, env.adapter.state.Runtime(cudagraphs=True))
        env.adapter.sampling.prepare_run(p)
        assert runner.stale and env.adapter.sampling.graph_runners(dm)["compiled"] is runner
    finally:
        env.adapter.sampling.drop_graphs(dm)


def test_first_run_notice_once_per_size_and_batch(env):
    """The notice shown while the first denoiser call at a size compiles (CUDA only, where the progress bar waits):
    it names the size in pixels and the denoiser batch, says whether CUDA graphs are captured, and comes once per
    shape. (The compile itself runs on the GPU: not here.)"""
    first_run = env.adapter.sampling.first_run
    cache = {}
    x = torch.zeros(2, 16, 128, 96)
    msg = first_run(cache, x, graphs=False)
    assert "first FP8 run at 768x1024, denoiser batch 2: compiling once" in msg and "CUDA graphs" not in msg
    assert first_run(cache, x, graphs=False) is None
    assert "capturing CUDA graphs" in first_run(cache, x, graphs=True)  # graphs: a capture of its own
    assert "at 768x1024, denoiser batch 4" in first_run(cache, torch.zeros(4, 16, 128, 96), graphs=False)
    assert first_run({}, x, graphs=False) == msg  # another model: its own first run
