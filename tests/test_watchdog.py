"""A dead Python-backend process must not look healthy: fault injection on a real tritonserver.

Each kind of stub (the BLS, the reference cache, a component runner) is killed with -9 while
requests flow. Triton keeps answering ready; flux2_serving/server/watchdog.py (running here as it
does next to the server in Kubernetes) notices through requests, reloads the model through the repository API,
and the server serves again within RECOVERY_S. Requests in flight fail with a clear error; the
same request afterwards gives the same image as before the kill."""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request

import numpy as np
import pytest

from flux2_serving.clients.api import Flux2Client, Flux2Error
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.server.launch import running, stub_processes
from flux2_serving.serving.repository import assemble

RECOVERY_S = 60  # stated in README ("Scaling out"): kill to first good answer, watchdog every 1 s here


@pytest.fixture(scope="module")
def watched(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    workdir = tmp_path_factory.mktemp("watched")
    repository = assemble(onnx_fp32, tiny_checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=2)
    with running(repository, log_file=workdir / "server.log", watchdog=1.0) as server:  # canary every probe
        yield server


def _request(client, reference):
    images = client.generate("a fox in the snow", [reference], height=256, width=256, seed=5, num_inference_steps=1)
    return np.asarray(images[0])


@pytest.mark.parametrize("instance", ["flux2_klein_kv_0_1", "reference_kv_cache_0_0", "transformer_cached_0_0"])
def test_a_killed_stub_is_found_and_reloaded_while_requests_flow(watched, instance):
    reference = synthetic_reference((128, 128), 61)
    with Flux2Client(watched.grpc, timeout_s=120) as client:
        before = _request(client, reference)
    pid = stub_processes(watched.process.pid)[instance]

    failures, successes, stop = [], [], threading.Event()
    killed_at = [0.0]

    def load():
        with Flux2Client(watched.grpc, timeout_s=120) as client:
            while not stop.is_set():
                try:
                    image = _request(client, reference)
                    successes.append((time.monotonic(), image))
                except Flux2Error as exc:
                    failures.append((time.monotonic(), str(exc)))
                    time.sleep(0.1)  # a dead stub fails at once: do not spin (the watchdog shares this process)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(1.0)
    killed_at[0] = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    deadline = killed_at[0] + RECOVERY_S
    # Ready stays 200 throughout: readiness cannot see it (why the watchdog exists).
    with urllib.request.urlopen(f"http://{watched.http}/v2/health/ready", timeout=5) as response:
        assert response.status == 200
    recovered = None  # kill -> the first of 3 good answers in a row from a replaced stub
    while time.monotonic() < deadline and recovered is None:
        time.sleep(0.5)
        if not failures or not new_pid_differs(watched, instance, pid):
            continue
        after = [t for t, _ in successes if t > max(t for t, _ in failures)]
        if len(after) >= 3:
            recovered = after[0] - killed_at[0]
    stop.set()
    thread.join(120)
    print(f"{instance}: {len(failures)} failed, recovered after {recovered} s; first errors:",
          [message[:200] for _, message in failures[:3]])
    assert failures, "the kill went unnoticed by the requests"  # the test would prove nothing
    assert recovered is not None and recovered <= RECOVERY_S
    for _, message in failures:  # clear errors: the dead process, or the model being reloaded
        assert any(text in message for text in ("not healthy", "unavailable", "not found", "not ready",
                                                "is not loaded", "unknown model")), message
    assert new_pid_differs(watched, instance, pid)
    with Flux2Client(watched.grpc, timeout_s=120) as client:
        assert np.array_equal(_request(client, reference), before)  # nothing else lost


def new_pid_differs(server, instance: str, old_pid: int) -> bool:
    return stub_processes(server.process.pid).get(instance) not in (None, old_pid)
