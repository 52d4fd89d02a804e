"""Diffusers' SD3 transformer and ComfyUI's MMDiT agree once the library converts the keys
(sd35fp8/io/diffusers_keys.py): a tiny ``SD3Transformer2DModel`` (diffusers, installed by the test setup) with
random weights, converted tensor by tensor, loaded by ComfyUI's own loader, gives the same denoiser output for the
same inputs. SD3.5 Large's layout (q/k RMS norms) and Medium's (MMDiT-X: a second attention in early blocks)."""
import pytest
import torch

import tiny_sd35
from comfy_harness import comfy_dir

from sd35fp8.io.diffusers_keys import convert, is_diffusers_sd3, plan
from tests.support.adapter import import_adapter

pytestmark = pytest.mark.comfy
diffusers = pytest.importorskip("diffusers", reason="needs diffusers (requirements-dev.txt)")
DEPTH = 2


def tiny_transformer(variant: str, seed: int = 0):
    torch.manual_seed(seed)
    m = diffusers.SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=DEPTH, attention_head_dim=64,
        num_attention_heads=DEPTH, joint_attention_dim=4096, caption_projection_dim=64 * DEPTH,
        pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, qk_norm="rms_norm",
        dual_attention_layers=(0,) if variant == "medium" else ())
    with torch.no_grad():  # diffusers zero-initialises some layers: every weight random, so each one matters
        for name, p in m.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.03))
    return m.eval()


@pytest.fixture(scope="module")
def comfy():
    import_adapter(comfy_dir(), cpu=True)
    import comfy.sd
    return comfy.sd


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_converted_keys_are_the_single_file_layout(variant):
    sd = tiny_transformer(variant).state_dict()
    assert is_diffusers_sd3(sd) and not is_diffusers_sd3(tiny_sd35.mmdit_state_dict(DEPTH, variant, prefix=""))
    reads = []
    got = dict(convert(sd, lambda k: reads.append(k) or sd[k]))
    ref = tiny_sd35.mmdit_state_dict(DEPTH, variant, prefix="", attn2_blocks=1 if variant == "medium" else 0)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert sorted(reads) == sorted(sd)  # every diffusers tensor read once: converted while streaming


@pytest.mark.parametrize("variant", ["large", "medium"])
def test_diffusers_and_comfyui_give_the_same_denoiser_output(comfy, variant):
    tm = tiny_transformer(variant, seed=1)
    sd = tm.state_dict()
    p = comfy.load_diffusion_model_state_dict(dict(convert(sd, sd.__getitem__)),
                                              model_options={"dtype": torch.float32})
    assert p is not None, "ComfyUI did not recognise the converted state dict as SD3"
    dm = p.model.diffusion_model.float()
    g = torch.Generator().manual_seed(2)
    x, ctx, y = torch.randn(2, 16, 32, 32, generator=g), torch.randn(2, 12, 4096, generator=g), torch.randn(2, 2048,
                                                                                                         generator=g)
    t = torch.tensor([500.0, 120.0])
    with torch.no_grad():
        ref = tm(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        out = dm(x, t, context=ctx, y=y)
    rel = float((out - ref).norm() / ref.norm())
    assert ref.abs().max() > 0.01 and rel < 1e-4, rel


def test_an_unknown_tensor_is_named_not_dropped():
    sd = tiny_transformer("large").state_dict()
    sd["transformer_blocks.0.attn.to_gate.weight"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="to_gate"):
        plan(sd)


@pytest.mark.parametrize("shard", [True, False])
def test_the_loader_takes_a_diffusers_transformer_as_its_single_file_twin(comfy, tmp_path, shard):
    """Load SD3.5 Checkpoint (FP8) given a diffusers transformer (any of its shards, or its one file) builds the same
    FP8 model, bit for bit, as from the same weights in the single-file layout."""
    import os

    from safetensors.torch import save_file

    from sd35fp8 import fp8_layers
    from tests.support.adapter import import_adapter as again
    adapter = again(comfy_dir(), cpu=True)
    tm = tiny_transformer("large", seed=3).to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "transformer", max_shard_size="300KB" if shard else "10GB", safe_serialization=True)
    files = sorted(f for f in os.listdir(tmp_path / "transformer") if f.endswith(".safetensors"))
    assert (len(files) > 1) == shard
    sd = tm.state_dict()
    single = tmp_path / "single.safetensors"
    save_file({k: v.contiguous() for k, v in convert(sd, sd.__getitem__)}, str(single))
    a = adapter.checkpoints.load_sd35_fp8(str(tmp_path / "transformer" / files[-1]))
    b = adapter.checkpoints.load_sd35_fp8(str(single))
    assert "SD3.5 Large" in a[3] or "MMDiT" in a[3]
    da, db = a[0].model.diffusion_model, b[0].model.diffusion_model
    assert len(fp8_layers(da)) == len(fp8_layers(db)) > 0
    ta = dict(da.state_dict())
    tb = dict(db.state_dict())
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k].float(), tb[k].float()), k


