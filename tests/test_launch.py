"""`python -m flux2_serving.server.launch` as a user and a process supervisor run it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tritonclient.http as http

from bench.report import process_tree
from flux2_serving.clients.api import Flux2Client, Flux2Error
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.server.launch import (
    START_ATTEMPTS,
    STOP_TIMEOUT_S,
    LaunchError,
    ServerExited,
    bundled_server,
    command,
    free_ports,
    group_members,
    live_processes,
    prepare_backends,
    python_version,
    start,
    stub_python,
)
from flux2_serving.serving.memory_plan import bls_transfer_bytes
from flux2_serving.serving.repository import assemble

STOP_BOUND_S = STOP_TIMEOUT_S + 10  # stated in README ("Serving with Triton"): the launcher's bound, plus slack


def start_launcher(repository, *extra) -> tuple[subprocess.Popen, dict]:
    """The launcher in a process group of its own, as a shell runs a foreground job (Ctrl-C goes to the group);
    tritonserver's log goes next to the repository (not into build/)."""
    ports = free_ports()
    log = Path(repository).parent / f"launcher-{ports['http']}.log"
    launcher = subprocess.Popen([sys.executable, "-m", "flux2_serving.server.launch", "--repository", str(repository),
                                 "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                                 "--metrics-port", str(ports["metrics"]), "--log-file", str(log), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    assert "serving " in launcher.stdout.readline()  # it says which repository it serves
    ready = launcher.stdout.readline()  # (tritonserver's own log goes to --log-file)
    assert "tritonserver ready" in ready, ready
    return launcher, ports


def server_pid(launcher) -> int:
    (pid,) = [pid for pid in process_tree(launcher.pid) if pid != launcher.pid and
              open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")[0].endswith(b"tritonserver")]
    return pid


def test_the_launcher_listens_on_loopback_keeps_the_admin_apis_closed_and_leaves_nothing_on_sigterm(
        small_repository):
    """One launcher (a start costs ~13 s here) for both: its tritonserver listens on loopback only, with the
    admin APIs closed; then systemd, Kubernetes or a shell send SIGTERM to the launcher: tritonserver (its
    stubs and the gate) must not be orphaned."""
    launcher, ports = start_launcher(small_repository)
    try:
        pid = server_pid(launcher)
        listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        mine = [line for line in listening.splitlines() if f"pid={pid}," in line]
        # HTTP, gRPC (shown as the IPv4-mapped [::ffff:127.0.0.1]) and metrics: loopback only.
        assert len(mine) == 3 and all(re.search(r"[ \[:]127\.0\.0\.1\]?:\d+ ", line) for line in mine), mine
        with pytest.raises(Exception, match="restricted"):  # no key configured: nobody may unload
            http.InferenceServerClient(f"127.0.0.1:{ports['http']}").unload_model("flux2_klein_kv")

        tree = [pid for pid in process_tree(launcher.pid) if pid != launcher.pid]
        assert tree, "tritonserver is not a child of the launcher"
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(STOP_BOUND_S)
        assert live_processes(tree) == [], f"left running after SIGTERM: {live_processes(tree)}"
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


@pytest.mark.parametrize("attempt", range(5))
def test_ctrl_c_mid_request_stops_everything_within_the_bound(small_repository, attempt):
    """Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) while a long request
    runs: the launcher returns within STOP_BOUND_S and no process of tritonserver's group (its
    Python-backend stubs included) is left."""
    launcher, ports = start_launcher(small_repository)
    pid = server_pid(launcher)
    outcome = []

    def long_request():
        try:
            with Flux2Client(f"127.0.0.1:{ports['grpc']}", timeout_s=120) as user:
                user.generate("a long request", height=1024, width=1024, seed=attempt, num_inference_steps=50)
            outcome.append("served")
        except Flux2Error as exc:
            outcome.append(str(exc))

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    time.sleep(2.0)  # the request is computing
    assert group_members(pid), "tritonserver's process group is empty before the stop"
    started = time.monotonic()
    os.killpg(launcher.pid, signal.SIGINT)
    try:
        launcher.wait(STOP_BOUND_S)
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    took = time.monotonic() - started
    left = group_members(pid)  # live ones only
    print(f"attempt {attempt}: stopped in {took:.1f} s, request: {outcome}, output: {launcher.stdout.read()[-300:]!r}")
    assert took <= STOP_BOUND_S
    assert left == [], f"left running: {left}"
    thread.join(30)
    assert outcome and outcome != ["served"]  # the request was cut short, and its client was told


def test_a_server_that_exits_during_start_up_is_started_again(tmp_path, capfd):
    """tritonserver 2.51 aborted once while its Python stubs started on a loaded machine: the launcher
    starts it again (START_ATTEMPTS in all) before it gives up, with one line saying so."""
    ports = free_ports()
    with pytest.raises(ServerExited, match="exited with status"):
        start(tmp_path / "no-such-repository", ports["http"], ports["grpc"], ports["metrics"],
              log_file=tmp_path / "server.log")
    assert f"starting it again (attempt 2 of {START_ATTEMPTS})" in capfd.readouterr().err


def test_a_stub_built_for_another_python_is_replaced_or_refused(tmp_path, monkeypatch):
    """A backends folder shared with another Python (a 3.12 GPU machine, a 3.11 venv) holds a stub
    linked to the wrong libpython: the launcher copies this Python's stub over it; where the only stub
    on offer is for another Python, it refuses with one line instead of starting models that fail."""
    other = "3.12" if python_version() != "3.12" else "3.11"
    wrong = bundled_server() / "python_backend_stubs" / other / "triton_python_backend_stub"
    assert stub_python(wrong) == other
    backends = tmp_path / "backends"
    (backends / "python").mkdir(parents=True)
    shutil.copy(wrong, backends / "python" / "triton_python_backend_stub")  # a stale stub from the other Python
    prepare_backends(backends)
    assert stub_python(backends / "python" / "triton_python_backend_stub") == python_version()

    fake = tmp_path / "bundle"  # a tritonserver folder whose stub for this Python is really the other one's
    shutil.copytree(bundled_server() / "backends", fake / "backends")
    (fake / "python_backend_stubs" / python_version()).mkdir(parents=True)
    shutil.copy(wrong, fake / "python_backend_stubs" / python_version() / "triton_python_backend_stub")
    monkeypatch.setenv("FLUX2_TRITONSERVER_DIR", str(fake))
    with pytest.raises(LaunchError) as refused:
        prepare_backends(tmp_path / "other_backends")
    message = str(refused.value)
    assert "\n" not in message and f"built for Python {other}, not this Python {python_version()}" in message


def test_a_repository_served_on_a_gpu_gets_its_cuda_memory_pool(tmp_path, onnx_fp32, tiny_checkpoint):
    """The BLS on cuda:N: the launcher passes --cuda-memory-pool-byte-size=N:<the plan's BLS transfers>,
    written into the repository by the assembler; on the CPU no pool flag."""
    manifest = read_manifest(onnx_fp32)
    expected = 2 * bls_transfer_bytes(manifest.dims, manifest.dtype, DEFAULT_ENVELOPE)
    gpu = assemble(onnx_fp32, tiny_checkpoint, tmp_path / "gpu", backend="onnxruntime", device="cuda:1",
                   bls_instances=2)
    cpu = assemble(onnx_fp32, tiny_checkpoint, tmp_path / "cpu", backend="onnxruntime", bls_instances=2)
    assert f"--cuda-memory-pool-byte-size=1:{expected}" in command(gpu, 1, 2, 3, tmp_path)
    assert not any(arg.startswith("--cuda-memory-pool") for arg in command(cpu, 1, 2, 3, tmp_path))
