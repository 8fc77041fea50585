"""reference_kv_cache: reference K/V shared by every instance of the `flux2_klein_kv` BLS.

Triton runs each BLS instance in its own process and spreads requests over them, so a cache
inside the BLS would be split (with 2 instances, sequential requests alternate and half the
repeats miss). This single-instance model holds the one LRU instead; the BLS asks it by key:

  key [1] (BYTES) alone           -> lookup: outputs hit [1] (BOOL) and, on a hit, the per-block
                                     K/V cached_kv_00 ... (one per transformer block)
  key [1] and ref_kv_00 ...        -> store:  output hit [1] = false (kept, evicting the least
                                     recently used entries to stay within the byte budget)
  key [1] = "" (empty)             -> hit [1] = false, the cache untouched: the liveness probe of
                                     flux2_serving/server/watchdog.py (proves this model's process answers)

Internal: every request but the probe must carry the server's internal secret as the request
parameter `flux2_internal` (flux2_serving/contract/security.py; the BLS sends it, a caller cannot know it), so no
caller can look up, store or flood entries. Keys are sha256 hex digests; a store must hold every
block's K/V, each [2, N, heads, head_dim] with one N in [1, max_reference_tokens], so one store
takes at most the K/V of the largest reference set; an entry is never replaced. Every refusal is
INVALID_ARG with one line (no traceback) and nothing in the server's log: no input a caller can send
reaches the INTERNAL path, which is kept for server faults.

Tensors stay on the serving device (parameter `device`; DLPack in and out). The budget is the
parameter `reference_cache_bytes`. Hits, misses, evictions, bytes and entries are Triton
custom metrics on the metrics endpoint.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from ..contract.heap import keep_freed_memory
from ..contract.names import cached_name
from ..contract.security import INTERNAL_ONLY, internal_secret, is_internal
from .lru import ReferenceKVCache
from .triton_io import before_teardown, lasting, model_config, request_parameters, to_torch, to_triton

COUNTERS = {"hits": "Lookups answered from the cache (VAE encoding and prefill skipped)",
            "misses": "Lookups that found nothing (the BLS ran VAE encoding and the prefill)",
            "evictions": "Entries evicted to stay within the byte budget"}
GAUGES = {"bytes": "Bytes of reference K/V held", "entries": "Reference sets held"}
KEY = re.compile(rb"[0-9a-f]{64}")  # reference_key(): a sha256 hex digest


class Refused(ValueError):
    """A request this model does not serve: INVALID_ARG with this one-line message."""


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        keep_freed_memory()  # MiB-sized tensors every request: no page faults for each (contract/heap.py)
        self.device = torch.device(params.get("device", "cpu"))
        self.cache = ReferenceKVCache(int(params["reference_cache_bytes"]))
        self.kv_names = [tensor["name"] for tensor in config["input"] if tensor["name"].startswith("ref_kv_")]
        self.max_tokens = int(params["max_reference_tokens"])
        self.secret = internal_secret()
        labels = {"model": args["model_name"], "version": args["model_version"]}
        family = pb_utils.MetricFamily
        # Metric families must outlive their metrics: both last as long as this process (lasting(), issue 28).
        self.families = {name: lasting(family(name=f"flux2_reference_cache_{name}_total", description=text,
                                              kind=family.COUNTER))
                         for name, text in COUNTERS.items()}
        self.families.update({name: lasting(family(name=f"flux2_reference_cache_{name}", description=text,
                                                   kind=family.GAUGE))
                              for name, text in GAUGES.items()})
        self.metrics = {name: lasting(fam.Metric(labels=labels)) for name, fam in self.families.items()}
        self.reported = dict.fromkeys(COUNTERS, 0)

    def finalize(self):
        """Nothing Triton-owned may be left for the stub's teardown (issue 28, triton_io.before_teardown);
        the metrics are lasting()."""
        before_teardown()

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(pb_utils.InferenceResponse(self._serve(request)))
            except Refused as exc:  # one error object per response (a shared one crashed tritonserver 2.51);
                # not logged: a caller must not be able to fill the server's log
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"reference_kv_cache: {exc}", pb_utils.TritonError.INVALID_ARG)))
            except Exception as exc:  # a server fault (e.g. out of memory while storing): logged, one line back
                pb_utils.Logger.log_error(f"reference_kv_cache: {type(exc).__name__}: {exc}")
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"reference_kv_cache: internal error: {type(exc).__name__}")))
        self._report()
        return responses

    def _serve(self, request) -> list:
        # `key` is declared required, but the config's optional K/V inputs make Triton check only how
        # many inputs came: a request of K/V alone reaches this model, so `key` is checked here.
        key = pb_utils.get_input_tensor_by_name(request, "key")
        if key is None:
            raise Refused("'key' is required: one sha256 hex digest (BYTES, shape [1])")
        key = key.as_numpy().reshape(-1)
        key = bytes(key[0]) if key.size == 1 else None
        if key == b"":  # a probe: alive, nothing looked up or counted; open to anyone
            return [_hit(False)]
        if not is_internal(request_parameters(request), self.secret):
            raise Refused(INTERNAL_ONLY)
        if key is None or not KEY.fullmatch(key):
            raise Refused("'key' must be one sha256 hex digest")
        key = key.decode()
        values = [pb_utils.get_input_tensor_by_name(request, name) for name in self.kv_names]
        if any(value is not None for value in values):
            self._store(key, values)
            return [_hit(False)]
        found = self.cache.get(key)
        outputs = [_hit(found is not None)]
        if found is not None:
            outputs += [to_triton(cached_name(name), tensor) for name, tensor in zip(self.kv_names, found, strict=True)]
        return outputs

    def _store(self, key: str, values: list) -> None:
        """Keep copies of a complete, consistent K/V set (the request's memory is freed after the response)."""
        missing = [name for name, value in zip(self.kv_names, values, strict=True) if value is None]
        if missing:
            raise Refused(f"a store needs all {len(self.kv_names)} ref_kv_NN inputs; missing {', '.join(missing[:3])}"
                          + (" ..." if len(missing) > 3 else ""))
        tokens = {tuple(value.shape())[1] for value in values}
        if len(tokens) != 1 or not 1 <= next(iter(tokens)) <= self.max_tokens:
            raise Refused(f"every ref_kv_NN must hold the same number of reference tokens, in "
                          f"[1, {self.max_tokens}]; got {sorted(tokens)[:4]}")
        # Copies on the serving device, made by the cache after it made room (and not for a key it holds); wait
        # for them before answering (they run on the current CUDA stream).
        self.cache.put(key, [to_torch(value) for value in values], copy=lambda t: t.to(self.device, copy=True))
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def _report(self):
        for name in COUNTERS:
            count = getattr(self.cache, name)
            self.metrics[name].increment(count - self.reported[name])
            self.reported[name] = count
        self.metrics["bytes"].set(self.cache.bytes_held)
        self.metrics["entries"].set(len(self.cache.entries))


def _hit(value: bool):
    return pb_utils.Tensor("hit", np.array([value], dtype=np.bool_))
