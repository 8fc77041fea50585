"""python -m flux2_serving.server.watchdog: keep a Triton replica serving when a model breaks.

Killing a Python-backend stub (the BLS, reference_kv_cache, a component runner) leaves Triton
answering 200 on /v2/health/ready and on the model's ready endpoint while every request to that
model fails with "Stub process ... is not healthy", with no end (Triton 2.51). Readiness cannot
see it; requests can. Every --interval seconds this checks:

  - the repository index (an admin API: needs the admin key): a model that is not READY
    (unloaded, failed to load) is loaded again;
  - flux2_klein_kv, with as many requests with an empty prompt as it has instances, at once: each
    answers INVALID_ARG from the BLS's own code, or names the dead stub;
  - reference_kv_cache, with a lookup of the empty key (answered without touching the cache);
  - every --canary-every rounds (and with --canary), one small real request through the BLS with a
    64x64 reference and the cache bypassed: 256x256, 1 step, so every component model runs.

Probes go to the BLS at the top priority level with a queue timeout, so they wait behind the
requests being computed, not behind the queue; a probe that times out or is refused because the
server is full means "busy", never "broken": the watchdog does not kill a replica for working.
A model found broken is loaded again through Triton's repository API without unloading it
(reload_without_gap: the server runs with --model-control-mode=explicit; the old version serves until
the new one is ready, and the other models keep serving); a model that is not loaded is loaded.
Nothing a probe meets ends the watch loop.

Next to flux2_serving.server.launch this is an option (--watchdog): the launcher's supervisor
(flux2_serving/server/supervisor.py, on by default) sees a dead process in the process table within
a second and repairs it without probing; probes still find what the process table cannot show (a
stub that is alive but stopped, a model that was unloaded). In Kubernetes, where tritonserver runs
without the launcher, this sidecar is the repair. `--once` probes once, reloads nothing and exits 1 only if something is
definitely broken: a Kubernetes livenessProbe, so that a replica the watchdog cannot repair is
restarted. Standard library and Pillow only: it runs in the serving image (/opt/flux2/server/).
"""

from __future__ import annotations

import io
import json
import re
import struct
import sys
import time
import traceback
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from flux2_serving.contract import security
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.names import BLS_MODEL as BLS
from flux2_serving.contract.names import CACHE_MODEL as CACHE
from flux2_serving.contract.names import QUEUE_FULL, QUEUE_TIMEOUT

EMPTY_PROMPT_ANSWER = "'prompt' must be a non-empty string"
DEAD_STUB = re.compile(r"Stub process '(?P<instance>[^']+)' is not healthy")
# Answers that mean "working, come back later": the BLS's queue is full, or a probe waited its time.
BUSY = (QUEUE_FULL, QUEUE_TIMEOUT, "timed out")
PROBE_PRIORITY = 1  # the BLS's top priority level (its config.pbtxt has 2; requests default to 2)
NO_ANSWER = 0  # status of a request that got no HTTP answer (refused, reset, timed out)


def _post(url: str, body: bytes, headers: dict, timeout: float) -> tuple[int, bytes]:
    """(HTTP status, body); (NO_ANSWER, reason) when nothing came back in time."""
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (urllib.error.URLError, OSError) as exc:  # refused, reset, or timed out (TimeoutError is an OSError)
        reason = getattr(exc, "reason", exc)
        return NO_ANSWER, f"no answer: {'timed out' if 'timed out' in str(reason) else reason}".encode()


def infer(base: str, model: str, inputs: list[tuple[str, str, list, list[bytes] | list]], outputs=(),
          timeout: float = 30, parameters: dict | None = None) -> tuple[int, str]:
    """One KServe v2 request with binary tensors: inputs are (name, datatype, shape, values); BYTES
    values are bytes; `parameters` are the request's (e.g. priority, timeout in microseconds).
    Returns (HTTP status, error message or ''); (NO_ANSWER, why) when nothing came back in time."""
    header = {"inputs": [], "outputs": [{"name": name, "parameters": {"binary_data": True}} for name in outputs]}
    if parameters:
        header["parameters"] = parameters
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
    headers = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    status, body = _post(f"http://{base}/v2/models/{model}/infer", head + b"".join(blobs), headers, timeout)
    if status == 200:
        return status, ""
    try:
        return status, json.loads(body.decode(errors="replace")).get("error", body.decode(errors="replace"))
    except ValueError:
        return status, body.decode(errors="replace")[:500]


def _get_json(url: str, timeout: float, headers: dict | None = None):
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def _canary_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def is_busy(status: int, message: str) -> bool:
    """A probe answer that means the server is working, not broken: queue full, or no answer in time."""
    return (status in (NO_ANSWER, 503) and any(text in message for text in BUSY))


