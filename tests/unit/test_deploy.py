"""The deployment files (deploy/) as an orchestrator reads them. No cluster and no Docker daemon exist here: the
Kubernetes manifests are validated against the Kubernetes API schemas (kubernetes-validate, strict: an unknown field
fails), KEDA's ScaledObject against the fields of its v1alpha1 API, and the pieces are checked to point at each other
(names, ports, routes, grace periods longer than the job timeout). The container's entry point itself runs in
tests/e2e/test_cluster.py."""
import os
import re
import subprocess

import pytest
import yaml

from service.cluster import JOB_TIMEOUT

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(REPO, "deploy")
K8S = os.path.join(DEPLOY, "k8s")
K8S_VERSION = "1.33.0"
ROUTES = open(os.path.join(REPO, "nodes", "routes.py")).read()

# KEDA's ScaledObject (keda.sh/v1alpha1), the fields this project uses and their types, from KEDA's API reference
SCALED_OBJECT = {
    "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {"type": "object", "required": ["scaleTargetRef", "triggers"], "additionalProperties": False,
                 "properties": {
                     "scaleTargetRef": {"type": "object", "required": ["name"], "additionalProperties": False,
                                        "properties": {"name": {"type": "string"}, "kind": {"type": "string"},
                                                       "apiVersion": {"type": "string"}}},
                     "minReplicaCount": {"type": "integer", "minimum": 0},
                     "maxReplicaCount": {"type": "integer", "minimum": 1},
                     "pollingInterval": {"type": "integer"}, "cooldownPeriod": {"type": "integer"},
                     "idleReplicaCount": {"type": "integer"},
                     "advanced": {"type": "object", "additionalProperties": False, "properties": {
                         "restoreToOriginalReplicaCount": {"type": "boolean"},
                         "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False,
                                                           "properties": {"name": {"type": "string"},
                                                                          "behavior": {"type": "object"}}}}},
                     "triggers": {"type": "array", "minItems": 1, "items": {
                         "type": "object", "required": ["type", "metadata"],
                         "properties": {"type": {"type": "string"}, "name": {"type": "string"},
                                        "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                                        "metadata": {"type": "object",
                                                     "additionalProperties": {"type": "string"}}}}}}}}}


def k8s_docs():
    docs = []
    for name in sorted(os.listdir(K8S)):
        if name.endswith(".yaml") and name != "kustomization.yaml":
            docs += [(name, d) for d in yaml.safe_load_all(open(os.path.join(K8S, name))) if d]
    return docs


def by_kind(kind):
    return {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == kind}


