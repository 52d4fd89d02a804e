"""The generation service, on ComfyUI's own aiohttp server (no second process): AUTOMATIC1111-compatible routes
(``/sdapi/v1/...``), a simple ``POST /v1/txt2img``, jobs (``/v1/jobs``) with webhooks and cancel, health and
readiness, ``/metrics``. Requests run through ComfyUI's own prompt queue with the configured workflow
(service/config.py), so the calibrated model is loaded once and shared with graph-editor users; compatible requests
that arrive together share one sampler call (SD35FP8PromptBatch), one seed per image. Completion is read from
ComfyUI's history record of each prompt (written by its executor), progress from its executor's events.

The request checks, A1111's names and answer shapes live in service/api.py (pure Python); this module is the
ComfyUI adapter. docs/api.md and docs/openapi.json describe the routes.
"""
from __future__ import annotations

import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import time
import uuid

from aiohttp import ClientSession, ClientTimeout, web

import comfy.model_management
import comfy.samplers
import execution
import folder_paths
import nodes as comfy_nodes

from ..service import api, cluster, graph
from ..service import config as service_config
from . import metrics

log = logging.getLogger("sd35fp8")
CLIENT_ID = "sd35fp8-service"
PACK = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPENAPI = os.path.join(PACK, "docs", "openapi.json")
TERMINAL = ("succeeded", "failed", "cancelled")


def pack_version() -> str:
    try:
        import tomllib
        with open(os.path.join(PACK, "pyproject.toml"), "rb") as f:
            return "sd35fp8-" + tomllib.load(f)["project"]["version"]
    except (OSError, KeyError, ValueError, ImportError):
        return "sd35fp8"


class HTTPProblem(Exception):
    def __init__(self, status: int, message: str, **extra):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class Job:
    def __init__(self, kind: str, items: list[dict], extras: dict | None = None, params: dict | None = None):
        extras = extras or {}
        self.id = uuid.uuid4().hex
        self.kind, self.items, self.params = kind, items, params
        for i, it in enumerate(items):
            it["name"] = f"{self.id}-{i:02d}"
        self.webhook = extras.get("webhook")
        self.timeout = extras.get("timeout")
        self.deadline = time.monotonic() + self.timeout if self.timeout else None
        self.status, self.error = "queued", None
        self.created, self.started, self.finished = time.time(), None, None
        self.queued_at = time.monotonic()
        self.images: list[dict | None] = [None] * len(items)
        self.fraction: dict[int, float] = {}  # item -> sampling progress of a running item
        self.done = asyncio.Event()
        self.webhook_state: dict | None = None

    @property
    def progress(self) -> float:
        done = sum(1 for x in self.images if x is not None)
        if self.status == "succeeded":
            return 1.0
        return round((done + sum(f for i, f in self.fraction.items() if self.images[i] is None)) / len(self.items), 4)

    def record(self) -> dict:
        rec = {"id": self.id, "status": self.status, "progress": self.progress, "count": len(self.items),
               "seeds": [it["seed"] for it in self.items], "created": self.created, "started": self.started,
               "finished": self.finished, "error": self.error,
               "images": [{"index": i, "seed": self.items[i]["seed"], "url": f"/v1/jobs/{self.id}/images/{i}",
                           "filename": img["filename"]} for i, img in enumerate(self.images) if img is not None]}
        if self.webhook:
            rec["webhook"] = dict(self.webhook_state or {"url": self.webhook, "delivered": False, "attempts": 0})
        return rec


class Group:
    """One prompt in ComfyUI's queue: the items (job, index) it renders, in batch order."""

    def __init__(self, pid: str, items: list):
        self.pid, self.items = pid, items
        self.running = False
        self.sampler_t0: float | None = None
        self.step_times: list[tuple[float, int]] = []  # (time, steps done) of the sampler's progress events
        self.missing_since: float | None = None


def jobs_of(items: list) -> list[Job]:
    """The distinct jobs of (job, index) items, in order."""
    return list({id(j): j for j, _ in items}.values())


