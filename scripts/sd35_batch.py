#!/usr/bin/env python3
"""The batch client: a list of prompts becomes images, a manifest and a summary, unattended.

    scripts/batch.sh ITEMS [--server http://127.0.0.1:8188] [--workflow large|medium|large_turbo|FILE.json]
                           [--out DIR] [--seed BASE] [--retries 2] [--fail-on black,flat,clipped]

ITEMS is a text file (one prompt per line; blank lines and lines starting with # are skipped), a CSV with a header
or a JSONL file. CSV/JSONL columns: ``prompt`` (required), ``negative``, ``seed``, ``width``, ``height``, ``steps``,
``cfg``, ``count`` (images of that item, one sampler batch), ``name`` (file names; default item-00001, ...).
A missing seed is derived from ``--seed`` and the item's name, so a re-run reproduces every image.

The workflow is one of the bundled ones or any API-format workflow (ComfyUI's "Export (API)") holding one
KSampler: the client finds the nodes to fill by type and role (the sampler, the text encoders feeding its positive
and negative inputs, the empty latent feeding it, the SaveImage nodes), never by id, and refuses a workflow it
cannot map, naming what is missing. Every input line and every model file the workflow names is checked before
anything is queued. The pack's Calibrate node is left as the workflow has it, so ComfyUI calibrates once per model
and settings (the pack's calibration cache keeps it across restarts).

Without ``--server`` it starts a ComfyUI with the pack as scripts/run.sh does (the tiny embedded model unless
``--ckpt`` is given). Output: ``OUT/<name>_<k>.png`` and ``OUT/manifest.jsonl`` (one line per finished item:
prompt, seed, settings, files, seconds, status, quality flags). Running the same command again skips the items
the manifest has as done (resume after a crash or Ctrl-C) and retries the failed ones. An item that fails is
retried ``--retries`` times, then recorded as failed and the batch goes on. Exit status: 0 all done, 1 some item
failed, 2 bad input (nothing queued), 3 the quality gate (``--fail-on``, ``--min-psnr``) failed.
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import os
import re
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if HERE not in sys.path:
    sys.path.insert(0, HERE)
from comfy_harness import http_get, http_post  # noqa: E402  (stdlib only: the client needs no torch)

if REPO not in sys.path:
    sys.path.insert(0, REPO)
from service.graph import (  # noqa: E402
    MODELS_HINT, InputError, batch_key, can_group, combo_options, error_of, group_graph, groupable, item_graph,
    inline_settings, map_workflow, model_problems, saved_images, settings_of, ui_for)
from service.cluster import JOB_TIMEOUT, LIVE, job_id  # noqa: E402
from service.config import BUNDLED, bundled_ui_path  # noqa: E402
FIELDS = ("prompt", "negative", "seed", "width", "height", "steps", "cfg", "count", "name")
INT_FIELDS = {"seed": (0, 2**64 - 1), "width": (64, 16384), "height": (64, 16384), "steps": (1, 10000),
              "count": (1, 64)}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
FLAGS = ("non_finite", "black", "flat", "clipped")


# -- items ---------------------------------------------------------------------------------------------------------
def derive_seed(base: int, name: str) -> int:
    """A seed from the base seed and the item's name: the same on every run, independent of the item's position."""
    return int.from_bytes(hashlib.sha256(f"{base}:{name}".encode()).digest()[:8], "big") >> 11  # 53 bits


def _coerce(field: str, value, where: str):
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None
    if field in INT_FIELDS:
        try:
            v = int(str(value).strip()) if not isinstance(value, int) or isinstance(value, bool) else value
        except ValueError:
            raise InputError(f"{where}: {field} must be a whole number, got {value!r}") from None
        lo, hi = INT_FIELDS[field]
        if not lo <= v <= hi:
            raise InputError(f"{where}: {field} {v} is outside {lo}..{hi}")
        if field in ("width", "height") and v % 16:
            raise InputError(f"{where}: {field} {v} is not a multiple of 16 (SD3 latents are 1/8 size, patches 2)")
        return v
    if field == "cfg":
        try:
            v = float(str(value).strip())
        except ValueError:
            raise InputError(f"{where}: cfg must be a number, got {value!r}") from None
        if not 0.0 <= v <= 100.0:
            raise InputError(f"{where}: cfg {v} is outside 0..100")
        return v
    if not isinstance(value, str):
        raise InputError(f"{where}: {field} must be text, got {type(value).__name__}")
    return value


def read_items(path: str, base_seed: int) -> list[dict]:
    """Parse and check every line; raise InputError listing every bad line (file name and line number)."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    with open(path, encoding="utf-8-sig", newline="") as f:
        text = f.read()
    rows: list[tuple[int, dict]] = []
    errors: list[str] = []
    if ext == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        unknown = [c for c in (reader.fieldnames or []) if c not in FIELDS]
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise InputError(f"{path}: the CSV header must name a 'prompt' column (columns: {', '.join(FIELDS)})")
        if unknown:
            raise InputError(f"{path}: line 1: unknown column(s) {', '.join(unknown)}; use {', '.join(FIELDS)}")
        for rec in reader:
            if None in rec:
                errors.append(f"{path}: line {reader.line_num}: more values than columns")
                continue
            if not any((v or "").strip() for v in rec.values()):
                continue
            rows.append((reader.line_num, rec))
    elif ext in (".jsonl", ".ndjson"):
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(f"{path}: line {n}: not JSON ({e.msg} at column {e.colno})")
                continue
            if not isinstance(rec, dict):
                errors.append(f"{path}: line {n}: expected a JSON object like {{\"prompt\": \"...\"}}")
                continue
            unknown = [k for k in rec if k not in FIELDS]
            if unknown:
                errors.append(f"{path}: line {n}: unknown field(s) {', '.join(unknown)}; use {', '.join(FIELDS)}")
                continue
            rows.append((n, rec))
    else:  # plain text: one prompt per line
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                rows.append((n, {"prompt": line.strip()}))
    items, names = [], {}
    for i, (n, rec) in enumerate(rows):
        where = f"{path}: line {n}"
        try:
            item = {f: _coerce(f, rec.get(f), where) for f in FIELDS}
        except InputError as e:
            errors.append(str(e))
            continue
        if not item["prompt"] or not item["prompt"].strip():
            errors.append(f"{where}: empty prompt")
            continue
        name = item["name"] or f"item-{i + 1:05d}"
        if not NAME_RE.match(name):
            errors.append(f"{where}: name {name!r} must be letters, digits, '.', '_' or '-' (it names the files)")
            continue
        if name in names:
            errors.append(f"{where}: name {name!r} is already used on line {names[name]}")
            continue
        names[name] = n
        item.update(name=name, line=n, seed_derived=item["seed"] is None)
        if item["seed"] is None:
            item["seed"] = derive_seed(base_seed, name)
        items.append(item)
    if errors:
        more = f"\n... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise InputError("\n".join(errors[:20]) + more)
    if not items:
        raise InputError(f"{path}: no prompts in the file")
    return items


