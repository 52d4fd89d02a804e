"""The generation service (nodes/routes.py) on a real ComfyUI server with the pack and the tiny model: an A1111
client library and A1111-style scripts, concurrent clients, jobs with cancel and webhooks, readiness, bad input,
auth, Prometheus metrics and a schema-driven fuzzer from docs/openapi.json."""
import base64
import http.server
import io
import json
import os
import random
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

import tiny_sd35
from comfy_harness import REPO, ComfyServer
from run_batch import TINY_CKPT, TINY_CLIP, adapt, load_workflow

from service.config import bundled_ui_path

pytestmark = pytest.mark.comfy
OPENAPI = os.path.join(REPO, "docs", "openapi.json")
LIMITS = {"SD35FP8_API_MAX_WIDTH": "256", "SD35FP8_API_MAX_HEIGHT": "256", "SD35FP8_API_MAX_STEPS": "60",
          "SD35FP8_API_MAX_IMAGES": "4", "SD35FP8_API_REQUEST_TIMEOUT": "300", "SD35FP8_API_WEBHOOK_RETRIES": "2",
          "SD35FP8_API_WEBHOOK_BACKOFF": "0.2", "SD35FP8_API_WEBHOOK_TIMEOUT": "3", "SD35FP8_API_MAX_QUEUE": "24"}


def models_dir(tmp_path_factory, with_ckpt=True) -> str:
    d = str(tmp_path_factory.mktemp("models"))
    if with_ckpt:
        tiny_sd35.write_checkpoint(os.path.join(d, "checkpoints", TINY_CKPT), variant="large", seed=0)
    cache = os.path.join(REPO, ".cache", "test-models", TINY_CLIP)  # the random CLIP-L: once per machine
    tiny_sd35.write_clip_l(cache)
    os.makedirs(os.path.join(d, "text_encoders"), exist_ok=True)
    os.symlink(cache, os.path.join(d, "text_encoders", TINY_CLIP))
    return d


