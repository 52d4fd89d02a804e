import torch

import sd35fp8
from sd35fp8 import QuantPolicy, quantize_model


class Named(torch.nn.Module):
    """A module tree with SD3's Linear names."""

    def __init__(self, names_shapes):
        super().__init__()
        for name, (out_f, in_f) in names_shapes.items():
            parent = self
            parts = name.split(".")
            for p in parts[:-1]:
                if not hasattr(parent, p):
                    parent.add_module(p, torch.nn.Module())
                parent = getattr(parent, p)
            parent.add_module(parts[-1], torch.nn.Linear(in_f, out_f))


SD3_LAYERS = {
    "x_embedder.proj": (128, 64),
    "context_embedder": (128, 4096),
    "t_embedder.mlp.0": (128, 256),
    "y_embedder.mlp.2": (128, 128),
    "joint_blocks.0.x_block.attn.qkv": (384, 128),
    "joint_blocks.0.x_block.attn.proj": (128, 128),
    "joint_blocks.0.x_block.attn2.qkv": (384, 128),
    "joint_blocks.0.x_block.mlp.fc1": (512, 128),
    "joint_blocks.0.x_block.mlp.fc2": (128, 512),
    "joint_blocks.0.x_block.adaLN_modulation.1": (1152, 128),
    "joint_blocks.0.context_block.attn.qkv": (384, 128),
    "joint_blocks.1.context_block.adaLN_modulation.1": (250, 128),  # not divisible by 16
    "final_layer.linear": (64, 128),
    "final_layer.adaLN_modulation.1": (256, 128),
}


def test_sd3_policy_decisions_are_reported():
    m = Named(SD3_LAYERS)
    pol = quantize_model(m, QuantPolicy())
    d = {x.name: x for x in pol.decisions}
    assert set(d) == set(SD3_LAYERS)
    fp8_names = {n for n, x in d.items() if x.fp8}
    assert fp8_names == {
        "joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.attn.proj", "joint_blocks.0.x_block.attn2.qkv",
        "joint_blocks.0.x_block.mlp.fc1", "joint_blocks.0.x_block.mlp.fc2",
        "joint_blocks.0.x_block.adaLN_modulation.1", "joint_blocks.0.context_block.attn.qkv"}
    assert "not divisible by 16" in d["joint_blocks.1.context_block.adaLN_modulation.1"].reason
    assert "excluded" in d["context_embedder"].reason and "excluded" in d["final_layer.linear"].reason
    assert set(sd35fp8.fp8_layers(m)) == fp8_names
    assert isinstance(m.joint_blocks[0].x_block.mlp.fc1 if False else m.get_submodule("joint_blocks.0.x_block.mlp.fc1"),
                      sd35fp8.FP8Linear)
    assert type(m.get_submodule("context_embedder")) is torch.nn.Linear
    js = pol.to_dict()
    assert js["granularity"] == "per_tensor" and len(js["layers"]) == len(SD3_LAYERS)
    assert "kept context_embedder" in pol.summary()
    back = QuantPolicy.from_dict(js)
    assert back.to_dict() == js and back.summary() == pol.summary()


def test_apply_input_scales_and_report():
    m = Named({"joint_blocks.0.x_block.mlp.fc1": (64, 32), "joint_blocks.0.x_block.mlp.fc2": (32, 64)})
    pol = quantize_model(m)
    with sd35fp8.fp8_autocast(calibrating=True) as s:
        m.get_submodule("joint_blocks.0.x_block.mlp.fc1")(torch.randn(3, 32))
    try:
        sd35fp8.calibrated_amax(s, m)
        raise AssertionError("expected an error for the layer calibration never reached")
    except ValueError as e:
        assert "fc2" in str(e)
    with sd35fp8.fp8_autocast(calibrating=s):
        m.get_submodule("joint_blocks.0.x_block.mlp.fc2")(torch.randn(3, 64))
    amax = sd35fp8.calibrated_amax(s, m)
    assert sd35fp8.apply_input_scales(m, amax) == 2
    assert float(m.get_submodule("joint_blocks.0.x_block.mlp.fc2").input_scale) > 0
    txt = sd35fp8.report(pol, amax, bytes_before=sd35fp8.bf16_bytes(m), bytes_after=sd35fp8.weight_bytes(m, 2))
    assert "FP8 layers: 2" in txt and "calibrated input scales for 2 layers" in txt


def test_weight_bytes_fp8_is_about_half_of_bf16():
    m = Named({f"joint_blocks.0.x_block.mlp.fc{i}": (256, 256) for i in (1, 2)})
    m.register_buffer("pos_embed", torch.zeros(1, 64, 256))
    base = sd35fp8.bf16_bytes(m)
    assert base == 2 * (2 * 256 * 256 + 2 * 256 + 64 * 256)
    quantize_model(m)
    assert sd35fp8.bf16_bytes(m) == base  # baseline does not change with quantization
    after = sd35fp8.weight_bytes(m, 2)
    assert after == 2 * 256 * 256 + 2 * 4 + 2 * (2 * 256 + 64 * 256)


def test_int8_adaln_policy_names_its_layers_and_round_trips():
    from sd35fp8 import QuantPolicy
    from sd35fp8.core.quant import INT8_ROWS
    p = QuantPolicy(adaln_int8=True)
    assert p.decide("joint_blocks.0.x_block.adaLN_modulation.1", 768, 128)
    assert p.decide("joint_blocks.0.x_block.mlp.fc1", 512, 128)
    assert p.granularity_for("joint_blocks.0.x_block.adaLN_modulation.1") == INT8_ROWS
    assert p.granularity_for("joint_blocks.0.x_block.mlp.fc1") == "per_tensor"
    assert QuantPolicy().granularity_for("joint_blocks.0.x_block.adaLN_modulation.1") == "per_tensor"
    assert [d.reason.split(",")[0] for d in p.decisions] == ["int8 weights", "fp8 e4m3"]
    assert "1 adaLN layers with INT8 per-channel weights" in p.summary()
    q = QuantPolicy.from_dict(p.to_dict())
    assert q.adaln_int8 and q.decisions == p.decisions


def test_int8_mlp_policy_names_its_layers_and_round_trips():
    from sd35fp8 import QuantPolicy
    from sd35fp8.core.quant import INT8_ROWS
    p = QuantPolicy(adaln_int8=True, mlp_int8=True)
    for name in ("joint_blocks.0.x_block.adaLN_modulation.1", "joint_blocks.0.x_block.mlp.fc1",
                 "joint_blocks.3.context_block.mlp.fc2", "joint_blocks.0.x_block.attn.qkv"):
        assert p.decide(name, 512, 128)
    assert [p.granularity_for(d.name) for d in p.decisions] == [INT8_ROWS, INT8_ROWS, INT8_ROWS, "per_tensor"]
    assert p.granularity_for("joint_blocks.0.x_block.mlp.fc1.") == INT8_ROWS  # a module prefix
    assert QuantPolicy(mlp_int8=True).granularity_for("joint_blocks.0.x_block.adaLN_modulation.1") == "per_tensor"
    assert [d.reason.split(" (")[-1] for d in p.decisions[:2]] == ["weight-only: BF16 activations)",
                                                                   "W8A8 INT8 matmul in the static runtime)"]
    assert "1 adaLN layers with INT8" in p.summary() and "2 MLP layers with INT8 per-channel weights (W8A8)" \
        in p.summary()
    q = QuantPolicy.from_dict(p.to_dict())
    assert q.mlp_int8 and q.adaln_int8 and q.decisions == p.decisions
    assert not QuantPolicy.from_dict(QuantPolicy().to_dict()).mlp_int8