def auto_per_call(srv: Server) -> int:
    """Without --per-call: 4 prompts per sampler call on a server with a CUDA GPU (a 1024² batch of one leaves it
    partly idle), 1 elsewhere (on CPUs larger calls measured slower: bench/results/*_cpu_prompt_batch_tiny.md)."""
    try:
        devices = srv.get("/system_stats").get("devices", [])
    except (OSError, urllib.error.URLError, ValueError):
        return 1
    return 4 if any(d.get("type") == "cuda" for d in devices) else 1


def make_jobs(todo: list[dict], wf: dict, m: dict, per_call: int) -> list[list[dict]]:
    """Items that share size, steps, cfg and negative prompt (one image each, consecutive in the list) go into one
    sampler call of up to ``per_call`` prompts (SD35FP8PromptBatch); the others run alone."""
    if per_call <= 1 or not can_group(wf, m):
        return [[it] for it in todo]
    jobs, cur = [], []
    key = batch_key
    for it in todo:
        if not groupable(it):
            jobs.append([it])
            continue
        if cur and (key(cur[0]) != key(it) or len(cur) >= per_call):
            jobs.append(cur)
            cur = []
        cur.append(it)
    if cur:
        jobs.append(cur)
    return jobs


# -- the server ----------------------------------------------------------------------------------------------------
class Server:
    """ComfyUI's HTTP API and websocket, as a client on another machine would use them."""

    def __init__(self, base: str):
        self.base = base.rstrip("/")
        self.client_id = uuid.uuid4().hex
        self.events: dict[str, list] = {}
        self.progress: dict = {}
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self._ws_thread = None
        self.ws_error = None

    def get(self, path: str, timeout: float = 60):
        return http_get(self.base, path, timeout)

    def get_bytes(self, path: str, timeout: float = 120) -> bytes:
        with urllib.request.urlopen(self.base + path, timeout=timeout) as r:
            return r.read()

    def post(self, path: str, payload: dict, timeout: float = 60):
        return http_post(self.base, path, payload, timeout)

    def listen(self):
        """Websocket events of this client's prompts, by prompt id (and the current step, for the progress bar)."""
        import websocket  # websocket-client
        url = self.base.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        ws = websocket.create_connection(url, timeout=10)

        def run():
            while True:
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                except Exception as e:  # noqa: BLE001  (the server went away)
                    with self.cond:
                        self.ws_error = str(e) or type(e).__name__
                        self.cond.notify_all()
                    return
                if not isinstance(raw, str):
                    continue
                msg = json.loads(raw)
                data = msg.get("data") or {}
                pid = data.get("prompt_id")
                with self.cond:
                    if msg["type"] == "progress" and pid:
                        self.progress = {"prompt_id": pid, "value": data.get("value"), "max": data.get("max")}
                    elif pid:
                        self.events.setdefault(pid, []).append(msg)
                    self.cond.notify_all()
        self._ws_thread = threading.Thread(target=run, daemon=True)
        self._ws_thread.start()

    def queue(self, graph: dict, extra: dict) -> str:
        status, body = self.post("/prompt", {"prompt": graph, "client_id": self.client_id, "extra_data": extra})
        if status != 200 or "prompt_id" not in body:
            raise QueueRefused(body.get("error", {}).get("message") if isinstance(body.get("error"), dict)
                               else None, body)
        return body["prompt_id"]

    def finished(self, pid: str) -> dict | None:
        """The history entry once ``pid`` has finished (success or error), else None."""
        for m in self.events.get(pid, []):
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                break
        else:
            return None
        for _ in range(100):
            h = self.get(f"/history/{urllib.parse.quote(pid)}")
            if pid in h and h[pid].get("status", {}).get("completed") is not None:
                return h[pid]
            time.sleep(0.1)
        return {"status": {"status_str": "error", "messages": []}, "outputs": {}}


    def wait(self, pid: str, on_step=None) -> dict:
        """Block until ``pid`` has finished; ``on_step(progress)`` for its progress events. Returns its history."""
        while (entry := self.finished(pid)) is None:
            with self.cond:
                self.cond.wait(timeout=1.0)
                if self.ws_error:
                    raise RuntimeError(f"lost the connection to ComfyUI at {self.base}: {self.ws_error}")
                step = dict(self.progress)
            if on_step:
                on_step(step if step.get("prompt_id") == pid else None)
        return entry

    def image(self, img: dict) -> bytes:
        """One output image of a history entry, through /view (the server may be on another machine)."""
        q = urllib.parse.urlencode({"filename": img["filename"], "subfolder": img.get("subfolder", ""),
                                    "type": img.get("type", "output")})
        return self.get_bytes(f"/view?{q}")