class Watchdog:
    """Probes one server (HTTP address `base`) and repairs what it can. `admin_key` opens the
    repository API (reloads, the repository index); `probe_timeout`: seconds a probe may wait."""

    def __init__(self, base: str, admin_key: str | None = None, probe_timeout: float = 60, repair=None):
        self.base, self.admin_key, self.probe_timeout = base, admin_key, probe_timeout
        # repair(model): how a loaded, broken model is reloaded (the launcher's supervisor's, which also
        # retires the old version's processes); default reload_without_gap.
        self.repair = repair
        self.rounds = 0  # completed rounds (a test can see the loop is alive)
        self.busy = 0  # probes that found the server busy
        self.repairs: list[tuple[str, str]] = []  # (model, outcome) of every repair tried
        self._reloads = 0

    # ------------------------------------------------------------------ checks

    def not_ready(self) -> dict[str, str]:
        """{model: state and reason} of models the repository index does not list as READY
        ({} without an admin key: the index is a restricted API)."""
        if not self.admin_key:
            return {}
        request = urllib.request.Request(f"http://{self.base}/v2/repository/index", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **security.admin_headers(self.admin_key)})
        with urllib.request.urlopen(request, timeout=10) as response:
            index = json.loads(response.read())
        return {entry["name"]: f"{entry.get('state', 'UNKNOWN')}: {entry.get('reason', '')}".strip(": ")
                for entry in index if entry.get("state") != "READY"}

    def probe(self, model: str, inputs: list, outputs=(), priority: bool = True) -> tuple[int, str]:
        """A request that waits at most probe_timeout s (client side and, for the BLS, in Triton's queue)."""
        parameters = {"priority": PROBE_PRIORITY, "timeout": int(self.probe_timeout * 1e6)} if priority else None
        return infer(self.base, model, inputs, outputs, timeout=self.probe_timeout + 5, parameters=parameters)

    def broken_models(self, canary: bool = False) -> dict[str, str]:
        """{model: what failed} for every model that is definitely broken; {} when all answer as they
        should or are busy. A server that does not answer at all is {"tritonserver": ...}."""
        return self._check(canary)[0]

    def _check(self, canary: bool) -> tuple[dict[str, str], set[str]]:
        """(broken_models, the models among them that the repository index shows not loaded)."""
        base = self.base
        try:
            with urllib.request.urlopen(f"http://{base}/v2/health/live", timeout=10) as response:
                if response.status != 200:
                    return {"tritonserver": f"/v2/health/live answered {response.status}"}, set()
            broken = self.not_ready()
            unloaded = set(broken)
            config = _get_json(f"http://{base}/v2/models/{BLS}/config", 10) if BLS not in broken else {}
        except (urllib.error.URLError, OSError, ValueError) as exc:
            return {"tritonserver": f"not answering: {exc}"}, set()
        count = sum(int(group.get("count", 1)) for group in config.get("instance_group", [])) or 1

        def note(model_hint: str, status: int, message: str) -> None:
            if is_busy(status, message):
                self.busy += 1
                log(f"{model_hint} busy ({message[:120]}): not a failure")
                return
            if status == NO_ANSWER:  # refused or reset: the server itself went away (or is stopping)
                broken.setdefault("tritonserver", f"{model_hint}: {message[:300]}")
                return
            dead = DEAD_STUB.search(message)
            # The stub's instance name is <model>_<group>_<index>; a BLS error names the callee first.
            model = re.sub(r"(_\d+)+$", "", dead.group("instance")) if dead else model_hint
            broken.setdefault(model, f"HTTP {status}: {message[:300]}")

        if BLS not in broken:
            empty_prompt = [("prompt", "BYTES", [1], [b""])]
            with ThreadPoolExecutor(max_workers=count) as pool:  # concurrent, so every BLS instance answers one
                answers = list(pool.map(lambda _: self.probe(BLS, empty_prompt), range(count)))
            for status, message in answers:
                if not (status == 400 and EMPTY_PROMPT_ANSWER in message):
                    note(BLS, status, message)
        if CACHE not in broken:
            status, message = self.probe(CACHE, [("key", "BYTES", [1], [b""])], outputs=("hit",), priority=False)
            if status != 200:
                note(CACHE, status, message)
        if canary and not broken:
            status, message = self.probe(BLS, [
                ("prompt", "BYTES", [1], [b"watchdog canary"]), ("image", "BYTES", [1], [_canary_png()]),
                ("height", "INT32", [1], [256]), ("width", "INT32", [1], [256]), ("seed", "INT64", [1], [0]),
                ("num_inference_steps", "INT32", [1], [1]), ("reuse_reference_cache", "BOOL", [1], [False])],
                outputs=("images",))
            if status != 200:
                note(BLS, status, message)
        return broken, unloaded

    # ------------------------------------------------------------------ repair

    def reload(self, model: str, loaded: bool = True, timeout: float = 600) -> None:
        """Load `model` again: a loaded one without unloading it (reload_without_gap, or the
        supervisor's repair), one that is not loaded plainly."""
        if loaded and self.repair is not None:
            if not self.repair(model):
                raise RuntimeError(f"reloading {model} failed (see the supervisor's lines)")
            return
        if loaded:
            self._reloads += 1
            reload_without_gap(self.base, model, self.admin_key, f"watchdog.{self._reloads}", timeout)
            return
        headers = {"Content-Type": "application/json", **security.admin_headers(self.admin_key)}
        status, body = _post(f"http://{self.base}/v2/repository/models/{model}/load", b"{}", headers, timeout)
        if status != 200:
            raise RuntimeError(f"load {model}: HTTP {status}: {body.decode(errors='replace')[:300]}")

    def round(self, canary: bool = False) -> dict[str, str]:
        """One probe-and-repair round; never raises (a watchdog that dies repairs nothing)."""
        try:
            broken, unloaded = self._check(canary)
            for model, reason in broken.items():
                if model == "tritonserver":
                    log(f"server not answering ({reason}); nothing to reload")
                    continue
                log(f"{model} broken ({reason}): {'loading' if model in unloaded else 'reloading'}")
                started = time.monotonic()
                try:
                    self.reload(model, loaded=model not in unloaded)
                    self.repairs.append((model, "reloaded"))
                    log(f"{model} reloaded in {time.monotonic() - started:.1f} s")
                except (RuntimeError, urllib.error.URLError, OSError) as exc:
                    self.repairs.append((model, f"failed: {exc}"))
                    log(f"reloading {model} failed: {exc}")
            return broken
        except Exception:  # any failure: log and keep watching
            log(f"probe round failed unexpectedly; watching on:\n{traceback.format_exc()}")
            return {}
        finally:
            self.rounds += 1

    def watch(self, interval: float, canary_every: int, stop=None) -> None:
        """Probe every `interval` s and repair what is broken, until `stop` (a threading.Event) is set
        or the process is killed."""
        while stop is None or not stop.is_set():
            self.round(canary_every > 0 and self.rounds % canary_every == 0)
            if stop is not None:
                stop.wait(interval)
            else:
                time.sleep(interval)


