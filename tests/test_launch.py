"""`python -m server.launch` as a user and a process supervisor run it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from bench.report import process_tree
from server.launch import free_ports


def test_sigterm_to_the_launcher_stops_tritonserver_too(triton_server):
    """systemd, Kubernetes or a shell send SIGTERM to the launcher: tritonserver must not be orphaned."""
    ports = free_ports()
    launcher = subprocess.Popen([sys.executable, "-m", "server.launch", "--repository", str(triton_server["repository"]),
                                 "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]),
                                 "--metrics-port", str(ports["metrics"])],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert "serving " in launcher.stdout.readline()  # it says which repository it serves
        assert "tritonserver ready" in launcher.stdout.readline()
        tree = [pid for pid in process_tree(launcher.pid) if pid != launcher.pid]
        assert tree, "tritonserver is not a child of the launcher"
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(90)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in tree):
            time.sleep(0.5)
        alive = [pid for pid in tree if os.path.exists(f"/proc/{pid}")
                 and open(f"/proc/{pid}/stat").read().split()[2] != "Z"]
        assert alive == [], f"left running after SIGTERM: {alive}"
    finally:
        if launcher.poll() is None:
            launcher.kill()