def test_a_missing_shard_is_named(comfy, tmp_path):
    import os

    from sd35fp8 import CheckpointError
    from sd35fp8.io.diffusers_files import open_checkpoint
    tm = tiny_transformer("large", seed=4).to(torch.bfloat16)
    tm.save_pretrained(tmp_path / "t", max_shard_size="300KB", safe_serialization=True)
    files = sorted(f for f in os.listdir(tmp_path / "t") if f.endswith(".safetensors"))
    os.remove(tmp_path / "t" / files[0])
    with pytest.raises(CheckpointError, match=f"shard {files[0]} of {len(files)}"):
        open_checkpoint(str(tmp_path / "t" / files[-1]))


# -- FP8 on diffusers' side (sd35fp8.integrations.diffusers) ----------------------------------------------------------
def tiny_pipeline(tm):
    """diffusers' own StableDiffusion3Pipeline around the tiny transformer; prompts come as embeddings (the text
    encoders and the VAE are not needed for latents)."""
    return diffusers.StableDiffusion3Pipeline(
        transformer=tm, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)


def pipe_call(pipe, seed, steps=3):
    g = torch.Generator().manual_seed(seed)
    dt = pipe.transformer.dtype
    pe, npe = torch.randn(1, 12, 4096, generator=g).to(dt), torch.randn(1, 12, 4096, generator=g).to(dt)
    pp, npp = torch.randn(1, 2048, generator=g).to(dt), torch.randn(1, 2048, generator=g).to(dt)
    return pipe(prompt_embeds=pe, negative_prompt_embeds=npe, pooled_prompt_embeds=pp,
                negative_pooled_prompt_embeds=npp, height=64, width=64, num_inference_steps=steps, guidance_scale=4.5,
                output_type="latent", generator=torch.Generator().manual_seed(seed + 100)).images