def tiny_workflow(tmp_path_factory) -> str:
    """The bundled Large workflow on the tiny model (CLIPLoader on the random CLIP-L), 128² and 3 steps."""
    wf = adapt(load_workflow(os.path.join(REPO, "workflows", "api", "sd35_large_fp8_api.json")), ckpt_name=TINY_CKPT,
               tiny_clip=TINY_CLIP, width=128, height=128, batch=1, steps=3, calib_prompts=2)
    p = str(tmp_path_factory.mktemp("wf") / "service_api.json")
    with open(p, "w") as f:
        json.dump(wf, f)
    return p


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Open (no token), warmed up at start, up to 4 compatible images per sampler call."""
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=tiny_workflow(tmp_path_factory), SD35FP8_API_WARMUP="1",
               SD35FP8_API_MAX_PER_CALL="4", SD35FP8_API_BATCH_WINDOW="0.2",
               SD35FP8_API_UI_WORKFLOW=bundled_ui_path("large"))
    srv = ComfyServer(models_dir(tmp_path_factory), workdir=str(tmp_path_factory.mktemp("comfy")), env=env)
    srv.start()
    deadline = time.time() + 300
    while requests.get(srv.base + "/v1/health/ready").status_code != 200:
        assert time.time() < deadline, srv.log_tail()
        time.sleep(0.5)
    yield srv
    srv.stop()


def png(data: bytes) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"), dtype=np.int16)


def txt2img(base, **body):
    return requests.post(base + "/v1/txt2img", json=body, timeout=600)


def wait_job(base, jid, states=("succeeded", "failed", "cancelled"), timeout=300, headers=None):
    t0 = time.time()
    while True:
        rec = requests.get(f"{base}/v1/jobs/{jid}", headers=headers, timeout=30).json()
        if rec["status"] in states:
            return rec
        assert time.time() - t0 < timeout, rec
        time.sleep(0.1)


def scrape(base, headers=None) -> dict:
    from prometheus_client.parser import text_string_to_metric_families
    r = requests.get(base + "/metrics", headers=headers, timeout=30)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(r.text)
            for s in fam.samples}


def total(samples: dict, name: str, **labels) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all(dict(lab).get(k) == w for k, w in
                                                                           labels.items()))


# -- A1111 clients ---------------------------------------------------------------------------------------------------
def test_a1111_client_library_gets_pngs_whose_seeds_match_info(server):
    """webuiapi (the common A1111 client library, unchanged): seeds of a batch are seed, seed+1, ... and each
    image is the one its seed gives alone."""
    import webuiapi
    host, port = server.base.rsplit("//", 1)[1].split(":")
    a = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler", steps=3)
    assert a.util_get_current_model() == os.path.splitext(TINY_CKPT)[0]
    assert "Euler" in [s["name"] for s in a.get_samplers()]
    assert any(s["label"] == "SGM Uniform" for s in a.get_schedulers())
    assert [m["title"] for m in a.get_sd_models()] == [TINY_CKPT]
    r = a.txt2img(prompt="a red circle, top left", negative_prompt="blurry", seed=1234, batch_size=2, width=128,
                  height=128, cfg_scale=4.5)
    assert len(r.images) == 2 and all(im.size == (128, 128) for im in r.images)
    assert r.info["all_seeds"] == [1234, 1235] and r.info["seed"] == 1234
    assert "Seed: 1235" in r.info["infotexts"][1] and r.info["sampler_name"] == "Euler"
    alone = a.txt2img(prompt="a red circle, top left", negative_prompt="blurry", seed=1235, width=128, height=128,
                      cfg_scale=4.5)
    diff = np.abs(np.asarray(alone.image, np.int16) - np.asarray(r.images[1], np.int16))
    assert diff.max() <= 3, f"the image of seed 1235 differs from the batch's second image by {diff.max()}"
    assert np.abs(np.asarray(r.images[0], np.int16) - np.asarray(r.images[1], np.int16)).mean() > 5
    rand = a.txt2img(prompt="x", seed=-1, width=64, height=64)
    assert isinstance(rand.info["seed"], int) and rand.info["seed"] >= 0
    progress = a.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0


def test_a1111_style_script(server):
    """A script written from A1111's API wiki: requests + base64, old sampler names, A1111 error shape."""
    url = server.base
    payload = {"prompt": "a blue square", "steps": 3, "sampler_index": "DPM++ 2M Karras", "width": 64,
               "height": 64, "seed": 7, "n_iter": 2, "override_settings": {"CLIP_stop_at_last_layers": 2},
               "styles": ["cinematic"], "alwayson_scripts": {}}
    r = requests.post(url=f"{url}/sdapi/v1/txt2img", json=payload).json()
    for i in r["images"]:
        Image.open(io.BytesIO(base64.b64decode(i.split(",", 1)[0]))).verify()
    info = json.loads(r["info"])
    assert info["all_seeds"] == [7, 8] and info["extra_generation_params"]["Schedule type"] == "Karras"
    assert r["parameters"]["steps"] == 3
    bad = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "sampler_name": "Nope"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "sampler_name"]
    hr = requests.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True})
    assert hr.status_code == 422 and "enable_hr" in hr.json()["detail"][0]["loc"]
    opts = requests.get(f"{url}/sdapi/v1/options").json()
    assert requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": opts["sd_model_checkpoint"]}
                         ).status_code == 200
    ro = requests.post(f"{url}/sdapi/v1/options", json={"sd_model_checkpoint": "other"})
    assert ro.status_code == 403 and "read-only" in ro.json()["errors"]


