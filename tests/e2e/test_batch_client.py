"""The batch client (scripts/sd35_batch.py) against a real ComfyUI server with the pack and the tiny model: a
20-item CSV, resume after the client is killed, bad input refused before anything is queued, quality flags on a
planted black image, the PNG metadata read back."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

import tiny_sd35
from comfy_harness import REPO, ComfyServer
from run_batch import TINY_CKPT, TINY_CLIP, adapt, load_workflow

from service.config import bundled_ui_path
from sd35_batch import Server, auto_per_call, derive_seed

pytestmark = pytest.mark.comfy
CLIENT = os.path.join(REPO, "scripts", "sd35_batch.py")
UI = bundled_ui_path("large")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("models"))
    tiny_sd35.write_checkpoint(os.path.join(d, "checkpoints", TINY_CKPT), variant="large", seed=0)
    cache = os.path.join(REPO, ".cache", "test-models", TINY_CLIP)  # the random CLIP-L: once per machine
    tiny_sd35.write_clip_l(cache)
    os.makedirs(os.path.join(d, "text_encoders"), exist_ok=True)
    os.symlink(cache, os.path.join(d, "text_encoders", TINY_CLIP))
    srv = ComfyServer(d, workdir=str(tmp_path_factory.mktemp("comfy")))
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The bundled Large workflow on the tiny model (CLIPLoader on the random CLIP-L), small and fast."""
    wf = adapt(load_workflow(os.path.join(REPO, "workflows", "api", "sd35_large_fp8_api.json")), ckpt_name=TINY_CKPT,
               tiny_clip=TINY_CLIP, width=128, height=128, batch=1, steps=3, calib_prompts=2)
    p = str(tmp_path_factory.mktemp("wf") / "tiny_api.json")
    with open(p, "w") as f:
        json.dump(wf, f)
    return p, wf


def client(server, items, out, *args, wait=True, workflow=None):
    cmd = [sys.executable, CLIENT, str(items), "--server", server.base, "--workflow", workflow, "--ui-workflow", UI,
           "--out", str(out), *args]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900)


def manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(x) for x in f if x.strip()]


def history_size(server):
    return len(server.get("/history"))


