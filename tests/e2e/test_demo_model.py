"""The embedded demo model (demo/sd3.5_demo.safetensors, trained by scripts/train_demo.py), the A/B compare
workflow and the fidelity protocol, through a real ComfyUI server with the pack (CPU)."""
import json
import os
import subprocess

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import demo_scenes
import tiny_sd35
from comfy_harness import REPO, ComfyError, ComfyServer, comfy_python
from run_batch import (DEMO_CKPT, DEMO_PATH, DEMO_PROMPT, DEMO_SIZE, DEMO_STEPS, TINY_CLIP, adapt,
                       demo_calibration_prompts, load_workflow, make_demo_models)
from train_demo import tensors_sha256

pytestmark = pytest.mark.comfy
WF = os.path.join(REPO, "workflows", "api")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    models = str(tmp_path_factory.mktemp("demo-models"))
    make_demo_models(models)
    srv = ComfyServer(models, workdir=str(tmp_path_factory.mktemp("demo")))
    srv.start()
    yield srv
    srv.stop()


def demo_graph(workflow: str, prompt: str, seed: int = 1, batch: int = 1) -> dict:
    return adapt(load_workflow(os.path.join(WF, workflow)), ckpt_name=DEMO_CKPT, tiny_clip=TINY_CLIP,
                 width=DEMO_SIZE, height=DEMO_SIZE, batch=batch, steps=DEMO_STEPS, seed=seed, prompt=prompt,
                 calib_text=demo_calibration_prompts())