def test_quantize_and_calibrate_a_diffusers_pipeline():
    """The policy on diffusers' names (embedders, norm_out, proj_out kept), q/k/v sharing one weight scale,
    calibration through the pipeline's own calls (every step, both CFG halves), static scales installed, and the
    FP8 pipeline's latents close to the BF16 one's."""
    from sd35fp8 import fp8_autocast, fp8_layers
    from sd35fp8.integrations import diffusers as fp8d
    tm = tiny_transformer("medium", seed=5)
    pipe = tiny_pipeline(tm)
    ref = pipe_call(pipe, 7)
    pol = fp8d.quantize(tm)
    layers = fp8_layers(tm)
    linears = {n for n, m in tm.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(layers) == {d.name for d in pol.decisions if d.fp8}
    assert len(layers) == len(linears) - 7  # context_embedder, norm_out, proj_out, time_text_embed's four
    assert not any(n.startswith(("pos_embed", "time_text_embed", "context_embedder", "norm_out", "proj_out"))
                   for n in layers)
    for n in ("attn", "attn2"):
        s = [layers[f"transformer_blocks.0.{n}.to_{x}"].weight_scale for x in "qkv"]
        assert torch.equal(s[0], s[1]) and torch.equal(s[1], s[2])
    calls = []
    tm.register_forward_hook(lambda m, a, k: calls.append(1), with_kwargs=False)
    amax = fp8d.calibrate(tm, lambda: [pipe_call(pipe, s) for s in (1, 2)])
    assert len(calls) == 2 * 3  # 2 prompts x 3 steps, cond and uncond batched in each call
    assert set(amax) == set(layers) and all(layers[n].input_scale is not None for n in layers)
    assert amax["transformer_blocks.1.attn.to_q"] == amax["transformer_blocks.1.attn.to_v"]
    with fp8_autocast():
        out = pipe_call(pipe, 7)
    rel = float((out - ref).norm() / ref.norm())
    # E4M3 weights on a random tiny model (the CPU runs FP8 weight-only) drift a few percent over 3 steps; a wrong
    # scale or layout would be off by order 1
    assert torch.isfinite(out).all() and 0 < rel < 0.1, rel


def test_diffusers_fp8_and_comfyui_fp8_agree_with_the_same_scales(comfy):
    """The same weights quantized on both sides give identical FP8 tensors, and with the diffusers calibration's
    scales on ComfyUI's model (comfy_amax) both denoisers give the same output."""
    from sd35fp8 import QuantPolicy, apply_input_scales, fp8_autocast, fp8_layers, quantize_model
    from sd35fp8.integrations import diffusers as fp8d
    tm = tiny_transformer("large", seed=6)
    sd = {k: v.clone() for k, v in tm.state_dict().items()}
    fp8d.quantize(tm)
    amax = fp8d.calibrate(tm, lambda: pipe_call(tiny_pipeline(tm), 3))
    p = comfy.load_diffusion_model_state_dict(dict(convert(sd, sd.__getitem__)),
                                              model_options={"dtype": torch.float32})
    dm = p.model.diffusion_model.float()
    quantize_model(dm, QuantPolicy())
    ca = fp8d.comfy_amax(amax)
    assert set(ca) == set(fp8_layers(dm))
    apply_input_scales(dm, ca)
    dl, cl = fp8_layers(tm), fp8_layers(dm)
    qkv = torch.cat([dl[f"transformer_blocks.0.attn.to_{x}"].weight for x in "qkv"]).view(torch.uint8)
    assert torch.equal(qkv, cl["joint_blocks.0.x_block.attn.qkv"].weight.view(torch.uint8))
    assert torch.equal(dl["transformer_blocks.0.attn.to_q"].weight_scale,
                       cl["joint_blocks.0.x_block.attn.qkv"].weight_scale)
    g = torch.Generator().manual_seed(9)
    x, ctx, y = torch.randn(2, 16, 32, 32, generator=g), torch.randn(2, 12, 4096, generator=g), torch.randn(2, 2048,
                                                                                                         generator=g)
    t = torch.tensor([700.0, 50.0])
    with torch.no_grad(), fp8_autocast():
        a = tm(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        b = dm(x, t, context=ctx, y=y)
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-4, rel


def test_saved_diffusers_fp8_file_loads_calibrated_in_comfyui_and_back_in_diffusers(comfy, tmp_path):
    """save(): the single-file FP8 format of the nodes. ComfyUI's loader (the pack's) gets the same FP8 weights and
    static scales, ready without calibration; load() puts the file into a fresh diffusers transformer, which then
    gives the saved one's output bit for bit."""
    from sd35fp8 import fp8_autocast, fp8_layers
    from sd35fp8.integrations import diffusers as fp8d
    adapter = import_adapter(comfy_dir(), cpu=True)
    tm = tiny_transformer("large", seed=8).to(torch.bfloat16)
    fp8d.quantize(tm)
    amax = fp8d.calibrate(tm, lambda: pipe_call(tiny_pipeline(tm), 4))
    path = str(tmp_path / "tiny_diffusers_fp8.safetensors")
    assert fp8d.save(tm, amax, path, calibration={"method": "max", "prompts": 1, "steps": 3}) > 0
    with pytest.raises(FileExistsError):
        fp8d.save(tm, amax, path)
    model, _, _, text = adapter.checkpoints.load_sd35_fp8(path)
    assert "calibrated" in text.lower()
    cl, dl = fp8_layers(model.model.diffusion_model), fp8_layers(tm)
    qkv = cl["joint_blocks.1.x_block.attn.qkv"]
    assert torch.equal(qkv.weight.view(torch.uint8), torch.cat(
        [dl[f"transformer_blocks.1.attn.to_{x}"].weight.view(torch.uint8) for x in "qkv"]))
    loaded = adapter.state.get(model).input_amax  # the static ranges the loaded MODEL samples with
    want = fp8d.comfy_amax(amax)
    assert loaded.keys() == want.keys() and all(abs(float(loaded[k]) - want[k]) <= 1e-5 * want[k] for k in want)
    assert comfy.load_diffusion_model(path) is not None  # stock ComfyUI's UNETLoader path reads it too
    fresh = tiny_transformer("large", seed=99).to(torch.bfloat16)
    back = fp8d.load(fresh, path)
    assert back.keys() == amax.keys() and all(abs(back[k] - amax[k]) <= 1e-6 * amax[k] for k in amax)
    g = torch.Generator().manual_seed(10)
    x, ctx, y = (torch.randn(1, 16, 32, 32, generator=g).bfloat16(), torch.randn(1, 12, 4096, generator=g).bfloat16(),
                 torch.randn(1, 2048, generator=g).bfloat16())
    t = torch.tensor([300.0])
    with torch.no_grad(), fp8_autocast():
        a = tm(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        b = fresh(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
    assert torch.equal(a, b)


def test_a_diffusers_repository_gives_model_vae_and_text_encoder(comfy, tmp_path):
    """Picking the transformer of a diffusers repository (transformer/, vae/, text_encoder/) gives the FP8 MODEL and
    also the VAE and the text encoder from their folders."""
    import os

    from safetensors.torch import save_file
    adapter = import_adapter(comfy_dir(), cpu=True)
    repo = tmp_path / "stable-diffusion-3.5-tiny"
    tiny_transformer("large", seed=11).to(torch.bfloat16).save_pretrained(repo / "transformer",
                                                                          safe_serialization=True)
    torch.manual_seed(0)
    # SD3's VAE configuration (ComfyUI builds that one), random weights, half precision on disk (~170 MB)
    diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
                            latent_channels=16, layers_per_block=2, norm_num_groups=32, use_quant_conv=False,
                            use_post_quant_conv=False).half().save_pretrained(repo / "vae", safe_serialization=True)
    (repo / "text_encoder").mkdir()
    save_file(tiny_sd35.clip_l_state_dict(), str(repo / "text_encoder" / "model.safetensors"))
    f = next(x for x in os.listdir(repo / "transformer") if x.endswith(".safetensors"))
    model, clip, vae, text = adapter.checkpoints.load_sd35_fp8(str(repo / "transformer" / f))
    assert model is not None and clip is not None and vae is not None, text
    assert "VAE from vae/" in text and "text encoders from 1 text_encoder*/ folder(s)" in text
    img = vae.decode(torch.randn(1, 16, 8, 8))
    assert img.shape[-1] == 3 and img.shape[1:3] == (64, 64) and torch.isfinite(img).all()
    cond = clip.encode_from_tokens(clip.tokenize("a red fox"))
    assert torch.isfinite(cond).all()
    # without the sibling folders: the MODEL alone, and the report says where the others come from
    import shutil
    shutil.rmtree(repo / "vae")
    shutil.rmtree(repo / "text_encoder")
    _, clip, vae, text = adapter.checkpoints.load_sd35_fp8(str(repo / "transformer" / f))
    assert clip is None and vae is None and "take them with ComfyUI's loaders" in text


def test_the_calibrated_diffusers_transformer_runs_under_torch_compile():
    """torch.compile(pipe.transformer) after quantize + calibrate: the compiled FP8 transformer gives the eager one's
    output (Inductor on the CPU here; on a GPU the same call compiles the FP8 GEMMs)."""
    from sd35fp8 import fp8_autocast
    from sd35fp8.integrations import diffusers as fp8d
    tm = tiny_transformer("large", seed=12)
    fp8d.quantize(tm)
    fp8d.calibrate(tm, lambda: pipe_call(tiny_pipeline(tm), 1))
    g = torch.Generator().manual_seed(1)
    x, ctx, y = torch.randn(1, 16, 32, 32, generator=g), torch.randn(1, 12, 4096, generator=g), torch.randn(1, 2048,
                                                                                                         generator=g)
    t = torch.tensor([300.0])
    with torch.no_grad(), fp8_autocast():
        eager = tm(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y, timestep=t).sample
        compiled = torch.compile(tm)(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=y,
                                     timestep=t).sample
    assert float((compiled - eager).norm() / eager.norm()) < 1e-4
