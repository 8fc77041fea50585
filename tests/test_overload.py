"""Bounded work on a real tritonserver: a full queue is answered at once, abandoned requests stop,
a request's own deadline is kept, and the watchdog neither dies nor repairs a server that is merely
busy (issue 18). One BLS instance with a queue of QUEUE requests, watched every second by a
watchdog whose probes may wait PROBE_TIMEOUT_S: less than one 1024^2 request takes here."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http

from flux2_serving.clients.api import Flux2Client, Flux2Error, infer_inputs, request_tensors
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.devtools.metrics import metric_by_label, scrape
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble
from tests.support import wait_until_served

QUEUE = 20
PROBE_TIMEOUT_S = 1.0
SIDE, STEPS = 1024, 4


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    workdir = tmp_path_factory.mktemp("busy")
    repository = assemble(onnx_fp32, tiny_checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=1,
                          envelope=replace(DEFAULT_ENVELOPE, bls_max_queue=QUEUE, bls_queue_timeout_s=120))
    with running(repository, log_file=workdir / "server.log", watchdog=1.0, watchdog_timeout=PROBE_TIMEOUT_S,
                 canary_every=0) as server:
        yield server


def outcomes(server) -> dict[str, float]:
    return metric_by_label(server.metrics, "flux2_bls_requests_total", "outcome")


def triton_failures(server, reason: str, model: str = "flux2_klein_kv") -> float:
    """Triton's own count of requests it ended before the model (e.g. CANCELED while queued)."""
    pattern = f'nv_inference_request_failure{{model="{model}",reason="{reason}",version="1"}} '
    line = next(line for line in scrape(server.metrics).splitlines() if line.startswith(pattern))
    return float(line.rsplit(" ", 1)[1])


def executions(server, model: str) -> int:
    client = grpc.InferenceServerClient(server.grpc)
    stats = client.get_inference_statistics(model, headers=server.admin_headers("grpc")).model_stats[0]
    return stats.execution_count


def wait_idle(server, timeout: float = 120) -> None:
    """Until the BLS answers a small request: requests an HTTP client gave up on stay queued until
    their `timeout` (HTTP has no cancellation), so the first tries may still find the queue full."""
    wait_until_served(server.grpc, timeout)