def test_a1111_progress_and_interrupt(server):
    """A client polling /sdapi/v1/progress sees the running request's steps; /sdapi/v1/interrupt ends it, and the
    request answers as A1111 does (200, the images finished so far: none here)."""
    out = {}

    def run():
        out["r"] = requests.post(server.base + "/sdapi/v1/txt2img", json={"prompt": "long", "steps": 60,
                                                                           "width": 256, "height": 256, "seed": 1})
    t = threading.Thread(target=run)
    t.start()
    deadline = time.time() + 120
    while True:
        p = requests.get(server.base + "/sdapi/v1/progress").json()
        if p["state"]["job_count"] == 1 and p["state"]["sampling_step"] > 0:
            break
        assert time.time() < deadline, p
        time.sleep(0.05)
    assert 0 < p["progress"] < 1 and p["state"]["sampling_steps"] == 60 and p["state"]["job"]
    assert requests.post(server.base + "/sdapi/v1/interrupt").status_code == 200
    t.join(60)
    r = out["r"]
    assert r.status_code == 200 and r.json()["images"] == [] and json.loads(r.json()["info"])["interrupted"]
    assert requests.get(server.base + "/sdapi/v1/progress").json()["state"]["job_count"] == 0


# -- concurrency, batching -------------------------------------------------------------------------------------------
def test_four_clients_ten_requests_each_none_mixed_up(server):
    """40 requests over 10 (prompt, seed) pairs, each client in its own order: every pair's 4 renders agree (so no
    image went to the wrong request, whichever sampler call it shared) and different pairs differ."""
    pairs = [(f"a {c} {s} in the {p}", 100 + k) for k, (c, s, p) in enumerate(
        [(c, s, p) for c in ("red", "green") for s in ("circle", "square", "star", "moon", "tree") for p in
         ("middle",)])]
    results: dict[int, list] = {k: [] for k in range(len(pairs))}
    errors = []
    before = scrape(server.base)

    def client(n):
        order = list(range(len(pairs)))
        random.Random(n).shuffle(order)
        for k in order:
            try:
                r = txt2img(server.base, prompt=pairs[k][0], seed=pairs[k][1], width=64, height=64, steps=3)
                assert r.status_code == 200, r.text
                assert r.headers["X-Seed"] == str(pairs[k][1])
                results[k].append((r.headers["X-Job-Id"], png(r.content)))
                meta = Image.open(io.BytesIO(r.content)).info  # its own item's graph, also from a shared call
                ui = {n["id"]: n for n in json.loads(meta["workflow"])["nodes"]}
                assert ui[5]["widgets_values"][0] == pairs[k][0] and ui[8]["widgets_values"][0] == pairs[k][1]
                assert json.loads(meta["prompt"])["5"]["inputs"]["text"] == pairs[k][0]
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(repr(e))
    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors[:3]
    assert len({jid for rs in results.values() for jid, _ in rs}) == 40
    for k, rs in results.items():
        assert len(rs) == 4
        for _, img in rs[1:]:
            assert np.abs(img - rs[0][1]).max() <= 3, f"pair {k}: renders of one prompt and seed differ"
    firsts = [rs[0][1] for rs in results.values()]
    for i in range(len(firsts)):
        for j in range(i + 1, len(firsts)):
            assert np.abs(firsts[i] - firsts[j]).mean() > 2, f"pairs {i} and {j} gave the same image"
    after = scrape(server.base)
    calls = total(after, "sd35fp8_sampling_seconds_count") - total(before, "sd35fp8_sampling_seconds_count")
    assert total(after, "sd35fp8_images_generated_total") - total(before, "sd35fp8_images_generated_total") == 40
    assert calls < 40, "compatible requests that arrived together were not batched into shared sampler calls"


# -- jobs ------------------------------------------------------------------------------------------------------------
def long_job(base, **extra):
    r = requests.post(base + "/v1/jobs", json={"prompt": "slow", "width": 256, "height": 256, "steps": 60,
                                               **extra})
    assert r.status_code == 202, r.text
    assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
    return r.json()