class QueueRefused(Exception):
    def __init__(self, message, body):
        super().__init__(message or "the server refused the prompt")
        self.body = body

    def details(self) -> str:
        errs = []
        for node, e in (self.body.get("node_errors") or {}).items():
            for x in e.get("errors", []):
                errs.append(f"node {node} ({e.get('class_type')}): {x.get('message')}: {x.get('details')}")
        return "; ".join(errs) or json.dumps(self.body)[:500]


def check_models(srv: Server, wf: dict, where: str) -> None:
    """Every model file the workflow names must be in the server's lists (before anything is queued)."""
    info = srv.get("/object_info")

    problems = model_problems(wf, info.keys(), lambda cls, inp: combo_options(info[cls]["input"], inp))
    if problems:
        raise InputError(f"{where}: " + "\n".join(problems) + "\n" + MODELS_HINT)


# -- quality -------------------------------------------------------------------------------------------------------
def quality_flags(img) -> dict:
    """Flags of one image (H x W x 3, uint8): black, flat (no detail), clipped (much of it at 0 or 255)."""
    import numpy as np
    x = np.asarray(img, dtype=np.float32)
    mean, std = float(x.mean()), float(x.std())
    clipped = float(((x <= 0) | (x >= 255)).mean())
    flags = []
    if mean < 4 and std < 4:
        flags.append("black")
    elif std < 2:
        flags.append("flat")
    if clipped > 0.5 and "black" not in flags:
        flags.append("clipped")
    return {"flags": flags, "mean": round(mean, 2), "std": round(std, 2), "clipped": round(clipped, 4)}


def image_metrics(pairs) -> tuple[list[float], list[float]]:
    """(PSNR, SSIM) of each (PIL image, PIL image) pair, by the library's metrics (torch: reference runs only)."""
    import numpy as np
    import torch
    from sd35fp8.core import fidelity

    def t(img):
        return torch.from_numpy(np.asarray(img, np.float32) / 255.0)
    ps, ss = [], []
    for x, y in pairs:
        ps += fidelity.psnr(t(x), t(y))
        ss += fidelity.ssim(t(x), t(y))
    return ps, ss


def reference_graph(g: dict, m: dict) -> dict | None:
    """The same graph through stock ComfyUI in BF16: the pack's loader -> CheckpointLoaderSimple/UNETLoader of the
    same file, Calibrate and Autocast bypassed. None when the graph has no pack loader."""
    if not m["loader"]:
        return None
    g = copy.deepcopy(g)
    name = g[m["loader"]]["inputs"]["ckpt_name"]
    g[m["loader"]] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}}
    for k, v in list(g.items()):
        if v["class_type"] in ("SD35FP8Calibrate", "SD35FP8Autocast"):
            src = v["inputs"]["model"]
            for other in g.values():
                for ik, iv in other["inputs"].items():
                    if isinstance(iv, list) and len(iv) == 2 and str(iv[0]) == k and iv[1] == 0:
                        other["inputs"][ik] = src
            del g[k]
    for k in [k for k, v in g.items() if v["class_type"] == "SD35FP8SaveCheckpoint"]:
        del g[k]
    return g


# -- the run -------------------------------------------------------------------------------------------------------
class Manifest:
    """OUT/manifest.jsonl: one JSON line per finished item, appended and synced; the last line of a name wins."""

    def __init__(self, path: str):
        self.path = path
        self.done: dict[str, dict] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    try:
                        rec = json.loads(line)
                        self.done[rec["name"]] = rec
                    except (json.JSONDecodeError, KeyError, TypeError):
                        print(f"[batch] {path}: line {n} is damaged (a crash while writing?); that item runs again",
                              file=sys.stderr)

    def finished_ok(self, item: dict, out_dir: str) -> bool:
        rec = self.done.get(item["name"])
        return bool(rec and rec.get("status") == "ok" and rec.get("seed") == item["seed"]
                    and rec.get("prompt") == item["prompt"]
                    and rec.get("files") and all(os.path.exists(os.path.join(out_dir, f)) for f in rec["files"]))

    def write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done[rec["name"]] = rec


