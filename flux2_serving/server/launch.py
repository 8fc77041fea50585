"""python -m flux2_serving.server.launch: start a real tritonserver on a model repository and wait until ready.

Here it runs the `tritonserver` binary bundled in the `nvidia-pytriton` wheel (server 2.51,
Python backend only); on a GPU host use NVIDIA's container instead (see README). The
Python-backend stub embeds Python and ignores PYTHONPATH: it takes its prefix from the first
`python3` on PATH, so the venv's bin/ goes first, and it links the system libpython, so the
venv Python's LIBDIR goes first on LD_LIBRARY_PATH.

Hardened as flux2_serving/contract/security.py describes: admin APIs behind a key ($FLUX2_ADMIN_KEY, or
--admin-key-file; without one they are closed), an internal secret for the internal models,
loopback-only listeners unless --address says otherwise. Stopping is bounded: SIGTERM, then after
STOP_TIMEOUT_S a SIGKILL to tritonserver's whole process group, Python-backend stubs included.

Quiet by default: tritonserver's own log (model loading, its option tables, and on a host without a
GPU its NVML/DCGM/CUDA-driver complaints) goes to a log file, whose path the ready line names;
--verbose shows it on the terminal instead. When tritonserver exits, the end of its log is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from flux2_serving import CHECKOUT
from flux2_serving.contract import security
from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.contract.cli_help import prog as cli_prog
from flux2_serving.contract.names import BLS_MODEL
from flux2_serving.server.watchdog import Watchdog


def bundled_server() -> Path:
    """The tritonserver folder of the nvidia-pytriton wheel, or $FLUX2_TRITONSERVER_DIR (the same
    layout, unpacked from build/gpu_bundle on a machine without the wheel)."""
    if os.environ.get("FLUX2_TRITONSERVER_DIR"):
        return Path(os.environ["FLUX2_TRITONSERVER_DIR"])
    spec = importlib.util.find_spec("pytriton")  # locate without importing (its __init__ needs more deps)
    if spec is None:
        raise RuntimeError("nvidia-pytriton is not installed: run `make setup`")
    return Path(spec.submodule_search_locations[0]) / "tritonserver"


class LaunchError(RuntimeError):
    """tritonserver cannot run here as set up; the message is the one line to show."""


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def prepare_backends(target: Path) -> Path:
    """backends/python with the stub that matches this Python (the wheel ships one per version),
    copied again when the one there was made for another Python (e.g. a build/ folder shared by a
    3.11 venv and a 3.12 GPU machine), and checked: stub_problem()."""
    bundle = bundled_server()
    python_dir = target / "python"
    stub = python_dir / "triton_python_backend_stub"
    if not stub.exists() or stub_python(stub) != python_version():
        source = bundle / "python_backend_stubs" / python_version() / "triton_python_backend_stub"
        if not source.exists():
            raise LaunchError(f"{bundle} has no Python-backend stub for Python {python_version()} "
                              f"(python_backend_stubs/{python_version()}): run with a Python it ships a stub for")
        shutil.copytree(bundle / "backends" / "python", python_dir, dirs_exist_ok=True)
        shutil.copy(source, stub)
    problem = stub_problem(stub, server_env())
    if problem:
        raise LaunchError(problem)
    return target


def stub_python(stub: Path) -> str | None:
    """The Python version a Python-backend stub was built for: the libpython3.X it links ('3.12'),
    read from the binary (no loader involved); None if it names none."""
    names = set(re.findall(rb"libpython(3\.\d+)\.so", Path(stub).read_bytes()))
    return names.pop().decode() if len(names) == 1 else None


def stub_problem(stub: Path, env: dict) -> str | None:
    """One line saying why `stub` cannot run this Python's models here, or None: it must be built
    for this Python, and every library it links must resolve (ldd, with the server's environment)."""
    built_for = stub_python(stub)
    if built_for != python_version():
        return (f"the Python-backend stub {stub} is built for Python {built_for}, not this Python "
                f"{python_version()}: delete it and start again (it is copied from the wheel's stubs)")
    ldd = shutil.which("ldd")
    if ldd is None:
        return None
    result = subprocess.run([ldd, str(stub)], capture_output=True, text=True, env=env, check=False)
    lost = [line.split()[0] for line in result.stdout.splitlines() if "not found" in line]
    if lost:
        return (f"the Python-backend stub needs {', '.join(lost)}, which this machine lacks (a Python built "
                f"without --enable-shared has no libpython{python_version()}.so): install it (Debian/Ubuntu: "
                f"apt install libpython{python_version()}) or use a Python that ships it")
    return None


def server_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    # The stub was copied out of the wheel, so its relative RPATH to the wheel's bundled libs is gone.
    wheel_libs = bundled_server().parent.parent / "nvidia_pytriton.libs"
    env["LD_LIBRARY_PATH"] = f"{sysconfig.get_config_var('LIBDIR')}:{wheel_libs}:{env.get('LD_LIBRARY_PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


EXIT_TIMEOUT_S = 10  # tritonserver --exit-timeout-secs: how long it waits for requests in flight
STOP_TIMEOUT_S = EXIT_TIMEOUT_S + 15  # then the process group is killed (a hung shutdown included)


def bls_parameter(repository: Path, key: str) -> str | None:
    """A string parameter of the BLS's config.pbtxt in `repository` (None if absent), read as text:
    the launcher runs before any Triton package is imported."""
    config = Path(repository) / BLS_MODEL / "config.pbtxt"
    if not config.exists():
        return None
    match = re.search(rf'key:\s*"{re.escape(key)}"\s*value\s*{{\s*string_value:\s*"([^"]*)"', config.read_text())
    return match.group(1) if match else None


def cuda_pool_args(repository: Path) -> list[str]:
    """--cuda-memory-pool-byte-size for a repository whose BLS computes on a GPU: the memory plan's
    value that flux2_serving.serving.repository wrote into the BLS's config. Without it the pool stays at Triton's
    64 MiB and every K/V tensor between the BLS and the engines falls back to cudaMalloc + IPC."""
    device, pool = bls_parameter(repository, "device"), bls_parameter(repository, "cuda_memory_pool_byte_size")
    if not device or not device.startswith("cuda") or not pool:
        return []
    gpu = device.split(":", 1)[1] if ":" in device else "0"
    return [f"--cuda-memory-pool-byte-size={gpu}:{pool}"]


def command(repository: Path, http: int, grpc: int, metrics: int, backends: Path,
            explicit: bool = False, admin_key: str | None = None, address: str = "127.0.0.1",
            metrics_address: str | None = None) -> list[str]:
    """tritonserver's command line; `explicit`: --model-control-mode=explicit with every model loaded
    at start, so that one model can be reloaded alone (flux2_serving/server/watchdog.py). `admin_key` opens the
    restricted APIs (None: nobody can use them). A repository served on a GPU gets the CUDA memory
    pool its plan needs (cuda_pool_args)."""
    control = ["--model-control-mode=explicit", "--load-model=*"] if explicit else []
    return [str(bundled_server() / "bin" / "tritonserver"), f"--model-repository={repository}",
            f"--backend-directory={backends}", f"--http-port={http}", f"--grpc-port={grpc}",
            f"--metrics-port={metrics}", "--allow-metrics=true", "--log-verbose=0",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}", *cuda_pool_args(repository),
            *security.server_args(admin_key or security.unknowable_key(), address, metrics_address), *control]


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Poll Triton's /v2/health/ready (plain HTTP: no client library needed)."""
    wait_http_ok(f"http://{url}/v2/health/ready", process, timeout, "tritonserver", ServerExited)


