"""What several test modules share (test modules do not import each other): numeric comparison,
graph runs, the served repository's settings and Triton's statistics."""

from __future__ import annotations

import numpy as np
import torch
import tritonclient.grpc as grpc

from flux2_serving.contract.security import admin_headers

# The served test repository: BLS instances (requests overlap on the CPU) and a reference cache budget
# small enough that the tests can fill it.
BLS_INSTANCES = 4
CACHE_BYTES = 2**20


def run_graph(session, **inputs) -> list[np.ndarray]:
    feeds = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return session.run(None, feeds)


def rel_l2(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
    print(f"rel_l2={err:.2e}")
    return err


def model_counts(server, model: str) -> tuple[int, int]:
    headers = admin_headers(server["admin_key"], "grpc")  # statistics are an admin API
    stats = grpc.InferenceServerClient(server["grpc"]).get_inference_statistics(model, headers=headers).model_stats[0]
    return stats.inference_count, stats.execution_count
