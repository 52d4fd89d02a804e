"""The Registry package: `comfy node pack` (comfy-cli from PyPI) on a clean clone ships only what runs, and the zip,
installed as the README says into a fresh ComfyUI's custom_nodes/, loads with no IMPORT FAILED line and serves."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import requests

from comfy_harness import PACK_NAME, REPO, ComfyServer
from test_service import LIMITS, models_dir, png, tiny_workflow

pytestmark = pytest.mark.comfy
RUNTIME = ("__init__.py", "nodes/schemas.py", "nodes/routes.py", "sd35fp8/__init__.py", "service/api.py",
           "workflows/api/sd35_large_fp8_api.json", "workflows/SD3.5 Large FP8 (28 steps, 1024px, batch of 4).json",
           "workflows/SD3.5 Large FP8 (28 steps, 1024px, batch of 4).jpg",
           "web/docs/SD35FP8Calibrate.md", "requirements.txt", "requirements-cluster.txt", "service/cluster.py",
           "service/worker.py", "deploy/entrypoint.sh",
           "pyproject.toml", "LICENSE", "README.md", "CHANGELOG.md", "docs/openapi.json",
           "nodes/calibration_prompts.txt", "scripts/batch.sh", "scripts/sd35_batch.py", "scripts/comfy_harness.py")


@pytest.fixture(scope="module")
def node_zip(tmp_path_factory):
    comfy = os.path.join(os.path.dirname(sys.executable), "comfy")
    if not os.path.exists(comfy):
        pytest.fail("comfy-cli is not installed: scripts/setup_env.sh installs requirements-dev.txt")
    clone = str(tmp_path_factory.mktemp("pack") / "clone")
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
    r = subprocess.run([comfy, "--skip-prompt", "node", "pack"], cwd=clone, capture_output=True, text=True,
                       timeout=300, stdin=subprocess.DEVNULL, env=dict(os.environ, HOME=clone + "-home"))
    assert r.returncode == 0, r.stdout + r.stderr
    return os.path.join(clone, "node.zip")


def test_the_zip_holds_only_what_runs(node_zip):
    names = zipfile.ZipFile(node_zip).namelist()
    missing = [n for n in RUNTIME if n not in names]
    assert not missing, f"runtime files missing from the zip: {missing}"
    dev = [n for n in names if n.split("/")[0] in ("tests", "bench", ".ci", ".schemathesis", ".cache")
           or n in ("requirements-dev.txt", "scripts/run.sh", "scripts/tiny_sd35.py", "scripts/test.sh")]
    assert not dev, f"development files in the zip: {dev[:10]}"
    assert not [n for n in names if n.endswith((".pyc", ".safetensors", ".png"))]
    with zipfile.ZipFile(node_zip) as z:
        assert "torch" not in z.read("requirements.txt").decode().split()
        assert z.read("LICENSE").decode().lstrip().startswith("GNU GENERAL PUBLIC LICENSE")


def test_the_zip_installs_as_documented_and_serves(node_zip, tmp_path_factory):
    """README: `unzip node.zip -d ComfyUI/custom_nodes/ComfyUI-SD35-FP8` into a fresh custom_nodes/."""
    work = str(tmp_path_factory.mktemp("fresh"))
    target = os.path.join(work, "custom_nodes", PACK_NAME)
    os.makedirs(target)
    shutil.unpack_archive(node_zip, target, "zip")
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=tiny_workflow(tmp_path_factory))
    srv = ComfyServer(models_dir(tmp_path_factory), workdir=work, env=env, pack_dir=target)
    srv.start()
    try:
        log = srv.log_text()
        failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and PACK_NAME in line]
        assert not failed and f"custom_nodes/{PACK_NAME}" in log, failed
        info = requests.get(srv.base + "/object_info").json()
        assert {"SD35FP8CheckpointLoader", "SD35FP8Calibrate", "SD35FP8Autocast", "SD35FP8PromptBatch"} <= info.keys()
        assert requests.get(srv.base + "/v1/openapi.json").json()["openapi"].startswith("3.")
        r = requests.post(srv.base + "/v1/txt2img", json={"prompt": "from the zip", "width": 64, "height": 64,
                                                          "steps": 2}, timeout=600)
        assert r.status_code == 200, r.text
        assert png(r.content).shape == (64, 64, 3)
    finally:
        srv.stop()