class Progress:
    def __init__(self, total: int, images_total: int, stream=sys.stderr):
        self.total, self.images_total, self.stream = total, images_total, stream
        self.t0, self.done, self.images, self.failed = time.time(), 0, 0, 0
        self.tty = stream.isatty()
        self.last = 0.0

    def show(self, current: str = "", step: dict | None = None, force: bool = False):
        now = time.time()
        if not force and now - self.last < (0.2 if self.tty else 10):
            return
        self.last = now
        el = now - self.t0
        rate = self.images / el if el > 0 and self.images else 0.0
        left = (self.images_total - self.images) / rate if rate else float("nan")
        eta = f"{int(left // 60)}:{int(left % 60):02d}" if left == left else "?"
        st = f" step {step['value']}/{step['max']}" if step and step.get("max") else ""
        line = (f"[batch] {self.done}/{self.total} items, {self.images} images, {rate:.2f} images/s, ETA {eta}"
                + (f", {self.failed} failed" if self.failed else "") + (f" | {current}{st}" if current else ""))
        self.stream.write(("\r" + line[:150].ljust(150)) if self.tty else line + "\n")
        self.stream.flush()


def start_server(a):
    """A ComfyUI with the pack, as scripts/run.sh starts one (the embedded demo model unless --ckpt)."""
    from comfy_harness import ComfyServer
    import run_batch
    models = os.path.join(REPO, ".cache", "models")
    work = os.path.join(REPO, ".cache", "batch")
    os.makedirs(work, exist_ok=True)
    tiny = not a.ckpt
    if tiny:
        run_batch.make_demo_models(models)
    else:
        run_batch.link_models(models, a.ckpt, a.text_encoders)
    import torch
    dev = [] if (a.gpu or torch.cuda.is_available()) else ["--cpu"]
    srv = ComfyServer(models, workdir=work, device_args=dev)
    srv.start()
    print(f"[batch] started ComfyUI at {srv.base} (log: {srv.log_path})", file=sys.stderr)
    return srv, tiny


def tiny_workflow(wf: dict, m: dict, cpu: bool) -> dict:
    import run_batch
    g = run_batch.adapt(wf, ckpt_name=run_batch.DEMO_CKPT, tiny_clip=run_batch.TINY_CLIP, width=run_batch.DEMO_SIZE,
                        height=run_batch.DEMO_SIZE, steps=run_batch.DEMO_STEPS,
                        calib_text=run_batch.demo_calibration_prompts())
    if cpu:
        g[m["latent"]]["inputs"]["batch_size"] = 1
    return g


def load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise InputError(f"{what} {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: not JSON (line {e.lineno}: {e.msg})") from None


def run(a) -> int:
    items = read_items(a.items, a.seed)
    if a.workflow in BUNDLED:
        api_path = os.path.join(REPO, "workflows", "api", BUNDLED[a.workflow] + "_api.json")
        ui_path = a.ui_workflow or bundled_ui_path(a.workflow)
    else:
        api_path, ui_path = a.workflow, a.ui_workflow
    wf = inline_settings(load_json(api_path, "workflow"))
    m = map_workflow(wf, api_path)
    ui = load_json(ui_path, "UI workflow") if ui_path else None
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    manifest = Manifest(os.path.join(out, "manifest.jsonl"))
    todo = [it for it in items if not manifest.finished_ok(it, out)]
    print(f"[batch] {len(items)} items in {a.items}; {len(items) - len(todo)} already done in {out}; "
          f"{len(todo)} to run", file=sys.stderr)
    if a.queue:
        return run_cluster(a, wf, m, ui, todo, items, manifest, out)
    started = None
    if a.server:
        srv = Server(a.server)
    else:
        started, tiny = start_server(a)
        srv = Server(started.base)
        if tiny:
            wf = tiny_workflow(wf, m, "--cpu" in started.extra_args)
    try:
        return run_items(a, srv, wf, m, ui, todo, items, manifest, out)
    finally:
        if started:
            started.stop()


