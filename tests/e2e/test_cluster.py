"""Scale-out on a real queue: Debian's redis-server started here, two CPU ComfyUIs with the pack (the tiny model,
warmed up), one worker each (``python -m service.worker``, RQ), and the batch client with ``--queue``.

What breaks in production fleets is what these tests do: ``kill -9`` of a worker mid-job, the queue server
restarted mid-run, SIGTERM on a busy worker, a job that fails on every delivery.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from comfy_harness import REPO, ComfyServer, free_port
from test_service import LIMITS, models_dir, tiny_workflow

from service.config import bundled_ui_path

rq = pytest.importorskip("rq", reason="needs rq and redis (requirements-cluster.txt; scripts/setup_env.sh)")
from redis import Redis  # noqa: E402
from rq import Worker  # noqa: E402

from service.cluster import QUEUE, Cluster  # noqa: E402

REDIS = shutil.which("redis-server")
pytestmark = [pytest.mark.comfy, pytest.mark.skipif(not REDIS, reason="needs Debian's redis-server "
                                                    "(scripts/setup_env.sh installs it)")]
CLIENT = os.path.join(REPO, "scripts", "sd35_batch.py")
LEASE = 2  # seconds between lease renewals: a dead worker's job is handed on about LEASE + 60 s later (RQ)


class RedisServer:
    """redis-server on a free port, its data on disk (append-only file, synced on every write), restartable."""

    def __init__(self, d):
        self.dir, self.port, self.proc = str(d), free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen([REDIS, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                                      "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
                                     stdout=open(os.path.join(self.dir, "redis.log"), "a"), stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                Redis.from_url(self.url).ping()
                return self
            except Exception:  # noqa: BLE001
                assert time.time() < deadline, "redis-server did not start"
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()  # SIGTERM: redis-server flushes its append-only file and exits
        self.proc.wait(30)


class WorkerProc:
    def __init__(self, name, comfy, url, log_dir):
        self.name, self.comfy, self.url = name, comfy, url
        self.log = os.path.join(str(log_dir), f"{name}.log")
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.worker", "--queue", self.url, "--comfy", self.comfy.base, "--name",
             self.name, "--lease", str(LEASE), "--maintenance", "3"], cwd=REPO, start_new_session=True,
            stdout=open(self.log, "a"), stderr=subprocess.STDOUT)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def kill9(self):
        """SIGKILL to the worker and its work horse (RQ puts the horse in a process group of its own), as a crash,
        an OOM kill or a lost machine does."""
        horses = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True,
                                text=True).stdout.split()
        for pid in [self.proc.pid, *map(int, horses)]:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self):
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def text(self):
        return open(self.log).read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    rs = RedisServer(tmp_path_factory.mktemp("redis")).start()
    wf_path = tiny_workflow(tmp_path_factory)
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=wf_path, SD35FP8_API_WARMUP="1")
    models = models_dir(tmp_path_factory)
    comfys = [ComfyServer(models, workdir=str(tmp_path_factory.mktemp(f"comfy{i}")), env=env) for i in range(2)]
    for c in comfys:
        c.start()
    logs = tmp_path_factory.mktemp("workers")
    workers = [WorkerProc(f"w{i + 1}", c, rs.url, logs).start() for i, c in enumerate(comfys)]
    ns = type("Cluster", (), {})()
    ns.redis, ns.comfys, ns.workers, ns.wf_path, ns.models = rs, comfys, workers, wf_path, models
    ns.conn = Redis.from_url(rs.url)
    wait_for(lambda: len(Worker.all(connection=ns.conn)) == 2, 300, "two workers registered")
    yield ns
    for w in workers:
        w.stop()
    for c in comfys:
        c.stop()
    rs.stop()


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.2)


def ensure_workers(cl):
    for w in cl.workers:
        if not w.alive():
            w.start()
    # a worker that reconnected after the queue server went away registers as <name>.<n>
    wait_for(lambda: {w.name.split(".")[0] for w in Worker.all(connection=cl.conn)} >= {w.name for w in cl.workers},
             120, "the workers registered")


def items_file(path, n, tag):
    path.write_text("".join(f"a {tag} circle number {i}, top left\n" for i in range(n)))
    return path


def slower(cl, tmp_path, steps):
    """The workflow with more sampling steps (seconds per job on the CPU: a kill lands mid-job)."""
    wf = json.load(open(cl.wf_path))
    for v in wf.values():
        if v["class_type"] == "KSampler":
            v["inputs"]["steps"] = steps
    p = tmp_path / f"steps{steps}_api.json"
    p.write_text(json.dumps(wf))
    return str(p)


def client(cl, items, out, *args, workflow=None):
    return subprocess.Popen([sys.executable, CLIENT, str(items), "--queue", cl.redis.url, "--workflow",
                             workflow or cl.wf_path,
                             "--ui-workflow", bundled_ui_path("large"), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            # Ctrl-C reaches it also when the tests run in a background job (which ignores SIGINT)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def manifest(out):
    p = os.path.join(out, "manifest.jsonl")
    if not os.path.exists(p):
        return []
    with open(p) as f:
        return [json.loads(x) for x in f if x.strip()]


def busy_job(cl, name):
    for w in Worker.all(connection=cl.conn):
        if w.name.split(".")[0] == name and w.get_current_job_id():
            return w.get_current_job_id()
    return None


def test_kill_9_of_a_worker_mid_job_loses_nothing_and_duplicates_nothing(cluster, tmp_path):
    """40 items on two workers; one worker (and its work horse) is killed with SIGKILL while it runs a job. Its
    lease runs out, the other worker's maintenance puts the job back, and every item ends in the manifest exactly
    once with its image; the killed job's item says it took two deliveries."""
    ensure_workers(cluster)
    out = tmp_path / "out"
    p = client(cluster, items_file(tmp_path / "items.txt", 40, "red"), out, "--retries", "3",
               workflow=slower(cluster, tmp_path, 16))
    victim = cluster.workers[0]
    wait_for(lambda: len(manifest(out)) >= 3 and busy_job(cluster, victim.name), 600, "w1 busy after 3 items")
    time.sleep(0.5)  # into the job (several seconds long)
    killed_job = busy_job(cluster, victim.name)
    victim.kill9()
    assert Cluster(cluster.redis.url).job(killed_job).get_status() == "started"  # killed mid-job
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-3000:]
    recs = manifest(out)
    names = [r["name"] for r in recs]
    assert len(names) == 40 == len(set(names)) and all(r["status"] == "ok" for r in recs), stderr[-2000:]
    pngs = sorted(f for f in os.listdir(out) if f.endswith(".png"))
    assert len(pngs) == 40 and not [f for f in os.listdir(out) if f.endswith(".partial")]
    assert {r["worker"].split(".")[0] for r in recs} == {"w1", "w2"}  # both took work before the kill
    again = Cluster(cluster.redis.url).job(killed_job).return_value()
    assert again["status"] == "ok" and again["worker"].startswith("w2") and again["delivery"] == 2, again
    assert sum(r["attempts"] == 2 for r in recs) >= 1
    # nothing left behind: no job waiting or leased, nothing dead-lettered, the images fetched and deleted
    depth = Cluster(cluster.redis.url).depth()
    assert depth == {"waiting": 0, "running": 0, "failed": 0}, depth
    assert not list(cluster.conn.scan_iter("sd35fp8:img:*"))