def test_a_full_queue_is_answered_at_once_and_the_admitted_are_served(busy_server):
    """QUEUE + 1 requests are admitted (one computing, QUEUE waiting); the rest of a burst gets
    UNAVAILABLE "Exceeds maximum queue size" at once, over gRPC and HTTP, before any admitted
    request has finished. The admitted give up after a few seconds (their deadline), so the test
    stays short; they end as served or abandoned, never as an error."""
    burst = QUEUE + 10
    answers = [None] * burst

    def send(index):
        protocol = "grpc" if index % 2 else "http"
        started = time.monotonic()
        try:
            with Flux2Client(getattr(busy_server, protocol), protocol, timeout_s=6) as user:
                user.generate(f"burst {index}", height=SIDE, width=SIDE, seed=index, num_inference_steps=STEPS)
            answers[index] = ("ok", time.monotonic() - started, "")
        except Flux2Error as exc:
            answers[index] = ("error", time.monotonic() - started, str(exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(burst)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    refused = [a for a in answers if "Exceeds maximum queue size" in a[2]]
    admitted = [a for a in answers if a not in refused]
    served = sum(a[0] == "ok" for a in admitted)
    print(f"{len(refused)} refused in at most {max(a[1] for a in refused):.2f} s; admitted: "
          f"{served} served, {len(admitted) - served} gave up")
    assert len(refused) >= burst - QUEUE - 2  # (a request or two may leave the queue while the burst arrives)
    assert all("overloaded" in a[2] for a in refused)  # the client's hint: send it again later
    first_finished = min(a[1] for a in admitted)
    assert max(a[1] for a in refused) < first_finished  # refused before any admitted request had finished
    gave_up = ("Deadline", "timed out", "Request timeout expired", "deadline exceeded")
    for status, _, message in admitted:
        assert status == "ok" or any(text in message for text in gave_up), message
    wait_idle(busy_server)


def test_abandoned_requests_stop_within_a_step(busy_server):
    """20 requests at 1024^2 whose deadline (1 s: the gRPC deadline, and Triton's `timeout`, which the
    client sets to the same) passes long before they could finish: the waiting ones leave the queue
    uncomputed (Triton: CANCELED or REJECTED, whichever it notices first), the one computing stops
    at its next component call (the BLS: outcome cancelled or timeout). None runs to its end."""
    wait_idle(busy_server)
    before = outcomes(busy_server)

    def dropped_so_far():
        return sum(triton_failures(busy_server, reason) for reason in ("CANCELED", "REJECTED"))

    def stopped_so_far():
        now = outcomes(busy_server)
        return sum(now[outcome] - before.get(outcome, 0) for outcome in ("cancelled", "timeout"))

    queued_before = dropped_so_far()
    steps_before = executions(busy_server, "transformer_cached")

    def send(index):
        with Flux2Client(busy_server.grpc, timeout_s=1.0) as user:
            try:
                user.generate(f"abandoned {index}", height=SIDE, width=SIDE, seed=index, num_inference_steps=8)
            except Flux2Error as exc:
                return str(exc)
        return "served"

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(send, range(20)))
    # The gRPC deadline and Triton's queue timeout are the same second: either may answer first.
    assert all("Deadline" in result or "Request timeout expired" in result for result in results), results
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the server notices the cancellations on its own time
        stopped, dropped = stopped_so_far(), dropped_so_far() - queued_before
        if stopped + dropped >= 20:
            break
        time.sleep(0.5)
    wait_idle(busy_server)
    after = outcomes(busy_server)
    steps = executions(busy_server, "transformer_cached") - steps_before - 1  # minus wait_idle's one step
    print(f"stopped while computing: {stopped:.0f}, dropped from the queue: {dropped:.0f}, "
          f"denoising steps run: {steps} (of {20 * 8} asked)")
    assert after["ok"] - before.get("ok", 0) == 1  # wait_idle's request only: no abandoned one ran to its end
    # Every one ended as dropped or stopped (Triton's CANCELED/REJECTED counter may also catch a straggler
    # of the previous test's abandoned requests: at least 20, and one was computing).
    assert stopped + dropped >= 20 and stopped >= 1
    # A request stops before its next component call: at most one step after its deadline. With a 1 s
    # deadline a 1024^2 step here takes a sizeable part of it, so each started request ran a few steps at most.
    assert steps <= 4 * stopped, (steps, stopped)


def test_a_request_timeout_bounds_a_started_request(busy_server):
    """HTTP has no cancellation on the wire; Triton's `timeout` parameter is the deadline instead: the
    BLS stops a request that has run longer than it, at its next step (UNAVAILABLE, outcome timeout)."""
    wait_idle(busy_server)
    before = outcomes(busy_server)
    client = http.InferenceServerClient(busy_server.http, network_timeout=120)
    tensors = request_tensors("a long one", height=SIDE, width=SIDE, num_inference_steps=50, seed=1)
    started = time.monotonic()
    with pytest.raises(Exception) as stopped:
        client.infer("flux2_klein_kv", infer_inputs(http, tensors), timeout=1_500_000)
    print(f"stopped after {time.monotonic() - started:.1f} s: {stopped.value}")
    assert "deadline exceeded" in str(stopped.value) and "1.5 s" in str(stopped.value)
    assert outcomes(busy_server)["timeout"] - before.get("timeout", 0) == 1


def test_the_watchdog_outlives_a_queue_longer_than_its_probe_timeout(busy_server):
    """While the queue holds more work than a probe may wait for, probes answer "busy": the watch
    loop goes on and repairs nothing. A model unloaded by someone holding the admin key is loaded
    again by the watchdog, and serves."""
    dog = busy_server.watchdog
    rounds, busy, repairs = dog.rounds, dog.busy, list(dog.repairs)

    def send(index):
        with Flux2Client(busy_server.grpc, timeout_s=60) as user:
            user.generate(f"queue {index}", height=SIDE, width=SIDE, seed=index, num_inference_steps=STEPS)

    with ThreadPoolExecutor(6) as pool:  # ~6 requests of >= 1 s each: far beyond one probe's wait
        list(pool.map(send, range(6)))
    print(f"watchdog rounds {dog.rounds - rounds}, busy answers {dog.busy - busy}, "
          f"repairs {dog.repairs[len(repairs):]}")
    assert dog.rounds - rounds >= 3  # the loop kept going
    assert dog.repairs == repairs  # and repaired nothing that was merely busy

    client = http.InferenceServerClient(busy_server.http)
    client.unload_model("flux2_klein_kv", headers=busy_server.admin_headers())
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not client.is_model_ready("flux2_klein_kv"):
        time.sleep(0.5)
    assert client.is_model_ready("flux2_klein_kv"), "the watchdog did not load the unloaded model again"
    assert ("flux2_klein_kv", "reloaded") in dog.repairs[len(repairs):]
    with Flux2Client(busy_server.grpc, timeout_s=120) as user:
        (image,) = user.generate("after the reload", height=256, width=256, seed=2, num_inference_steps=1)
    assert np.asarray(image).shape == (256, 256, 3)