def run_items(a, srv, wf, m, ui, todo, items, manifest, out) -> int:
    check_models(srv, wf, a.workflow)
    run_tag = hashlib.sha256(out.encode()).hexdigest()[:12]  # this output folder's prompts on the server
    drop_stale(srv, run_tag)
    prefix = f"sd35_batch/{run_tag}"
    srv.listen()
    prog = Progress(len(todo), sum(it["count"] or 1 for it in todo))
    if not todo:
        return finish(a, items, manifest, out, prog, 0, 0, {}, [])
    cal_info = probe_calibration(srv, wf, m, prog)
    pending: dict[str, tuple] = {}  # prompt id -> (job, attempt, t0)
    per_call = a.per_call if a.per_call is not None else auto_per_call(srv)
    queue = [(job, 1) for job in make_jobs(todo, wf, m, per_call)]
    failed = quality_failed = 0
    summary_flags: dict[str, int] = {}
    psnrs = []
    gate = set(a.fail_on + (["below_min_psnr"] if a.min_psnr is not None else []))

    graphs: dict[str, dict] = {}

    def graph_of(it):  # the item's own graph: queued alone, and the source of its manifest line and PNG metadata
        if it["name"] not in graphs:
            graphs[it["name"]] = item_graph(wf, m, it, prefix)
        return graphs[it["name"]]

    def item_png(it):
        png = {"workflow": ui_for(ui, graph_of(it))} if ui else {}
        png["sd35fp8"] = pack_info(graph_of(it), m, cal_info)
        return png

    def fail(it, attempt, secs, why, flags):
        nonlocal failed
        manifest.write(record(it, graph_of(it), m, [], secs, "failed", attempt, why, flags))
        graphs.pop(it["name"], None)
        failed += 1
        prog.failed += 1
        prog.done += 1
    try:
        while queue or pending:
            while queue and len(pending) < a.inflight:  # keep the next job queued: no idle GPU between jobs
                job, attempt = queue.pop(0)
                g = graph_of(job[0]) if len(job) == 1 else group_graph(wf, m, job, prefix)
                png = item_png(job[0])
                if len(job) > 1:
                    png["sd35fp8"]["items"] = [{"name": it["name"], "seed": it["seed"]} for it in job]
                extra = {"extra_pnginfo": png, "sd35fp8_batch": {"run": run_tag, "items": [it["name"] for it in job],
                                                                 "attempt": attempt}}
                try:
                    pid = srv.queue(g, extra)
                except QueueRefused as e:  # the graph itself is wrong: no retry helps
                    for it in job:
                        fail(it, attempt, 0.0, f"refused: {e}: {e.details()}", [])
                    continue
                pending[pid] = (job, attempt, time.time())
            with srv.cond:
                srv.cond.wait(timeout=1.0)
                if srv.ws_error:
                    raise RuntimeError(f"lost the connection to ComfyUI at {srv.base}: {srv.ws_error}")
                step = dict(srv.progress)
            cur = pending.get(step.get("prompt_id"), (None,))[0]
            prog.show(", ".join(it["name"] for it in cur)[:60] if cur else "", step)
            for pid in list(pending):
                entry = srv.finished(pid)
                if entry is None:
                    continue
                job, attempt, t0 = pending.pop(pid)
                secs = time.time() - t0
                status = entry.get("status", {})
                if status.get("status_str") != "success":
                    why = error_of(entry)
                    flags = ["non_finite"] if "NaN" in why or "Inf" in why else []
                    if attempt <= a.retries and not flags:
                        print(f"\n[batch] {', '.join(it['name'] for it in job)[:80]}: failed "
                              f"({why.splitlines()[0][:200]}); retry {attempt}", file=sys.stderr)
                        queue.insert(0, (job, attempt + 1))
                        continue
                    for it in job:
                        fail(it, attempt, secs, why[:2000], flags)
                    continue
                try:
                    saved = save_outputs(srv, entry, m, job, out, [item_png(it) for it in job] if len(job) > 1
                                         else None)
                except (RuntimeError, OSError, urllib.error.URLError) as e:
                    for it in job:
                        fail(it, attempt, secs, f"could not fetch the images: {e}", [])
                    continue
                for it, (files, q) in zip(job, saved):
                    flags = sorted({f for x in q for f in x["flags"]})
                    g1 = graph_of(it)
                    rec = record(it, g1, m, files, secs / len(job), "ok", attempt, None, flags, quality=q)
                    if len(job) > 1:
                        rec["batched_with"] = len(job)
                    if a.reference_every and (items.index(it) % a.reference_every == 0):
                        rec["reference"] = reference_check(srv, g1, m, it, files, out, prefix)
                        if "psnr" in rec["reference"]:
                            psnrs.append(rec["reference"]["psnr"])
                            if a.min_psnr is not None and rec["reference"]["psnr"] < a.min_psnr:
                                rec["flags"].append("below_min_psnr")
                    quality_failed += count_flags(rec, summary_flags, gate)
                    manifest.write(rec)
                    graphs.pop(it["name"], None)
                    prog.done += 1
                    prog.images += len(files)
                prog.show(force=True)
    except KeyboardInterrupt:
        drop_stale(srv, run_tag, interrupt=True)
        print("\n[batch] interrupted: finished items are in the manifest; run the same command again to go on",
              file=sys.stderr)
        return 130
    return finish(a, items, manifest, out, prog, failed, quality_failed, summary_flags, psnrs)


class JobImages:
    """A finished cluster job's images, read from the queue's store (what :func:`save_outputs` asks a server)."""

    def __init__(self, cl, jid: str):
        self.cl, self.jid = cl, jid

    def image(self, img: dict) -> bytes:
        return self.cl.image(self.jid, img)


