"""Start a real ComfyUI server with this pack and talk to it over HTTP + websocket.

Used by the tests and by ``run_batch.py``. The ComfyUI folder and its Python come from the
environment (``COMFYUI_DIR``, ``COMFYUI_PYTHON``), defaulting to what ``setup_env.sh`` builds, so the
same suite runs against the CI ComfyUI (0.3.75) or a newer upstream checkout.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACK_NAME = "ComfyUI-SD35-FP8"


def comfy_dir() -> str:
    return os.environ.get("COMFYUI_DIR") or os.path.join(REPO, ".comfyui")


def comfy_python() -> str:
    """``COMFYUI_PYTHON``, else setup_env.sh's ``.venv``, else this interpreter (a machine where ComfyUI's
    dependencies are installed in the running Python, as on the GPU machines)."""
    venv = os.path.join(REPO, ".venv", "bin", "python")
    return os.environ.get("COMFYUI_PYTHON") or (venv if os.path.exists(venv) else sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(base: str, path: str, timeout: float = 30):
    """GET a JSON answer of ComfyUI's HTTP API."""
    with urllib.request.urlopen(base + path, timeout=timeout) as r:
        return json.loads(r.read())


def http_post(base: str, path: str, payload: dict, timeout: float = 60) -> tuple[int, dict]:
    """POST JSON to ComfyUI's HTTP API: (status, JSON body), also for an error status."""
    req = urllib.request.Request(base + path, data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        body = e.read()
        try:
            return e.code, json.loads(body)
        except json.JSONDecodeError:
            return e.code, {"raw": body.decode(errors="replace")}


class ComfyError(RuntimeError):
    def __init__(self, msg, payload=None):
        super().__init__(msg)
        self.payload = payload


class ComfyServer:
    def __init__(self, models_dir: str, workdir: str | None = None, extra_args=(), device_args=("--cpu",),
                 launcher: str | None = None, env: dict | None = None, port: int | None = None,
                 pack_dir: str | None = None):
        """``launcher``: a Python script that runs main.py itself (``python LAUNCHER main.py ARGS``); ``env``:
        extra environment variables of the server process; ``pack_dir``: the pack folder to install (this checkout
        by default)."""
        self.models_dir = os.path.abspath(models_dir)
        self.workdir = workdir or tempfile.mkdtemp(prefix="comfy-run-")
        self.output_dir = os.path.join(self.workdir, "output")
        self.port = port or free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(device_args) + list(extra_args)
        self.launcher = launcher
        self.env = dict(env or {})
        self.pack_dir = pack_dir or REPO
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(self.workdir, "comfyui.log")
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []  # websocket JSON messages of the last wait()

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 240.0) -> "ComfyServer":
        cdir = comfy_dir()
        if not os.path.isfile(os.path.join(cdir, "main.py")):
            raise ComfyError(f"no ComfyUI at {cdir}: run scripts/setup_env.sh or set COMFYUI_DIR")
        nodes_parent = os.path.join(self.workdir, "custom_nodes")
        os.makedirs(nodes_parent, exist_ok=True)
        link = os.path.join(nodes_parent, PACK_NAME)
        if not os.path.exists(link):
            os.symlink(self.pack_dir, link)
        for d in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras"):
            os.makedirs(os.path.join(self.models_dir, d), exist_ok=True)
        yaml_path = os.path.join(self.workdir, "extra_model_paths.yaml")
        with open(yaml_path, "w") as f:
            f.write("sd35fp8_test:\n"
                    f"    base_path: {self.models_dir}\n"
                    "    is_default: true\n"  # files the pack saves go here, not into the ComfyUI folder
                    "    checkpoints: checkpoints\n    diffusion_models: diffusion_models\n"
                    "    text_encoders: text_encoders\n    vae: vae\n    loras: loras\n"
                    f"    custom_nodes: {nodes_parent}\n")
        for d in ("output", "input", "temp", "user"):
            os.makedirs(os.path.join(self.workdir, d), exist_ok=True)
        cmd = [comfy_python(), *([self.launcher] if self.launcher else []), "main.py", "--listen", "127.0.0.1",
               "--port", str(self.port),
               "--extra-model-paths-config", yaml_path, "--output-directory", self.output_dir,
               "--input-directory", os.path.join(self.workdir, "input"),
               "--temp-directory", os.path.join(self.workdir, "temp"),
               "--user-directory", os.path.join(self.workdir, "user"),
               "--database-url", "sqlite:///" + os.path.join(self.workdir, "user", "comfyui.db"),
               "--disable-auto-launch", *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **self.env)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=cdir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, timeout: float = 30):
        return http_get(self.base, path, timeout)

    def post(self, path: str, payload: dict, timeout: float = 60):
        return http_post(self.base, path, payload, timeout)

    def queue(self, prompt: dict) -> str:
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200 or "prompt_id" not in body:
            raise ComfyError(f"/prompt rejected the graph (HTTP {status}): {json.dumps(body)[:2000]}", body)
        return body["prompt_id"]

    def connect(self):
        import websocket  # websocket-client
        return websocket.create_connection(f"ws://127.0.0.1:{self.port}/ws?clientId={self.client_id}", timeout=5)

    def wait(self, prompt_id: str, timeout: float = 900.0, ws=None) -> dict:
        """Wait on the websocket until the prompt finishes; return its /history entry.
        Raises ComfyError with ComfyUI's own message on an execution error."""
        import websocket  # websocket-client
        ws = ws or self.connect()
        deadline = time.time() + timeout
        self.messages = []
        try:
            while time.time() < deadline:
                # the prompt may already be done before we connected
                hist = self.get(f"/history/{prompt_id}")
                if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None \
                        and hist[prompt_id]["status"].get("status_str") in ("success", "error"):
                    break
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if not isinstance(raw, str):
                    continue  # binary preview frames
                msg = json.loads(raw)
                self.messages.append(msg)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if msg["type"] == "execution_error":
                    break
                if msg["type"] == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
                if msg["type"] == "execution_success":
                    break
            else:
                raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")
        finally:
            ws.close()
        for _ in range(50):
            hist = self.get(f"/history/{prompt_id}")
            if prompt_id in hist:
                break
            time.sleep(0.1)
        entry = hist.get(prompt_id)
        if entry is None:
            raise ComfyError(f"prompt {prompt_id} has no history entry:\n{self.log_tail()}")
        if entry.get("status", {}).get("status_str") == "error":
            errs = [m[1] for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
            msg = errs[0].get("exception_message", "") if errs else "unknown error"
            raise ComfyError(f"prompt failed: {msg}", entry)
        return entry

    def run(self, prompt: dict, timeout: float = 900.0) -> dict:
        ws = self.connect()  # before queueing, so no progress message is missed
        try:
            pid = self.queue(prompt)
        except Exception:
            ws.close()
            raise
        return self.wait(pid, timeout, ws)

    def output_images(self, entry: dict) -> list[str]:
        files = []
        for node_out in entry.get("outputs", {}).values():
            for img in node_out.get("images", []):
                files.append(os.path.join(self.output_dir, img.get("subfolder", ""), img["filename"]))
        return files


def cached_nodes(entry: dict) -> set[str]:
    out: set[str] = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            out.update(str(n) for n in data.get("nodes", []))
    return out


if __name__ == "__main__":  # manual smoke: python scripts/comfy_harness.py MODELS_DIR
    with ComfyServer(sys.argv[1]) as srv:
        info = srv.get("/object_info")
        print(sorted(k for k in info if k.startswith("SD35FP8")))