def test_queue_server_restarted_mid_run_workers_and_client_reconnect(cluster, tmp_path):
    ensure_workers(cluster)
    out = tmp_path / "out"
    p = client(cluster, items_file(tmp_path / "items.txt", 16, "blue"), out)
    wait_for(lambda: len(manifest(out)) >= 3, 600, "3 items done")
    cluster.redis.stop()
    time.sleep(3)
    cluster.redis.start()
    stdout, stderr = p.communicate(timeout=900)
    assert p.returncode == 0, stderr[-3000:]
    recs = manifest(out)
    assert len({r["name"] for r in recs}) == 16 == len(recs) and all(r["status"] == "ok" for r in recs)
    assert "does not answer" in stderr and "is back" in stderr
    assert all(w.alive() for w in cluster.workers)
    assert any("unreachable" in w.text() for w in cluster.workers)
    # the workers registered again and take jobs
    wait_for(lambda: {w.name.split(".")[0] for w in Worker.all(connection=cluster.conn)} == {"w1", "w2"}, 120,
             "both workers back on the queue")


def test_sigterm_finishes_the_running_job_then_exits(cluster, tmp_path):
    """docker stop / a pod ending: the busy worker takes no new job, finishes the one it runs, exits 0; a job queued
    meanwhile goes to the other worker."""
    ensure_workers(cluster)
    cl = Cluster(cluster.redis.url)
    wf = json.load(open(cluster.wf_path))
    ks = next(k for k, v in wf.items() if v["class_type"] == "KSampler")
    slow = json.loads(json.dumps(wf))
    slow[ks]["inputs"]["steps"] = 80  # several seconds on the CPU
    jobs = [cl.submit(f"t-sigterm-{i}-{time.time_ns()}", slow, {}, retries=1) for i in range(2)]
    w1 = cluster.workers[0]
    wait_for(lambda: busy_job(cluster, "w1") in {j.id for j in jobs}, 300, "w1 runs a slow job")
    mine = busy_job(cluster, "w1")

    def lease_end():  # the running job's entry in RQ's StartedJobRegistry: its score is when the lease ends
        return max(score for member, score in cluster.conn.zrange(f"rq:wip:{QUEUE}", 0, -1, withscores=True)
                   if member.decode().startswith(mine))
    first = lease_end()
    time.sleep(LEASE + 1.5)
    assert lease_end() > first  # renewed while the job runs: not handed to another worker
    os.kill(w1.proc.pid, signal.SIGTERM)
    late = cl.submit(f"t-late-{time.time_ns()}", wf, {}, retries=1)
    assert w1.proc.wait(300) == 0
    res = cl.job(mine).return_value()
    assert res["status"] == "ok" and res["worker"].startswith("w1") and res["delivery"] == 1
    assert "warm shut down" in w1.text()
    wait_for(lambda: late.get_status() == "finished", 300, "the late job done elsewhere")
    assert late.return_value()["worker"].startswith("w2")
    wait_for(lambda: all(j.get_status() == "finished" for j in jobs), 300, "both slow jobs done")
    w1.start()


