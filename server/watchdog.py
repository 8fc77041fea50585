"""python -m server.watchdog: keep a Triton replica serving when a Python-backend process dies.

Killing a Python-backend stub (the BLS, reference_kv_cache, a component runner) leaves Triton
answering 200 on /v2/health/ready and on the model's ready endpoint while every request to that
model fails with "Stub process ... is not healthy", with no end (Triton 2.51). Readiness cannot
see it; requests can. Every --interval seconds this sends:

  - to flux2_klein_kv, as many requests with an empty prompt as it has instances, at once: each
    answers INVALID_ARG from the BLS's own code, or names the dead stub;
  - to reference_kv_cache, a lookup with the empty key (answered without touching the cache);
  - every --canary-every rounds (and with --canary), one small real request through the BLS with a
    64x64 reference and the cache bypassed: 256x256, 1 step, so every component model runs.

A model found broken is unloaded and loaded again through Triton's repository API (the server
runs with --model-control-mode=explicit; its other models keep serving). `--once` probes once,
reloads nothing and exits 1 if anything is broken: a Kubernetes livenessProbe, so that a replica
the watchdog cannot repair is restarted. Standard library and Pillow only: it runs in the serving
image (docker/serving.Dockerfile copies it to /opt/flux2/watchdog.py).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import struct
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

BLS = "flux2_klein_kv"
CACHE = "reference_kv_cache"
EMPTY_PROMPT_ANSWER = "'prompt' must be a non-empty string"
DEAD_STUB = re.compile(r"Stub process '(?P<instance>[^']+)' is not healthy")


def _post(url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def infer(base: str, model: str, inputs: list[tuple[str, str, list, list[bytes] | list]], outputs=(),
          timeout: float = 30) -> tuple[int, str]:
    """One KServe v2 request with binary tensors: inputs are (name, datatype, shape, values); BYTES
    values are bytes. Returns (HTTP status, error message or '')."""
    header = {"inputs": [], "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}
    blobs = []
    for name, datatype, shape, values in inputs:
        if datatype == "BYTES":
            blob = b"".join(struct.pack("<I", len(v)) + v for v in values)
        else:
            fmt = {"INT32": "i", "INT64": "q", "BOOL": "?"}[datatype]
            blob = struct.pack(f"<{len(values)}{fmt}", *values)
        header["inputs"].append({"name": name, "datatype": datatype, "shape": shape,
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps(header).encode()
    status, body = _post(f"http://{base}/v2/models/{model}/infer", head + b"".join(blobs),
                         {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))},
                         timeout)
    if status == 200:
        return status, ""
    try:
        return status, json.loads(body.decode(errors="replace")).get("error", body.decode(errors="replace"))
    except ValueError:
        return status, body.decode(errors="replace")[:500]


def instance_count(base: str, model: str, timeout: float = 10) -> int:
    with urllib.request.urlopen(f"http://{base}/v2/models/{model}/config", timeout=timeout) as response:
        config = json.loads(response.read())
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1


def _canary_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def broken_models(base: str, canary: bool = False, timeout: float = 60) -> dict[str, str]:
    """{model: what failed} for every model whose requests fail; {} when all answer as they should.
    A server that does not answer at all is {"tritonserver": ...} (nothing to reload: restart it)."""
    try:
        with urllib.request.urlopen(f"http://{base}/v2/health/live", timeout=10) as response:
            if response.status != 200:
                return {"tritonserver": f"/v2/health/live answered {response.status}"}
        count = instance_count(base, BLS)
    except (urllib.error.URLError, OSError) as exc:
        return {"tritonserver": f"not answering: {exc}"}
    broken: dict[str, str] = {}

    def note(model_hint: str, status: int, message: str) -> None:
        dead = DEAD_STUB.search(message)
        # The stub's instance name is <model>_<group>_<index>; a BLS error names the callee first.
        model = re.sub(r"(_\d+)+$", "", dead.group("instance")) if dead else model_hint
        broken.setdefault(model, f"HTTP {status}: {message[:300]}")

    empty_prompt = [("prompt", "BYTES", [1], [b""])]
    with ThreadPoolExecutor(max_workers=count) as pool:  # concurrent, so every BLS instance answers one
        answers = list(pool.map(lambda _: infer(base, BLS, empty_prompt, timeout=timeout), range(count)))
    for status, message in answers:
        if not (status == 400 and EMPTY_PROMPT_ANSWER in message):
            note(BLS, status, message)
    status, message = infer(base, CACHE, [("key", "BYTES", [1], [b""])], outputs=("hit",), timeout=timeout)
    if status != 200:
        note(CACHE, status, message)
    if canary and not broken:
        status, message = infer(base, BLS, [
            ("prompt", "BYTES", [1], [b"watchdog canary"]), ("image", "BYTES", [1], [_canary_png()]),
            ("height", "INT32", [1], [256]), ("width", "INT32", [1], [256]), ("seed", "INT64", [1], [0]),
            ("num_inference_steps", "INT32", [1], [1]), ("reuse_reference_cache", "BOOL", [1], [False])],
            outputs=("images",), timeout=timeout)
        if status != 200:
            note(BLS, status, message)
    return broken


def reload(base: str, model: str, timeout: float = 600) -> None:
    """Unload and load `model` (Triton skips a load of an unchanged, loaded model)."""
    for action in ("unload", "load"):
        status, body = _post(f"http://{base}/v2/repository/models/{model}/{action}", b"{}",
                             {"Content-Type": "application/json"}, timeout)
        if status != 200:
            raise RuntimeError(f"{action} {model}: HTTP {status}: {body.decode(errors='replace')[:300]}")
        if action == "unload":  # unload returns before the model has gone
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and _ready(base, model):
                time.sleep(0.2)


def _ready(base: str, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{base}/v2/models/{model}/ready", timeout=10) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def log(message: str) -> None:
    print(f"[watchdog {time.strftime('%H:%M:%S')}] {message}", flush=True)


def watch(base: str, interval: float, canary_every: int, stop=None) -> None:
    """Probe every `interval` s and reload what is broken, until `stop` (a threading.Event) is set
    or the process is killed."""
    done = 0
    while stop is None or not stop.is_set():
        canary = canary_every > 0 and done % canary_every == 0
        for model, reason in broken_models(base, canary).items():
            if model == "tritonserver":
                log(f"server not answering ({reason}); nothing to reload")
                continue
            log(f"{model} broken ({reason}): reloading")
            started = time.monotonic()
            try:
                reload(base, model)
                log(f"{model} reloaded in {time.monotonic() - started:.1f} s")
            except (RuntimeError, urllib.error.URLError, OSError) as exc:
                log(f"reloading {model} failed: {exc}")
        done += 1
        if stop is not None:
            stop.wait(interval)
        else:
            time.sleep(interval)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.watchdog", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address (default %(default)s)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between probes (default %(default)s)")
    parser.add_argument("--canary-every", type=int, default=6,
                        help="send the small real request every N probes; 0: never (default %(default)s)")
    parser.add_argument("--once", action="store_true", help="probe once, reload nothing, exit 1 if anything is broken")
    parser.add_argument("--canary", action="store_true", help="with --once: include the small real request")
    args = parser.parse_args(argv)
    if args.once:
        broken = broken_models(args.url, canary=args.canary)
        for model, reason in broken.items():
            print(f"{model}: {reason}")
        print("ok" if not broken else f"broken: {', '.join(broken)}")
        return 1 if broken else 0
    log(f"watching {args.url} every {args.interval:g} s (canary every {args.canary_every} probes)")
    watch(args.url, args.interval, args.canary_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
