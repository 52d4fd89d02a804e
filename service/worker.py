"""A cluster worker: takes jobs from the queue (service/cluster.py) and runs them on one ComfyUI with the pack.

    python -m service.worker --queue redis://queue:6379/0 --comfy http://127.0.0.1:8188

Run one per ComfyUI (one per GPU), beside it (deploy/: the container starts both). Behaviour:

- **Ready first:** it takes a job only while its ComfyUI answers ``GET /v1/health/ready`` with 200 (the pack's
  service: model files present, model loaded and calibrated when ``SD35FP8_API_WARMUP=1``, room in the queue). It
  looks again before every job and every few seconds while idle.
- **Leases:** a running job's lease is renewed every ``--lease`` seconds (RQ's heartbeat; the lease lasts that plus
  60 s). If this process dies, the lease runs out and another worker's maintenance (every ``--maintenance`` s)
  hands the job on.
- **SIGTERM** (docker stop, a Kubernetes pod ending): no new job; the running one finishes, then it exits 0. Give
  it a grace period longer than the longest job (deploy/ sets 15 minutes). A second SIGTERM or SIGINT stops at
  once (the job is then handed on through its lease).
- **The queue server goes away:** it waits and reconnects, with the running job kept or handed on by its lease.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request

if __package__ in (None, ""):  # run as a file: the pack's folder is the import root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from service import cluster  # noqa: E402

log = logging.getLogger("sd35fp8.worker")


def comfy_ready(comfy: str, path: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(comfy.rstrip("/") + path, timeout=10) as r:
            return r.status == 200, ""
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}"
    except (urllib.error.URLError, OSError) as e:
        return False, str(e)


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def make_worker_class():
    from rq import Worker

    class ComfyWorker(Worker):
        """RQ's forking worker, taking a job only while its ComfyUI is ready."""
        comfy = ""
        ready_path = "/v1/health/ready"
        idle_poll = 5

        def wait_until_ready(self) -> None:
            said = None
            while True:
                ok, why = comfy_ready(self.comfy, self.ready_path)
                if ok:
                    break
                if why != said:
                    self.log.info("Worker %s: not taking jobs: ComfyUI at %s is not ready (%s)", self.name, self.comfy,
                                  why)
                    said = why
                self.heartbeat()
                if self.should_run_maintenance_tasks:  # still hand on other workers' abandoned jobs
                    self.run_maintenance_tasks()
                time.sleep(1)
            if said:
                self.log.info("Worker %s: ComfyUI at %s is ready: taking jobs", self.name, self.comfy)

        def _install_signal_handlers(self):
            # RQ registers the worker (bootstrap) before it installs its handlers: main() blocks SIGTERM/SIGINT
            # until here, so a stop that comes in between waits for RQ's warm shutdown instead of killing the process
            super()._install_signal_handlers()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

        def dequeue_job_and_maintain_ttl(self, timeout, max_idle_time=None):
            # short waits: readiness is looked at again every few seconds while the queue is empty
            t = self.idle_poll if timeout is None else min(timeout, self.idle_poll)
            while True:
                self.wait_until_ready()
                result = super().dequeue_job_and_maintain_ttl(t, max_idle_time)
                if result is not None or max_idle_time:
                    return result
    return ComfyWorker


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queue", default=os.environ.get("SD35FP8_QUEUE_URL"),
                    help="the Redis URL (env SD35FP8_QUEUE_URL), e.g. redis://queue:6379/0")
    ap.add_argument("--comfy", default=os.environ.get(cluster.COMFY_ENV, "http://127.0.0.1:8188"),
                    help="this worker's ComfyUI (default http://127.0.0.1:8188)")
    ap.add_argument("--name", default=os.environ.get(cluster.WORKER_ENV) or f"{socket.gethostname()}-{os.getpid()}",
                    help="the worker's name in the queue (default host-pid)")
    ap.add_argument("--lease", type=int, default=10, help="seconds between lease renewals of a running job (10)")
    ap.add_argument("--maintenance", type=int, default=30,
                    help="seconds between looks for abandoned jobs of dead workers (30)")
    ap.add_argument("--ready-path", default="/v1/health/ready", help="ComfyUI's readiness route")
    ap.add_argument("--queue-name", default=cluster.QUEUE)
    a = ap.parse_args(argv)
    if not a.queue:
        ap.error("--queue (or SD35FP8_QUEUE_URL) is required, e.g. redis://127.0.0.1:6379/0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    os.environ[cluster.COMFY_ENV] = a.comfy  # the job function (in the forked horse) reads them
    os.environ[cluster.WORKER_ENV] = a.name
    from redis.exceptions import RedisError
    from rq import Queue
    cls = make_worker_class()
    cls.comfy, cls.ready_path = a.comfy, a.ready_path
    stopping = False
    incarnation = 0
    while True:
        try:
            conn = cluster.connect(a.queue)
            conn.ping()
            incarnation += 1
            name = a.name if incarnation == 1 else f"{a.name}.{incarnation}"  # a restarted loop: a fresh name
            w = cls([Queue(a.queue_name, connection=conn)], connection=conn, name=name,
                    job_monitoring_interval=a.lease, maintenance_interval=a.maintenance)
            log.info("worker %s: queue %s (%s), ComfyUI %s", name, a.queue, a.queue_name, a.comfy)
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # until RQ's handlers are in (see the class)
            try:
                w.work(logging_level="INFO")
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            stopping = getattr(w, "_shutdown_requested_date", None) is not None
        except RedisError as e:
            log.warning("worker %s: the queue at %s is unreachable (%s): retrying in 2 s", a.name, a.queue, e)
        except SystemExit:  # a cold shutdown (second signal)
            return 1
        if stopping:
            log.info("worker %s: stopped on request", a.name)
            return 0
        # the loop ended without a stop request (the queue server went away mid-loop): reconnect and go on
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