REPAIR_PARAMETER = "flux2_repair"  # a config parameter no model reads: changing it makes a load a reload


def reload_without_gap(base: str, model: str, admin_key: str | None, generation: str, timeout: float = 600) -> None:
    """Load the loaded `model` again, as a new version that Triton loads while the old one serves and
    swaps in once ready: its current config (GET .../config) with REPAIR_PARAMETER set to `generation`,
    as the load's config override. (Triton skips the load of an unchanged, loaded model, so a dead
    Python-backend process would stay dead; unloading first leaves a window of NOT_FOUND answers;
    changing only the instance group would keep the dead instance.) Raises RuntimeError if Triton
    refuses or the new version fails to load (the old one then goes on serving)."""
    config = _get_json(f"http://{base}/v2/models/{model}/config", 30)
    config.setdefault("parameters", {})[REPAIR_PARAMETER] = {"string_value": generation}
    body = json.dumps({"parameters": {"config": json.dumps(config)}}).encode()
    headers = {"Content-Type": "application/json", **security.admin_headers(admin_key)}
    status, answer = _post(f"http://{base}/v2/repository/models/{model}/load", body, headers, timeout)
    if status != 200:
        raise RuntimeError(f"load {model}: HTTP {status}: {answer.decode(errors='replace')[:300]}")


def log(message: str) -> None:
    print(f"[watchdog {time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.server.watchdog", __doc__)
    parser.add_argument("--url", default="127.0.0.1:8000", help="Triton's HTTP address (default %(default)s)")
    parser.add_argument("--interval", type=float, default=10, help="seconds between probes (default %(default)s)")
    parser.add_argument("--canary-every", type=int, default=6,
                        help="send the small real request every N probes; 0: never (default %(default)s)")
    parser.add_argument("--probe-timeout", type=float, default=30,
                        help="seconds a probe may wait before it counts as 'busy' (default %(default)s)")
    parser.add_argument("--once", action="store_true", help="probe once, reload nothing, exit 1 if anything is broken")
    parser.add_argument("--canary", action="store_true", help="with --once: include the small real request")
    args = parser.parse_args(argv)
    admin_key = security.configured_admin_key()
    if not admin_key:
        log(f"no ${security.ADMIN_KEY_ENV} or ${security.ADMIN_KEY_FILE_ENV}: cannot read the repository index "
            "or reload models (probing only)")
    dog = Watchdog(args.url, admin_key, args.probe_timeout)
    if args.once:
        broken = dog.broken_models(canary=args.canary)
        for model, reason in broken.items():
            print(f"{model}: {reason}")
        print("ok" + (" (busy)" if dog.busy else "") if not broken else f"broken: {', '.join(broken)}")
        return 1 if broken else 0
    log(f"watching {args.url} every {args.interval:g} s (canary every {args.canary_every} probes)")
    dog.watch(args.interval, args.canary_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