def run_cluster(a, wf, m, ui, todo, items, manifest, out) -> int:
    """The same batch on a cluster (``--queue redis://...``): every job goes to the queue under an id made from this
    output folder and its items (a re-run finds its jobs again: nothing is rendered twice), workers run them on
    their ComfyUIs, and this client writes the files and manifest lines as results come. A lost queue server is
    waited for."""
    from redis.exceptions import RedisError

    from service.cluster import Cluster
    cl = Cluster(a.queue)
    cl.ping()
    run_tag = hashlib.sha256(out.encode()).hexdigest()[:12]
    prefix = f"sd35_batch/{run_tag}"
    prog = Progress(len(todo), sum(it["count"] or 1 for it in todo))
    jobs = make_jobs(todo, wf, m, a.per_call or 1)
    failed = quality_failed = 0
    summary_flags: dict[str, int] = {}
    gate = set(a.fail_on)

    graphs: dict[str, dict] = {}

    def graph_of(it):  # the item's own graph: its job's prompt (alone), its manifest line and its PNG's metadata
        if it["name"] not in graphs:
            graphs[it["name"]] = item_graph(wf, m, it, prefix)
        return graphs[it["name"]]

    def item_png(it):
        png = {"workflow": ui_for(ui, graph_of(it))} if ui else {}
        png["sd35fp8"] = pack_info(graph_of(it), m, {})
        return png

    def fail(job, why, flags, attempts):
        nonlocal failed
        for it in job:
            manifest.write(record(it, graph_of(it), m, [], 0.0, "failed", attempts, why[:2000], flags))
            graphs.pop(it["name"], None)
            failed += 1
            prog.failed += 1
            prog.done += 1

    pending: dict[str, list[dict]] = {}
    for job in jobs:
        g = graph_of(job[0]) if len(job) == 1 else group_graph(wf, m, job, prefix)
        png = item_png(job[0])
        if len(job) > 1:
            png["sd35fp8"]["items"] = [{"name": it["name"], "seed": it["seed"]} for it in job]
        jid = job_id(run_tag, [it["name"] for it in job])
        tag = {"run": run_tag, "items": [it["name"] for it in job]}
        cl.submit(jid, g, {"extra_pnginfo": png, "sd35fp8_batch": tag}, a.retries, a.job_timeout)
        pending[jid] = job
    print(f"[batch] {len(pending)} job(s) on the queue {a.queue} ({cl.depth()})", file=sys.stderr)
    lost_since = None
    try:
        while pending:
            try:
                for jid, state in cl.poll(list(pending)).items():
                    if state.status in LIVE:
                        continue
                    job = pending.pop(jid)
                    res, n = state.result, state.deliveries
                    if state.error:
                        fail(job, state.error + ("; run the batch again" if state.status == "missing" else ""), [], n)
                        continue
                    if res.get("status") != "ok":
                        fail(job, f"{res.get('status')}: {res.get('error')}", res.get("flags", []), n)
                        continue
                    entry = res["entry"]
                    try:
                        saved = save_outputs(JobImages(cl, jid), entry, m, job, out,
                                             [item_png(it) for it in job] if len(job) > 1 else None)
                    except (RuntimeError, OSError) as e:
                        fail(job, f"could not fetch the images: {e}", [], n)
                        continue
                    for it, (files, q) in zip(job, saved):
                        flags = sorted({f for x in q for f in x["flags"]})
                        rec = record(it, graph_of(it), m, files, res.get("seconds", 0.0) / len(job), "ok", n, None,
                                     flags, quality=q)
                        rec["worker"] = res.get("worker")
                        if len(job) > 1:
                            rec["batched_with"] = len(job)
                        quality_failed += count_flags(rec, summary_flags, gate)
                        manifest.write(rec)
                        graphs.pop(it["name"], None)
                        prog.done += 1
                        prog.images += len(files)
                    cl.forget(jid, entry)
                if lost_since is not None:
                    print(f"\n[batch] the queue at {a.queue} is back", file=sys.stderr)
                    lost_since = None
            except RedisError as e:
                if lost_since is None:
                    lost_since = time.time()
                    print(f"\n[batch] the queue at {a.queue} does not answer ({e}): waiting for it (Ctrl-C stops; the "
                          "jobs stay queued)", file=sys.stderr)
            prog.show(f"{len(pending)} job(s) on the cluster")
            if pending:
                time.sleep(0.5)
    except KeyboardInterrupt:
        print("\n[batch] interrupted: the jobs stay on the queue and finish; run the same command again to collect "
              "them", file=sys.stderr)
        return 130
    prog.show(force=True)
    return finish(a, items, manifest, out, prog, failed, quality_failed, summary_flags, [])


def count_flags(rec: dict, summary_flags: dict, gate: set) -> int:
    """Add an item's quality flags to the run's summary; 1 when one of them fails the quality gate, else 0."""
    for f in rec["flags"]:
        summary_flags[f] = summary_flags.get(f, 0) + 1
    return int(bool(set(rec["flags"]) & gate))


def finish(a, items, manifest, out, prog, failed, quality_failed, summary_flags, psnrs) -> int:
    """The summary and the exit status."""
    el = max(time.time() - prog.t0, 1e-9)
    done_ok = sum(1 for it in items if manifest.finished_ok(it, out))
    print(f"\n[batch] done in {el:.0f} s: {done_ok}/{len(items)} items ok, {failed} failed, {prog.images} images "
          f"this run ({prog.images / el:.2f} images/s); manifest {manifest.path}", file=sys.stderr)
    if summary_flags:
        print("[batch] quality flags: " + ", ".join(f"{k} {v}" for k, v in sorted(summary_flags.items())),
              file=sys.stderr)
    if psnrs:
        print(f"[batch] vs BF16 reference ({len(psnrs)} items): PSNR min {min(psnrs):.1f} dB, mean "
              f"{sum(psnrs) / len(psnrs):.1f} dB", file=sys.stderr)
    if failed:
        return 1
    if quality_failed:
        print(f"[batch] QUALITY GATE FAILED: {quality_failed} item(s) flagged {', '.join(a.fail_on) or ''}"
              + (f" or below {a.min_psnr} dB" if a.min_psnr is not None else ""), file=sys.stderr)
        return 3
    return 0