def test_job_polled_and_cancelled_queued_and_running(server):
    a = long_job(server.base, seed=1)
    b = long_job(server.base, seed=2, steps=59)
    c = requests.post(server.base + "/v1/jobs", json={"prompt": "quick", "width": 64, "height": 64, "steps": 3,
                                                       "count": 2, "seed": 5}).json()
    wait_job(server.base, a["id"], ("running",))
    gone = requests.delete(f"{server.base}/v1/jobs/{b['id']}")  # still queued: leaves the queue, never runs
    assert gone.status_code == 200 and gone.json()["status"] == "cancelled" and gone.json()["started"] is None
    running = requests.delete(f"{server.base}/v1/jobs/{a['id']}")  # running: interrupted
    assert running.status_code == 200 and running.json()["status"] == "cancelled"
    t0 = time.time()
    rec = wait_job(server.base, c["id"])
    assert time.time() - t0 < 120, "the interrupted job kept running"
    assert rec["status"] == "succeeded" and rec["seeds"] == [5, 6] and rec["progress"] == 1.0
    assert [im["seed"] for im in rec["images"]] == [5, 6]
    for im in rec["images"]:
        r = requests.get(server.base + im["url"])
        assert r.status_code == 200 and r.headers["X-Seed"] == str(im["seed"]) and png(r.content).shape == (64, 64, 3)
    assert requests.delete(f"{server.base}/v1/jobs/{c['id']}").status_code == 409
    assert requests.get(f"{server.base}/v1/jobs/{b['id']}").json()["images"] == []
    assert requests.get(f"{server.base}/v1/jobs/nope").status_code == 404
    listed = [j["id"] for j in requests.get(server.base + "/v1/jobs").json()["jobs"]]
    assert {a["id"], b["id"], c["id"]} <= set(listed)


def test_a_job_past_its_timeout_fails_and_stops(server):
    j = long_job(server.base, seed=9, timeout=1.5)
    rec = wait_job(server.base, j["id"], timeout=60)
    assert rec["status"] == "failed" and rec["error"] == "timed out after 1.5 s" and rec["images"] == []
    t0 = time.time()  # the interrupted prompt left the queue: a quick request is served at once
    assert txt2img(server.base, prompt="next", width=64, height=64, steps=3).status_code == 200
    assert time.time() - t0 < 30


class Hook(http.server.BaseHTTPRequestHandler):
    status = 200
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, json.loads(body)))
        self.send_response(type(self).status)
        self.end_headers()

    def log_message(self, *a):
        pass


def hook_server(status):
    handler = type("H", (Hook,), {"status": status, "received": []})
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, handler


def test_webhooks_delivered_and_failing(server):
    ok, ok_h = hook_server(200)
    bad, bad_h = hook_server(500)
    try:
        j1 = requests.post(server.base + "/v1/jobs", json={"prompt": "hook", "width": 64, "height": 64, "steps": 3,
                                                            "webhook": f"http://127.0.0.1:{ok.server_port}/done"}).json()
        j2 = requests.post(server.base + "/v1/jobs", json={"prompt": "hook", "width": 64, "height": 64, "steps": 3,
                                                            "webhook": f"http://127.0.0.1:{bad.server_port}/x"}).json()
        for j in (j1, j2):
            assert wait_job(server.base, j["id"])["status"] == "succeeded"
        deadline = time.time() + 30
        while time.time() < deadline:
            r2 = requests.get(f"{server.base}/v1/jobs/{j2['id']}").json()
            if ok_h.received and r2["webhook"]["attempts"] == 3 and len(bad_h.received) == 3:
                break
            time.sleep(0.2)
        assert ok_h.received[0][0] == "/done" and ok_h.received[0][1]["id"] == j1["id"]
        assert ok_h.received[0][1]["status"] == "succeeded" and len(ok_h.received[0][1]["images"]) == 1
        assert requests.get(f"{server.base}/v1/jobs/{j1['id']}").json()["webhook"]["delivered"] is True
        assert len(bad_h.received) == 3 and r2["webhook"] == {"url": j2["webhook"]["url"], "delivered": False,
                                                                "attempts": 3, "error": "HTTP 500"}
        assert txt2img(server.base, prompt="still serving", width=64, height=64, steps=3).status_code == 200
    finally:
        ok.shutdown()
        bad.shutdown()


