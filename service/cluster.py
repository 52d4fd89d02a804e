"""Scale-out on RQ (Redis Queue): ComfyUI API graphs as jobs, run by workers, one worker per ComfyUI (per GPU).

Why RQ, and how it behaves when things break: docs/scale-out.md. In short:

- A job is one prompt graph (one batch item, or several items sharing a sampler call) under an id the client
  chooses, so submitting is idempotent: an id that is queued, running or finished is kept, not run again.
- At-least-once: a running job sits in RQ's StartedJobRegistry under a lease that the worker renews every
  ``lease`` seconds (RQ's job heartbeat; the lease is that plus 60 s). A worker that dies stops renewing; a live
  worker's maintenance then puts the job back on the queue, or in the FailedJobRegistry when its deliveries are
  spent. Failures and abandoned deliveries count alike (``Retry(max=retries)``), so a job that kills its worker
  every time still ends in the FailedJobRegistry (the dead-letter place: ``rq info``, rq-dashboard, the client).
- Outputs are idempotent per job id: every delivery of a job uses the same ComfyUI prompt id, so a worker whose
  ComfyUI already ran (or is running) it takes that result instead of sampling again; the images go to Redis under
  the job's id (with a TTL) and the job's result is ComfyUI's history entry, which the client turns into files and
  manifest lines exactly once.

Pure Python besides ``redis`` and ``rq`` (imported here only): no ComfyUI, no torch. The job function
:func:`run_graph` runs in the worker (service/worker.py) and talks to its ComfyUI over HTTP.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

QUEUE = "sd35fp8"
PREFIX = "sd35fp8:"
IMAGE_TTL = 24 * 3600  # images wait this long in Redis for their client
RESULT_TTL = 7 * 24 * 3600  # a job's result (or error) stays this long: a resumed client finds it
JOB_TIMEOUT = 600  # RQ stops a job running longer; deploy/ gives a stopping worker more (900 s)
COMFY_ENV = "SD35FP8_WORKER_COMFY"  # the worker's ComfyUI, for the job function (set by service/worker.py)
WORKER_ENV = "SD35FP8_WORKER_NAME"
JOB_FUNCTION = "service.cluster.run_graph"
LIVE = ("queued", "started", "deferred", "scheduled")


def connect(url: str):
    """A Redis connection for ``url`` (redis://host:port/db); the error names the URL."""
    from redis import Redis
    try:
        return Redis.from_url(url, socket_connect_timeout=5, health_check_interval=10)
    except ValueError as e:
        raise ValueError(f"queue URL {url!r}: {e} (expected redis://host:6379/0)") from None


def job_id(run: str, names: list[str]) -> str:
    """The id of the job that renders items ``names`` of client run ``run``: the same on every submission."""
    return f"sd35fp8-{run}-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def image_key(jid: str, img: dict) -> str:
    return f"{PREFIX}img:{jid}:{img.get('type', 'output')}/{img.get('subfolder', '')}/{img['filename']}"


def deliveries_key(jid: str) -> str:
    return f"{PREFIX}deliveries:{jid}"


@dataclasses.dataclass
class JobState:
    status: str            # RQ's (queued, started, finished, failed, ...) or "missing"
    result: dict | None    # a finished job's return value (:func:`run_graph`)
    error: str | None      # why it ended without a result
    deliveries: int        # how often a worker took it (0 while unknown)


class Cluster:
    """The client's side: submit jobs, read their state and results, clean up what was written."""

    def __init__(self, url: str, queue: str = QUEUE):
        from rq import Queue
        self.url, self.conn = url, connect(url)
        self.queue = Queue(queue, connection=self.conn)

    def ping(self) -> None:
        from redis.exceptions import RedisError
        try:
            self.conn.ping()
        except RedisError as e:
            raise ConnectionError(f"the queue at {self.url} does not answer: {e}") from None

    def job(self, jid: str):
        from rq.exceptions import NoSuchJobError
        from rq.job import Job
        try:
            return Job.fetch(jid, connection=self.conn)
        except NoSuchJobError:
            return None

    def submit(self, jid: str, graph: dict, extra: dict, retries: int, timeout: int = JOB_TIMEOUT):
        """Queue ``graph`` as job ``jid`` unless that job is queued, running or finished already (a resumed client,
        a second submission). A failed one (its deliveries spent) is queued afresh."""
        from rq import Retry
        old = self.job(jid)
        if old is not None:
            if old.get_status(refresh=False) in LIVE + ("finished",):
                return old
            old.delete()
        self.conn.delete(deliveries_key(jid))
        # by name: the workers import the pack's folder as the top level (a gateway's ComfyUI imports it under
        # the folder's own name)
        return self.queue.enqueue(JOB_FUNCTION, graph, extra, job_id=jid, job_timeout=timeout, result_ttl=RESULT_TTL,
                                  failure_ttl=RESULT_TTL, retry=Retry(max=retries) if retries > 0 else None,
                                  description=f"sd35fp8 graph {jid}")

    def poll(self, jids: list[str]) -> dict[str, JobState]:
        """The state of each job in ``jids``, fetched in one round trip (results and errors only for the ended
        ones). A job the queue no longer knows is ``missing``."""
        from rq.job import Job
        out = {}
        for jid, rj in zip(jids, Job.fetch_many(jids, connection=self.conn) if jids else []):
            if rj is None:
                out[jid] = JobState("missing", None, "the job vanished from the queue (did the queue server lose its "
                                    "data?)", 0)
                continue
            status = rj.get_status(refresh=False)
            if status == "finished":
                res = rj.return_value()
                out[jid] = JobState(status, res, None, (res or {}).get("delivery", 0))
            elif status in LIVE:
                out[jid] = JobState(status, None, None, 0)
            else:  # failed (deliveries spent), stopped, canceled
                last = rj.latest_result()
                why = str(last.exc_string if last and last.exc_string else status).strip().splitlines()[-1]
                n = int(self.conn.get(deliveries_key(jid)) or 0)
                out[jid] = JobState(status, None, f"failed on the cluster after {n} deliveries: {why}", n)
        return out

    def image(self, jid: str, img: dict) -> bytes:
        data = self.conn.get(image_key(jid, img))
        if data is None:
            raise RuntimeError(f"job {jid}: image {img['filename']} is no longer in the queue's store "
                               f"(kept {IMAGE_TTL // 3600} h): run the batch again to render it")
        return data

    def forget(self, jid: str, entry: dict | None) -> None:
        """Delete a job's images and delivery count once the client has written its files (the result stays)."""
        keys = [image_key(jid, img) for out in (entry or {}).get("outputs", {}).values()
                for img in out.get("images", [])]
        self.conn.delete(deliveries_key(jid), *keys)

    def cancel(self, jid: str) -> None:
        """Take a waiting job off the queue, or stop a running one on its worker (RQ stops the work horse; the
        prompt may still finish on that worker's ComfyUI, unread)."""
        from redis.exceptions import RedisError
        from rq.command import send_stop_job_command
        try:
            rj = self.job(jid)
            if rj is None:
                return
            if rj.get_status() == "started":
                send_stop_job_command(self.conn, jid)
            else:
                rj.cancel()
        except (RedisError, ValueError):
            pass

    def depth(self) -> dict:
        """Jobs waiting, running (leased) and dead-lettered: what an autoscaler and an operator look at."""
        from rq.registry import FailedJobRegistry, StartedJobRegistry
        return {"waiting": self.queue.count,
                "running": StartedJobRegistry(queue=self.queue).count,
                "failed": FailedJobRegistry(queue=self.queue).count}


# -- the worker's side (runs in the RQ work horse) ----------------------------------------------------------------
class ComfyDown(RuntimeError):
    """The worker's ComfyUI does not answer: the job goes back to the queue (another delivery)."""


def _http(method: str, url: str, body: dict | None = None, timeout: float = 60):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:
        raise ComfyDown(f"ComfyUI at {url.split('/', 3)[:3][-1]} does not answer: {e}") from None


def _json(method: str, url: str, body: dict | None = None):
    status, raw = _http(method, url, body)
    try:
        return status, json.loads(raw or b"null")
    except json.JSONDecodeError:
        return status, {"error": raw[:500].decode(errors="replace")}


def _queued(comfy: str, pid: str) -> bool:
    _, q = _json("GET", comfy + "/queue")
    return any(len(e) > 1 and e[1] == pid for k in ("queue_running", "queue_pending") for e in (q or {}).get(k, []))


def _failure(entry: dict) -> str:
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_error":
            where = f"{data.get('node_type', '?')} (node {data.get('node_id', '?')})"
            return f"{where}: {data.get('exception_message', '')}"
    return "the prompt failed without an error message"


def run_graph(graph: dict, extra: dict, poll: float = 0.2) -> dict:
    """The job: run ``graph`` on this worker's ComfyUI and keep its images in Redis. Returns ``{"status": "ok",
    "entry": <ComfyUI history entry>, ...}``, or ``{"status": "refused" | "error", "error": ...}`` for a graph no
    retry can help (refused at validation; NaN). Raises on what another delivery may fix (ComfyUI down, an
    execution error), so RQ retries it while deliveries are left."""
    from rq import get_current_job
    job = get_current_job()
    comfy = os.environ[COMFY_ENV].rstrip("/")
    worker = os.environ.get(WORKER_ENV, "")
    n = job.connection.incr(deliveries_key(job.id))
    job.connection.expire(deliveries_key(job.id), RESULT_TTL)
    t0 = time.time()
    pid = str(uuid.uuid5(uuid.NAMESPACE_URL, job.id))  # every delivery: the same prompt on the same ComfyUI
    _, hist = _json("GET", f"{comfy}/history/{pid}")
    entry = (hist or {}).get(pid)
    if entry is not None and (entry.get("status") or {}).get("status_str") != "success":
        entry, pid = None, str(uuid.uuid4())  # an earlier delivery failed here: run it again, as a new prompt
    if entry is None and not _queued(comfy, pid):
        status, body = _json("POST", comfy + "/prompt", {"prompt": graph, "extra_data": extra, "prompt_id": pid,
                                                         "client_id": f"sd35fp8-worker-{worker}"})
        if status == 400:
            return {"status": "refused", "error": json.dumps(body)[:4000], "worker": worker, "delivery": n}
        if status != 200:
            raise ComfyDown(f"ComfyUI refused the prompt with HTTP {status}: {json.dumps(body)[:500]}")
    while entry is None:
        time.sleep(poll)
        _, hist = _json("GET", f"{comfy}/history/{pid}")
        entry = (hist or {}).get(pid)
    if (entry.get("status") or {}).get("status_str") != "success":
        why = _failure(entry)
        if "NaN" in why or "Inf" in why:
            return {"status": "error", "error": why, "flags": ["non_finite"], "worker": worker, "delivery": n}
        raise RuntimeError(f"ComfyUI at {comfy} failed the prompt: {why}")
    pipe = job.connection.pipeline()
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            q = urllib.parse.urlencode({k: img.get(k, "") for k in ("filename", "subfolder", "type")})
            status, data = _http("GET", f"{comfy}/view?{q}", timeout=120)
            if status != 200:
                raise ComfyDown(f"ComfyUI at {comfy} did not serve {img['filename']} (HTTP {status})")
            pipe.set(image_key(job.id, img), data, ex=IMAGE_TTL)
    pipe.execute()
    return {"status": "ok", "entry": {"outputs": entry.get("outputs", {}), "status": entry.get("status", {})},
            "worker": worker, "delivery": n, "seconds": round(time.time() - t0, 3)}