class Service:
    def __init__(self, prompt_server):
        self.ps = prompt_server
        self.version = pack_version()
        self.cfg = service_config.Config()
        self.config_error: str | None = None
        self.wf = self.m = self.ui = None
        self.defaults = api.Defaults()
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self.pending: collections.deque = collections.deque()  # (job, index) not yet in ComfyUI's queue
        self.groups: dict[str, Group] = {}
        self.ready_job: Job | None = None
        self.served_one = False
        self.validated = False
        self._all_there = float("-inf")  # when problems() last found every file
        self.wake: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.loop = None
        self.cluster = None  # a gateway (``queue`` set): jobs go to the cluster's workers instead of ComfyUI's queue
        self.cluster_depth: dict | None = None
        self.cluster_error: str | None = None
        self._polled = float("-inf")  # when cluster_tick last looked at the queue
        self.configure()

    # -- configuration --------------------------------------------------------------------------------------------
    def configure(self) -> None:
        try:
            self.cfg = service_config.load()
            self.wf = service_config.build_workflow(self.cfg)
            self.ui = service_config.ui_workflow(self.cfg)
            self.m = graph.map_workflow(self.wf, service_config.workflow_path(self.cfg))
        except (service_config.ConfigError, graph.InputError) as e:
            self.config_error = str(e)
            return
        if self.cfg.queue:
            try:
                self.cluster = cluster.Cluster(self.cfg.queue)
            except ImportError:
                self.config_error = ("queue is set but rq/redis are not installed in ComfyUI's Python: pip install -r "
                                     "requirements-cluster.txt (the pack's folder), then restart")
                return
            except ValueError as e:
                self.config_error = f"queue ({self.cfg.source}): {e}"
                return
        s, lat = self.wf[self.m["sampler"]]["inputs"], self.wf[self.m["latent"]]["inputs"]
        neg = self.wf[self.m["negative"]]["inputs"].get("text", "") if self.m["negative"] else ""
        self.defaults = api.Defaults(negative=neg if isinstance(neg, str) else "", width=lat.get("width", 1024),
                                     height=lat.get("height", 1024), steps=s.get("steps", 28), cfg=s.get("cfg", 4.5),
                                     sampler_name=s.get("sampler_name", "euler"),
                                     scheduler=s.get("scheduler", "sgm_uniform"))

    def problems(self) -> list[str]:
        """Why the routes cannot serve: a bad configuration, a missing node type or model file. While something is
        missing every call looks again (a file put into models/ is found at once); once all is there, the model
        lists are read at most once a second, since every request asks."""
        if self.config_error:
            return [self.config_error]
        if self.cluster:  # the workers have the models and validate; the gateway needs its queue
            return [self.cluster_error] if self.cluster_error else []
        now = time.monotonic()
        if now - self._all_there < 1.0:
            return []

        def options_of(cls, inp):
            return graph.combo_options(comfy_nodes.NODE_CLASS_MAPPINGS[cls].INPUT_TYPES(), inp)
        found = graph.model_problems(self.wf, comfy_nodes.NODE_CLASS_MAPPINGS.keys(), options_of)
        if not found:
            self._all_there = now
        return found

    @property
    def ckpt_file(self) -> str:
        """The model file the configured workflow loads ("" when it cannot be mapped)."""
        if not self.m:
            return ""
        loader = next((v["inputs"] for v in self.wf.values() if v["class_type"] in
                       ("SD35FP8CheckpointLoader", "CheckpointLoaderSimple", "UNETLoader")), {})
        return str(loader.get("ckpt_name") or loader.get("unet_name") or "")

    @property
    def model_name(self) -> str:
        return os.path.splitext(self.ckpt_file)[0]

    def per_call(self) -> int:
        if self.cfg.max_per_call:
            return self.cfg.max_per_call
        # a gateway's workers are GPUs
        return 4 if self.cluster or comfy.model_management.get_torch_device().type == "cuda" else 1

    # -- start ----------------------------------------------------------------------------------------------------
    async def start(self, app=None) -> None:
        self.loop = asyncio.get_running_loop()
        self.wake = asyncio.Event()
        self.hook_events()
        self.task = asyncio.create_task(self.run())
        problems = self.problems()
        if problems:
            log.error("sd35fp8 service: the routes answer 503 until this is fixed: %s", "; ".join(problems))
            return
        log.info("sd35fp8 service: /sdapi/v1/txt2img, /v1/txt2img, /v1/jobs, /metrics on this server; workflow %s "
                 "(%s)%s", service_config.workflow_path(self.cfg), self.cfg.source,
                 "; auth token required" if self.cfg.token else "")

    async def check_workflow(self) -> None:
        """Once the model files are there: ComfyUI's own validation of the configured workflow (every widget value),
        so a bad setting is a 503 with its reason at once, not a failure at sampling time; then the warm-up."""
        if self.validated or self.problems() or self.cluster:
            return
        self.validated = True
        valid = await execution.validate_prompt(str(uuid.uuid4()), json.loads(json.dumps(self.wf)), None)
        if not valid[0]:
            self.config_error = (f"the workflow {service_config.workflow_path(self.cfg)} with this configuration "
                                 f"({self.cfg.source}) does not validate: {_validation_message(valid)}; fix the "
                                 "configuration and restart")
            log.error("sd35fp8 service: the routes answer 503 until this is fixed: %s", self.config_error)
            return
        if self.cfg.warmup:
            d = self.defaults
            self.ready_job = Job("warmup", [{"prompt": "a photograph", "negative": d.negative, "width": d.width,
                                             "height": d.height, "steps": d.steps, "cfg": d.cfg,
                                             "sampler_name": d.sampler_name, "scheduler": d.scheduler, "count": 1,
                                             "seed": 0}])
            self.submit(self.ready_job)

    def hook_events(self) -> None:
        """See ComfyUI's executor events (they go through ``send_sync`` from its worker thread) for our prompts."""
        original = self.ps.send_sync

        def send_sync(event, data, sid=None):
            original(event, data, sid)
            if isinstance(data, dict) and data.get("prompt_id") in self.groups:
                self.loop.call_soon_threadsafe(self.on_event, event, data, time.monotonic())
        self.ps.send_sync = send_sync

    def on_event(self, event: str, data: dict, t: float) -> None:
        grp = self.groups.get(data.get("prompt_id"))
        if grp is None:
            return
        sampler = self.m["sampler"]
        if event == "execution_start":
            self.mark_running(grp)
        elif event == "executing" and data.get("node") == sampler:
            grp.sampler_t0 = t
        elif event == "progress" and data.get("node") == sampler and data.get("max"):
            grp.step_times.append((t, data["value"]))  # newer ComfyUI sends fewer events than steps (throttled)
            for job, i in grp.items:
                job.fraction[i] = min(1.0, data["value"] / data["max"])

    def mark_running(self, grp: Group) -> None:
        grp.running = True
        for job, _ in grp.items:
            if job.status == "queued":
                job.status, job.started = "running", time.time()

    # -- the loop -------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # never let one bad prompt stop the service
                log.exception("sd35fp8 service: dispatcher error")
            try:
                await asyncio.wait_for(self.wake.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()

    async def tick(self) -> None:
        if self.cluster:
            return await self.cluster_tick()
        await self.check_workflow()
        q = self.ps.prompt_queue
        now = time.monotonic()
        with q.mutex:
            present = {x[1] for x in q.queue}
            running = {x[1] for x in q.currently_running.values()}
            done = {pid: q.get_history(prompt_id=pid).get(pid) for pid in self.groups
                    if pid not in present and pid not in running}
        for pid, entry in done.items():
            grp = self.groups[pid]
            if entry is not None:
                del self.groups[pid]
                self.finish_group(grp, entry)
            elif grp.missing_since is None:
                grp.missing_since = now
            elif now - grp.missing_since > 2.0:  # removed from ComfyUI's queue by someone else: run it again
                del self.groups[pid]
                log.warning("sd35fp8 service: prompt %s left ComfyUI's queue unrun; queueing its images again", pid)
                self.pending.extendleft(reversed(grp.items))
        for pid in running & self.groups.keys():
            if not self.groups[pid].running:
                self.mark_running(self.groups[pid])
        for job in list(self.active()):
            if job.deadline and now > job.deadline:
                self.cancel(job, "failed", f"timed out after {job.timeout:g} s")
        while self.pending and len(self.groups) < self.cfg.inflight:
            chosen = self.take_group(now)
            if not chosen:
                break
            await self.enqueue(chosen)
        self.prune()

    def active(self):
        return (j for j in self.jobs.values() if j.status not in TERMINAL)

    # -- a gateway: the cluster's queue instead of ComfyUI's ---------------------------------------------------------
    CLUSTER_INFLIGHT = 64  # the gateway's jobs on the cluster's queue at a time (the workers pull them)

    CLUSTER_POLL = 0.5  # seconds between looks at the queue (the dispatcher ticks every 0.1 s)

    def cluster_poll(self, jids: list[str]) -> tuple[dict, dict]:
        """(in a thread) Each job's state (:meth:`Cluster.poll`, one round trip) and the queue's depth; raises
        RedisError when the queue is away."""
        from rq import Worker
        depth = self.cluster.depth()
        depth["workers"] = Worker.count(connection=self.cluster.conn, queue=self.cluster.queue)
        return self.cluster.poll(jids), depth

    def cluster_fetch(self, jid: str, entry: dict) -> dict:
        """(in a thread) The job's images into this server's output folder (``<prefix>/cluster/<job>/``: the
        workers' own file names may repeat), each written whole; the entry, pointing at them."""
        stored, entry = entry, json.loads(json.dumps(entry))
        base = folder_paths.get_output_directory()
        sub = os.path.join(self.cfg.output_prefix, "cluster", jid)
        os.makedirs(os.path.join(base, sub), exist_ok=True)
        for out in entry.get("outputs", {}).values():
            for img in out.get("images", []):
                data = self.cluster.image(jid, img)
                path = os.path.join(base, sub, img["filename"])
                with open(path + ".partial", "wb") as f:
                    f.write(data)
                os.replace(path + ".partial", path)
                img.update(subfolder=sub, type="output")
        self.cluster.forget(jid, stored)  # the images' copies in the queue's store, by the names the worker gave
        return entry

    async def cluster_tick(self) -> None:
        """Every CLUSTER_POLL seconds: the jobs' states (finished ones' images fetched, failed ones reported); every
        tick: waiting images to the queue while there is room (a lone one after its batch window)."""
        from redis.exceptions import RedisError
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        if now - self._polled >= self.CLUSTER_POLL:
            self._polled = now
            try:
                states, self.cluster_depth = await loop.run_in_executor(None, self.cluster_poll, list(self.groups))
            except RedisError as e:
                if not self.cluster_error:
                    log.error("sd35fp8 gateway: the queue at %s does not answer: %s", self.cfg.queue, e)
                self.cluster_error = f"the cluster's queue at {self.cfg.queue} does not answer: {e}"
                return
            if self.cluster_error:
                log.info("sd35fp8 gateway: the queue at %s is back", self.cfg.queue)
            self.cluster_error = None
            await self.cluster_results(states)
            for job in list(self.active()):
                if job.deadline and now > job.deadline:
                    self.cancel(job, "failed", f"timed out after {job.timeout:g} s")
        while self.cluster_error is None and self.pending and \
                len(self.groups) < max(self.cfg.inflight, self.CLUSTER_INFLIGHT):
            chosen = self.take_group(now)
            if not chosen:
                break
            g, pnginfo = self.prompt_for(chosen)
            extra = {"extra_pnginfo": pnginfo} if pnginfo else {}
            jid = f"sd35fp8-api-{uuid.uuid4()}"
            try:
                await loop.run_in_executor(None, self.cluster.submit, jid, g, extra, self.cfg.retries)
            except RedisError as e:
                self.pending.extendleft(reversed(chosen))
                self.cluster_error = f"the cluster's queue at {self.cfg.queue} does not answer: {e}"
                break
            self.groups[jid] = Group(jid, chosen)
        self.prune()

    async def cluster_results(self, states: dict) -> None:
        from redis.exceptions import RedisError
        for jid, state in states.items():
            grp = self.groups.get(jid)
            if grp is None:
                continue
            res = state.result
            if state.status == "started" and not grp.running:
                self.mark_running(grp)
            elif state.status == "finished":
                del self.groups[jid]
                if res.get("status") != "ok":
                    for job in jobs_of(grp.items):
                        self.cancel(job, "failed", f"{res.get('status')}: {res.get('error')}")
                    continue
                try:
                    entry = await asyncio.get_running_loop().run_in_executor(None, self.cluster_fetch, jid,
                                                                             res["entry"])
                except (RuntimeError, OSError, RedisError) as e:
                    for job in jobs_of(grp.items):
                        self.cancel(job, "failed", f"could not fetch the images from the queue: {e}")
                    continue
                self.finish_group(grp, entry)
            elif state.error:
                del self.groups[jid]
                for job in jobs_of(grp.items):
                    self.cancel(job, "failed", state.error)

    def take_group(self, now: float) -> list:
        """The oldest waiting image and, where the workflow allows, compatible ones (same size, steps, cfg,
        sampler, scheduler, negative) of any request, up to the per-call limit. A lone image waits
        ``batch_window`` seconds for company."""
        job, i = self.pending[0]
        first = job.items[i]
        per_call = self.per_call() if graph.can_group(self.wf, self.m) and graph.groupable(first) else 1
        key = graph.batch_key(first)
        mates = [x for x in list(self.pending)[1:] if graph.groupable(x[0].items[x[1]])
                 and graph.batch_key(x[0].items[x[1]]) == key][:per_call - 1]
        if len(mates) < per_call - 1 and now - job.queued_at < self.cfg.batch_window:
            return []
        chosen = [self.pending.popleft(), *mates]
        for x in mates:
            self.pending.remove(x)
        return chosen

    def prompt_for(self, chosen: list) -> tuple[dict, dict]:
        """(graph, PNG metadata) of the chosen images: one item's graph, or several in one sampler call. A lone
        item's PNG opens in the editor as its own workflow (a shared call's PNGs get theirs when served)."""
        items = [job.items[i] for job, i in chosen]
        prefix = self.cfg.output_prefix
        g = graph.group_graph(self.wf, self.m, items, prefix) if len(items) > 1 else \
            graph.item_graph(self.wf, self.m, items[0], prefix)
        return g, ({"workflow": graph.ui_for(self.ui, g)} if self.ui and len(items) == 1 else {})

    async def enqueue(self, chosen: list) -> None:
        g, pnginfo = self.prompt_for(chosen)
        pid = str(uuid.uuid4())
        data = self.ps.trigger_on_prompt({"prompt": g, "client_id": CLIENT_ID})
        prompt = data.get("prompt", g)
        replace = getattr(getattr(self.ps, "node_replace_manager", None), "apply_replacements", None)
        if replace:
            replace(prompt)
        valid = await execution.validate_prompt(pid, prompt, None)
        if not valid[0]:
            for job in jobs_of(chosen):
                self.cancel(job, "failed", f"ComfyUI refused the workflow: {_validation_message(valid)}")
            return
        number = self.ps.number
        self.ps.number += 1
        extra = {"client_id": CLIENT_ID, "create_time": int(time.time() * 1000)}
        if pnginfo:
            extra["extra_pnginfo"] = pnginfo
        self.groups[pid] = Group(pid, chosen)
        self.ps.prompt_queue.put((number, pid, prompt, extra, valid[2], {}))

    def finish_group(self, grp: Group, entry: dict) -> None:
        ok = entry.get("status", {}).get("status_str") == "success"
        jobs = jobs_of(grp.items)
        if ok:
            imgs = graph.saved_images(entry, self.m)
            if len(imgs) != len(grp.items):
                for job in jobs:
                    self.cancel(job, "failed", f"the workflow saved {len(imgs)} image(s) for {len(grp.items)}")
                return
            for (job, i), img in zip(grp.items, imgs):
                if job.status in TERMINAL:
                    continue
                job.images[i] = dict(img, path=os.path.join(folder_paths.get_directory_by_type(img.get("type",
                                     "output")), img.get("subfolder", ""), img["filename"]))
                if len(grp.items) > 1:  # a shared call's PNG gets its own item's prompt and workflow when served
                    own = graph.item_graph(self.wf, self.m, job.items[i], self.cfg.output_prefix)
                    job.images[i]["pnginfo"] = {"prompt": own, **({"workflow": graph.ui_for(self.ui, own)}
                                                                  if self.ui else {})}
                job.fraction.pop(i, None)
            if grp.sampler_t0 is not None:
                metrics.observe_call(grp.sampler_t0, grp.step_times)
            for job in jobs:
                if job.status not in TERMINAL and all(x is not None for x in job.images):
                    self.finish(job, "succeeded")
        else:
            for job in jobs:
                self.cancel(job, "failed", graph.error_of(entry))

    # -- jobs -----------------------------------------------------------------------------------------------------
    def waiting_images(self) -> int:
        return len(self.pending) + sum(len(g.items) for g in self.groups.values())

    def submit(self, job: Job) -> Job:
        if self.waiting_images() + len(job.items) > self.cfg.max_queue + self.cfg.max_images and job.kind != "warmup":
            raise HTTPProblem(429, f"the service has {self.waiting_images()} images waiting (max_queue "
                                   f"{self.cfg.max_queue}); retry later", retry_after=5)
        self.jobs[job.id] = job
        self.pending.extend((job, i) for i in range(len(job.items)))
        self.wake.set()
        return job

    def cancel(self, job: Job, status: str = "cancelled", error: str | None = None) -> bool:
        """End ``job`` (only it): its waiting images leave the service's list, its queued prompts leave ComfyUI's
        queue, a running one is interrupted; other requests' images that shared a prompt with it are queued
        again."""
        if job.status in TERMINAL:
            return False
        self.pending = collections.deque(x for x in self.pending if x[0] is not job)
        q = self.ps.prompt_queue
        for pid, grp in list(self.groups.items()):
            if not any(j is job for j, _ in grp.items):
                continue
            others = [(j, i) for j, i in grp.items if j is not job and j.status not in TERMINAL]
            if self.cluster:  # off the cluster's queue, or stopped on its worker
                del self.groups[pid]
                asyncio.get_running_loop().run_in_executor(None, self.cluster.cancel, pid)
            elif q.delete_queue_item(lambda item, pid=pid: item[1] == pid):
                del self.groups[pid]
            else:
                with q.mutex:
                    is_running = any(x[1] == pid for x in q.currently_running.values())
                    entry = None if is_running else q.get_history(prompt_id=pid).get(pid)
                del self.groups[pid]
                if entry is not None:  # it has just finished: what it rendered stands
                    self.finish_group(grp, entry)
                    others = []
                elif is_running:
                    comfy_nodes.interrupt_processing()
            self.pending.extendleft(reversed(others))
        self.finish(job, status, error)
        return job.status == status

    def finish(self, job: Job, status: str, error: str | None = None) -> None:
        if job.status in TERMINAL:
            return
        job.status, job.error, job.finished = status, error, time.time()
        job.fraction.clear()
        job.done.set()
        if status == "succeeded":
            self.served_one = True
        metrics.count_job(status, len(job.items) if status == "succeeded" and job.kind != "warmup" else 0)
        if status != "succeeded":
            log.info("sd35fp8 service: job %s %s%s", job.id, status, f": {error}" if error else "")
        if job.webhook:
            asyncio.get_running_loop().create_task(self.deliver(job))
        self.wake.set()

    def prune(self) -> None:
        """Finished jobs older than job_ttl go, and the oldest finished ones beyond max_jobs_kept."""
        now = time.time()
        excess = len(self.jobs) - self.cfg.max_jobs_kept
        for jid in [k for k, j in self.jobs.items() if j.status in TERMINAL]:
            if excess > 0 or now - self.jobs[jid].finished > self.cfg.job_ttl:
                del self.jobs[jid]
                excess -= 1

    async def deliver(self, job: Job) -> None:
        """POST the finished job's record to its webhook, retried with back-off; a failure is recorded on the job,
        logged and counted, never raised."""
        body = json.dumps(job.record()).encode()
        headers = {"Content-Type": "application/json", "X-SD35FP8-Job": job.id}
        if self.cfg.token:
            sig = hmac.new(self.cfg.token.encode(), body, hashlib.sha256).hexdigest()
            headers["X-SD35FP8-Signature"] = f"sha256={sig}"
        state = {"url": job.webhook, "delivered": False, "attempts": 0, "error": None}
        delay = self.cfg.webhook_backoff
        for attempt in range(1 + self.cfg.webhook_retries):
            state["attempts"] = attempt + 1
            try:
                async with ClientSession(timeout=ClientTimeout(total=self.cfg.webhook_timeout)) as s:
                    async with s.post(job.webhook, data=body, headers=headers) as r:
                        if r.status < 300:
                            state.update(delivered=True, error=None, status=r.status)
                            break
                        state["error"] = f"HTTP {r.status}"
            except Exception as e:  # noqa: BLE001 - a webhook must never harm the server
                state["error"] = f"{type(e).__name__}: {e}"[:300]
            job.webhook_state = dict(state)
            if attempt < self.cfg.webhook_retries:
                await asyncio.sleep(delay)
                delay *= 2
        job.webhook_state = state
        metrics.count_webhook(state["delivered"])
        if not state["delivered"]:
            log.warning("sd35fp8 service: webhook %s for job %s failed after %d attempts: %s", job.webhook, job.id,
                        state["attempts"], state["error"])

    async def wait(self, request: web.Request, job: Job) -> Job:
        """A synchronous request: wait for its job; a client that goes away before the job starts has it removed
        from the queue."""
        job.deadline = time.monotonic() + self.cfg.request_timeout
        job.timeout = self.cfg.request_timeout
        try:
            while not job.done.is_set():
                try:
                    await asyncio.wait_for(job.done.wait(), 0.25)
                except asyncio.TimeoutError:
                    pass
                gone = request.transport is None or request.transport.is_closing()
                if gone and job.status == "queued":
                    self.cancel(job, "cancelled", "the client disconnected before the job started")
        except asyncio.CancelledError:  # a server that cancels handlers of lost clients
            if job.status == "queued":
                self.cancel(job, "cancelled", "the client disconnected before the job started")
            raise
        return job

    # -- readiness ------------------------------------------------------------------------------------------------
    def readiness(self) -> tuple[bool, list[str]]:
        reasons = self.problems()
        if self.cluster:  # a gateway: ready when its queue answers (the workers have their own readiness)
            if not reasons and self.cluster_depth is None:
                reasons.append("the cluster's queue has not answered yet")
        elif not reasons:
            if self.ready_job is not None and self.ready_job.status != "succeeded":
                reasons.append(f"warm-up {self.ready_job.status}" + (f": {self.ready_job.error}"
                                                                     if self.ready_job.error else
                                                                     " (loading and calibrating the model)"))
            elif self.ready_job is None and self.cfg.warmup:
                reasons.append("the warm-up has not started yet")
            elif self.ready_job is None and not self.served_one:
                reasons.append("the model is not loaded yet: it loads and calibrates with the first request (set "
                               "SD35FP8_API_WARMUP=1 to do it at start)")
        if self.waiting_images() >= self.cfg.max_queue:
            reasons.append(f"{self.waiting_images()} images waiting (max_queue {self.cfg.max_queue})")
        return not reasons, reasons

    def state_counts(self) -> dict:
        counts = {"queued": 0, "running": 0}
        for j in self.active():
            counts[j.status] = counts.get(j.status, 0) + 1
        return counts

    def queue_state(self) -> tuple[int, int]:
        q = self.ps.prompt_queue
        with q.mutex:
            return len(q.queue), len(q.currently_running)

    async def image_bytes(self, img: dict) -> bytes:
        """The PNG's bytes; an image of a shared sampler call first gets its own item's metadata (written once,
        atomically, off the event loop)."""
        def read():
            meta = img.pop("pnginfo", None)
            if meta:
                retag_png(img["path"], meta)
            with open(img["path"], "rb") as f:
                return f.read()
        return await asyncio.get_running_loop().run_in_executor(None, read)


# -- HTTP -------------------------------------------------------------------------------------------------------------
def _json(data, status: int = 200, headers=None) -> web.Response:
    return web.json_response(data, status=status, headers=headers)


async def _body(request: web.Request):
    try:
        raw = await request.read()
        return json.loads(raw or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise api.FieldError("body", f"is not valid JSON: {e}") from None


def _authorized(request: web.Request, token: str) -> bool:
    got = request.headers.get("Authorization", "")
    if got.startswith("Bearer "):
        return hmac.compare_digest(got[7:].strip().encode(), token.encode())
    if got.startswith("Basic "):  # A1111 clients send --api-auth as basic auth: the password is the token
        try:
            password = base64.b64decode(got[6:].strip(), validate=True).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(password.encode(), token.encode())
    return False


def register(prompt_server) -> Service | None:
    """Add the routes to ComfyUI's server (before it starts) and start the service with it."""
    svc = Service(prompt_server)
    if not svc.cfg.enabled and not svc.config_error:
        log.info("sd35fp8 service: off (SD35FP8_API_ENABLED=0)")
        return None
    routes = prompt_server.routes
    metrics.add_gauges(svc.queue_state, svc.state_counts, lambda: svc.cluster_depth)
    samplers, schedulers = list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)

    def route(method: str, path: str, a1111: bool = False, auth: bool = True, serving: bool = False):
        def wrap(handler):
            async def endpoint(request: web.Request) -> web.StreamResponse:
                try:
                    if auth and svc.cfg.token and not _authorized(request, svc.cfg.token):
                        raise HTTPProblem(401, "unauthorized: send 'Authorization: Bearer <token>' with the "
                                               "server's SD35FP8_API_TOKEN", www=True)
                    if serving:
                        problems = svc.problems()
                        if problems:
                            raise HTTPProblem(503, "the service cannot serve: " + "; ".join(problems))
                    resp = await handler(request)
                except api.FieldError as e:
                    resp = _json(api.a1111_validation_error(e) if a1111 else
                                 {"error": str(e), "field": e.field}, 422 if e.field != "body" or a1111 else 400)
                except HTTPProblem as e:
                    headers = {"WWW-Authenticate": 'Bearer realm="sd35fp8"'} if e.extra.get("www") else {}
                    if e.extra.get("retry_after"):
                        headers["Retry-After"] = str(e.extra["retry_after"])
                    body = api.a1111_error(_reason(e.status), e.message) \
                        if a1111 else {"error": e.message, **{k: v for k, v in e.extra.items()
                                                              if k not in ("www", "retry_after")}}
                    resp = _json(body, e.status, headers)
                except Exception as e:  # noqa: BLE001 - answer 500 with the cause, keep serving
                    log.exception("sd35fp8 service: %s %s failed", method, path)
                    resp = _json(api.a1111_error(type(e).__name__, str(e)) if a1111 else
                                 {"error": f"{type(e).__name__}: {e}"}, 500)
                metrics.count_request(path, method, resp.status)
                return resp
            routes.route(method, path)(endpoint)
            return handler
        return wrap

    limits = svc.cfg.limits()

    # -- A1111 -------------------------------------------------------------------------------------------------------
    @route("POST", "/sdapi/v1/txt2img", a1111=True, serving=True)
    async def a1111_txt2img(request):
        items, params = api.a1111_items(await _body(request), limits, svc.defaults, samplers, schedulers)
        job = await svc.wait(request, svc.submit(Job("a1111", items, params=params)))
        if job.status == "failed":
            raise HTTPProblem(504 if job.error and job.error.startswith("timed out") else 500, job.error or "failed")
        done = [i for i, img in enumerate(job.images) if img is not None]
        images = [base64.b64encode(await svc.image_bytes(job.images[i])).decode() for i in done]
        info = api.a1111_info([items[i] for i in done] or items, params, svc.model_name, svc.version,
                              job.created)
        if job.status == "cancelled":
            info["interrupted"] = True
        return _json({"images": images, "parameters": params, "info": json.dumps(info)})

    @route("GET", "/sdapi/v1/sd-models")
    async def a1111_models(request):
        name = svc.model_name
        ckpt = svc.ckpt_file
        return _json([{"title": ckpt, "model_name": name, "hash": None, "sha256": None, "filename": ckpt,
                       "config": None}] if ckpt else [])

    @route("GET", "/sdapi/v1/samplers")
    async def a1111_samplers(request):
        return _json([{"name": api.a1111_sampler_label(s), "aliases": [s, *api.A1111_ALIASES.get(
            api.a1111_sampler_label(s), [])], "options": {}} for s in samplers])

    @route("GET", "/sdapi/v1/schedulers")
    async def a1111_schedulers(request):
        return _json([{"name": s, "label": api.A1111_SCHEDULER_NAMES.get(s, s), "aliases": None,
                       "default_rho": 7.0 if s == "karras" else -1, "need_inner_model": False} for s in schedulers])

    @route("GET", "/sdapi/v1/scripts")
    async def a1111_scripts(request):
        return _json({"txt2img": [], "img2img": []})

    @route("GET", "/sdapi/v1/options")
    async def a1111_options_get(request):
        return _json(a1111_options())

    def a1111_options() -> dict:
        return {"sd_model_checkpoint": svc.model_name, "sd_checkpoint_hash": None, "samples_format": "png",
                "CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 0, "sd_vae": "Automatic",
                "outdir_samples": "", "save_images_add_number": True, "enable_pnginfo": True}

    @route("POST", "/sdapi/v1/options", a1111=True)
    async def a1111_options_set(request):
        body = await _body(request)
        if not isinstance(body, dict):
            raise api.FieldError("body", "must be a JSON object of options", "type_error.dict")
        current = a1111_options()
        changed = [k for k, v in body.items() if current.get(k, object()) != v and not (
            k == "sd_model_checkpoint" and isinstance(v, str) and v.split(" [")[0] in (svc.model_name,))]
        if changed:
            raise HTTPProblem(403, f"options are read-only on this server (it runs the configured workflow): "
                                   f"{', '.join(changed[:10])}; change the service configuration instead")
        return _json(None)

    @route("GET", "/sdapi/v1/progress")
    async def a1111_progress(request):
        active = list(svc.active())
        running = [j for j in active if j.status == "running"]
        cur = running[0] if running else None
        progress = cur.progress if cur else 0.0
        elapsed = time.time() - cur.started if cur and cur.started else 0.0
        eta = elapsed / progress - elapsed if progress > 0 else 0.0
        step = 0
        steps = cur.items[0]["steps"] if cur else 0
        if cur and cur.fraction:
            step = int(round(max(cur.fraction.values()) * steps))
        state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": cur.id if cur else "",
                 "job_count": len(active), "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(
                     cur.created)) if cur else "0", "job_no": 0, "sampling_step": step, "sampling_steps": steps}
        return _json({"progress": progress, "eta_relative": round(eta, 3), "state": state, "current_image": None,
                      "textinfo": None, "current_task": cur.id if cur else None})

    @route("POST", "/sdapi/v1/interrupt")
    async def a1111_interrupt(request):
        for job in [j for j in svc.active() if j.kind == "a1111" and j.status == "running"]:
            svc.cancel(job, "cancelled", "interrupted (/sdapi/v1/interrupt)")
        return _json(None)

    # -- simple and jobs ---------------------------------------------------------------------------------------------
    @route("POST", "/v1/txt2img", serving=True)
    async def simple_txt2img(request):
        items, _ = api.simple_items(await _body(request), limits, svc.defaults, samplers, schedulers)
        job = await svc.wait(request, svc.submit(Job("simple", items)))
        if job.status != "succeeded":
            code = 504 if job.error and job.error.startswith("timed out") else 409 if job.status == "cancelled" \
                else 500
            raise HTTPProblem(code, job.error or job.status, job=job.id)
        png = await svc.image_bytes(job.images[0])
        return web.Response(body=png, content_type="image/png",
                            headers={"X-Seed": str(items[0]["seed"]), "X-Job-Id": job.id})

    @route("POST", "/v1/jobs", serving=True)
    async def jobs_post(request):
        items, extras = api.simple_items(await _body(request), limits, svc.defaults, samplers, schedulers,
                                         allow=("count", "webhook", "timeout"))
        job = svc.submit(Job("job", items, extras))
        return _json(job.record(), 202, {"Location": f"/v1/jobs/{job.id}"})

    def job_of(request) -> Job:
        job = svc.jobs.get(request.match_info["job_id"])
        if job is None or job.kind == "warmup":
            raise HTTPProblem(404, f"no job {request.match_info['job_id']!r} (unknown, or finished more than "
                                   f"{svc.cfg.job_ttl:g} s ago)")
        return job

    @route("GET", "/v1/jobs")
    async def jobs_list(request):
        return _json({"jobs": [j.record() for j in reversed(svc.jobs.values()) if j.kind != "warmup"][:100]})

    @route("GET", "/v1/jobs/{job_id}")
    async def jobs_get(request):
        return _json(job_of(request).record())

    @route("DELETE", "/v1/jobs/{job_id}")
    async def jobs_delete(request):
        job = job_of(request)
        if not svc.cancel(job, "cancelled", "cancelled (DELETE /v1/jobs)"):
            raise HTTPProblem(409, f"job {job.id} has already {job.status}", job_status=job.status)
        return _json(job.record())

    @route("GET", "/v1/jobs/{job_id}/images/{index}")
    async def jobs_image(request):
        job = job_of(request)
        idx = request.match_info["index"]
        if not idx.isdigit() or int(idx) >= len(job.images):
            raise HTTPProblem(404, f"job {job.id} has images 0..{len(job.images) - 1}, not {idx!r}")
        img = job.images[int(idx)]
        if img is None:
            raise HTTPProblem(404, f"image {idx} of job {job.id} is not ready (job {job.status})")
        return web.Response(body=await svc.image_bytes(img), content_type="image/png",
                            headers={"X-Seed": str(job.items[int(idx)]["seed"])})

    # -- operations --------------------------------------------------------------------------------------------------
    @route("GET", "/v1/health/live", auth=False)
    async def live(request):
        if svc.task is not None and svc.task.done():
            raise HTTPProblem(500, "the service's dispatcher stopped (see the server log)")
        return _json({"status": "alive"})

    @route("GET", "/v1/health/ready", auth=False)
    async def ready(request):
        ok, reasons = svc.readiness()
        return _json({"ready": ok, "reasons": reasons, "waiting_images": svc.waiting_images()}, 200 if ok else 503)

    @route("GET", "/v1/cluster", auth=False)
    async def cluster_depth(request):
        """A gateway's cluster: jobs waiting, running and dead-lettered, their total (what KEDA scales on) and the
        workers on the queue."""
        if not svc.cluster:
            raise HTTPProblem(404, "this server is not a cluster gateway (set SD35FP8_API_QUEUE=redis://...)")
        if svc.cluster_error or svc.cluster_depth is None:
            raise HTTPProblem(503, svc.cluster_error or "the queue has not answered yet")
        d = dict(svc.cluster_depth)
        return _json(dict(d, total=d["waiting"] + d["running"], queue=svc.cfg.queue.split("@")[-1]))

    @route("GET", "/v1/openapi.json", auth=False)
    async def openapi(request):
        return web.FileResponse(OPENAPI)

    async def metrics_handler(request):
        out = metrics.exposition()
        if out is None:
            raise HTTPProblem(503, "prometheus-client is not installed in ComfyUI's Python: pip install "
                                   "prometheus-client, then restart")
        return web.Response(body=out[0], headers={"Content-Type": out[1]})
    route("GET", "/metrics", auth=svc.cfg.protect_metrics)(metrics_handler)

    prompt_server.app.on_startup.append(svc.start)
    return svc


