"""The service's request checks, A1111 mapping and configuration (service/, pure Python)."""
import json

import pytest

from service import api
from service import config as cfgmod

SAMPLERS = ["euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde", "uni_pc", "lcm"]
SCHEDULERS = ["simple", "sgm_uniform", "karras", "exponential", "normal", "beta", "kl_optimal"]
D = api.Defaults(negative="ugly", width=1024, height=768, steps=28, cfg=4.5, sampler_name="euler",
                 scheduler="sgm_uniform")
L = api.Limits(max_width=1024, max_height=1024, max_steps=50, max_images=8)


def simple(body, **kw):
    return api.simple_items(body, L, D, SAMPLERS, SCHEDULERS, **kw)


def a1111(body):
    return api.a1111_items(body, L, D, SAMPLERS, SCHEDULERS)


def test_simple_defaults_come_from_the_workflow_and_seeds_count_up():
    items, extras = simple({"prompt": "a cat", "seed": 10, "count": 3}, allow=("count",))
    assert [i["seed"] for i in items] == [10, 11, 12] and extras == {}
    it = items[0]
    assert (it["negative"], it["width"], it["height"], it["steps"], it["cfg"], it["sampler_name"], it["scheduler"]) \
        == ("ugly", 1024, 768, 28, 4.5, "euler", "sgm_uniform")
    rand = simple({"prompt": "a cat", "seed": -1})[0][0]["seed"]
    assert 0 <= rand < 2**32


@pytest.mark.parametrize("body,field", [
    ({"prompt": "x", "count": 2}, "count"),  # count only where allowed (jobs)
    ({"prompt": "x", "width": 1040}, "width"), ({"prompt": "x", "height": 72}, "height"),
    ({"prompt": "x", "steps": True}, "steps"), ({"prompt": "x", "cfg": float("nan")}, "cfg"),
    ({"prompt": "x", "seed": -2}, "seed"), ({"prompt": "x", "seed": 1.5}, "seed"),
    ({"prompt": "x" * 4001}, "prompt"), ({"prompt": "x\x00"}, "prompt"), ({"negative": "x"}, "prompt"),
    ({"prompt": "x", "sampler": "Euler"}, "sampler"), ({"prompt": "x", "scheduler": "kl_optimal", "steps": 1}, "steps"),
])
def test_simple_refuses_naming_the_field(body, field):
    with pytest.raises(api.FieldError) as e:
        simple(body)
    assert e.value.field == field


def test_job_extras_webhook_and_timeout():
    _, extras = simple({"prompt": "x", "webhook": "https://hooks.example/x", "timeout": 30},
                       allow=("webhook", "timeout"))
    assert extras == {"webhook": "https://hooks.example/x", "timeout": 30.0}
    for bad in ("ftp://x", "http://", "not a url", 3):
        with pytest.raises(api.FieldError, match="webhook"):
            simple({"prompt": "x", "webhook": bad}, allow=("webhook",))


def test_a1111_fields_map_to_comfyui_and_seeds_are_honest():
    items, params = a1111({"prompt": "a dog", "negative_prompt": "", "seed": 5, "batch_size": 2, "n_iter": 2,
                           "sampler_name": "DPM++ 2M Karras", "scheduler": "Automatic", "steps": 20,
                           "cfg_scale": 7, "width": 512, "height": 512, "styles": ["x"], "override_settings": {},
                           "restore_faces": False, "enable_hr": False, "subseed_strength": 0})
    assert [i["seed"] for i in items] == [5, 6, 7, 8]
    assert items[0]["sampler_name"] == "dpmpp_2m" and items[0]["scheduler"] == "karras"
    assert params["batch_size"] == 2 and params["n_iter"] == 2 and params["seed"] == 5
    info = api.a1111_info(items, params, "sd3.5_large", "sd35fp8-0.2.0", 0)
    assert info["all_seeds"] == [5, 6, 7, 8] and len(info["infotexts"]) == 4
    assert info["sampler_name"] == "DPM++ 2M" and "Seed: 8, Size: 512x512" in info["infotexts"][3]
    assert json.loads(json.dumps(info)) == info
    # A1111's defaults where a field is missing; webuiapi's lowercase "automatic"; ComfyUI names accepted too
    it = a1111({"prompt": "x", "sampler_name": "euler_ancestral", "scheduler": "automatic"})[0][0]
    assert (it["width"], it["cfg"], it["sampler_name"], it["scheduler"], it["steps"]) == \
        (512, 7.0, "euler_ancestral", "sgm_uniform", 28)
    assert a1111({"prompt": "x", "sampler_index": "k_euler_a", "scheduler": "SGM Uniform"})[0][0]["scheduler"] \
        == "sgm_uniform"
    assert a1111({"prompt": "x", "scheduler": "Uniform"})[0][0]["scheduler"] == "normal"


