"""The gate in front of the embedded tritonserver 2.51 (flux2_serving/server/gate.py), through the
session's real server: every body that crashed it or made it hold gigabytes, and the malformed JSON
it answered with HTTP 500, is refused with a one-line error before tritonserver sees a byte; the
server answers normal requests afterwards, and the peak memory of tritonserver and of the gate stays
within the bounds stated here.

Before the gate: 200,000 nested '[' (400 KB) killed tritonserver (SIGSEGV, 3 of 3); a 1 MB gzip body
drove it to 5.8 GB; a 512 MiB prompt in a compressed gRPC message was taken in (2.6 GB); 14 kinds of
malformed JSON got HTTP 500."""

from __future__ import annotations

import gzip
import http.client
import json
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
from tritonclient.utils import InferenceServerException

from flux2_serving.clients.api import Flux2Client
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.server import kserve_json

MIB = 2**20
LIMIT = DEFAULT_ENVELOPE.max_request_bytes
# Stated bounds. tritonserver never sees a refused body: its peak RSS may grow by what one small good
# request costs it (a response buffer), not by the body. The gate holds a body it receives once, plus
# grpcio's decompression buffer: at most twice the request limit, plus its own working set.
TRITONSERVER_GROWTH_BYTES = 64 * MIB
GATE_GROWTH_BYTES = 2 * LIMIT + 64 * MIB
INFER = "/v2/models/flux2_klein_kv/infer"


def post(address: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, str]:
    """(status, error message) of one POST; the body is sent whole unless the server answers first."""
    host, port = address.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    try:
        connection.putrequest("POST", path)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            connection.putheader(key, value)
        connection.endheaders()
        try:
            connection.send(body)
        except (BrokenPipeError, ConnectionResetError):  # refused before the body arrived: read the answer
            pass
        response = connection.getresponse()
        text = response.read().decode(errors="replace")
    finally:
        connection.close()
    try:
        return response.status, json.loads(text).get("error", text)
    except ValueError:
        return response.status, text