def test_a_job_failing_on_every_delivery_goes_to_the_dead_letter_registry(cluster, tmp_path):
    """A checkpoint that is damaged fails at execution on every worker: after 1 + retries deliveries the job sits in
    RQ's FailedJobRegistry (the operator sees it) and the client records the item as failed with the cause."""
    ensure_workers(cluster)
    bad = os.path.join(cluster.models, "checkpoints", "damaged.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}...")
    wf = json.load(open(cluster.wf_path))
    for v in wf.values():
        if v["class_type"] == "SD35FP8CheckpointLoader":
            v["inputs"]["ckpt_name"] = "damaged.safetensors"
    wf_bad = tmp_path / "bad_api.json"
    wf_bad.write_text(json.dumps(wf))
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, CLIENT, str(items_file(tmp_path / "i.txt", 1, "green")), "--queue",
                        cluster.redis.url, "--workflow", str(wf_bad), "--out", str(out), "--retries", "2"],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stderr[-3000:]
    (rec,) = manifest(out)
    assert rec["status"] == "failed" and "after 3 deliveries" in rec["error"] and "damaged" in rec["error"], rec
    cl = Cluster(cluster.redis.url)
    assert cl.depth()["failed"] == 1
    from rq.registry import FailedJobRegistry
    (jid,) = FailedJobRegistry(QUEUE, connection=cluster.conn).get_job_ids()
    assert int(cluster.conn.get(f"sd35fp8:deliveries:{jid}")) == 3
    # the next run of the same batch queues it afresh (the file fixed: here, still damaged -> failed again)
    os.remove(bad)


@pytest.fixture(scope="module")
def gateway(cluster, tmp_path_factory):
    """A ComfyUI with the pack as the cluster's front door: no models, the service routes on the queue."""
    env = dict(LIMITS, SD35FP8_API_WORKFLOW=cluster.wf_path, SD35FP8_API_QUEUE=cluster.redis.url,
               SD35FP8_API_UI_WORKFLOW=bundled_ui_path("large"))
    gw = ComfyServer(str(tmp_path_factory.mktemp("no-models")), workdir=str(tmp_path_factory.mktemp("gw")), env=env)
    gw.start()
    yield gw
    gw.stop()