def container(deploy):
    return deploy["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e.get("value") for e in c.get("env", [])}


@pytest.mark.parametrize("name,doc", k8s_docs(), ids=lambda x: x if isinstance(x, str) else x.get("kind"))
def test_every_manifest_is_valid_for_its_api(name, doc):
    if doc["kind"] == "ScaledObject":
        import jsonschema
        jsonschema.validate(doc, SCALED_OBJECT)
        return
    import kubernetes_validate
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_validation_catches_a_wrong_field():
    import jsonschema
    import kubernetes_validate
    worker = by_kind("Deployment")["sd35-fp8-worker"]
    bad = yaml.safe_load(yaml.safe_dump(worker))
    bad["spec"]["template"]["spec"]["terminationGracePeriod"] = 900  # the real field ends in ...Seconds
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    so = yaml.safe_load(yaml.safe_dump(by_kind("ScaledObject")["sd35-fp8-worker"]))
    so["spec"]["minReplicas"] = 0  # HPA's name, not KEDA's
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(so, SCALED_OBJECT)


def test_kustomization_lists_every_manifest():
    k = yaml.safe_load(open(os.path.join(K8S, "kustomization.yaml")))
    assert sorted(k["resources"]) == sorted(n for n in os.listdir(K8S) if n.endswith(".yaml")
                                            and n != "kustomization.yaml")


def test_the_pieces_point_at_each_other():
    deployments, services = by_kind("Deployment"), by_kind("Service")
    worker, gateway = deployments["sd35-fp8-worker"], deployments["sd35-fp8-gateway"]
    queue = by_kind("StatefulSet")["sd35-fp8-queue"]
    so = by_kind("ScaledObject")["sd35-fp8-worker"]
    # KEDA scales the worker Deployment on the gateway's /v1/cluster total (waiting + running), down to zero
    assert so["spec"]["scaleTargetRef"]["name"] == "sd35-fp8-worker" and so["spec"]["minReplicaCount"] == 0
    (trig,) = so["spec"]["triggers"]
    host, port, path = re.match(r"http://([^:/]+):(\d+)(/\S*)", trig["metadata"]["url"]).groups()
    assert host in services and int(port) in [p["port"] for p in services[host]["spec"]["ports"]]
    assert services[host]["spec"]["selector"] == gateway["spec"]["template"]["metadata"]["labels"]
    assert f'"{path}"' in ROUTES and trig["metadata"]["valueLocation"] == "total"
    # every pod reaches the queue through its Service; the queue keeps its data on a volume
    for d in (worker, gateway):
        url = env_of(container(d))["SD35FP8_QUEUE_URL"]
        qhost, qport = re.match(r"redis://([^:/]+):(\d+)/\d+", url).groups()
        assert qhost in services and services[qhost]["spec"]["selector"] == queue["spec"]["selector"]["matchLabels"]
    assert "--appendonly" in container(queue)["args"] and queue["spec"]["volumeClaimTemplates"]
    # a stopping worker may finish its job: the grace period is longer than the job timeout
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > JOB_TIMEOUT
    # the entry point's modes, the probes' routes, Prometheus annotations on every pod with /metrics
    modes = re.findall(r"^\s+(\w+)\)", open(os.path.join(DEPLOY, "entrypoint.sh")).read(), re.M)
    for d, mode in ((worker, "worker"), (gateway, "gateway")):
        c = container(d)
        assert c["args"] == [mode] and mode in modes
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            if probe in c:
                assert f'"{c[probe]["httpGet"]["path"]}"' in ROUTES, (probe, c[probe])
        ann = d["spec"]["template"]["metadata"]["annotations"]
        assert ann["prometheus.io/path"] == "/metrics" and ann["prometheus.io/port"] == str(c["ports"][0]
                                                                                         ["containerPort"])
    assert container(worker)["resources"]["limits"]["nvidia.com/gpu"] == 1
    claims = {v["persistentVolumeClaim"]["claimName"] for v in worker["spec"]["template"]["spec"]["volumes"]
              if "persistentVolumeClaim" in v}
    assert claims <= set(by_kind("PersistentVolumeClaim"))


def test_compose_file():
    c = yaml.safe_load(open(os.path.join(DEPLOY, "compose.yaml")))
    s = c["services"]
    assert "--appendonly" in s["queue"]["command"] and s["queue"]["volumes"]
    workers = [k for k in s if k.startswith("worker")]
    assert len(workers) >= 2
    modes = re.findall(r"^\s+(\w+)\)", open(os.path.join(DEPLOY, "entrypoint.sh")).read(), re.M)
    for name in workers + ["gateway"]:
        svc = s[name]
        assert svc["command"][0] in modes
        assert svc["environment"]["SD35FP8_QUEUE_URL"].startswith("redis://queue:")
        assert os.path.isfile(os.path.join(DEPLOY, svc["build"]["context"], svc["build"]["dockerfile"]))
        assert svc["depends_on"]["queue"]["condition"] == "service_healthy"
    for name in workers:
        grace = s[name]["stop_grace_period"]
        secs = int(grace[:-1]) * {"s": 1, "m": 60, "h": 3600}[grace[-1]]
        assert secs > JOB_TIMEOUT and s[name]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] \
            == ["gpu"]
    ids = [s[w]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for w in workers]
    assert len({tuple(i) for i in ids}) == len(ids)  # one GPU per worker


def test_dockerfile_and_entrypoint():
    text = open(os.path.join(DEPLOY, "Dockerfile")).read()
    assert re.search(r"^FROM nvidia/cuda:\S+", text, re.M)
    for src in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for f in src.split():
            assert os.path.exists(os.path.join(REPO, f)), f
    entry = re.search(r'^ENTRYPOINT \["([^"]+)"\]', text, re.M).group(1)
    pack = "/opt/ComfyUI/custom_nodes/sd35-fp8/"
    assert entry.startswith(pack) and os.access(os.path.join(REPO, entry[len(pack):]), os.X_OK)
    assert "requirements-cluster.txt" in text and "STOPSIGNAL SIGTERM" in text
    assert re.search(r"^HEALTHCHECK .*\n.*/v1/health/live", text, re.M)
    r = subprocess.run(["bash", "-n", os.path.join(DEPLOY, "entrypoint.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", os.path.join(DEPLOY, "entrypoint.sh"), "worker"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"]})
    assert r.returncode != 0 and "set SD35FP8_QUEUE_URL" in r.stderr
    r = subprocess.run(["bash", os.path.join(DEPLOY, "entrypoint.sh"), "nonsense"], capture_output=True, text=True,
                       env={"PATH": os.environ["PATH"], "SD35FP8_QUEUE_URL": "redis://x:6379/0"})
    assert r.returncode == 2 and "unknown mode 'nonsense'" in r.stderr
    ign = open(os.path.join(REPO, ".dockerignore")).read().split()
    assert {".venv", ".comfyui", ".git"} <= set(ign)