class PeakRss:
    """Peak resident memory of processes from a starting point: /proc/PID/clear_refs with 5 resets
    the kernel's high-water mark (VmHWM) to the current RSS."""

    def __init__(self, *pids: int):
        self.pids = pids
        for pid in pids:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.start = [self._field(pid, "VmRSS") for pid in pids]

    @staticmethod
    def _field(pid: int, name: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{name}:"):
                return int(line.split()[1]) * 1024
        raise KeyError(name)

    def growth(self) -> list[int]:
        return [self._field(pid, "VmHWM") - start for pid, start in zip(self.pids, self.start, strict=True)]


def assert_serving(server) -> None:
    with Flux2Client(server["grpc"], timeout_s=120) as client:
        assert np.asarray(client.generate("still here?", height=256, width=256, seed=1,
                                          num_inference_steps=1)[0]).shape == (256, 256, 3)


def assert_bounded(peak: PeakRss) -> None:
    server_growth, gate_growth = peak.growth()
    print(f"peak RSS growth: tritonserver {server_growth / MIB:.1f} MiB, gate {gate_growth / MIB:.1f} MiB")
    assert server_growth <= TRITONSERVER_GROWTH_BYTES, server_growth
    assert gate_growth <= GATE_GROWTH_BYTES, gate_growth


@pytest.fixture
def peak(triton_server):
    return PeakRss(triton_server["process"].pid, triton_server["gate"].pid)


def test_a_400_kb_nested_body_is_refused_and_the_server_lives(triton_server, peak):
    body = b'{"inputs":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    status, message = post(triton_server["http"], INFER, body)
    assert status == 400 and "nested deeper than 32 levels" in message, (status, message)
    status, message = post(triton_server["http"], "/v2/repository/index", body)  # every JSON body, not only infer
    assert status == 400 and "nested deeper" in message, (status, message)
    assert_serving(triton_server)
    assert_bounded(peak)


def test_a_1_mb_gzip_body_is_refused_unread(triton_server, peak):
    prompt = b'{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["' + b"a" * 2**30 + b'"]}]}'
    body = gzip.compress(prompt, compresslevel=9)
    del prompt
    assert len(body) < 2 * MIB
    status, message = post(triton_server["http"], INFER, body, {"Content-Encoding": "gzip"})
    assert status == 415 and "Content-Encoding 'gzip' is not accepted" in message, (status, message)
    assert_serving(triton_server)
    assert_bounded(peak)


def test_a_body_over_the_request_limit_is_refused_before_it_is_read(triton_server, peak):
    """Five 60 MB references took 2.9 GB of tritonserver before the 4-reference check."""
    status, message = post(triton_server["http"], INFER, b"\0" * (LIMIT + 1),
                           {"Inference-Header-Content-Length": "2"})
    assert status == 413 and f"at most {LIMIT} bytes" in message, (status, message)
    assert_bounded(peak)


def test_compressed_and_oversized_grpc_messages_are_refused(triton_server, peak):
    client = grpc.InferenceServerClient(triton_server["grpc"])
    prompt = grpc.InferInput("prompt", [1], "BYTES")
    prompt.set_data_from_numpy(np.array([b"a" * (512 * MIB)], dtype=np.object_))
    for compression in ("gzip", None):
        with pytest.raises(InferenceServerException) as refused:
            client.infer("flux2_klein_kv", [prompt], compression_algorithm=compression)
        assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value
        assert "larger than max" in str(refused.value.message()), refused.value
    del prompt
    assert_serving(triton_server)
    assert_bounded(peak)


MALFORMED = {  # the probe's kinds that tritonserver 2.51 answered with HTTP 500
    "truncated": (b'{"inputs":[', "not valid JSON"),
    "not_utf8": (b'{"inputs":["\xff"]}', "not UTF-8"),
    "height_string": (b'{"inputs":[{"name":"height","shape":[1],"datatype":"INT32","data":["abc"]}]}', "'height'"),
    "height_null": (b'{"inputs":[{"name":"height","shape":[1],"datatype":"INT32","data":[null]}]}', "'height'"),
    "height_huge": (b'{"inputs":[{"name":"height","shape":[1],"datatype":"INT32","data":[1e10]}]}', "'height'"),
    "timeout_negative": (b'{"parameters":{"timeout":-1},"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES",'
                         b'"data":["x"]}]}', "parameters.timeout"),
    "priority_negative": (b'{"parameters":{"priority":-1},"inputs":[{"name":"prompt","shape":[1],'
                          b'"datatype":"BYTES","data":["x"]}]}', "parameters.priority"),
    "shape_data_mismatch": (b'{"inputs":[{"name":"prompt","shape":[2],"datatype":"BYTES","data":["x"]}]}',
                            "shape [2] holds 2 elements"),
    "negative_shape": (b'{"inputs":[{"name":"prompt","shape":[-1],"datatype":"BYTES","data":["x"]}]}', "'shape'"),
    "shape_not_list": (b'{"inputs":[{"name":"prompt","shape":"1","datatype":"BYTES","data":["x"]}]}', "'shape'"),
    "unknown_datatype": (b'{"inputs":[{"name":"prompt","shape":[1],"datatype":"STRING","data":["x"]}]}',
                         "'datatype'"),
    "inputs_not_list": (b'{"inputs":{"name":"prompt"}}', "'inputs'"),
    "input_not_object": (b'{"inputs":[1]}', "'inputs[0]'"),
    "binary_size_mismatch": (b'{"inputs":[{"name":"seed","shape":[1],"datatype":"INT64",'
                             b'"parameters":{"binary_data_size":4}}]}', "binary_data_size"),
    "outputs_not_list": (b'{"inputs":[{"name":"prompt","shape":[1],"datatype":"BYTES","data":["x"]}],"outputs":1}',
                         "'outputs'"),
    "not_an_object": (b'[1, 2]', "'request'"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_json_gets_400_naming_the_field(triton_server, case):
    body, fragment = MALFORMED[case]
    status, message = post(triton_server["http"], INFER, body)
    assert status == 400 and fragment in message, (status, message)
    assert "Traceback" not in message


def test_binary_requests_as_tritonclient_sends_them_pass(triton_server):
    """The gate's schema check accepts what the real clients send (binary tensors, JSON tensors)."""
    body = json.dumps({"inputs": [{"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a fox"]},
                                  {"name": "height", "shape": [1], "datatype": "INT32", "data": [256]},
                                  {"name": "width", "shape": [1], "datatype": "INT32", "data": [256]},
                                  {"name": "num_inference_steps", "shape": [1], "datatype": "INT32", "data": [1]}],
                       "outputs": [{"name": "seed"}], "parameters": {"priority": 2}}).encode()
    status, message = post(triton_server["http"], INFER, body)
    assert status == 200, (status, message)
    assert_serving(triton_server)


def test_generate_endpoints_are_not_served(triton_server):
    status, message = post(triton_server["http"], "/v2/models/flux2_klein_kv/generate", b'{"prompt":"x"}')
    assert status == 404 and "not served" in message, (status, message)


def test_the_metrics_port_ignores_hostile_bodies(triton_server):
    """The metrics port is tritonserver's own (GET /metrics only, no JSON parsing): still answering."""
    for body, headers in ((b"[" * 200_000, {}), (gzip.compress(b"a" * 2**26), {"Content-Encoding": "gzip"})):
        post(triton_server["metrics"], "/metrics", body, headers)
    host, port = triton_server["metrics"].rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/metrics")
    assert connection.getresponse().status == 200
    assert_serving(triton_server)


def test_json_depth_is_measured_without_recursion():
    assert kserve_json.depth([[[]]]) == 3 and kserve_json.depth(5) == 0
    with pytest.raises(kserve_json.BadJson, match="nested deeper than 32"):
        kserve_json.parse(b"[" * 33 + b"]" * 33)
    assert kserve_json.parse(b"[" * 32 + b"]" * 32) is not None