def write_csv(path, rows, header="name,prompt,seed,width,height"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_csv_of_20_items_with_mixed_seeds_and_two_sizes(server, workflow, tmp_path):
    rows = [f"p{i:02d},\"a red circle number {i}, top left\",{'' if i % 2 else 1000 + i},"
            f"{128 if i < 10 else 96},{128 if i < 10 else 160}" for i in range(20)]
    items = write_csv(tmp_path / "items.csv", rows)
    out = tmp_path / "out"
    r = client(server, items, out, "--seed", "77", workflow=workflow[0])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = manifest(out)
    assert [x["name"] for x in recs] == sorted(x["name"] for x in recs) and len(recs) == 20
    for i, rec in enumerate(recs):
        assert rec["status"] == "ok" and rec["files"] == [f"p{i:02d}_1.png"]
        assert rec["seed"] == (derive_seed(77, f"p{i:02d}") if i % 2 else 1000 + i)
        w, h = (128, 128) if i < 10 else (96, 160)
        assert Image.open(out / rec["files"][0]).size == (w, h)
        assert rec["settings"]["width"] == w and rec["settings"]["steps"] == 3
    assert sorted(os.listdir(out)) == sorted([f"p{i:02d}_1.png" for i in range(20)] + ["manifest.jsonl"])
    assert "20/20 items ok" in r.stderr and "images/s" in r.stderr
    # the same command again: nothing to do, nothing queued
    before = history_size(server)
    r2 = client(server, items, out, "--seed", "77", workflow=workflow[0])
    assert r2.returncode == 0 and "20 already done" in r2.stderr
    assert history_size(server) == before


def test_resume_after_the_client_is_killed(server, workflow, tmp_path):
    items = tmp_path / "items.txt"
    items.write_text("# a comment line\n" + "\n".join(f"a blue square, view {i}" for i in range(14)) + "\n")
    out = tmp_path / "out"
    p = client(server, items, out, wait=False, workflow=workflow[0])
    deadline = time.time() + 300
    while time.time() < deadline:
        if os.path.exists(out / "manifest.jsonl") and len(manifest(out)) >= 4:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    first = len(manifest(out))
    assert 4 <= first < 14, "the client was to be killed half-way"
    r = client(server, items, out, workflow=workflow[0])
    assert r.returncode == 0, r.stderr[-3000:]
    recs = manifest(out)
    names = [x["name"] for x in recs]
    assert len(names) == len(set(names)) == 14, "no item twice, none missing"
    assert f"{14 - first} to run" in r.stderr
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert pngs == [f"item-{i:05d}_1.png" for i in range(1, 15)]
    assert not [f for f in os.listdir(out) if f.endswith(".partial")]


def test_a_bad_line_is_reported_with_its_number_before_anything_is_queued(server, workflow, tmp_path):
    items = write_csv(tmp_path / "bad.csv", ["a,a cat,1,128,128", "b,a dog,12x,128,128", "c,a cow,3,100,128",
                                             "a,again,4,128,128"])
    before = history_size(server)
    r = client(server, items, tmp_path / "out", workflow=workflow[0])
    assert r.returncode == 2
    assert "bad.csv: line 3: seed must be a whole number, got '12x'" in r.stderr
    assert "line 4: width 100 is not a multiple of 16" in r.stderr
    assert "line 5: name 'a' is already used on line 2" in r.stderr
    assert "nothing was queued" in r.stderr and history_size(server) == before
    jl = tmp_path / "bad.jsonl"
    jl.write_text('{"prompt": "ok"}\n{"prompt": "x", "colour": "red"}\n{"prompt": \n')
    r = client(server, jl, tmp_path / "out", workflow=workflow[0])
    assert r.returncode == 2 and "line 2: unknown field(s) colour" in r.stderr and "line 3: not JSON" in r.stderr


def test_missing_model_file_and_unmappable_workflow_are_refused(server, workflow, tmp_path):
    items = tmp_path / "items.txt"
    items.write_text("a cat\n")
    wf = json.loads(json.dumps(workflow[1]))
    loader = next(k for k, v in wf.items() if v["class_type"] == "SD35FP8CheckpointLoader")
    wf[loader]["inputs"]["ckpt_name"] = "sd3.5_missing.safetensors"
    p = tmp_path / "missing.json"
    p.write_text(json.dumps(wf))
    before = history_size(server)
    r = client(server, items, tmp_path / "out", workflow=str(p))
    assert r.returncode == 2 and "'sd3.5_missing.safetensors' is not in the server's model folders" in r.stderr
    wf = json.loads(json.dumps(workflow[1]))
    for k in [k for k, v in wf.items() if v["class_type"] == "SaveImage"]:
        del wf[k]
    p.write_text(json.dumps(wf))
    r = client(server, items, tmp_path / "out", workflow=str(p))
    assert r.returncode == 2 and "cannot map the workflow: it lacks a SaveImage node" in r.stderr
    assert history_size(server) == before


def test_a_planted_black_image_is_flagged_and_the_gate_fails(server, workflow, tmp_path):
    """SaveImage fed by a black EmptyImage (the sampler still runs, into a preview): the flag and the gate."""
    wf = json.loads(json.dumps(workflow[1]))
    save = next(k for k, v in wf.items() if v["class_type"] == "SaveImage")
    dec = next(k for k, v in wf.items() if v["class_type"] == "VAEDecode")
    wf["90"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}}
    wf["91"] = {"class_type": "PreviewImage", "inputs": {"images": [dec, 0]}}
    wf[save]["inputs"]["images"] = ["90", 0]
    p = tmp_path / "black.json"
    p.write_text(json.dumps(wf))
    items = tmp_path / "items.txt"
    items.write_text("a cat\na dog\n")
    r = client(server, items, tmp_path / "out", workflow=str(p))
    assert r.returncode == 0, r.stderr[-2000:]
    recs = manifest(tmp_path / "out")
    assert all(x["flags"] == ["black"] for x in recs) and "quality flags: black 2" in r.stderr
    r = client(server, items, tmp_path / "out2", "--fail-on", "black", workflow=str(p))
    assert r.returncode == 3 and "QUALITY GATE FAILED" in r.stderr