def wait_http_ok(address: str, process: subprocess.Popen, timeout: float, what: str,
                 exited=RuntimeError, every: float = 0.5) -> None:
    """Poll `address` until it answers 200; `exited` if `process` ends first, TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise exited(f"{what} exited with status {process.returncode} before {address} answered")
        try:
            with urllib.request.urlopen(address, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):  # not listening yet, or not ready (400)
            pass
        time.sleep(every)
    raise TimeoutError(f"{what}: {address} did not answer within {timeout:.0f} s")


def free_port() -> int:
    """A port free on loopback now (for servers started next to others: tests, perf, bench)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_ports() -> dict[str, int]:
    return {"http": free_port(), "grpc": free_port(), "metrics": free_port()}


def busy_ports(ports: dict[str, int], address: str = "127.0.0.1") -> list[str]:
    """'HTTP 8000'-style names of the `ports` ({"http": 8000, ...}) that something already listens on
    at `address`, checked as tritonserver binds them (SO_REUSEADDR: a port in TIME_WAIT is free)."""
    busy = []
    for name, port in ports.items():
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                busy.append(f"{PORT_NAMES.get(name, name)} {port}")
    return busy


PORT_NAMES = {"http": "HTTP", "grpc": "gRPC", "metrics": "metrics"}