def drop_stale(srv: Server, run_tag: str, interrupt: bool = False) -> None:
    """Remove this output folder's prompts still waiting in the server's queue (a killed earlier run left them); with
    ``interrupt`` also stop the one running now if it is ours."""
    try:
        q = srv.get("/queue")
    except (OSError, urllib.error.URLError):
        return
    mine = lambda e: len(e) > 3 and isinstance(e[3], dict) and (e[3].get("sd35fp8_batch") or {}).get("run") == run_tag  # noqa: E731
    stale = [e[1] for e in q.get("queue_pending", []) if mine(e)]
    if stale:
        srv.post("/queue", {"delete": stale})
        print(f"[batch] removed {len(stale)} prompt(s) of this output folder left in the server's queue",
              file=sys.stderr)
    if interrupt and any(mine(e) for e in q.get("queue_running", [])):
        srv.post("/interrupt", {})


def ancestors(wf: dict, node: str) -> set[str]:
    out, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in out:
            continue
        out.add(n)
        todo += [str(v[0]) for v in wf[n]["inputs"].values() if isinstance(v, list) and len(v) == 2 and str(v[0]) in wf]
    return out


def probe_calibration(srv: Server, wf: dict, m: dict, prog) -> dict:
    """Run the workflow's calibration alone first (ComfyUI keeps it for the items; a cached one returns at once) and
    read its id from the report, so that every PNG names the calibration it was made with."""
    if not m["calibrate"]:
        return {}
    g = {k: copy.deepcopy(wf[k]) for k in ancestors(wf, m["calibrate"])}
    g["sd35fp8_probe"] = {"class_type": "PreviewAny", "inputs": {"source": [m["calibrate"], 1]}}
    print("[batch] calibrating (once per model and settings; reused from ComfyUI's or the pack's cache if done "
          "before)", file=sys.stderr)
    t0 = time.time()
    entry = srv.wait(srv.queue(g, {}), lambda step: prog.show("calibration", step))
    if entry.get("status", {}).get("status_str") != "success":
        raise InputError(f"the workflow's calibration failed: {error_of(entry)}")
    outs = entry.get("outputs", {})
    text = " ".join((outs.get("sd35fp8_probe") or {}).get("text") or (outs.get(m["calibrate"]) or {}).get("text")
                    or [])
    found = re.search(r"calibration id ([0-9a-f]+)", text)
    print(f"[batch] calibration ready in {time.time() - t0:.0f} s" + (f" (id {found.group(1)})" if found else ""),
          file=sys.stderr)
    return {"id": found.group(1)} if found else {}


def pack_info(g: dict, m: dict, cal_info: dict) -> dict:
    """The pack's FP8 information for the PNG: model file, weight format, Autocast settings, calibration."""
    info = {}
    if m["loader"]:
        li = g[m["loader"]]["inputs"]
        info.update(model=li.get("ckpt_name"), weight_scaling=li.get("weight_scaling"))
    for k, v in g.items():
        if v["class_type"] == "SD35FP8Autocast":
            info["autocast"] = {x: y for x, y in v["inputs"].items() if not isinstance(y, list)}
    if m["calibrate"]:
        c = g[m["calibrate"]]["inputs"]
        info["calibration"] = {x: c.get(x) for x in ("steps", "cfg", "sampler_name", "scheduler", "width", "height",
                                                    "seed", "method")}
        info["calibration"]["prompts"] = len([p for p in str(c.get("prompts", "")).splitlines() if p.strip()])
        if cal_info.get("id"):
            info["calibration"]["id"] = cal_info["id"]
    return info


def save_outputs(srv: Server, entry: dict, m: dict, job: list[dict], out: str, pnginfo: list | None = None):
    """Download the job's images (/view) into OUT as <name>_<k>.png, in batch order (item by item), each written
    whole (temp name, then renamed). ``pnginfo``: per item, text chunks to store instead of the server's (the
    PNGs of a shared sampler call get their own item's UI workflow). Returns [(files, quality)] per item."""
    from PIL import Image, PngImagePlugin
    imgs = saved_images(entry, m)
    per_item = [it["count"] or 1 for it in job]
    if len(imgs) != sum(per_item):
        raise RuntimeError(f"expected {sum(per_item)} image(s) from the workflow's SaveImage, got {len(imgs)}")
    result, i = [], 0
    for j, it in enumerate(job):
        files, quality = [], []
        for k in range(per_item[j]):
            img = imgs[i]
            i += 1
            data = srv.image(img)
            pic = Image.open(io.BytesIO(data))
            if pnginfo and pnginfo[j]:
                meta = PngImagePlugin.PngInfo()
                texts = {k: v for k, v in pic.info.items() if isinstance(v, str)}  # the server's (prompt, ...)
                texts.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in pnginfo[j].items()})
                for key, val in texts.items():
                    meta.add_text(key, val)
                buf = io.BytesIO()
                pic.save(buf, format="PNG", pnginfo=meta, compress_level=4)
                data = buf.getvalue()
            name = f"{it['name']}_{k + 1}.png"
            tmp = os.path.join(out, f".{name}.partial")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, os.path.join(out, name))
            files.append(name)
            quality.append(quality_flags(pic.convert("RGB")))
        result.append((files, quality))
    return result


