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
