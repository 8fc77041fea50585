"""A stop leaves no crashed Python-backend process (issue 28).

python_backend r24.10 (tritonserver 2.51) frees what a model still holds after its stub has let go of
its shared memory; a custom metric freed then made every BLS and reference_kv_cache process die of
SIGSEGV at address 0x60 on every stop, and the last request a BLS instance answered (held by the
pipeline) of a general protection fault in libc. Neither shows in tritonserver's log: only the kernel's
("triton_python_b[PID]: segfault at 60 ... in triton_python_backend_stub", flux2_serving/models/triton_io.py).

One real server (the launcher's running(), behind the gate), one request, a stop; then: tritonserver
exited 0 having unloaded every model (so every model's finalize() ran: a stop that ran out of
--exit-timeout-secs kills the stubs instead, which hides the crash), and the kernel log names none of
this server's stubs. Skipped where the kernel log cannot be read (dmesg needs root, or
kernel.dmesg_restrict=0) or does not report crashes (debug.exception-trace=0). The kernel rate-limits
these lines: on a machine where other servers crash often, a crash here may go unreported."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from flux2_serving.clients.api import Flux2Client
from flux2_serving.server.launch import log_tail, running, stub_processes
from flux2_serving.serving.repository import assemble

# "triton_python_b[PID]: segfault at ...", "traps: triton_python_b[PID] general protection fault ...",
# "traps: triton_python_b[PID] trap invalid opcode ..." (the kernel truncates the name to 15 characters)
CRASH = re.compile(r"triton_python_b\[(\d+)\]:? (segfault|general protection|trap)")


def kernel_log() -> list[str] | None:
    """The kernel log's lines, or None where it cannot be read."""
    try:
        result = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.splitlines() if result.returncode == 0 and result.stdout else None


def crashed(lines: list[str], pids) -> list[tuple[int, str]]:
    """(pid, line) for each line of `lines` that reports a crash of a process in `pids`."""
    return [(int(match.group(1)), line) for line in lines
            if (match := CRASH.search(line)) and int(match.group(1)) in pids]


def test_crash_lines_are_recognised():
    segv = ("[ 1632.5] triton_python_b[27906]: segfault at 60 ip 000056139f783260 sp 00007ffe39d11360 error 4 in "
            "triton_python_backend_stub[b4260,56139f6dc000+b3000] likely on CPU 1 (core 1, socket 0)")
    gp = ("[ 1631.0] traps: triton_python_b[27907] general protection fault ip:7f5cc70aa370 sp:7fffe3baaeb8 "
          "error:0 in libc.so.6[8c370,7f5cc7044000+156000]")
    assert crashed([segv, gp, "[ 1.0] unrelated"], {27906, 27907}) == [(27906, segv), (27907, gp)]
    assert crashed([segv, gp], {1}) == []


def test_stop_leaves_no_crashed_stub(tmp_path, onnx_fp32, tiny_checkpoint):
    before = kernel_log()
    if before is None:
        pytest.skip("the kernel log is not readable here (dmesg needs root or kernel.dmesg_restrict=0)")
    trace = Path("/proc/sys/debug/exception-trace")
    if trace.exists() and trace.read_text().strip() == "0":
        pytest.skip("the kernel does not log crashed processes here (debug.exception-trace=0)")
    repository = assemble(onnx_fp32, tiny_checkpoint, tmp_path / "model_repository", backend="onnxruntime",
                          bls_instances=2)  # one instance answers the request, the other answers none
    log = tmp_path / "server.log"
    with running(repository, log_file=log) as server:
        with Flux2Client(server.grpc, timeout_s=300) as client:
            client.generate("a stop", height=256, width=256, seed=0, num_inference_steps=1)
        stubs = stub_processes(server.process.pid)
    assert {name.rsplit("_", 2)[0] for name in stubs} >= {"flux2_klein_kv", "reference_kv_cache", "text_encoder"}
    text = log.read_text(errors="replace")
    unloaded = set(re.findall(r"successfully unloaded '([^']+)'", text))
    assert server.process.returncode == 0 and unloaded >= {name.rsplit("_", 2)[0] for name in stubs}, (
        f"tritonserver did not stop cleanly (status {server.process.returncode}, unloaded {sorted(unloaded)}):\n"
        f"{log_tail(log)}")
    time.sleep(1)  # the kernel logs a crash as it happens; the stop has waited for every stub
    seen = set(before)
    new = [line for line in kernel_log() or [] if line not in seen]
    names = {pid: name for name, pid in stubs.items()}
    lines = crashed(new, names)
    assert not lines, "Python-backend processes crashed at the stop:\n" + "\n".join(
        f"{names[pid]}: {line}" for pid, line in lines)