def test_gateway_routes_run_on_the_cluster(cluster, gateway):
    """The service routes of a gateway put their prompts on the queue: the same answers as on one server (PNG with
    its seed, jobs with images, A1111's shape), the cluster's depth for the autoscaler and Prometheus."""
    import requests
    ensure_workers(cluster)
    wait_for(lambda: requests.get(gateway.base + "/v1/health/ready").status_code == 200, 120, "gateway ready")
    r = requests.post(gateway.base + "/v1/txt2img", json={"prompt": "a red circle", "seed": 5}, timeout=600)
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png" and r.headers["X-Seed"] == "5", r.text
    from PIL import Image
    import io
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (128, 128) and "workflow" in img.info and "prompt" in img.info
    j = requests.post(gateway.base + "/v1/jobs", json={"prompt": "a blue square", "count": 3, "seed": 10})
    assert j.status_code == 202
    jid = j.json()["id"]
    wait_for(lambda: requests.get(f"{gateway.base}/v1/jobs/{jid}").json()["status"] in ("succeeded", "failed"), 600,
             "the job done")
    rec = requests.get(f"{gateway.base}/v1/jobs/{jid}").json()
    assert rec["status"] == "succeeded" and rec["seeds"] == [10, 11, 12] and len(rec["images"]) == 3, rec
    pngs = [requests.get(gateway.base + im["url"]).content for im in rec["images"]]
    assert len(set(pngs)) == 3 and all(p[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    a = requests.post(gateway.base + "/sdapi/v1/txt2img", timeout=600,
                      json={"prompt": "x", "seed": 3, "steps": 3, "width": 128, "height": 128})
    assert a.status_code == 200 and len(a.json()["images"]) == 1, a.text
    # the gateway fetched its jobs' images into its output folder and deleted them from the queue's store
    wait_for(lambda: not list(cluster.conn.scan_iter("sd35fp8:img:sd35fp8-api-*")), 10, "the images deleted")
    d = requests.get(gateway.base + "/v1/cluster").json()
    assert d["waiting"] == d["running"] == 0 and d["total"] == 0 and d["workers"] >= 2, d
    m = requests.get(gateway.base + "/metrics").text
    assert 'sd35fp8_cluster_jobs{state="waiting"} 0.0' in m and "sd35fp8_cluster_workers" in m
    # the queue gone: readiness says so, and a request gets 503 naming it
    cluster.redis.stop()
    try:
        wait_for(lambda: requests.get(gateway.base + "/v1/health/ready").status_code == 503, 60, "gateway not ready")
        why = requests.get(gateway.base + "/v1/health/ready").json()["reasons"][0]
        assert "queue" in why and str(cluster.redis.port) in why
    finally:
        cluster.redis.start()
    wait_for(lambda: requests.get(gateway.base + "/v1/health/ready").status_code == 200, 60, "gateway ready again")


def test_container_entrypoint_finishes_the_job_on_sigterm_then_stops_comfyui(cluster, tmp_path):
    """deploy/entrypoint.sh as the container runs it (here on the host's ComfyUI): ComfyUI + worker; SIGTERM (docker
    stop, a pod ending) while the worker runs a job: the job finishes on it, the worker exits, then ComfyUI stops;
    the entry point exits 0."""
    from comfy_harness import comfy_dir, comfy_python
    import urllib.request
    ensure_workers(cluster)
    work = tmp_path / "ep"
    nodes = work / "custom_nodes"
    for d in (nodes, work / "output", work / "user"):
        d.mkdir(parents=True)
    os.symlink(REPO, nodes / "sd35-fp8")
    yaml_path = work / "extra_model_paths.yaml"
    yaml_path.write_text(f"t:\n    base_path: {cluster.models}\n    checkpoints: checkpoints\n"
                         f"    text_encoders: text_encoders\n    custom_nodes: {nodes}\n")
    port = free_port()
    args = (f"--cpu --extra-model-paths-config {yaml_path} --output-directory {work}/output --user-directory "
            f"{work}/user --database-url sqlite:///{work}/db.sqlite --disable-auto-launch")
    env = dict(os.environ, COMFYUI_DIR=comfy_dir(), PYTHON=comfy_python(), COMFY_PORT=str(port), COMFY_ARGS=args,
               SD35FP8_QUEUE_URL=cluster.redis.url, SD35FP8_WORKER_LEASE="2", SD35FP8_WORKER_NAME="ep",
               SD35FP8_API_WORKFLOW=cluster.wf_path, **LIMITS)
    log = open(tmp_path / "ep.log", "w")
    ep = subprocess.Popen(["bash", os.path.join(REPO, "deploy", "entrypoint.sh"), "worker"], env=env,
                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def registered():
            assert ep.poll() is None, open(tmp_path / "ep.log").read()[-3000:]
            return any(w.name == "ep" for w in Worker.all(connection=cluster.conn))
        wait_for(registered, 300, "ep registered")
        # registered is not ready: the worker takes jobs once its ComfyUI has loaded and warmed up
        wait_for(lambda: registered() and "is ready: taking jobs" in open(tmp_path / "ep.log").read(), 300,
                 "ep's ComfyUI ready")
        cl = Cluster(cluster.redis.url)
        wf = json.load(open(cluster.wf_path))
        for v in wf.values():
            if v["class_type"] == "KSampler":
                v["inputs"]["steps"] = 40
        jobs, last = [], [0.0]

        def ep_busy():
            # the other workers take jobs too: one more job every 2 s until ep runs one of them
            if busy_job(cluster, "ep") in {j.id for j in jobs}:
                return True
            if len(jobs) < 12 and time.time() - last[0] > 2:
                last[0] = time.time()
                jobs.append(cl.submit(f"t-ep-{len(jobs)}-{time.time_ns()}", wf, {}, retries=1))
            return False
        wait_for(ep_busy, 300, "ep runs a job")
        mine = busy_job(cluster, "ep")
        ep.send_signal(signal.SIGTERM)  # to the entry point only, as docker stop does to PID 1
        assert ep.wait(300) == 0, open(tmp_path / "ep.log").read()[-3000:]
        res = cl.job(mine).return_value()
        assert res["status"] == "ok" and res["worker"] == "ep" and res["delivery"] == 1
        with pytest.raises(OSError):  # ComfyUI stopped after the worker
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health/live", timeout=3)
        text = open(tmp_path / "ep.log").read()
        assert "SIGTERM: the worker finishes its job" in text and "warm shut down" in text
        wait_for(lambda: all(j.get_status() == "finished" for j in jobs), 300, "the other jobs done elsewhere")
    finally:
        if ep.poll() is None:
            os.killpg(ep.pid, signal.SIGKILL)


def test_interrupted_client_resumes_without_rendering_twice(cluster, tmp_path):
    """Ctrl-C on the client leaves its jobs on the queue (they finish); the same command again collects them: every
    item once in the manifest, every job delivered once."""
    ensure_workers(cluster)
    out = tmp_path / "out"
    items = items_file(tmp_path / "items.txt", 12, "yellow")
    wf = slower(cluster, tmp_path, 16)  # seconds per job: the interrupt lands before the last items are done
    p = client(cluster, items, out, workflow=wf)
    wait_for(lambda: len(manifest(out)) >= 2, 600, "2 items done")
    p.send_signal(signal.SIGINT)
    _, stderr = p.communicate(timeout=60)
    assert p.returncode == 130 and "run the same command again" in stderr, stderr[-2000:]
    first = len(manifest(out))
    p = client(cluster, items, out, workflow=wf)
    _, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr[-3000:]
    recs = manifest(out)
    assert len(recs) == 12 == len({r["name"] for r in recs}) and f"{first} already done" in stderr
    assert all(r["attempts"] == 1 for r in recs)  # no job ran twice


def test_a_worker_takes_no_job_while_its_comfyui_is_not_ready(cluster, tmp_path):
    """The other workers stopped (SIGTERM while idle): a worker whose ComfyUI does not answer registers, says why it
    waits, and leaves the job queued; a worker with a ready ComfyUI then takes it."""
    ensure_workers(cluster)
    for w in cluster.workers:
        os.kill(w.proc.pid, signal.SIGTERM)
        assert w.proc.wait(60) == 0
    lonely = WorkerProc("w-unready", type("C", (), {"base": f"http://127.0.0.1:{free_port()}"})(), cluster.redis.url,
                        tmp_path).start()
    try:
        wait_for(lambda: any(w.name == "w-unready" for w in Worker.all(connection=cluster.conn)), 60, "registered")
        cl = Cluster(cluster.redis.url)
        job = cl.submit(f"t-unready-{time.time_ns()}", json.load(open(cluster.wf_path)), {}, retries=1)
        time.sleep(6)
        assert job.get_status() == "queued" and "is not ready" in lonely.text()
        ensure_workers(cluster)
        wait_for(lambda: job.get_status() == "finished", 300, "taken by a ready worker")
        assert job.return_value()["worker"] in ("w1", "w2")
    finally:
        lonely.stop()
