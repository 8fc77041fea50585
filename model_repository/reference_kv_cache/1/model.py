"""reference_kv_cache: reference K/V shared by every instance of the `flux2_klein_kv` BLS.

Triton runs each BLS instance in its own process and spreads requests over them, so a cache
inside the BLS would be split (with 2 instances, sequential requests alternate and half the
repeats miss). This single-instance model holds the one LRU instead; the BLS asks it by key:

  key [1] (BYTES) alone           -> lookup: outputs hit [1] (BOOL) and, on a hit, the per-block
                                     K/V cached_kv_00 ... (one per transformer block)
  key [1] and ref_kv_00 ...        -> store:  output hit [1] = false (kept, evicting the least
                                     recently used entries to stay within the byte budget)
  key [1] = "" (empty)             -> hit [1] = false, the cache untouched: the liveness probe of
                                     server/watchdog.py (proves this model's process answers)

Tensors stay on the serving device (parameter `device`; DLPack in and out). The budget is the
parameter `reference_cache_bytes`. Hits, misses, evictions, bytes and entries are Triton
custom metrics on the metrics endpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from lru import ReferenceKVCache  # noqa: E402
from triton_io import model_config, to_torch, to_triton  # noqa: E402 - copied here by the assembler

COUNTERS = {"hits": "Lookups answered from the cache (VAE encoding and prefill skipped)",
            "misses": "Lookups that found nothing (the BLS ran VAE encoding and the prefill)",
            "evictions": "Entries evicted to stay within the byte budget"}
GAUGES = {"bytes": "Bytes of reference K/V held", "entries": "Reference sets held"}


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        self.device = torch.device(params.get("device", "cpu"))
        self.cache = ReferenceKVCache(int(params["reference_cache_bytes"]))
        self.kv_names = [tensor["name"] for tensor in config["input"] if tensor["name"].startswith("ref_kv_")]
        labels = {"model": args["model_name"], "version": args["model_version"]}
        family = pb_utils.MetricFamily
        # Metric families must outlive their metrics: keep both.
        self.families = {name: family(name=f"flux2_reference_cache_{name}_total", description=text, kind=family.COUNTER)
                         for name, text in COUNTERS.items()}
        self.families.update({name: family(name=f"flux2_reference_cache_{name}", description=text, kind=family.GAUGE)
                              for name, text in GAUGES.items()})
        self.metrics = {name: fam.Metric(labels=labels) for name, fam in self.families.items()}
        self.reported = dict.fromkeys(COUNTERS, 0)

    def execute(self, requests):
        responses = []
        for request in requests:
            key = pb_utils.get_input_tensor_by_name(request, "key").as_numpy().reshape(-1)[0].decode()
            values = [pb_utils.get_input_tensor_by_name(request, name) for name in self.kv_names]
            if not key:  # a probe: alive, nothing looked up or counted
                responses.append(pb_utils.InferenceResponse([_hit(False)]))
            elif values[0] is not None:
                # The request's memory is freed after the response: keep copies on the serving device,
                # and wait for the copies before answering (they run on the current CUDA stream).
                self.cache.put(key, [to_torch(value).to(self.device, copy=True) for value in values])
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                responses.append(pb_utils.InferenceResponse([_hit(False)]))
            else:
                found = self.cache.get(key)
                outputs = [_hit(found is not None)]
                if found is not None:
                    outputs += [to_triton("cached" + name[3:], tensor) for name, tensor in zip(self.kv_names, found)]
                responses.append(pb_utils.InferenceResponse(outputs))
        self._report()
        return responses

    def _report(self):
        for name in COUNTERS:
            count = getattr(self.cache, name)
            self.metrics[name].increment(count - self.reported[name])
            self.reported[name] = count
        self.metrics["bytes"].set(self.cache.bytes_held)
        self.metrics["entries"].set(len(self.cache.entries))


def _hit(value: bool):
    return pb_utils.Tensor("hit", np.array([value], dtype=np.bool_))