def reference_check(srv: Server, g: dict, m: dict, it: dict, files: list[str], out: str, prefix: str) -> dict:
    """Render the item through stock ComfyUI in BF16 (same prompt, seed, settings) and compare (PSNR, SSIM)."""
    from PIL import Image
    ref = reference_graph(g, m)
    if ref is None:
        return {"error": "no SD35FP8CheckpointLoader in the workflow: no BF16 reference to render"}
    for k in m["saves"]:
        ref[k]["inputs"]["filename_prefix"] = f"{prefix}/reference/{it['name']}"
    try:
        entry = srv.wait(srv.queue(ref, {}))
    except QueueRefused as e:
        return {"error": f"reference refused: {e.details()}"}
    if entry.get("status", {}).get("status_str") != "success":
        return {"error": f"the BF16 reference render failed: {error_of(entry)}"}
    ps, ss = image_metrics([(Image.open(io.BytesIO(srv.image(img))).convert("RGB"),
                             Image.open(os.path.join(out, f)).convert("RGB"))
                            for img, f in zip(saved_images(entry, m), files)])
    return {"psnr": round(min(ps), 2), "ssim": round(min(ss), 4)} if ps else {"error": "no reference image"}


def record(it, g, m, files, secs, status, attempts, error, flags, quality=None) -> dict:
    rec = {"name": it["name"], "line": it["line"], "prompt": it["prompt"], "negative": it["negative"],
           "seed": it["seed"], "seed_derived": it["seed_derived"], "settings": settings_of(g, m), "files": files,
           "seconds": round(secs, 2), "status": status, "attempts": attempts, "flags": list(flags)}
    if quality:
        rec["quality"] = quality
    if error:
        rec["error"] = error
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("items", help="prompts: .txt (one per line), .csv or .jsonl")
    ap.add_argument("--workflow", default="large", help="large, large_turbo, medium (bundled) or an API workflow")
    ap.add_argument("--ui-workflow", help="the UI-format workflow to store in the PNGs (bundled ones: automatic)")
    ap.add_argument("--server", help="a running ComfyUI, e.g. http://127.0.0.1:8188 (default: start one)")
    ap.add_argument("--queue", help="a cluster's queue instead of one ComfyUI: redis://host:6379/0 (workers: "
                                    "python -m service.worker; docs/scale-out.md)")
    ap.add_argument("--job-timeout", type=int, default=JOB_TIMEOUT,
                    help="with --queue: seconds a job may run before its worker stops it (default 600)")
    ap.add_argument("--ckpt", help="without --server: an SD3.5 .safetensors for the started ComfyUI")
    ap.add_argument("--text-encoders", help="without --server: the folder with clip_l/clip_g/t5xxl")
    ap.add_argument("--gpu", action="store_true", help="without --server: let the started ComfyUI use the GPU")
    ap.add_argument("--out", default="output/batch", help="images and manifest.jsonl (default output/batch)")
    ap.add_argument("--seed", type=int, default=0, help="base seed for items without one (default 0)")
    ap.add_argument("--retries", type=int, default=2, help="retries of a failed item (default 2)")
    ap.add_argument("--inflight", type=int, default=2, help="prompts kept in the server's queue (default 2)")
    ap.add_argument("--per-call", type=int,
                    help="up to N items of the same size, steps, cfg and negative in one sampler call "
                         "(SD35FP8PromptBatch; KSampler workflows); default 4 on a CUDA server, 1 on a CPU one")
    ap.add_argument("--fail-on", default="", help="quality flags that fail the run: black,flat,clipped,non_finite")
    ap.add_argument("--reference-every", type=int, default=0,
                    help="render every Nth item also through stock ComfyUI in BF16 and record PSNR/SSIM")
    ap.add_argument("--min-psnr", type=float, help="with --reference-every: fail the run below this PSNR (dB)")
    a = ap.parse_args(argv)
    a.fail_on = [f for f in a.fail_on.split(",") if f]
    bad = [f for f in a.fail_on if f not in FLAGS]
    if bad:
        ap.error(f"--fail-on: unknown flag(s) {', '.join(bad)}; use {', '.join(FLAGS)}")
    if a.queue and (a.server or a.reference_every):
        ap.error("--queue sends the jobs to the cluster's workers: drop --server and --reference-every")
    if a.min_psnr is not None and not a.reference_every:
        ap.error("--min-psnr needs --reference-every N (which items get a BF16 reference)")
    try:
        return run(a)
    except InputError as e:
        print(f"[batch] nothing was queued:\n{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