def test_client_that_disconnects_before_its_job_starts_has_it_removed(server):
    a = long_job(server.base, seed=3)
    wait_job(server.base, a["id"], ("running",))
    with pytest.raises(requests.exceptions.Timeout):
        requests.post(server.base + "/v1/txt2img", json={"prompt": "impatient", "width": 64, "height": 64},
                      timeout=1.0)
    deadline = time.time() + 10
    while time.time() < deadline:
        mine = [j for j in requests.get(server.base + "/v1/jobs").json()["jobs"] if j["status"] == "cancelled"
                and j["error"] == "the client disconnected before the job started"]
        if mine:
            break
        time.sleep(0.2)
    assert mine and mine[0]["started"] is None
    requests.delete(f"{server.base}/v1/jobs/{a['id']}")


# -- bad input, metrics, fuzzing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,field,status", [
    ({"prompt": "x", "width": 100}, "width", 422), ({"prompt": ""}, "prompt", 422),
    ({"prompt": "x", "steps": 0}, "steps", 422), ({"prompt": "x", "steps": 61}, "steps", 422),
    ({"prompt": "x", "width": 512}, "width", 422), ({"prompt": "x", "cfg": "high"}, "cfg", 422),
    ({"prompt": "x", "sampler": "fast"}, "sampler", 422), ({"prompt": "x", "promt": "y"}, "promt", 422),
    ({"prompt": "x", "seed": 2**64}, "seed", 422), ({"prompt": "x", "scheduler": "kl_optimal", "steps": 1},
                                                    "steps", 422),
    ([1, 2], "body", 400), ("{not json", "body", 400)])
def test_bad_requests_are_4xx_naming_the_field(server, body, field, status):
    r = requests.post(server.base + "/v1/txt2img", data=body if isinstance(body, str) else json.dumps(body))
    assert r.status_code == status and r.json()["field"] == field, r.text
    j = requests.post(server.base + "/v1/jobs", json={"prompt": "x", "count": 5})
    assert j.status_code == 422 and j.json()["field"] == "count"
    assert requests.get(server.base + "/v1/health/live").json() == {"status": "alive"}


def test_metrics_parse_and_grow(server):
    before = scrape(server.base)
    assert total(before, "sd35fp8_model_loads_total") >= 1
    assert total(before, "sd35fp8_calibrations_total", result="computed") >= 1
    assert ("sd35fp8_queue_pending", ()) in before and ("sd35fp8_queue_running", ()) in before
    assert txt2img(server.base, prompt="count me", width=64, height=64, steps=3).status_code == 200
    after = scrape(server.base)
    assert total(after, "sd35fp8_images_generated_total") == total(before, "sd35fp8_images_generated_total") + 1
    assert total(after, "sd35fp8_requests_total", route="/v1/txt2img", status="200") == \
        total(before, "sd35fp8_requests_total", route="/v1/txt2img", status="200") + 1
    assert total(after, "sd35fp8_step_seconds_count") == total(before, "sd35fp8_step_seconds_count") + 3
    assert total(after, "sd35fp8_sampling_seconds_sum") > total(before, "sd35fp8_sampling_seconds_sum")