def register_with_server() -> Service | None:
    """:func:`register` on the running ComfyUI's server; nothing where there is none (the library imported on its
    own, a test)."""
    import server
    instance = getattr(server.PromptServer, "instance", None)
    return register(instance) if instance is not None else None


def retag_png(path: str, texts: dict) -> None:
    """Replace text chunks of a PNG (values as JSON), keeping the others; temp file, then rename."""
    from PIL import Image, PngImagePlugin
    with Image.open(path) as pic:
        pic.load()
        meta = PngImagePlugin.PngInfo()
        merged = {k: v for k, v in pic.info.items() if isinstance(v, str)}
        merged.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in texts.items()})
        for k, v in merged.items():
            meta.add_text(k, v)
        tmp = f"{path}.{os.getpid()}.retag"
        pic.save(tmp, format="PNG", pnginfo=meta, compress_level=4)
    os.replace(tmp, path)


def _validation_message(valid) -> str:
    """ComfyUI's validate_prompt answer as one line: its message and each node's first error."""
    err, nodes = valid[1], valid[3]
    why = f"{err.get('message', '')}: {err.get('details', '')}" if isinstance(err, dict) else str(err)
    per_node = "; ".join(f"node {n}: {(e.get('errors') or [{}])[0].get('details', '')}" for n, e in nodes.items()) \
        if isinstance(nodes, dict) else ""
    return f"{why} {per_node}".strip()


def _reason(status: int) -> str:
    from http import HTTPStatus
    try:
        return HTTPStatus(status).phrase.replace(" ", "")
    except ValueError:
        return "Error"
