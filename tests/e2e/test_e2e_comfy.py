"""End-to-end: a real ComfyUI server (``main.py --cpu``) with this pack, driven over HTTP/websocket.

The ComfyUI folder and Python come from COMFYUI_DIR / COMFYUI_PYTHON (default: what
scripts/setup_env.sh builds), so the same suite runs against newer upstream ComfyUI.
"""
import glob
import json
import os
import re
import time

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import tiny_sd35
from comfy_harness import REPO, ComfyError, ComfyServer, cached_nodes
from run_batch import TINY_CLIP, adapt, load_workflow

from service.config import TEMPLATES, bundled_ui_path
from service.graph import inline_settings
from tests.support.workflow_check import validate_api, validate_ui

WF_DIR = os.path.join(REPO, "workflows")
LARGE, MEDIUM, AIO, DIFF_ONLY = ("tiny_sd3.5_large.safetensors", "tiny_sd3.5_medium.safetensors",
                                 "tiny_sd3.5_aio.safetensors", "tiny_sd3.5_large_unet.safetensors")

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("models"))
    ck = os.path.join(d, "checkpoints")
    tiny_sd35.write_checkpoint(os.path.join(ck, LARGE), variant="large", seed=0)
    tiny_sd35.write_checkpoint(os.path.join(ck, MEDIUM), variant="medium", depth=2, seed=10)
    tiny_sd35.write_checkpoint(os.path.join(ck, AIO), variant="large", clip_l=True, seed=20)
    tiny_sd35.write_checkpoint(os.path.join(d, "diffusion_models", DIFF_ONLY), diffusion_only=True, seed=0)
    # the random CLIP-L is 250 MB: build it once per machine
    cache = os.path.join(REPO, ".cache", "test-models", TINY_CLIP)
    tiny_sd35.write_clip_l(cache)
    os.makedirs(os.path.join(d, "text_encoders"), exist_ok=True)
    os.symlink(cache, os.path.join(d, "text_encoders", TINY_CLIP))
    # bad inputs
    save_file({"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": torch.zeros(64, 64),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)},
              os.path.join(ck, "sdxl_like.safetensors"))
    trunc = os.path.join(ck, "truncated_sd3.5.safetensors")
    tiny_sd35.write_checkpoint(trunc)
    with open(trunc, "r+b") as f:
        f.truncate(os.path.getsize(trunc) // 2)
    sd = tiny_sd35.mmdit_state_dict(seed=0)
    sd["model.diffusion_model.final_layer.linear.weight"] = torch.full_like(
        sd["model.diffusion_model.final_layer.linear.weight"], 3e38)
    sd.update(tiny_sd35.taesd_state_dict())
    save_file(sd, os.path.join(ck, "tiny_sd3.5_overflow.safetensors"))
    q = {k: (v.to(torch.float8_e4m3fn) if ".joint_blocks." in k and k.endswith(".weight") and v.dim() == 2 else v)
         for k, v in tiny_sd35.mmdit_state_dict(seed=0).items()}
    save_file(q, os.path.join(ck, "tiny_sd3.5_fp8_scaled.safetensors"))
    os.makedirs(os.path.join(d, "loras"), exist_ok=True)
    lk = "diffusion_model.joint_blocks.0.x_block.attn.qkv"
    save_file({f"{lk}.lora_up.weight": torch.randn(384, 4) * 0.1, f"{lk}.lora_down.weight": torch.randn(4, 128) * 0.1},
              os.path.join(d, "loras", "tiny_lora.safetensors"))
    return d


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    srv = ComfyServer(models, workdir=str(tmp_path_factory.mktemp("comfy")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


def graph(ckpt=LARGE, size=128, steps=3, batch=2, prompts=2, seed=7, workflow="sd35_large_fp8_api.json",
          prefix="e2e"):
    # the settings Calibrate feeds KSampler and the latent as plain values: tests change one side or drop Calibrate
    wf = inline_settings(load_workflow(os.path.join(WF_DIR, "api", workflow)))
    return adapt(wf, ckpt_name=ckpt, tiny_clip=TINY_CLIP, width=size, height=size, batch=batch, steps=steps,
                 calib_prompts=prompts, seed=seed, prefix=prefix)


def add_save_latent(g, prefix):
    ks = next(k for k, v in g.items() if v["class_type"] == "KSampler")
    g["90"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/{prefix}"}}
    return g


def saved_latent(server, entry):
    for out in entry["outputs"].values():
        for lat in out.get("latents", []):
            p = os.path.join(server.output_dir, lat["subfolder"], lat["filename"])
            return load_file(p)["latent_tensor"].float()
    raise AssertionError("no latent saved")


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_object_info_lists_the_nodes_with_stable_inputs(object_info):
    expect = {
        "SD35FP8CheckpointLoader": ["ckpt_name", "weight_scaling"],
        "SD35FP8Calibrate": ["model", "clip", "prompts", "steps", "cfg", "sampler_name", "scheduler", "width",
                             "height", "seed", "method", "percentile"],
        "SD35FP8Autocast": ["model", "enabled", "fp8_format", "amax_history_len", "margin", "backend"],
        "SD35FP8SaveCheckpoint": ["model", "filename", "overwrite"],
        "SD35FP8PromptBatch": ["clip", "prompts", "negative", "seeds", "seed", "width", "height"],
    }
    for node, inputs in expect.items():
        assert node in object_info, f"{node} missing: the pack failed to import (see the server log)"
        order = object_info[node].get("input_order", {}).get("required") or list(object_info[node]["input"]["required"])
        assert order == inputs
    # appended later as optional inputs: old API-format prompts without them stay valid
    assert list(object_info["SD35FP8Autocast"]["input"]["optional"]) == ["compile", "attention", "cuda_graphs",
                                                                         "scaling"]
    assert object_info["SD35FP8Autocast"]["input"]["required"]["backend"][1]["options"] == ["auto", "torch",
                                                                                  "transformer_engine"]
    # options are only ever appended: saved workflows keep their choice
    assert object_info["SD35FP8Autocast"]["input"]["optional"]["attention"][1]["options"] == [
        "auto", "cudnn", "flash", "efficient", "math", "fp8"]
    assert object_info["SD35FP8CheckpointLoader"]["output"] == ["MODEL", "CLIP", "VAE", "STRING"]
    # outputs only ever appended: saved links to MODEL and report keep their slots; the settings calibrated for
    # follow, typed as KSampler's and the latent's inputs so they connect to them
    cal_out = object_info["SD35FP8Calibrate"]["output"]
    assert cal_out[:2] == ["MODEL", "STRING"] and cal_out[2:4] == ["INT", "FLOAT"] and cal_out[6:] == ["INT", "INT"]
    ks = object_info["KSampler"]["input"]["required"]
    assert cal_out[4] == ks["sampler_name"][0] and cal_out[5] == ks["scheduler"][0]
    assert object_info["SD35FP8PromptBatch"]["output"] == ["CONDITIONING", "CONDITIONING", "LATENT", "NOISE", "STRING"]
    assert list(object_info["SD35FP8SaveCheckpoint"]["input"]["optional"]) == ["clip", "vae"]
    assert object_info["SD35FP8SaveCheckpoint"]["output_node"] is True
    # a calibration seed that the frontend randomizes after each queue would re-calibrate every run
    assert object_info["SD35FP8Calibrate"]["input"]["required"]["seed"][1]["control_after_generate"] is False
    opts = object_info["SD35FP8CheckpointLoader"]["input"]["required"]["ckpt_name"][1]["options"]
    assert LARGE in opts and DIFF_ONLY in opts  # checkpoints/ and diffusion_models/


def test_bundled_workflows_validate_against_object_info(object_info):
    files = sorted(glob.glob(os.path.join(WF_DIR, "*.json")) + glob.glob(os.path.join(WF_DIR, "api", "*.json")))
    assert len(files) == 8
    for f in files:
        wf = json.load(open(f))
        errs = validate_api(wf, object_info) if f.endswith("_api.json") else validate_ui(wf, object_info)
        assert errs == [], f"{os.path.basename(f)}: {errs}"
        compare = "compare" in os.path.basename(f)
        if not f.endswith("_api.json"):
            assert {n["type"] for n in wf["nodes"]} >= {"SD35FP8CheckpointLoader", "SD35FP8Calibrate",
                                                         "SD35FP8Autocast", "TripleCLIPLoader", "SaveImage"}
            if compare:
                assert {n["type"] for n in wf["nodes"]} >= {"CheckpointLoaderSimple", "SD35FP8CompareImages"}
        else:
            lat = next(v for v in inline_settings(wf).values() if v["class_type"] == "EmptySD3LatentImage")["inputs"]
            assert (lat["width"], lat["height"], lat["batch_size"]) == (1024, 1024, 1 if compare else 4)


def test_only_ui_workflows_are_offered_as_templates(server):
    listed = server.get("/workflow_templates")
    pack, ours = next((k, v) for k, v in listed.items() if "SD35" in k.upper())
    # named for what they do: the template browser shows the file name as title and description
    assert sorted(ours) == sorted(TEMPLATES.values())
    for name in ours:  # the template browser's thumbnails: a JPEG of the same name
        r = requests.get(f"{server.base}/api/workflow_templates/{pack}/{name}.jpg")
        assert r.status_code == 200 and r.content[:3] == b"\xff\xd8\xff", name


def test_validator_catches_broken_workflows(object_info):
    wf = json.load(open(os.path.join(WF_DIR, "api", "sd35_large_fp8_api.json")))
    bad = json.loads(json.dumps(wf))
    bad["3"]["class_type"] = "SD35FP8Calibrated"
    bad["4"]["inputs"]["fp8_format"] = "E5M2"
    bad["8"]["inputs"]["steps"] = 0
    bad["9"]["inputs"]["vae"] = ["1", 0]  # MODEL into a VAE input
    errs = " | ".join(validate_api(bad, object_info))
    assert "unknown node type 'SD35FP8Calibrated'" in errs and "E5M2" in errs and "outside" in errs
    assert "expects VAE" in errs
    ui = json.load(open(bundled_ui_path("large")))
    ui["nodes"][3]["widgets_values"] = ui["nodes"][3]["widgets_values"][:-1]
    assert validate_ui(ui, object_info)


def test_batch_through_bundled_workflow(server):
    entry = server.run(graph(batch=3, prefix="batch"))
    files = server.output_images(entry)
    assert len(files) == 3
    for f in files:
        im = np.asarray(Image.open(f))
        assert im.shape == (128, 128, 3) and im.std() > 0
    report = next(o["text"] for o in entry["outputs"].values() if "text" in o)
    text = "\n".join(report)
    assert re.search(r"calibrated with method=max over 2 prompt\(s\) x 3 steps", text)
    assert "FP8 layers: 17" in text and "kept context_embedder" in text
    assert re.search(r"calibrated input scales for 17 layers", text)
    # per-channel statistics: the massive-activation line, whatever this random model has
    assert re.search(r"input channels: none 20x or more|input channels 20x or more above .* in \d+ of 17 FP8 layers",
                     text), text
    log = server.log_text()  # the tiny files use the official layout: ComfyUI finds every key it expects
    for complaint in ("unet missing", "unet unexpected", "Missing VAE keys", "left over keys in diffusion model"):
        assert complaint not in log, complaint


def test_sampling_outside_the_calibrated_settings_is_named_once(server):
    """Calibrate at 128², 3 steps, euler/sgm_uniform, cfg 4.5; sample at 64², 4 steps, dpmpp_2m/karras, cfg 7: one
    log line names all five and says what to do. The same settings as calibrated say nothing."""
    def said():
        return [line for line in server.log_text().splitlines() if "settings the calibration did not cover" in line]
    before = len(said())
    server.run(graph(seed=21, prefix="match"))  # the adapted workflow gives both nodes the same values
    assert len(said()) == before
    g = graph(seed=22, prefix="mismatch")
    for v in g.values():
        if v["class_type"] == "KSampler":
            v["inputs"].update(steps=4, cfg=7.0, sampler_name="dpmpp_2m", scheduler="karras")
        if v["class_type"] == "EmptySD3LatentImage":
            v["inputs"].update(width=64, height=64)
    server.run(g)
    line = said()[-1]
    for part in ("size 64x64 (calibrated at 128x128)", "4 steps (calibrated with 3)", "cfg 7 (calibrated with 4.5)",
                 "sampler dpmpp_2m (calibrated with euler)", "give SD35FP8Calibrate the same"):
        assert part in line, (part, line)
    g2 = graph(seed=23, prefix="sched")
    for v in g2.values():
        if v["class_type"] == "KSampler":
            v["inputs"]["scheduler"] = "karras"
    server.run(g2)
    assert said()[-1].endswith("(the bundled workflows share one set of values)")
    assert "a schedule other than sgm_uniform's" in said()[-1] and "steps (calibrated" not in said()[-1]
    server.run(g)  # the same case again: no second line
    assert len(said()) == before + 2


def test_bundled_graph_feeds_calibrate_settings_to_the_sampler(server):
    """The bundled API workflow as shipped: KSampler's steps/cfg/sampler/scheduler and the latent's size are links
    from SD35FP8Calibrate. Changing them on Calibrate alone changes what is sampled, and nothing is reported as
    uncovered."""
    def said():
        return [line for line in server.log_text().splitlines() if "settings the calibration did not cover" in line]
    g = adapt(load_workflow(os.path.join(WF_DIR, "api", "sd35_large_fp8_api.json")), ckpt_name=LARGE,
              tiny_clip=TINY_CLIP, batch=1, calib_prompts=1, seed=3, prefix="linked")
    ks = next(k for k, v in g.items() if v["class_type"] == "KSampler")
    cal = next(k for k, v in g.items() if v["class_type"] == "SD35FP8Calibrate")
    lat = next(k for k, v in g.items() if v["class_type"] == "EmptySD3LatentImage")
    assert all(g[ks]["inputs"][f] == [cal, i] for i, f in enumerate(("steps", "cfg", "sampler_name", "scheduler"), 2))
    assert g[lat]["inputs"]["width"] == [cal, 6] and g[lat]["inputs"]["height"] == [cal, 7]
    g[cal]["inputs"].update(steps=4, cfg=3.0, sampler_name="dpmpp_2m", scheduler="simple", width=96, height=64)
    before = len(said())
    entry = server.run(g)
    steps = [m["data"]["max"] for m in server.messages if m["type"] == "progress" and str(m["data"]["node"]) == ks]
    assert steps and set(steps) == {4}, steps
    img = next(i for out in entry["outputs"].values() for i in out.get("images", []))
    assert Image.open(os.path.join(server.output_dir, img["subfolder"], img["filename"])).size == (96, 64)
    assert len(said()) == before


def test_calibration_shows_a_progress_bar(server):
    server.run(graph(steps=3, prompts=2, seed=11, prefix="progress", size=64))
    prog = [m["data"] for m in server.messages if m["type"] == "progress" and str(m["data"].get("node")) == "3"]
    assert prog, "no progress messages from SD35FP8Calibrate"
    # each prompt: its encoding (one step, shown from the start) and its 3 sampling steps
    assert prog[-1]["max"] == 2 * (1 + 3) and prog[-1]["value"] == 2 * (1 + 3)
    values = [p["value"] for p in prog]
    assert values == sorted(values)  # newer ComfyUI throttles updates, so not every step is sent


def test_requeue_with_new_seed_reuses_quantized_and_calibrated_model(server):
    g1 = graph(seed=1, prefix="cache")
    server.run(g1)
    n_cal = server.log_text().count("sd35fp8: calibration done")
    n_load = server.log_text().count("sd35fp8: loaded ")
    g2 = graph(seed=2, prefix="cache")
    entry = server.run(g2)
    cached = cached_nodes(entry)
    assert {"1", "3", "4"} <= cached, cached  # loader, calibrate, autocast
    assert "8" not in cached                  # the KSampler ran again
    assert server.log_text().count("sd35fp8: calibration done") == n_cal
    assert server.log_text().count("sd35fp8: loaded ") == n_load
    assert len(server.output_images(entry)) == 2


def test_fp8_output_stays_close_to_stock_comfyui(server):
    """Same seed: stock CheckpointLoaderSimple (full precision) vs our calibrated FP8 vs weight-only."""
    base = add_save_latent(graph(seed=5, prefix="fid"), "stock")
    stock = json.loads(json.dumps(base))
    stock["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    stock["8"]["inputs"]["model"] = ["1", 0]
    del stock["3"], stock["4"]
    ref = saved_latent(server, server.run(stock))
    fp8 = saved_latent(server, server.run(add_save_latent(graph(seed=5, prefix="fid"), "fp8")))
    wo = json.loads(json.dumps(add_save_latent(graph(seed=5, prefix="fid"), "wo")))
    wo["4"]["inputs"]["enabled"] = False
    weight_only = saved_latent(server, server.run(wo))
    e_fp8, e_wo = rel(fp8, ref), rel(weight_only, ref)
    print(f"final-latent relative error vs stock: fp8 {e_fp8:.4f}, weight-only {e_wo:.4f}")
    assert torch.isfinite(fp8).all()
    assert 0 < e_wo < 0.05, e_wo
    assert e_wo < e_fp8 < 0.01, (e_fp8, e_wo)  # FP8 activations add error (so FP8 really ran), bounded


def test_medium_per_channel_percentile(server):
    g = graph(ckpt=MEDIUM, workflow="sd35_medium_fp8_api.json", prefix="medium")
    g["1"]["inputs"]["weight_scaling"] = "per_channel"
    g["3"]["inputs"]["method"] = "percentile"
    g["3"]["inputs"]["percentile"] = 99.9
    entry = server.run(g)
    assert len(server.output_images(entry)) == 2
    text = "\n".join(next(o["text"] for o in entry["outputs"].values() if "text" in o))
    assert "method=percentile (99.9th percentile)" in text and "per_channel" in text
    assert "Medium-type (MMDiT-X)" in server.log_text()


def test_turbo_workflow_and_diffusion_models_folder(server):
    g = graph(ckpt=DIFF_ONLY, workflow="sd35_large_turbo_fp8_api.json", prefix="turbo")
    g["9"]["inputs"]["vae"] = ["50", 2]  # the unet-only file has no VAE: take it from a checkpoint
    g["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    # and the loader's INT8 option (adaLN and MLP: the MLP runs W8A8 after calibration), through the server (its
    # combo accepts it; the info says what it did)
    g["1"]["inputs"]["weight_scaling"] = "per_tensor_int8_mlp"
    g["51"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}
    entry = server.run(g)
    assert len(server.output_images(entry)) == 2
    texts = [t for o in entry["outputs"].values() for t in o.get("text", [])]
    assert any("adaLN layers with INT8 per-channel weights" in t and "MLP layers with INT8 per-channel weights (W8A8)"
               in t for t in texts), texts


def test_all_in_one_file_provides_clip(server):
    g = graph(ckpt=AIO, prefix="aio")
    del g["2"]
    for node in g.values():
        for k, v in node["inputs"].items():
            if v == ["2", 0]:
                node["inputs"][k] = ["1", 1]
    entry = server.run(g)
    assert len(server.output_images(entry)) == 2


@pytest.mark.parametrize("ckpt,message", [
    ("sdxl_like.safetensors", "SDXL"),
    ("truncated_sd3.5.safetensors", "truncated"),
])
def test_wrong_or_damaged_files_fail_clearly_and_server_keeps_serving(server, ckpt, message):
    with pytest.raises(ComfyError, match=message):
        server.run(graph(ckpt=ckpt, prefix="bad"))
    assert "SD35FP8CheckpointLoader" in server.get("/object_info/SD35FP8CheckpointLoader")
    assert len(server.output_images(server.run(graph(prefix="after-bad")))) == 2


def test_missing_file_is_rejected_with_its_name(server):
    # Newer ComfyUI rejects an unknown combo value at /prompt; 0.3.75 does not validate V3 combos and
    # our loader's own error names the file at execution. Either way: a clear error, server serving.
    with pytest.raises(ComfyError, match="not in list|not found|is not one of its options") as e:
        server.run(graph(ckpt="no_such_model.safetensors", prefix="missing"))
    assert "no_such_model.safetensors" in str(e.value) + json.dumps(e.value.payload)
    assert server.get("/system_stats")["system"]


@pytest.mark.parametrize("node,field,value,message", [
    ("SD35FP8Calibrate", "sampler_name", "euler_typo", "SD35FP8Calibrate: sampler_name 'euler_typo' is not one of"),
    ("SD35FP8Calibrate", "scheduler", "sgm", "SD35FP8Calibrate: scheduler 'sgm' is not one of"),
    ("SD35FP8Calibrate", "method", "median", "SD35FP8Calibrate: method 'median' is not one of"),
    ("SD35FP8Calibrate", "cfg", float("nan"), "SD35FP8Calibrate: cfg must be a finite number"),
    ("SD35FP8Calibrate", "cfg", 31.0, "SD35FP8Calibrate: cfg = 31.0 is outside 0.0..30.0"),
    ("SD35FP8Autocast", "scaling", "sometimes", "SD35FP8Autocast: scaling 'sometimes' is not one of"),
    ("SD35FP8Autocast", "attention", "flash3", "SD35FP8Autocast: attention 'flash3' is not one of"),
    ("SD35FP8Autocast", "fp8_format", "E5M2", "SD35FP8Autocast: fp8_format 'E5M2' is not one of"),
    ("SD35FP8CheckpointLoader", "weight_scaling", "per_row", "weight_scaling 'per_row' is not one of"),
    ("SD35FP8Calibrate", "prompts", "a cat\n" * 1001, "SD35FP8Calibrate: prompts: 1001 calibration prompts"),
])
def test_unknown_options_and_non_finite_numbers_are_refused_at_queue_time(server, node, field, value, message):
    """ComfyUI 0.3.75 checks no V3 combo and lets NaN through its range checks: an unknown sampler calibrated with
    euler/simple and recorded the unknown name. /prompt now refuses them, naming node and field; nothing runs."""
    g = graph(prefix="invalid")
    nid = next(k for k, v in g.items() if v["class_type"] == node)
    g[nid]["inputs"][field] = value
    before = len(server.get("/history"))
    with pytest.raises(ComfyError, match=r"HTTP 400") as e:
        server.queue(g)
    errs = e.value.payload["node_errors"][nid]["errors"]
    assert any(message in x["details"] for x in errs), errs
    assert len(server.get("/history")) == before and server.get("/queue")["queue_pending"] == []


def test_save_names_are_checked_at_queue_time(server):
    g = graph(prefix="badname")
    for k in [k for k, v in g.items() if v["class_type"] == "SaveImage"]:
        del g[k]  # the save node is the only output: ComfyUI queues the valid outputs of a prompt
    g["70"] = {"class_type": "SD35FP8SaveCheckpoint",
               "inputs": {"model": [next(k for k, v in g.items() if v["class_type"] == "SD35FP8Calibrate"), 0],
                          "filename": "two\nlines", "overwrite": False}}
    with pytest.raises(ComfyError, match=r"HTTP 400.*control characters"):
        server.queue(g)


def test_an_invalid_sampling_half_queues_nothing_not_even_the_calibration(server):
    """The bundled graph's report preview was an output of its own: with an invalid KSampler ComfyUI still queued it
    and calibrated for nothing. The report now shows on the Calibrate node; the image is the graph's only output."""
    g = graph(prefix="halfbad", seed=23, steps=2)
    assert [v["class_type"] for v in g.values() if v["class_type"] in ("SaveImage", "PreviewAny")] == ["SaveImage"]
    ks = next(k for k, v in g.items() if v["class_type"] == "KSampler")
    g[ks]["inputs"]["sampler_name"] = "no_such_sampler"
    n_cal = server.log_text().count("sd35fp8: calibration done")
    with pytest.raises(ComfyError, match=r"HTTP 400"):
        server.queue(g)
    time.sleep(1.0)
    assert server.log_text().count("sd35fp8: calibration done") == n_cal and server.get("/queue")["queue_running"] == []


def test_switching_models_reuses_their_calibrations(server):
    """Alternating two checkpoints re-calibrated at every switch (19 times in 20 prompts): the second visit of a model
    reuses its calibration (the report says so, and from where), the images are the same."""
    def report(entry):
        return "\n".join(t for o in entry["outputs"].values() for t in o.get("text", []))

    a1 = server.run(graph(prefix="switch-a", seed=11))
    server.run(graph(ckpt=MEDIUM, prefix="switch-b", seed=11))
    a2 = server.run(graph(prefix="switch-a2", seed=11))  # the loader changed since the last prompt: all re-run
    assert "calibration reused from memory" in report(a2) and "no sampling" in report(a2), report(a2)
    imgs = [np.asarray(Image.open(p)) for e in (a1, a2) for p in server.output_images(e)]
    assert all(np.array_equal(x, y) for x, y in zip(imgs[:2], imgs[2:]))
    assert os.listdir(os.path.join(server.workdir, "user", "sd35fp8", "calibrations"))


def test_nan_during_sampling_is_a_clear_error(server):
    with pytest.raises(ComfyError, match="NaN/Inf"):
        server.run(graph(ckpt="tiny_sd3.5_overflow.safetensors", prefix="nan"))
    assert server.get("/queue")["queue_running"] == []


def as_ksampler_advanced(g):
    """Same sampling as the KSampler node, through KSamplerAdvanced: ComfyUI re-executes it (no cache hit)
    on the same, cached, model object."""
    k = g["8"]["inputs"]
    g["8"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": k["model"], "add_noise": "enable", "noise_seed": k["seed"], "steps": k["steps"], "cfg": k["cfg"],
        "sampler_name": k["sampler_name"], "scheduler": k["scheduler"], "positive": k["positive"],
        "negative": k["negative"], "latent_image": k["latent_image"], "start_at_step": 0, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    return g


@pytest.mark.parametrize("where", ["before_calibrate", "after_autocast"])
def test_lora_is_merged_into_fp8_layers_and_unpatched_cleanly(server, where):
    """Stock LoraLoaderModelOnly on our MODEL: ComfyUI merges the LoRA into the FP8 weights (our
    convert_weight/set_weight hooks); the next run without it is bit-identical to before."""
    ref = saved_latent(server, server.run(add_save_latent(graph(seed=9, prefix=f"pre-lora-{where}"), f"pl-{where}")))
    g = add_save_latent(graph(seed=9, prefix="lora"), f"lora-{where}")
    src, dst = (["1", 0], "3") if where == "before_calibrate" else (["4", 0], "8")
    g["60"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": src, "lora_name": "tiny_lora.safetensors", "strength_model": 1.0}}
    g[dst]["inputs"]["model"] = ["60", 0]
    with_lora = saved_latent(server, server.run(g))
    assert torch.isfinite(with_lora).all() and not torch.equal(with_lora, ref)
    # the shared (cached) FP8 model was restored: sampling it again gives the same latent
    entry = server.run(as_ksampler_advanced(add_save_latent(graph(seed=9, prefix="post-lora"), f"po-{where}")))
    assert "8" not in cached_nodes(entry) and "1" in cached_nodes(entry)
    assert torch.equal(saved_latent(server, entry), ref)


def test_saved_fp8_file_reloads_without_calibration_and_loads_in_stock_unetloader(server):
    name = "e2e_saved/tiny_large_fp8"
    g = add_save_latent(graph(seed=21, prefix="save"), "saved-src")
    g["70"] = {"class_type": "SD35FP8SaveCheckpoint",
               "inputs": {"model": ["3", 0], "filename": name, "overwrite": False}}
    entry = server.run(g)
    ref = saved_latent(server, entry)
    info = "\n".join(entry["outputs"]["70"]["text"])  # shown on the node
    assert "tiny_large_fp8.safetensors" in info and "17 FP8 layers with calibrated input scales" in info
    path = os.path.join(server.models_dir, "diffusion_models", name + ".safetensors")
    assert os.path.isfile(path)
    # our loader: calibrated from the file, no SD35FP8Calibrate node, same latent bit for bit
    r = add_save_latent(graph(seed=21, prefix="reload"), "saved-reload")
    r["1"]["inputs"]["ckpt_name"] = name + ".safetensors"
    r["4"]["inputs"]["model"] = ["1", 0]
    r["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    r["9"]["inputs"]["vae"] = ["50", 2]
    r["11"] = {"class_type": "PreviewAny", "inputs": {"source": ["1", 3]}}  # the loader's info
    del r["3"]
    entry = server.run(r)
    assert torch.equal(saved_latent(server, entry), ref)
    assert "no re-calibration needed" in server.log_text()
    # stock ComfyUI's UNETLoader reads the same file and samples it
    st = add_save_latent(graph(seed=21, prefix="stock-fp8"), "saved-stock")
    st["1"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name + ".safetensors", "weight_dtype": "default"}}
    st["8"]["inputs"]["model"] = ["1", 0]
    st["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    st["9"]["inputs"]["vae"] = ["50", 2]
    del st["3"], st["4"]
    stock = saved_latent(server, server.run(st))
    assert torch.isfinite(stock).all() and rel(stock, ref) < 0.05, rel(stock, ref)


def test_raw_fp8_file_loads_and_is_calibrated_by_the_workflow(server):
    g = graph(ckpt="tiny_sd3.5_fp8_scaled.safetensors", prefix="rawfp8")
    g["50"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    g["9"]["inputs"]["vae"] = ["50", 2]  # the file holds only the MMDiT
    entry = server.run(g)
    assert len(server.output_images(entry)) == 2
    assert "no calibrated input_scale for 17 of 17 FP8 layers" in server.log_text()


def test_empty_calibration_set_and_stock_model_are_refused(server):
    g = graph(prefix="empty")
    g["3"]["inputs"]["prompts"] = "  \n\n "
    with pytest.raises(ComfyError, match="prompt list is empty"):
        server.run(g)
    g = graph(prefix="stock")
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": LARGE}}
    g["9"]["inputs"]["vae"] = ["1", 2]
    with pytest.raises(ComfyError, match="no FP8 layers"):
        server.run(g)


def test_transformer_engine_backend_is_refused_at_queue_time_without_te(server):
    """No TransformerEngine in the CI environment: choosing it is rejected by /prompt (before anything
    runs) with how to install it; auto and torch still run."""
    g = graph(prefix="te")
    g["4"]["inputs"]["backend"] = "transformer_engine"
    with pytest.raises(ComfyError, match=r"HTTP 400.*TransformerEngine is not installed.*pip install") as e:
        server.run(g)
    errs = e.value.payload["node_errors"]["4"]["errors"]
    assert "backend" in [x["extra_info"]["input_name"] for x in errs]
    assert all("backend=transformer_engine: TransformerEngine is not installed" in x["details"] for x in errs)
    g["4"]["inputs"]["backend"] = "auto"
    assert len(server.output_images(server.run(g))) == 2


def test_fp8_attention_and_cuda_graph_options_queue_and_fall_back_without_an_fp8_gpu(server):
    """attention=fp8 and cuda_graphs are accepted by /prompt; without an FP8 GPU (CI's CPU) the attention falls
    back to SDPA and nothing is graphed, so the latent is the one attention=auto gives."""
    a = add_save_latent(graph(seed=9, prefix="attn"), "attn_auto")
    b = add_save_latent(graph(seed=9, prefix="attn"), "attn_fp8")
    b["4"]["inputs"]["attention"] = "fp8"
    b["4"]["inputs"]["cuda_graphs"] = True
    la, lb = saved_latent(server, server.run(a)), saved_latent(server, server.run(b))
    assert torch.isfinite(lb).all() and torch.equal(la, lb)


# -- robustness: a soak, concurrent clients, interrupts ------------------------------------------------------------
def _rss_mib(server) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _wait_all(server, pids, timeout=900.0) -> dict:
    """Poll /history until every prompt has finished; {prompt_id: status_str}."""
    deadline, done = time.time() + timeout, {}
    while len(done) < len(pids) and time.time() < deadline:
        hist = server.get("/history?max_items=1000")
        for p in pids:
            st = hist.get(p, {}).get("status", {})
            if st.get("completed") is not None or st.get("status_str") in ("success", "error"):
                done[p] = st.get("status_str")
        time.sleep(0.5)
    assert len(done) == len(pids), f"{len(pids) - len(done)} prompt(s) did not finish"
    return done


def test_soak_of_200_prompts_keeps_memory_bounded(server):
    """200 tiny prompts (each its own seed: every one samples) after a warm-up: all succeed, the server's RSS grows
    by less than 64 MiB (a leak of a latent per prompt would be far more over 200 prompts)."""
    def g(seed):
        return graph(prefix="soak", seed=seed, size=64, steps=1, batch=1)

    _wait_all(server, [server.queue(g(1000 + i)) for i in range(10)])  # warm-up: load, calibrate, first sampling
    before = _rss_mib(server)
    pids = [server.queue(g(2000 + i)) for i in range(200)]
    assert set(_wait_all(server, pids).values()) == {"success"}
    grown = _rss_mib(server) - before
    assert grown < 64, f"RSS grew by {grown:.1f} MiB over 200 prompts"


def test_three_concurrent_clients_each_get_their_images(server):
    import threading
    import uuid
    results, errors = {}, []

    def client(n):
        try:
            pids = []
            for i in range(3):
                status, body = server.post("/prompt", {"prompt": graph(prefix=f"client{n}", seed=300 + 10 * n + i,
                                                                       size=64, steps=2, batch=1),
                                                       "client_id": uuid.uuid4().hex})
                assert status == 200, body
                pids.append(body["prompt_id"])
            results[n] = pids
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    pids = [p for ps in results.values() for p in ps]
    assert len(pids) == 9 and set(_wait_all(server, pids).values()) == {"success"}
    hist = server.get("/history?max_items=1000")
    for p in pids:
        assert len(server.output_images(hist[p])) == 1


def _interrupt_when(server, g, node_class) -> str:
    """Queue ``g``, interrupt it once the node of ``node_class`` reports progress; returns the prompt's status."""
    nid = next(k for k, v in g.items() if v["class_type"] == node_class)
    ws = server.connect()
    try:
        pid = server.queue(g)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                raw = ws.recv()
            except Exception:  # noqa: BLE001 - a websocket timeout: keep waiting
                continue
            if not isinstance(raw, str):
                continue
            msg = json.loads(raw)
            if msg["type"] == "progress" and str(msg["data"].get("node")) == nid and msg["data"]["value"] >= 1:
                server.post("/interrupt", {})
                break
    finally:
        ws.close()
    return _wait_all(server, [pid])[pid]


@pytest.mark.parametrize("where", ["SD35FP8Calibrate", "KSampler"])
def test_interrupt_and_requeue_gives_the_uninterrupted_result(server, where):
    """Interrupting during the calibration or the sampling leaves nothing half-done: requeueing the same graph gives
    the image of an uninterrupted run, bit for bit, and no half calibration was kept."""
    steps = 30 if where == "KSampler" else 3
    g = graph(prefix=f"interrupt-{where}", seed=77, size=128, steps=steps, prompts=2)
    cal = next(k for k, v in g.items() if v["class_type"] == "SD35FP8Calibrate")
    g[cal]["inputs"]["steps"] = 40 if where == "SD35FP8Calibrate" else 5  # settings of its own: no earlier result
    assert _interrupt_when(server, g, where) == "error"  # ComfyUI reports an interrupted prompt as not a success
    again = server.run(g)  # the requeue: everything the interrupt cut short runs again
    server.run(graph(ckpt=MEDIUM, prefix="evict", size=64, steps=1, batch=1))  # ComfyUI's node cache forgets g
    ref = server.run(g)  # a clean, uninterrupted run (its calibration reused: the requeue's was kept)
    a, b = (np.asarray(Image.open(server.output_images(e)[0])) for e in (again, ref))
    assert np.array_equal(a, b)
