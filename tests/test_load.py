"""Concurrency and resilience against a real tritonserver on loopback (bounded in count and time)."""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http

from bench.report import tree_memory_gib
from flux2_serving.clients.api import Flux2Client, Flux2Error, infer_inputs, request_tensors
from flux2_serving.devtools.pictures import synthetic_reference
from tests.support import model_counts

# Mixed requests: different prompts, references, sizes and seeds. Their prompts (all padded to the
# same length) can meet in the text encoder's dynamic batcher.
MIXED = [
    dict(prompt="a red kite over dunes", refs=[((128, 128), 1)], height=256, width=256, seed=1),
    dict(prompt="a blue tram at night", refs=[((128, 128), 2)], height=256, width=256, seed=2),
    dict(prompt="ink drawing of a heron", refs=[((128, 128), 3)], height=256, width=256, seed=3),
    dict(prompt="a bowl of lemons", refs=[], height=256, width=256, seed=4),
    dict(prompt="a glass greenhouse", refs=[], height=256, width=256, seed=5),
    dict(prompt="two foxes in snow", refs=[((192, 128), 6), ((128, 128), 7)], height=256, width=320, seed=6),
    dict(prompt="a copper kettle", refs=[((192, 128), 8), ((128, 128), 9)], height=256, width=320, seed=7),
    dict(prompt="harbor at sunrise", refs=[((256, 256), 10)], height=320, width=256, seed=8),
]


def _send(server, job, **kwargs) -> np.ndarray:
    refs = [synthetic_reference(size, hue) for size, hue in job["refs"]]
    with Flux2Client(server["grpc"]) as client:
        (image,) = client.generate(job["prompt"], refs, height=job["height"], width=job["width"], seed=job["seed"],
                                   num_inference_steps=2, **kwargs)
    return np.asarray(image)


def test_concurrent_mixed_requests_equal_each_alone_and_are_batched(triton_server):
    alone = [_send(triton_server, job) for job in MIXED]
    batched_calls = 0
    for attempt in range(3):  # batching needs requests to meet in the queue; retry a burst if they did not
        before = model_counts(triton_server, "text_encoder")
        with ThreadPoolExecutor(len(MIXED)) as pool:
            together = list(pool.map(lambda job: _send(triton_server, job), MIXED))
        for job, expected, actual in zip(MIXED, alone, together, strict=True):
            assert np.array_equal(actual, expected), job["prompt"]
        inferences, executions = (a - b for a, b in zip(model_counts(triton_server, "text_encoder"), before,
                                                        strict=True))
        batched_calls = inferences - executions
        print(f"burst {attempt}: text_encoder {inferences} inferences in {executions} executions")
        if batched_calls > 0:
            break
    assert batched_calls > 0, "no two requests' prompts were ever batched together"


def _soak_job(rng: random.Random, index: int) -> tuple[dict, str | None]:
    """A valid request, or (one in five) an invalid one with the field its error must name."""
    job = dict(prompt=f"soak request {index}", refs=[], height=256, width=256, seed=index)
    if rng.random() < 0.4:
        job["refs"] = [((rng.choice([64, 128, 192]), 128), rng.randrange(6))]  # few distinct sets: cache hits
    if index % 5 == 0:
        field, bad = rng.choice([("height", dict(height=250)), ("width", dict(width=4096)),
                                 ("num_inference_steps", dict(steps=0)),
                                 ("image[0]", dict(raw_image=b"\x89PNG nope")), ("prompt", dict(prompt=" "))])
        job.update(bad)
        return job, field
    return job, None


def test_soak_mixed_valid_and_invalid_requests(triton_server):
    rng = random.Random(0)
    jobs = [_soak_job(rng, i) for i in range(200)]

    def run(item):
        job, field = item
        refs = [synthetic_reference(size, hue) for size, hue in job["refs"]]
        if "raw_image" in job:
            refs = [job["raw_image"]]
        try:
            with Flux2Client(triton_server["grpc"]) as client:
                images = client.generate(job["prompt"], refs, height=job["height"], width=job["width"],
                                         seed=job["seed"], num_inference_steps=job.get("steps", 1))
        except Flux2Error as error:
            return field, error
        return field, images

    process = triton_server["process"]
    with ThreadPoolExecutor(4) as pool:
        warmup = list(pool.map(run, jobs[:40]))
        memory_after_warmup = tree_memory_gib(process.pid)["rss_gib"]
        started = time.perf_counter()
        rest = list(pool.map(run, jobs[40:]))
    memory_after = tree_memory_gib(process.pid)["rss_gib"]
    growth_mib = (memory_after - memory_after_warmup) * 1024
    print(f"200 requests at concurrency 4; last 160 in {time.perf_counter() - started:.1f} s; server resident "
          f"{memory_after_warmup:.2f} -> {memory_after:.2f} GiB ({growth_mib:+.0f} MiB)")
    invalid = 0
    for field, outcome in warmup + rest:
        if field is None:
            assert isinstance(outcome, list) and outcome[0].size == (256, 256), outcome
        else:
            invalid += 1
            assert isinstance(outcome, Flux2Error) and outcome.status == "StatusCode.INVALID_ARGUMENT", outcome
            assert f"'{field}'" in str(outcome), (field, str(outcome))
    assert invalid == 40
    assert growth_mib < 256, "server memory kept growing after warm-up"


def test_clients_that_give_up_mid_request_leave_the_server_healthy(triton_server):
    long_request = dict(prompt="a very slow request", refs=[((512, 512), 3)], height=768, width=768, seed=1)
    refs = [synthetic_reference(size, hue) for size, hue in long_request["refs"]]
    with Flux2Client(triton_server["grpc"], timeout_s=0.3) as client, pytest.raises(Flux2Error) as error:
        client.generate(long_request["prompt"], refs, height=768, width=768, num_inference_steps=8)
    assert "Deadline" in str(error.value) or "DEADLINE" in str(error.value.status)
    with Flux2Client(triton_server["http"], "http", timeout_s=0.3) as client, pytest.raises(Flux2Error) as error:
        client.generate(long_request["prompt"], refs, height=768, width=768, num_inference_steps=8)
    assert "timed out" in str(error.value)
    # A gRPC call cancelled by the client itself.
    future_client = grpc.InferenceServerClient(triton_server["grpc"])
    tensors = request_tensors("cancelled", refs, height=768, width=768, num_inference_steps=8)
    done = []
    future = future_client.async_infer("flux2_klein_kv", infer_inputs(grpc, tensors),
                                       callback=lambda *r: done.append(r))
    time.sleep(0.2)
    future.cancel()
    assert grpc.InferenceServerClient(triton_server["grpc"]).is_server_live()
    assert http.InferenceServerClient(triton_server["http"]).is_server_ready()
    assert _send(triton_server, MIXED[3]).shape == (256, 256, 3)
