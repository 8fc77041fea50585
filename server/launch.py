"""python -m server.launch: start a real tritonserver on a model repository and wait until ready.

Here it runs the `tritonserver` binary bundled in the `nvidia-pytriton` wheel (server 2.51,
Python backend only); on a GPU host use NVIDIA's container instead (see README). The
Python-backend stub embeds Python and ignores PYTHONPATH: it takes its prefix from the first
`python3` on PATH, so the venv's bin/ goes first, and it links the system libpython, so the
venv Python's LIBDIR goes first on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

from export.cli_help import HelpFormatter

ROOT = Path(__file__).resolve().parent.parent


def bundled_server() -> Path:
    """The tritonserver folder of the nvidia-pytriton wheel, or $FLUX2_TRITONSERVER_DIR (the same
    layout, unpacked from build/gpu_bundle on a machine without the wheel)."""
    import importlib.util

    if os.environ.get("FLUX2_TRITONSERVER_DIR"):
        return Path(os.environ["FLUX2_TRITONSERVER_DIR"])
    spec = importlib.util.find_spec("pytriton")  # locate without importing (its __init__ needs more deps)
    if spec is None:
        raise RuntimeError("nvidia-pytriton is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


def prepare_backends(target: Path) -> Path:
    """backends/python with the stub that matches this Python (the wheel ships one per version)."""
    bundle = bundled_server()
    python_dir = target / "python"
    if not (python_dir / "triton_python_backend_stub").exists():
        shutil.copytree(bundle / "backends" / "python", python_dir, dirs_exist_ok=True)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        shutil.copy(bundle / "python_backend_stubs" / version / "triton_python_backend_stub", python_dir)
    return target


def server_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # The stub was copied out of the wheel, so its relative RPATH to the wheel's bundled libs is gone.
    wheel_libs = bundled_server().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = f"{sysconfig.get_config_var('LIBDIR')}:{wheel_libs}:{env.get('LD_LIBRARY_PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def command(repository: Path, http: int, grpc: int, metrics: int, backends: Path,
            explicit: bool = False) -> list[str]:
    """tritonserver's command line; `explicit`: --model-control-mode=explicit with every model loaded
    at start, so that one model can be reloaded alone (server/watchdog.py)."""
    control = ["--model-control-mode=explicit", "--load-model=*"] if explicit else []
    return [str(bundled_server() / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={backends}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={metrics}", "--allow-metrics=true", "--log-verbose=0",
            "--exit-timeout-secs=10", *control]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll Triton's /v2/health/ready (plain HTTP: no client library needed)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tritonserver exited with status {process.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"http://{url}/v2/health/ready", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or not ready (400)
            pass
        time.sleep(0.5)
    raise TimeoutError(f"tritonserver not ready after {timeout:.0f} s")


def free_port() -> int:
    """A port free on loopback now (for servers started next to others: tests, perf, bench)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports() -> dict[str, int]:
    return {"http": free_port(), "grpc": free_port(), "metrics": free_port()}


def port_of(address: str) -> int:
    """The port of a 'host:port' string."""
    return int(address.rsplit(":", 1)[1])


def stub_processes(server_pid: int) -> dict[str, int]:
    """{instance name: pid} of tritonserver's Python-backend stubs (e.g. 'flux2_klein_kv_0_1': the
    model, its instance group and index), from /proc: what a fault-injection test kills."""
    stubs = {}
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or f"PPid:\t{server_pid}\n" not in (proc / "status").read_text():
                continue
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        if argv and argv[0].endswith(b"triton_python_backend_stub") and len(argv) > 2:
            stubs[argv[-3].decode() if argv[-1] == b"" else argv[-2].decode()] = int(proc.name)
    return stubs


def start(repository, http=8000, grpc=8001, metrics=8002, log_file=None, explicit: bool = False,
          append: bool = False) -> subprocess.Popen:
    backends = prepare_backends(ROOT / "build" / "tritonserver" / "backends")
    out = open(log_file, "a" if append else "w") if log_file else None  # noqa: SIM115 - owned by the process
    process = subprocess.Popen(command(Path(repository).resolve(), http, grpc, metrics, backends, explicit),
                               env=server_env(), stdout=out, stderr=subprocess.STDOUT if out else None)
    try:
        wait_ready(f"127.0.0.1:{http}", process)
    except Exception:
        process.terminate()
        process.wait(30)
        raise
    return process


def stop(process: subprocess.Popen, timeout: float = 60) -> int:
    """Terminate tritonserver (it unloads its models and stops their stubs), kill it if it hangs."""
    if process.poll() is None:
        process.terminate()
        try:
            return process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait()


@dataclass
class Running:
    """A started server: its process and where to reach it (host:port strings). `process` may be
    replaced (a replica restarted on the same ports); the context manager stops the current one."""
    process: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path | None
    repository: Path | None = None
    explicit: bool = False

    def restart(self) -> None:
        """Start tritonserver again on the same repository and ports (after it died or was killed)."""
        if self.process.poll() is None:
            stop(self.process)
        ports = [port_of(address) for address in (self.http, self.grpc, self.metrics)]
        self.process = start(self.repository, *ports, log_file=self.log, explicit=self.explicit, append=True)


@contextlib.contextmanager
def running(repository, ports: dict | None = None, log_file=None, watchdog: float | None = None):
    """Start tritonserver on `repository` (free loopback ports unless given), yield a Running, and
    stop it on the way out, whatever happened. `watchdog`: seconds between server/watchdog.py probes,
    run in a thread here (the server then uses explicit model control, so a model can be reloaded)."""
    import threading

    ports = ports or free_ports()
    explicit = watchdog is not None
    process = start(repository, ports["http"], ports["grpc"], ports["metrics"], log_file=log_file, explicit=explicit)
    server = Running(process, *(f"127.0.0.1:{ports[k]}" for k in ("http", "grpc", "metrics")),
                     Path(log_file) if log_file else None, Path(repository), explicit)
    done = threading.Event()
    if watchdog is not None:
        from server.watchdog import watch

        threading.Thread(target=watch, args=(server.http, watchdog, 1, done), daemon=True).start()
    try:
        yield server
    finally:
        done.set()
        stop(server.process)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.launch", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--repository", default="build/model_repository", help="model repository to serve")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                        help="probe the models with requests every SECONDS and reload one whose Python-backend "
                             "process died (server/watchdog.py; the server then uses explicit model control)")
    args = parser.parse_args(argv)
    print(f"serving {Path(args.repository).resolve()} ...", flush=True)
    process = start(args.repository, args.http_port, args.grpc_port, args.metrics_port,
                    explicit=args.watchdog is not None)
    if args.watchdog is not None:
        import threading

        from server.watchdog import watch

        threading.Thread(target=watch, args=(f"127.0.0.1:{args.http_port}", args.watchdog, 6), daemon=True).start()

    def forward(signum, frame):  # SIGTERM or SIGINT to us: stop tritonserver too, never leave it orphaned.
        process.terminate()  # only signal here: process.wait() below (interrupted, holding its lock) returns

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    print(f"tritonserver ready: HTTP 127.0.0.1:{args.http_port}, gRPC 127.0.0.1:{args.grpc_port}, "
          f"metrics http://127.0.0.1:{args.metrics_port}/metrics (Ctrl-C stops it)", flush=True)
    try:
        return process.wait()
    finally:
        stop(process)


if __name__ == "__main__":
    raise SystemExit(main())