def log_tail(path, lines: int = 20) -> str:
    """The last `lines` lines of a log file ('' when there is none), each indented."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(f"  {line}" for line in text.rstrip().splitlines()[-lines:])


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


START_ATTEMPTS = 2  # a 2.51 server can abort while its Python stubs start on a loaded machine


def start(repository, http=8000, grpc=8001, metrics=8002, log_file=None, explicit: bool = False,
          append: bool = False, admin_key: str | None = None, address: str = "127.0.0.1",
          attempts: int = START_ATTEMPTS, metrics_address: str | None = None) -> subprocess.Popen:
    """Start tritonserver in a process group of its own (its stubs join it; stop() kills the group)
    and wait until it is ready. A terminal's Ctrl-C then reaches only the launcher, which stops it.
    A server that exits before it is ready is started again, `attempts` times in all: tritonserver
    2.51 aborted once at start-up (boost's lock_exception) while four BLS processes imported torch on
    a loaded machine, and no setting of the Python backend bounds that (flux2_serving/contract/security.py)."""
    backends = prepare_backends(CHECKOUT / "build" / "tritonserver" / "backends")
    env = security.server_environment(server_env())  # one internal secret for every attempt
    for attempt in range(1, attempts + 1):
        # The child keeps its own copy of the log's descriptor; this process closes its one at once.
        log = open(log_file, "a" if append or attempt > 1 else "w") if log_file else contextlib.nullcontext()
        with log as out:
            process = subprocess.Popen(
                command(Path(repository).resolve(), http, grpc, metrics, backends, explicit, admin_key, address,
                        metrics_address),
                env=env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True)
        try:
            wait_ready(f"{_reachable(address)}:{http}", process)
            return process
        except ServerExited as exc:
            stop(process)
            if attempt == attempts:
                raise
            print(f"{exc}; starting it again (attempt {attempt + 1} of {attempts})", file=sys.stderr, flush=True)
        except BaseException:
            stop(process)
            raise
    raise AssertionError("not reached")


class ServerExited(RuntimeError):
    """tritonserver (or the gate) exited before it was ready."""


GATE_READY_S = 60


def start_gate(public: dict[str, int], upstream: dict[str, int], address: str = "127.0.0.1", log_file=None,
               max_request_bytes: int | None = None) -> subprocess.Popen:
    """The gate (flux2_serving/server/gate.py) on the public HTTP and gRPC ports of `address`, in front of
    tritonserver's loopback ports `upstream`; returns once Triton's readiness answers through it."""
    listen = f"[{address}]" if ":" in address else address
    cmd = [sys.executable, "-m", "flux2_serving.server.gate", f"--http-listen={listen}:{public['http']}",
           f"--grpc-listen={listen}:{public['grpc']}", f"--http-upstream=127.0.0.1:{upstream['http']}",
           f"--grpc-upstream=127.0.0.1:{upstream['grpc']}",
           *([f"--max-request-bytes={max_request_bytes}"] if max_request_bytes else [])]
    with open(log_file, "a") if log_file else contextlib.nullcontext() as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                   start_new_session=True, cwd=CHECKOUT)
    try:
        wait_http_ok(f"http://{_reachable(address)}:{public['http']}/v2/health/ready", process, GATE_READY_S,
                     "the gate", ServerExited)
    except BaseException:
        stop_gate(process)
        raise
    return process


def stop_gate(process: subprocess.Popen | None, timeout: float = 5) -> None:
    """SIGTERM, then SIGKILL after `timeout` s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _reachable(address: str) -> str:
    """Where to reach a server that listens on `address` from this host."""
    return "127.0.0.1" if address in ("0.0.0.0", "") else f"[{address}]" if ":" in address else address


def stop(process: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop tritonserver within `timeout` s: SIGTERM (it finishes requests in flight for up to
    EXIT_TIMEOUT_S, unloads its models and stops their stubs), then SIGKILL to its whole process
    group, whose stubs are also killed if tritonserver itself died first (they would outlive it)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"tritonserver did not stop within {timeout:.0f} s of SIGTERM: killing its process group",
                  file=sys.stderr, flush=True)
    kill_group(process.pid)
    return process.wait()


def kill_group(pgid: int) -> None:
    """SIGKILL every process left in process group `pgid` (tritonserver's: start() made it a leader)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def process_state(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, process group) of process `pid` from /proc/<pid>/stat; None if there is none."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        state, ppid, pgid = os.read(fd, 4096).rsplit(b")", 1)[1].split()[:3]
        return state.decode(), int(ppid), int(pgid)
    except (OSError, ValueError):  # gone meanwhile
        return None
    finally:
        os.close(fd)


def process_table() -> dict[int, tuple[str, int, int]]:
    """{pid: (state, parent pid, process group)} of every process now, from /proc/<pid>/stat."""
    table = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (state := process_state(int(name))) is not None:
            table[int(name)] = state
    return table


def live_processes(pids) -> list[int]:
    """Which of `pids` are live processes (a zombie is not: it has exited and freed its memory)."""
    table = process_table()
    return [pid for pid in pids if table.get(pid, ("Z",))[0] != "Z"]


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group `pgid`."""
    return [pid for pid, (state, _, group) in process_table().items() if group == pgid and state != "Z"]


@dataclass
class Running:
    """A started server: its process and where callers reach it (host:port strings). `process` may be
    replaced (a replica restarted on the same ports); the context manager stops the current one.
    With the gate (the default), `http` and `grpc` are the gate's public ports and tritonserver listens
    on the loopback ports `upstream` ({"http": port, "grpc": port}); metrics are tritonserver's own.
    `admin_key` opens the restricted APIs (security.admin_headers); `watchdog` is its thread, if any;
    `supervisor` its flux2_serving/server/supervisor.py Supervisor (running() and main() attach one)."""
    process: subprocess.Popen
    http: str
    grpc: str
    metrics: str
    log: Path | None
    repository: Path | None = None
    explicit: bool = False
    admin_key: str | None = None
    watchdog: object = None
    gate: subprocess.Popen | None = None
    upstream: dict | None = None
    address: str = "127.0.0.1"
    supervisor: object = None

    def tritonserver_ports(self) -> tuple[int, int, int]:
        """(HTTP, gRPC, metrics) ports tritonserver itself listens on."""
        http, grpc = (self.upstream["http"], self.upstream["grpc"]) if self.upstream else (
            port_of(self.http), port_of(self.grpc))
        return http, grpc, port_of(self.metrics)

    def restart(self) -> None:
        """Start tritonserver again on the same repository and ports (after it died or was killed);
        the gate stays. With a supervisor, through it: one start at a time, the dead server's group
        killed and its /dev/shm regions swept, and nothing if the supervisor already started it again."""
        if self.supervisor is not None:
            self.supervisor.restart()
        else:
            self.start_again()

    def start_again(self) -> None:
        """restart() itself: stop what is left of tritonserver and start it again."""
        stop(self.process)
        self.process = start(self.repository, *self.tritonserver_ports(), log_file=self.log, explicit=self.explicit,
                             append=True, admin_key=self.admin_key,
                             address="127.0.0.1" if self.upstream else self.address, metrics_address=self.address)

    def restart_gate(self) -> None:
        """Start the gate again on the same ports (after it died)."""
        stop_gate(self.gate)
        self.gate = start_gate({"http": port_of(self.http), "grpc": port_of(self.grpc)}, self.upstream,
                               self.address, self.log)

    def stop(self) -> int:
        """tritonserver first (it finishes the requests in flight, whose answers still pass the gate), then the gate."""
        status = stop(self.process)
        stop_gate(self.gate)
        return status

    def admin_headers(self, protocol: str = "http") -> dict[str, str]:
        return security.admin_headers(self.admin_key, protocol)


def open_server(repository, ports: dict[str, int], log_file=None, explicit: bool = False,
                admin_key: str | None = None, address: str = "127.0.0.1", gate: bool = True) -> Running:
    """Start tritonserver on `repository` and, with `gate`, the gate on the public HTTP and gRPC `ports`
    in front of it (tritonserver then listens on free loopback ports); returns the Running server."""
    upstream = {"http": free_port(), "grpc": free_port()} if gate else None
    inner = upstream or ports
    process = start(repository, inner["http"], inner["grpc"], ports["metrics"], log_file=log_file, explicit=explicit,
                    admin_key=admin_key, address="127.0.0.1" if gate else address, metrics_address=address)
    try:
        gate_process = start_gate(ports, upstream, address, log_file) if gate else None
    except BaseException:
        stop(process)
        raise
    host = _reachable(address)
    return Running(process, *(f"{host}:{ports[k]}" for k in ("http", "grpc", "metrics")),
                   Path(log_file) if log_file else None, Path(repository), explicit, admin_key,
                   gate=gate_process, upstream=upstream, address=address)


@contextlib.contextmanager
def running(repository, ports: dict | None = None, log_file=None, watchdog: float | None = None,
            admin_key: str | None = None, watchdog_timeout: float = 60, canary_every: int = 1, gate: bool = True,
            repair: bool = True):
    """Start tritonserver on `repository` behind the gate (free loopback ports unless given), yield a
    Running, and stop it on the way out, whatever happened. `watchdog`: seconds between
    flux2_serving/server/watchdog.py probes, run in a thread here (the server then uses explicit model
    control, so a model can be reloaded), each probe waiting at most `watchdog_timeout` s, with the canary
    every `canary_every` rounds (0: never). `admin_key`: default, a random one, known only to the returned
    Running (tests, the watchdog thread). `gate`: False serves tritonserver's own HTTP and gRPC ports.
    `repair`: the supervisor (flux2_serving/server/supervisor.py) reloads a model whose process died and
    starts a dead tritonserver again (explicit model control); False: it only sweeps /dev/shm."""
    from flux2_serving.server.supervisor import Supervisor, sweep_dead_servers  # it imports this module

    ports = ports or free_ports()
    explicit = watchdog is not None or repair
    admin_key = admin_key or security.unknowable_key()
    sweep_dead_servers()
    server = open_server(repository, ports, log_file, explicit, admin_key, gate=gate)
    server.supervisor = Supervisor(server, enabled=repair).start()
    done = threading.Event()
    if watchdog is not None:
        server.watchdog = Watchdog(server.supervisor.triton_http(), admin_key, probe_timeout=watchdog_timeout,
                                   repair=server.supervisor.reload_model if repair else None)
        threading.Thread(target=server.watchdog.watch, args=(watchdog, canary_every, done), daemon=True).start()
    try:
        yield server
    finally:
        done.set()
        server.supervisor.close()
        server.stop()
        server.supervisor.sweep()


class Stopping(Exception):
    """SIGINT or SIGTERM reached the launcher."""


def default_log_file(http_port: int) -> Path:
    """Where the launcher writes tritonserver's log: one file per HTTP port, so that servers started
    side by side (tests, replicas) keep theirs apart."""
    return CHECKOUT / "build" / "tritonserver" / f"server-{http_port}.log"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog=cli_prog("flux2_serving.server.launch"),
                                     description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--repository", default="build/model_repository", help="model repository to serve")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    parser.add_argument("--address", default="127.0.0.1",
                        help="address HTTP, gRPC and metrics listen on (0.0.0.0: every interface)")
    parser.add_argument("--admin-key-file", default=None, metavar="FILE",
                        help=f"file holding the key that opens the admin APIs ({', '.join(security.RESTRICTED_APIS)}) "
                             f"to requests with the header {security.ADMIN_HEADER}; default ${security.ADMIN_KEY_ENV}; "
                             "neither: those APIs are closed")
    parser.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                        help="probe the models with requests every SECONDS and reload one whose Python-backend "
                             "process died or that was unloaded (flux2_serving/server/watchdog.py; the server then "
                             "uses explicit model control); the supervisor (on unless --no-repair) needs no probes "
                             "for a process that died: this finds one that is alive but stopped, or an unloaded model")
    parser.add_argument("--no-repair", action="store_true",
                        help="no self-repair: a model whose Python-backend process died is not reloaded and a "
                             "tritonserver that died is not started again (flux2_serving/server/supervisor.py; "
                             "on by default, with explicit model control); /dev/shm is still swept")
    parser.add_argument("--no-gate", action="store_true",
                        help="serve tritonserver's own HTTP and gRPC ports instead of the gate's "
                             "(flux2_serving/server/gate.py): only behind a proxy of your own that bounds bodies, "
                             "their JSON depth and compression (docs/security.md)")
    parser.add_argument("--log-file", default=None, metavar="FILE",
                        help="where tritonserver's own log goes (default build/tritonserver/server-<http port>.log)")
    parser.add_argument("--verbose", action="store_true",
                        help="tritonserver's own log on this terminal instead of the log file (model loading, "
                             "option tables; on a host without a GPU, NVML/DCGM/CUDA-driver messages that do not "
                             "matter there)")
    args = parser.parse_args(argv)
    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    busy = busy_ports(ports, args.address)
    if busy:  # tritonserver would start, fail to bind and exit: say why before
        print(f"error: {', '.join(busy)} already in use on {args.address} (another tritonserver?): pick free ports "
              "with --http-port/--grpc-port/--metrics-port (make serve HTTP_PORT=... GRPC_PORT=... METRICS_PORT=...)",
              file=sys.stderr)
        return 2
    log_file = None if args.verbose else Path(args.log_file or default_log_file(args.http_port))
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
    environ = dict(os.environ, **({security.ADMIN_KEY_FILE_ENV: args.admin_key_file} if args.admin_key_file else {}))
    configured = security.configured_admin_key(environ=environ)
    admin_key = configured or security.unknowable_key()  # unknowable: only the watchdog thread below has it

    def on_signal(signum, frame):  # the first SIGINT/SIGTERM stops the server (bounded); another kills it now
        signal.signal(signal.SIGINT, lambda *_: kill_group(server.process.pid) if server else None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stopping(signal.Signals(signum).name)

    server = None
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"serving {Path(args.repository).resolve()} ...", flush=True)
    from flux2_serving.server.supervisor import Supervisor, sweep_dead_servers  # it imports this module

    try:
        sweep_dead_servers()  # /dev/shm regions and orphaned stubs of servers that died without their launcher
        server = open_server(args.repository, ports, log_file, explicit=args.watchdog is not None or not args.no_repair,
                             admin_key=admin_key, address=args.address, gate=not args.no_gate)
        server.supervisor = Supervisor(server, enabled=not args.no_repair).start()
        if args.watchdog is not None:
            dog = Watchdog(server.supervisor.triton_http(), admin_key,
                           repair=None if args.no_repair else server.supervisor.reload_model)
            threading.Thread(target=dog.watch, args=(args.watchdog, 6), daemon=True).start()
        admin = (f"admin APIs need the header {security.ADMIN_HEADER}" if configured else
                 f"admin APIs closed (no ${security.ADMIN_KEY_ENV} or --admin-key-file)")
        where = f"its log: {log_file} (--verbose: on this terminal)" if log_file else "its log on this terminal"
        gated = (f" through the gate (tritonserver itself on 127.0.0.1:{server.upstream['http']} and "
                 f":{server.upstream['grpc']})" if server.gate else " (no gate)")
        print(f"tritonserver ready on {args.address}: HTTP {args.http_port}, gRPC {args.grpc_port}{gated}, metrics "
              f"{args.metrics_port}/metrics; {admin}; self-repair {'off' if args.no_repair else 'on'}; {where}. "
              "Ctrl-C stops it", flush=True)
        while True:
            try:
                status = server.process.wait(timeout=1.0)  # polled: signals are handled between waits
            except subprocess.TimeoutExpired:
                if server.gate is not None and server.gate.poll() is not None:
                    print(f"the gate exited with status {server.gate.returncode}: starting it again", flush=True)
                    server.restart_gate()
                continue
            if server.supervisor.enabled and not server.supervisor.gave_up.wait(1.0):
                continue  # the supervisor starts it again
            if status:  # it ended on its own: what it said last is the reason
                print(f"error: tritonserver exited with status {status}" +
                      (f"; the end of its log ({log_file}):\n{log_tail(log_file)}" if log_file else ""),
                      file=sys.stderr, flush=True)
            return status
    except Stopping as stopping:
        print(f"{stopping}: stopping tritonserver (at most {STOP_TIMEOUT_S} s)", flush=True)
        return 0
    except LaunchError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except (ServerExited, TimeoutError) as exc:  # it never became ready: its log says why
        print(f"error: {exc}" + (f"; the end of its log ({log_file}):\n{log_tail(log_file)}" if log_file else ""),
              file=sys.stderr, flush=True)
        return 1
    finally:
        if server is not None:
            if server.supervisor is not None:
                server.supervisor.close()
            server.stop()
            if server.supervisor is not None:
                server.supervisor.sweep()


if __name__ == "__main__":
    raise SystemExit(main())