def test_pngs_carry_the_prompt_the_ui_workflow_and_the_fp8_information(server, workflow, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"prompt": "a green triangle", "negative": "blurry", "seed": 5, "name": "tri"}) + "\n"
                     + json.dumps({"prompt": "a yellow star", "count": 2}) + "\n")
    out = tmp_path / "out"
    r = client(server, items, out, workflow=workflow[0])
    assert r.returncode == 0, r.stderr[-2000:]
    recs = manifest(out)
    assert recs[1]["files"] == ["item-00002_1.png", "item-00002_2.png"]
    for rec in recs:
        im = Image.open(out / rec["files"][0])
        prompt, ui, info = (json.loads(im.info[k]) for k in ("prompt", "workflow", "sd35fp8"))
        texts = [v["inputs"]["text"] for v in prompt.values() if v["class_type"] == "CLIPTextEncode"]
        assert rec["prompt"] in texts
        ks = next(v for v in prompt.values() if v["class_type"] == "KSampler")
        assert ks["inputs"]["seed"] == rec["seed"]
        ui_nodes = {n["type"]: n for n in ui["nodes"]}
        assert ui_nodes["KSampler"]["widgets_values"][0] == rec["seed"]
        assert rec["prompt"] in [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CLIPTextEncode"]
        assert "links" in ui and len(ui["nodes"]) == 10  # the graph as laid out, for the editor
        assert info["model"] == TINY_CKPT and info["weight_scaling"] == "fastest"
        assert info["calibration"]["prompts"] == 2 and len(info["calibration"]["id"]) == 16
    assert "blurry" in [v["inputs"]["text"] for v in json.loads(Image.open(out / "tri_1.png").info["prompt"]).values()
                        if v["class_type"] == "CLIPTextEncode"]


def _latent(server, entry):
    from safetensors.torch import load_file
    for out in entry["outputs"].values():
        for lat in out.get("latents", []):
            return load_file(os.path.join(server.output_dir, lat["subfolder"], lat["filename"]))["latent_tensor"]
    raise AssertionError("no latent saved")


def test_prompt_batch_node_equals_each_prompt_alone(server, workflow):
    """Three different prompts with their own seeds in one SamplerCustomAdvanced call: each latent equals KSampler's
    for that prompt and seed alone (batch 1), through the pack's calibrated FP8 model."""
    wf = workflow[1]
    k = {c: next(i for i, v in wf.items() if v["class_type"] == c)
         for c in ("SD35FP8Autocast", "CLIPLoader", "KSampler", "CLIPTextEncode", "EmptySD3LatentImage")}
    prompts, seeds = ["a red circle", "a blue square on a long wooden table in a garden", "stars"], [11, 22, 33]
    g = json.loads(json.dumps(wf))
    for n in [n for n, v in g.items() if v["class_type"] in ("KSampler", "CLIPTextEncode", "EmptySD3LatentImage",
                                                               "VAEDecode", "SaveImage")]:
        del g[n]
    auto, clip = [k["SD35FP8Autocast"], 0], [k["CLIPLoader"], 0]
    g.update({
        "pb": {"class_type": "SD35FP8PromptBatch", "inputs": {"clip": clip, "prompts": "\n".join(prompts),
                                                               "negative": "", "seeds": "11, 22, 33", "seed": 0,
                                                               "width": 128, "height": 128}},
        "guide": {"class_type": "CFGGuider", "inputs": {"model": auto, "positive": ["pb", 0], "negative": ["pb", 1],
                                                        "cfg": 4.5}},
        "smp": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sch": {"class_type": "BasicScheduler", "inputs": {"model": auto, "scheduler": "sgm_uniform", "steps": 3,
                                                           "denoise": 1.0}},
        "run": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["pb", 3], "guider": ["guide", 0],
                                                                  "sampler": ["smp", 0], "sigmas": ["sch", 0],
                                                                  "latent_image": ["pb", 2]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "latents/pb"}},
    })
    batched = _latent(server, server.run(g)).float()
    assert batched.shape == (3, 16, 16, 16)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        a = json.loads(json.dumps(wf))
        pos = a[k["KSampler"]]["inputs"]["positive"][0]
        a[pos]["inputs"]["text"] = p
        a[k["KSampler"]]["inputs"]["seed"] = s
        a[k["EmptySD3LatentImage"]]["inputs"]["batch_size"] = 1
        a["save"] = {"class_type": "SaveLatent", "inputs": {"samples": [k["KSampler"], 0],
                                                            "filename_prefix": f"latents/alone{i}"}}
        alone = _latent(server, server.run(a)).float()
        err = float((batched[i:i + 1] - alone).norm() / alone.norm())
        assert err < 1e-3, f"item {i}: batched vs alone rel. error {err:.2e}"
    # a seed count that does not match the prompts is refused at queue time
    with pytest.raises(Exception, match="3 seed"):
        bad = json.loads(json.dumps(g))
        bad["pb"]["inputs"]["seeds"] = "1, 2, 3"
        bad["pb"]["inputs"]["prompts"] = "one\ntwo"
        server.run(bad)