@pytest.mark.parametrize("body,field", [
    ({"enable_hr": True}, "enable_hr"), ({"restore_faces": True}, "restore_faces"),
    ({"subseed_strength": 0.5}, "subseed_strength"), ({"script_name": "x/y/z plot"}, "script_name"),
    ({"batch_size": 4, "n_iter": 3}, "n_iter"), ({"sampler_name": "Euler Ancestral"}, "sampler_name"),
    ({"scheduler": "Polyexponential"}, "scheduler"), ({"width": 500}, "width"), ({"steps": "20"}, "steps"),
])
def test_a1111_refusals_name_the_field_in_fastapis_shape(body, field):
    with pytest.raises(api.FieldError) as e:
        a1111(dict(prompt="x", **body))
    assert e.value.field == field
    assert api.a1111_validation_error(e.value)["detail"][0]["loc"] == ["body", field]


def test_config_file_and_environment(tmp_path):
    p = tmp_path / "api.json"
    p.write_text(json.dumps({"workflow": "medium", "max_steps": 40, "calibration": {"steps": 12}}))
    c = cfgmod.load({"SD35FP8_API_CONFIG": str(p), "SD35FP8_API_MAX_STEPS": "30", "SD35FP8_API_WARMUP": "yes",
                     "SD35FP8_API_TOKEN": "t", "SD35FP8_API_CKPT_NAME": "mine.safetensors",
                     "SD35FP8_API_TEXT_ENCODERS": "a.safetensors, b.safetensors,c.safetensors",
                     "SD35FP8_API_WEIGHT_FORMAT": "per_channel"})
    assert (c.workflow, c.max_steps, c.warmup, c.token, c.calibration) == ("medium", 30, True, "t", {"steps": 12})
    wf = cfgmod.build_workflow(c)
    by = {v["class_type"]: v["inputs"] for v in wf.values()}
    assert by["SD35FP8CheckpointLoader"]["ckpt_name"] == "mine.safetensors"
    assert by["SD35FP8CheckpointLoader"]["weight_scaling"] == "per_channel"
    assert [by["TripleCLIPLoader"][f"clip_name{i}"] for i in (1, 2, 3)] == ["a.safetensors", "b.safetensors",
                                                                          "c.safetensors"]
    assert by["SD35FP8Calibrate"]["steps"] == 12


@pytest.mark.parametrize("env,match", [
    ({"SD35FP8_API_MAX_STEPS": "many"}, "SD35FP8_API_MAX_STEPS: max_steps must be int"),
    ({"SD35FP8_API_WARMUP": "maybe"}, "SD35FP8_API_WARMUP"),
    ({"SD35FP8_API_CALIBRATION": "[1]"}, "calibration must be a JSON object"),
    ({"SD35FP8_API_CONFIG": "/nonexistent/api.json"}, "/nonexistent/api.json"),
])
def test_config_errors_name_the_variable(env, match):
    with pytest.raises(cfgmod.ConfigError, match=match):
        cfgmod.load(env)


def test_config_file_unknown_key_and_bad_workflow(tmp_path):
    p = tmp_path / "api.json"
    p.write_text(json.dumps({"max_step": 3}))
    with pytest.raises(cfgmod.ConfigError, match="unknown setting 'max_step'"):
        cfgmod.load({"SD35FP8_API_CONFIG": str(p)})
    with pytest.raises(cfgmod.ConfigError, match="TripleCLIPLoader takes 3 files, 1 given"):
        cfgmod.build_workflow(cfgmod.load({"SD35FP8_API_TEXT_ENCODERS": "one.safetensors"}))
    with pytest.raises(cfgmod.ConfigError, match="cannot read it"):
        cfgmod.build_workflow(cfgmod.load({"SD35FP8_API_WORKFLOW": str(tmp_path / "missing.json")}))


def test_ui_workflow_for_the_pngs(tmp_path):
    ui = cfgmod.ui_workflow(cfgmod.load({}))  # the bundled Large workflow's UI twin
    assert {n["type"] for n in ui["nodes"]} >= {"SD35FP8CheckpointLoader", "KSampler", "SaveImage"}
    assert cfgmod.ui_workflow(cfgmod.load({"SD35FP8_API_WORKFLOW": str(tmp_path / "mine.json")})) is None
    p = tmp_path / "ui.json"
    p.write_text("{}")
    with pytest.raises(cfgmod.ConfigError, match="not a UI-format workflow"):
        cfgmod.ui_workflow(cfgmod.load({"SD35FP8_API_UI_WORKFLOW": str(p)}))