def test_the_committed_model_is_small_and_names_its_text_encoder():
    assert os.path.getsize(DEMO_PATH) <= 25e6
    with safe_open(DEMO_PATH, "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["sd35fp8.demo"] == "1" and any(k.startswith("first_stage_model.taesd_decoder.") for k in keys)
    assert "model.diffusion_model.joint_blocks.2.context_block.attn.qkv.weight" in keys
    # the random CLIP-L this torch draws is the one the model was trained with
    clip = os.path.join(REPO, ".cache", "test-models", TINY_CLIP)
    tiny_sd35.write_clip_l(clip)
    assert tensors_sha256(clip) == meta["sd35fp8.demo.clip_l_tensors_sha256"]


def test_held_out_prompts_are_followed_through_the_bundled_workflow(server):
    """Prompts never seen in training, through the bundled Large workflow (calibrated FP8): the dominant colour and
    the position of what is drawn are the prompt's for most of them."""
    _, held = demo_scenes.split()
    judged = []
    for i, scene in enumerate(held[::2]):
        prompt = demo_scenes.prompt_of(*scene)
        entry = server.run(demo_graph("sd35_large_fp8_api.json", prompt, seed=100 + i))
        [f] = server.output_images(entry)
        img = np.asarray(Image.open(f).convert("RGB"))
        assert img.shape == (DEMO_SIZE, DEMO_SIZE, 3)
        judged.append((prompt, demo_scenes.judge(img, prompt)))
    colour = sum(j["colour_ok"] for _, j in judged) / len(judged)
    position = sum(j["position_ok"] for _, j in judged) / len(judged)
    assert colour >= 0.7 and position >= 0.7, json.dumps(judged, indent=1)


def test_compare_workflow_renders_stock_bf16_and_fp8_and_reports_the_difference(server):
    entry = server.run(demo_graph("sd35_large_compare_api.json", DEMO_PROMPT, seed=3))
    assert entry["status"]["status_str"] == "success"
    files = server.output_images(entry)
    by = {k: [f for f in files if f"/compare/{k}_" in f] for k in ("stock_bf16", "fp8", "difference")}
    assert all(len(v) == 1 for v in by.values()), files
    stock, fp8, diff = (np.asarray(Image.open(by[k][0]).convert("RGB")).astype(np.float64) / 255
                        for k in ("stock_bf16", "fp8", "difference"))
    assert stock.shape == fp8.shape == diff.shape == (DEMO_SIZE, DEMO_SIZE, 3)
    assert demo_scenes.judge(stock, DEMO_PROMPT)["colour_ok"] and demo_scenes.judge(fp8, DEMO_PROMPT)["colour_ok"]
    report = "\n".join(t for o in entry["outputs"].values() for t in o.get("text", []))
    assert "image_a vs image_b: 1 image pair(s)" in report and "heat map: white = " in report
    node_psnr = float(report.split("mean: PSNR ")[1].split(" dB")[0])
    mse = float(np.mean((stock - fp8) ** 2))
    assert mse > 0 and abs(node_psnr - 10 * np.log10(1 / mse)) < 1.0  # the saved PNGs are 8-bit roundings
    assert diff.max() > 0.9  # the largest difference is drawn white


def test_compare_node_names_a_size_mismatch(server):
    g = demo_graph("sd35_large_compare_api.json", DEMO_PROMPT, seed=3)
    ks = next(k for k, v in g.items() if v["class_type"] == "KSampler" and v["inputs"]["model"][0] != "4")
    g["99"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g[ks]["inputs"]["latent_image"] = ["99", 0]
    with pytest.raises(ComfyError, match=r"SD35FP8CompareImages: the images differ in size: \(64, 64\) vs "
                                         r"\(128, 128\) \(compare images rendered at the same width and height\)"):
        server.wait(server.queue(g))
    assert server.get("/system_stats")  # the server keeps serving


def test_fidelity_protocol_writes_its_report_and_grid(tmp_path):
    out = tmp_path / "fid"
    p = subprocess.run([comfy_python(), os.path.join(REPO, "scripts", "fidelity.py"), "--max-prompts", "2",
                        "--seeds", "1", "--formats", "fastest", "--out", str(out)],
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode in (0, 1), p.stderr[-3000:] + p.stdout[-2000:]
    rep = json.load(open(out / "report.json"))
    names = [r["configuration"] for r in rep["table"]]
    assert names == ["stock BF16", "stock fp8_e4m3fn", "stock fp8_e4m3fn_fast", "ours fastest"]
    ours = rep["table"][-1]
    assert ours["psnr_db"] > 20 and 0 < ours["latent_rel_error"] < 0.5 and 0 < ours["ssim"] <= 1
    assert ("target_met" in ours) and (p.returncode == 0) == ours["target_met"]
    md = open(out / "report.md").read()
    assert "| ours fastest |" in md and "PSNR dB (mean)" in md and "LPIPS" in md
    grid = np.asarray(Image.open(out / "grid.png"))
    assert grid.shape == (2 * (DEMO_SIZE + 4) + 4, 4 * (DEMO_SIZE + 4) + 4, 3)


def test_training_is_deterministic(tmp_path):
    """Two short runs of the training script give the same weights and metadata (the committed model is one long run
    of it). Not the same file bytes: safetensors writes its header's metadata in no fixed order."""
    outs = []
    for i in range(2):
        out = tmp_path / f"q{i}.safetensors"
        p = subprocess.run([comfy_python(), os.path.join(REPO, "scripts", "train_demo.py"),
                            "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        with safe_open(str(out), "pt") as f:
            outs.append((tensors_sha256(str(out)), f.metadata()))
    assert outs[0] == outs[1]
    assert outs[0][1]["sd35fp8.demo.train"].startswith("vae_steps=")


def test_the_main_job_draws_what_its_prompt_says(tmp_path):
    """scripts/run_batch.py (what scripts/run.sh runs) with no model given: the demo model, the bundled workflow, a
    batch of 4 through POST /prompt; every image shows the prompt's colour at the prompt's position."""
    prompt = "a green triangle bottom right, black background"
    out = tmp_path / "out"
    p = subprocess.run([comfy_python(), os.path.join(REPO, "scripts", "run_batch.py"), "--prompt", prompt,
                        "--out", str(out)], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    files = sorted(out.glob("*.png"))
    assert len(files) == 4, p.stdout[-2000:]
    for f in files:
        j = demo_scenes.judge(np.asarray(Image.open(f).convert("RGB")), prompt)
        assert j["colour_ok"] and j["position_ok"], (f.name, j)