def test_fuzzer_from_the_openapi_file_finds_no_server_error(server, tmp_path):
    """schemathesis generates valid and invalid requests for every route in docs/openapi.json (readiness aside:
    its 503 while the fuzzer's jobs fill the queue is its documented answer, tested above)."""
    cmd = [os.path.join(os.path.dirname(sys.executable), "schemathesis"), "run", OPENAPI, "--url", server.base,
           "--checks", "not_a_server_error", "--max-examples", "15", "--seed", "7", "--request-timeout", "300",
           "--exclude-path", "/v1/health/ready", "--report", "junit", "--report-dir", str(tmp_path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=str(tmp_path))
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert requests.get(server.base + "/v1/health/live").status_code == 200
    finally:  # the fuzzer's queued jobs would slow the tests after it
        for j in requests.get(server.base + "/v1/jobs").json()["jobs"]:
            if j["status"] in ("queued", "running"):
                requests.delete(f"{server.base}/v1/jobs/{j['id']}")


# -- configuration: a missing model, auth, readiness before the first request ---------------------------------------
def test_missing_model_then_auth_and_readiness(tmp_path_factory):
    """A token, no warm-up, and the checkpoint not there at start: the routes answer 503 naming the file and the
    log says it; once the file is in models/ (no restart) and the first request has run, readiness says yes."""
    d = models_dir(tmp_path_factory, with_ckpt=False)
    token = "s3cret-token"
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=tiny_workflow(tmp_path_factory), SD35FP8_API_TOKEN=token)
    srv = ComfyServer(d, workdir=str(tmp_path_factory.mktemp("comfy")), env=env)
    srv.start()
    auth = {"Authorization": f"Bearer {token}"}
    try:
        assert "sd35fp8 service: the routes answer 503" in srv.log_text() and TINY_CKPT in srv.log_text()
        r = requests.post(srv.base + "/v1/txt2img", json={"prompt": "x"}, headers=auth)
        assert r.status_code == 503 and TINY_CKPT in r.json()["error"]
        ready = requests.get(srv.base + "/v1/health/ready")  # open without the token
        assert ready.status_code == 503 and TINY_CKPT in ready.json()["reasons"][0]
        tiny_sd35.write_checkpoint(os.path.join(d, "checkpoints", TINY_CKPT), variant="large", seed=0)
        ready = requests.get(srv.base + "/v1/health/ready")
        assert ready.status_code == 503 and "not loaded yet" in ready.json()["reasons"][0]
        for path, method in (("/v1/txt2img", "post"), ("/v1/jobs", "get"), ("/sdapi/v1/sd-models", "get"),
                             ("/metrics", "get")):
            r = getattr(requests, method)(srv.base + path, json={"prompt": "x"})
            assert r.status_code == 401 and r.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert requests.post(srv.base + "/v1/txt2img", json={"prompt": "x"},
                             headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = requests.post(srv.base + "/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64}, headers=auth)
        assert r.status_code == 200 and png(r.content).shape == (64, 64, 3)
        assert requests.get(srv.base + "/v1/health/ready").status_code == 200
        import webuiapi  # A1111's --api-auth: basic auth, the password is the token
        host, port = srv.base.rsplit("//", 1)[1].split(":")
        a = webuiapi.WebUIApi(host=host, port=int(port), steps=3)
        a.set_auth("anyone", token)
        assert a.txt2img(prompt="x", width=64, height=64, seed=3).info["all_seeds"] == [3]
        assert "sd35fp8_images_generated_total" in requests.get(srv.base + "/metrics", headers=auth).text
    finally:
        srv.stop()


def test_a_bad_setting_is_a_503_naming_it_before_any_sampling(tmp_path_factory):
    """A weight format the loader does not have: ComfyUI's own validation of the configured workflow runs at start,
    so every generation route and readiness answer 503 with the reason, and the log says it."""
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=tiny_workflow(tmp_path_factory), SD35FP8_API_WEIGHT_FORMAT="fastest!",
               SD35FP8_API_WARMUP="1")
    srv = ComfyServer(models_dir(tmp_path_factory), workdir=str(tmp_path_factory.mktemp("comfy")), env=env)
    srv.start()
    try:
        deadline = time.time() + 30
        while "does not validate" not in srv.log_text():
            assert time.time() < deadline, srv.log_tail()
            time.sleep(0.2)
        for path in ("/v1/txt2img", "/sdapi/v1/txt2img", "/v1/jobs"):
            r = requests.post(srv.base + path, json={"prompt": "x"})
            assert r.status_code == 503 and "fastest!" in r.text and "weight_scaling" in r.text, (path, r.text)
        ready = requests.get(srv.base + "/v1/health/ready")
        assert ready.status_code == 503 and "does not validate" in ready.json()["reasons"][0]
        assert requests.get(srv.base + "/history").json() == {}, "something was sampled"
    finally:
        srv.stop()
