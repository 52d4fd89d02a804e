"""The pack's Prometheus metrics (prometheus-client, in its own registry so no other pack's metrics mix in): what
the nodes count (model loads, calibrations) and what the generation service counts (requests, images, sampling
time). Served at ``/metrics`` by nodes/routes.py. Without prometheus-client installed every call here does nothing
and ``/metrics`` answers 503 saying what to install.
"""
from __future__ import annotations

import logging

log = logging.getLogger("sd35fp8")

try:
    import prometheus_client as prom
    from prometheus_client.core import GaugeMetricFamily
except ImportError:  # the routes say so; the nodes work without it
    prom = None

STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10)
CALL_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

registry = prom.CollectorRegistry(auto_describe=True) if prom else None
if prom:
    requests = prom.Counter("sd35fp8_requests", "HTTP requests to the pack's routes", ["route", "method", "status"],
                            registry=registry)
    images = prom.Counter("sd35fp8_images_generated", "images the service delivered", registry=registry)
    jobs = prom.Counter("sd35fp8_jobs_finished", "service jobs finished, by final status", ["status"],
                        registry=registry)
    sampling = prom.Histogram("sd35fp8_sampling_seconds", "seconds of one sampler call of the service (all steps)",
                              buckets=CALL_BUCKETS, registry=registry)
    steps = prom.Histogram("sd35fp8_step_seconds", "seconds per sampling step of the service's sampler calls",
                           buckets=STEP_BUCKETS, registry=registry)
    model_loads = prom.Counter("sd35fp8_model_loads", "checkpoints loaded by the pack's loader", registry=registry)
    calibrations = prom.Counter("sd35fp8_calibrations", "calibrations, computed or reused from the cache",
                                ["result"], registry=registry)
    calibration_seconds = prom.Histogram("sd35fp8_calibration_seconds", "seconds of a computed calibration",
                                         buckets=CALL_BUCKETS, registry=registry)
    webhooks = prom.Counter("sd35fp8_webhook_deliveries", "webhook calls, by result", ["result"], registry=registry)


def count_model_load() -> None:
    if prom:
        model_loads.inc()


def count_calibration(reused: bool, seconds: float | None = None) -> None:
    if prom:
        calibrations.labels("reused" if reused else "computed").inc()
        if seconds is not None and not reused:
            calibration_seconds.observe(seconds)


def count_request(route: str, method: str, status: int) -> None:
    if prom:
        requests.labels(route, method, str(status)).inc()


def count_job(status: str, images_delivered: int) -> None:
    if prom:
        jobs.labels(status).inc()
        if images_delivered:
            images.inc(images_delivered)


def count_webhook(delivered: bool) -> None:
    if prom:
        webhooks.labels("delivered" if delivered else "failed").inc()


def observe_call(t0: float, progress: list[tuple[float, int]]) -> None:
    """One sampler call: started at ``t0`` (monotonic seconds); ``progress``: (time, steps done) of its progress
    events, which may skip steps (ComfyUI 0.30 throttles them): the time between two events is shared by the steps
    between them."""
    if not prom or not progress:
        return
    sampling.observe(progress[-1][0] - t0)
    prev_t, prev_v = t0, 0
    for t, v in progress:
        if v > prev_v:
            for _ in range(v - prev_v):
                steps.observe((t - prev_t) / (v - prev_v))
            prev_t, prev_v = t, v


def add_gauges(queue_state, service_state, cluster_state=lambda: None) -> None:
    """Gauges read at scrape time: ``queue_state()`` -> (pending, running) of ComfyUI's queue, ``service_state()``
    -> {state: count} of the service's jobs, ``cluster_state()`` -> a gateway's cluster queue depth (or None);
    GPU memory where CUDA is present."""
    if not prom:
        return

    class Collector:
        def collect(self):
            pending, running = queue_state()
            g = GaugeMetricFamily("sd35fp8_queue_pending", "prompts waiting in ComfyUI's queue")
            g.add_metric([], pending)
            yield g
            g = GaugeMetricFamily("sd35fp8_queue_running", "prompts ComfyUI is running")
            g.add_metric([], running)
            yield g
            g = GaugeMetricFamily("sd35fp8_service_jobs", "the service's unfinished jobs, by state",
                                            labels=["state"])
            for state, n in service_state().items():
                g.add_metric([state], n)
            yield g
            depth = cluster_state()
            if depth:
                g = GaugeMetricFamily("sd35fp8_cluster_jobs", "a gateway's cluster jobs, by state (waiting, "
                                      "running, failed = dead-lettered)", labels=["state"])
                for state in ("waiting", "running", "failed"):
                    g.add_metric([state], depth[state])
                yield g
                g = GaugeMetricFamily("sd35fp8_cluster_workers", "workers registered on the cluster's queue")
                g.add_metric([], depth.get("workers", 0))
                yield g
            yield from gpu_memory()

    registry.register(Collector())


def gpu_memory():
    import torch
    if not torch.cuda.is_available():
        return
    g = GaugeMetricFamily("sd35fp8_gpu_memory_bytes", "CUDA memory of this process",
                                    labels=["device", "kind"])
    for i in range(torch.cuda.device_count()):
        g.add_metric([str(i), "allocated"], torch.cuda.memory_allocated(i))
        g.add_metric([str(i), "reserved"], torch.cuda.memory_reserved(i))
        g.add_metric([str(i), "peak_allocated"], torch.cuda.max_memory_allocated(i))
    yield g


def exposition() -> tuple[bytes, str] | None:
    """(body, content type) of a scrape, or None without prometheus-client."""
    if not prom:
        return None
    return prom.generate_latest(registry), prom.CONTENT_TYPE_LATEST