def test_client_batches_items_that_share_settings_into_one_sampler_call(server, workflow, tmp_path):
    rows = [f"b{i},\"a red circle number {i}\",{500 + i},{128 if i < 6 else 96},128" for i in range(8)]
    items = write_csv(tmp_path / "items.csv", rows)
    r1 = client(server, items, tmp_path / "alone", workflow=workflow[0])
    r4 = client(server, items, tmp_path / "batched", "--per-call", "4", workflow=workflow[0])
    assert r1.returncode == 0 and r4.returncode == 0, r4.stderr[-3000:]
    recs = manifest(tmp_path / "batched")
    assert [x.get("batched_with") for x in recs] == [4, 4, 4, 4, 2, 2, 2, 2]  # sizes split the groups
    assert "batched_with" not in manifest(tmp_path / "alone")[0]
    assert auto_per_call(Server(server.base)) == 1  # a CPU server: one prompt per call unless asked
    import numpy as np
    for rec in recs:
        a = np.asarray(Image.open(tmp_path / "alone" / rec["files"][0]), dtype=np.int16)
        im = Image.open(tmp_path / "batched" / rec["files"][0])
        b = np.asarray(im, dtype=np.int16)
        assert a.shape == b.shape and np.abs(a - b).max() <= 3 and np.abs(a - b).mean() < 0.5, rec["name"]
        ui = json.loads(im.info["workflow"])  # this item's own single-prompt graph, for the editor
        assert rec["prompt"] in [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "CLIPTextEncode"]
        assert [n for n in ui["nodes"] if n["type"] == "KSampler"][0]["widgets_values"][0] == rec["seed"]
        assert json.loads(im.info["sd35fp8"])["calibration"]["id"]


def test_a_failed_item_is_retried_and_the_batch_goes_on(server, workflow, tmp_path):
    """The server interrupts the first item while it samples: the client queues it again; the others run."""
    items = write_csv(tmp_path / "items.csv", ["slow,a long one,1,128,128,200", "quick,a short one,2,128,128,3"],
                      header="name,prompt,seed,width,height,steps")
    p = client(server, items, tmp_path / "out", wait=False, workflow=workflow[0])
    interrupted, deadline = False, time.time() + 300
    while not interrupted and time.time() < deadline and p.poll() is None:
        running = server.get("/queue").get("queue_running", [])
        if any((e[3].get("sd35fp8_batch") or {}).get("items") == ["slow"] for e in running):
            time.sleep(0.3)  # inside the sampler
            server.post("/interrupt", {})
            interrupted = True
        time.sleep(0.02)
    out, err = p.communicate(timeout=600)
    assert interrupted and p.returncode == 0, err[-3000:]
    recs = {r["name"]: r for r in manifest(tmp_path / "out")}
    assert recs["slow"]["status"] == "ok" and recs["slow"]["attempts"] == 2 and "retry 1" in err
    assert recs["quick"]["status"] == "ok" and recs["quick"]["attempts"] == 1


def test_bf16_reference_check_records_psnr_and_ssim_and_gates(server, workflow, tmp_path):
    items = tmp_path / "items.txt"
    items.write_text("a cat\na dog\na cow\n")
    r = client(server, items, tmp_path / "out", "--reference-every", "2", "--min-psnr", "200", workflow=workflow[0])
    recs = manifest(tmp_path / "out")
    ref = [x.get("reference") for x in recs]
    assert ref[1] is None and ref[0]["psnr"] > 15 and 0 < ref[0]["ssim"] <= 1 and ref[2]["psnr"] > 15, ref
    assert r.returncode == 3 and "below 200.0 dB" in r.stderr and "vs BF16 reference (2 items)" in r.stderr
    assert all("below_min_psnr" in x["flags"] for x in (recs[0], recs[2]))
