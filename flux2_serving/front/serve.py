"""A front as a subprocess on a free port, for tests and benchmarks: `with running_front(grpc) as front`.

A subprocess rather than an app in the test's own event loop, so the front runs exactly as
deployed (`python -m flux2_serving.front`: uvicorn, its lifespan, its one gRPC client) and callers
reach it over real HTTP, as the official `openai` client does. API keys travel in the environment,
not on the command line (which anyone on the host can list).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flux2_serving.server.launch import free_port, wait_http_ok

from .__main__ import KEYS_VARIABLE

START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 15


@dataclass
class RunningFront:
    url: str  # the openai client's base_url: http://127.0.0.1:PORT/v1
    root: str  # http://127.0.0.1:PORT (health, metrics)
    process: subprocess.Popen
    log: Path  # the front's stdout and stderr (one line per request), removed when it stops

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _wait_live(root: str, process: subprocess.Popen, log: Path) -> None:
    try:
        wait_http_ok(f"{root}/health", process, START_TIMEOUT_S, "the front", every=0.1)
    except RuntimeError as exc:  # it exited: say why, from its log
        raise RuntimeError(f"{exc}:\n{log.read_text()[-3000:]}") from None


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # uvicorn: finish requests in flight, then stop
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_front(triton_grpc_url: str, api_keys=(), port: int | None = None, **settings):
    """Start `python -m flux2_serving.front` against `triton_grpc_url` and wait for /health; stop it on
    exit (SIGTERM, then SIGKILL). `settings`: FrontSettings fields (model_id, max_body_bytes,
    max_image_bytes, url_base, timeout_s), given as the command's options."""
    port = port or free_port()
    command = [sys.executable, "-m", "flux2_serving.front", "--triton-grpc", triton_grpc_url, "--port", str(port)]
    for name, value in settings.items():
        command += [f"--{name.replace('_', '-')}", str(value)]
    env = {**os.environ, KEYS_VARIABLE: ",".join(api_keys)}
    with tempfile.NamedTemporaryFile("w", prefix="flux2-front-", suffix=".log", delete=False) as out:
        log = Path(out.name)
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        _wait_live(root, process, log)
        yield RunningFront(f"{root}/v1", root, process, log)
    finally:
        _stop(process)
        log.unlink(missing_ok=True)
