"""The UI workflows as a person opens them: loaded into ComfyUI's real frontend in headless Chromium.

Checks that every node type is known to the frontend, no node is flagged, no "missing nodes" dialog,
no page error, and that the frontend's own graph-to-prompt conversion of each UI workflow yields the
bundled API workflow: widget order and values line up with the node definitions.
Needs Debian's chromium and playwright-core (installed by scripts/setup_env.sh --browser).
"""
import json
import os
import shutil
import subprocess

import pytest

import tiny_sd35
from comfy_harness import REPO, ComfyServer

from service.config import BUNDLED, TEMPLATES, TOOLS, bundled_ui_path

PW = os.path.join(REPO, ".cache", "node", "node_modules", "playwright-core")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = [pytest.mark.comfy, pytest.mark.skipif(
    not (shutil.which("node") and os.path.isdir(PW) and os.path.exists(CHROMIUM)),
    reason="needs node, chromium and playwright-core (run scripts/setup_env.sh --browser)")]

WORKFLOWS = list(BUNDLED) + list(TOOLS)  # large, large_turbo, medium; compare


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # files under the official names, so the frontend's missing-model markers stay off: tiny
    # checkpoints, and text-encoder placeholders (listed by the server, never loaded by this test)
    models = str(tmp_path_factory.mktemp("fe-models"))
    for ck in ("sd3.5_large", "sd3.5_large_turbo", "sd3.5_medium"):
        tiny_sd35.write_checkpoint(os.path.join(models, "checkpoints", f"{ck}.safetensors"))
    os.makedirs(os.path.join(models, "text_encoders"))
    for te in ("clip_l", "clip_g", "t5xxl_fp16"):
        open(os.path.join(models, "text_encoders", f"{te}.safetensors"), "wb").close()
    srv = ComfyServer(models, workdir=str(tmp_path_factory.mktemp("fe")))
    srv.start()
    yield srv
    srv.stop()


@pytest.mark.parametrize("name", WORKFLOWS)
def test_ui_workflow_loads_in_the_real_frontend(server, name, tmp_path):
    env = dict(os.environ, PLAYWRIGHT_CORE=PW, CHROMIUM=CHROMIUM)
    out = subprocess.run(["node", os.path.join(REPO, "tests", "support", "frontend_check.cjs"), server.base,
                          bundled_ui_path(name), str(tmp_path / f"{name}.png")],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["errors"] == [] and r["missing"] == []
    ui = json.load(open(bundled_ui_path(name)))
    assert len(r["nodes"]) == len(ui["nodes"]) == (10 if name in BUNDLED else 17)
    assert not any(n["has_errors"] for n in r["nodes"])
    cal = next(n for n in r["nodes"] if n["type"] == "SD35FP8Calibrate")
    assert "control_after_generate" not in cal["widgets"]  # calibration seed is never randomized
    api = json.load(open(os.path.join(REPO, "workflows", "api", f"{({**BUNDLED, **TOOLS})[name]}_api.json")))
    got = r["prompt"]
    assert set(got) == set(api)
    for nid, node in api.items():
        assert got[nid]["class_type"] == node["class_type"]
        g_inputs = {k: v for k, v in got[nid]["inputs"].items()
                    if not (node["class_type"] == "PreviewAny" and k == "preview")}
        assert g_inputs == node["inputs"], nid
    assert os.path.getsize(tmp_path / f"{name}.png") > 10_000
    boxes = {n["id"]: n["box"] for n in r["nodes"]}
    overlaps = [(a, b) for a in boxes for b in boxes if a < b and boxes[a][0] < boxes[b][2] and boxes[b][0] <
                boxes[a][2] and boxes[a][1] < boxes[b][3] and boxes[b][1] < boxes[a][3]]
    assert not overlaps, f"{name}: nodes overlap in the editor: {overlaps} ({boxes})"
    if os.environ.get("SD35FP8_SCREENSHOTS"):  # scripts/make_thumbnails.py makes the thumbnails from these
        shutil.copy(tmp_path / f"{name}.png", os.path.join(os.environ["SD35FP8_SCREENSHOTS"], f"{TEMPLATES[name]}.png"))


def test_a_workflow_saved_with_an_old_option_keeps_it(server, tmp_path):
    """Before 0.3 the loader's options were the formats' names (per_tensor_int8_mlp, ...); now they are named for
    what they give. A workflow saved then loads with its choice intact, and the server accepts it."""
    ui = json.load(open(bundled_ui_path("large")))
    loader = next(n for n in ui["nodes"] if n["type"] == "SD35FP8CheckpointLoader")
    loader["widgets_values"][1] = "per_tensor_int8_mlp"
    old = tmp_path / "old.json"
    old.write_text(json.dumps(ui))
    env = dict(os.environ, PLAYWRIGHT_CORE=PW, CHROMIUM=CHROMIUM)
    out = subprocess.run(["node", os.path.join(REPO, "tests", "support", "frontend_check.cjs"), server.base, str(old)],
                         capture_output=True, text=True, timeout=240, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["prompt"]["1"]["inputs"]["weight_scaling"] == "per_tensor_int8_mlp"
    assert not any(n["has_errors"] for n in r["nodes"]) and r["errors"] == []
    info = server.get("/object_info/SD35FP8CheckpointLoader")["SD35FP8CheckpointLoader"]
    assert info["input"]["required"]["weight_scaling"][1]["options"] == [
        "fastest", "finer weights (per channel)", "less error (INT8 adaLN)", "most faithful (INT8 MLP)"]
