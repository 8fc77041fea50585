"""python -m flux2_serving.server.serve [tritonserver options]: the serving container's entry point.

Runs `tritonserver` (on PATH: NVIDIA's image) with the hardening of flux2_serving/contract/security.py in front
of the options given: admin APIs (model repository, shared memory, logging, trace)
behind $FLUX2_ADMIN_KEY or the file named by $FLUX2_ADMIN_KEY_FILE (neither: closed to everyone),
an internal secret for the internal models, and listeners on --address (0.0.0.0 in a container:
the pod's network is its boundary).

By default the gate (flux2_serving/server/gate.py) holds the public HTTP and gRPC ports (--http-port,
--grpc-port: 8000, 8001) and tritonserver listens on loopback ports behind it ($FLUX2_UPSTREAM_HTTP_PORT,
$FLUX2_UPSTREAM_GRPC_PORT: 18000, 18001): no Triton release bounds gRPC messages (INT32_MAX), and the
image's release inflates gzip bodies without a bound (docs/security.md). This process then stays as
the parent of both: it passes SIGTERM/SIGINT to tritonserver (which finishes requests in flight), stops
the gate after it, reaps orphans when it is PID 1, and exits when either child exits, so that the
container restarts. --no-gate: the process becomes tritonserver (exec) on the public ports.

    python3 -m flux2_serving.server.serve --model-repository=/models --model-control-mode=explicit --load-model=*
    python3 -m flux2_serving.server.serve --print -- --model-repository=/models   # the commands, key masked

Standard library only, apart from the gate's own process (aiohttp, grpcio: docker/requirements-serving.txt).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

try:
    from flux2_serving.contract import security
except ImportError:  # run as a file, next to security.py
    import security  # type: ignore[no-redef]

USAGE = __doc__.split("\n\n", 1)[0]
OURS = ("--print", "--", "--no-gate")
PUBLIC_PORTS = {"http": 8000, "grpc": 8001}
UPSTREAM_ENV = {"http": "FLUX2_UPSTREAM_HTTP_PORT", "grpc": "FLUX2_UPSTREAM_GRPC_PORT"}
UPSTREAM_DEFAULTS = {"http": 18000, "grpc": 18001}
STOP_TIMEOUT_S = 120  # after SIGTERM: tritonserver's --exit-timeout-secs (60 in the image) and its unloading


def _split(args: list[str]) -> tuple[str, dict[str, int], list[str]]:
    """(address, public ports, the rest for tritonserver) from `args`."""
    address, ports, rest = "0.0.0.0", dict(PUBLIC_PORTS), []
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "--address":
            address = value
        elif key in ("--http-port", "--grpc-port"):  # the public ports: tritonserver's without the gate
            ports[key[2:-5]] = int(value)
        elif arg not in OURS:
            rest.append(arg)
    return address, ports, rest


def command(args: list[str], environ=os.environ, binary: str = "tritonserver") -> tuple[list[str], bool]:
    """(tritonserver's command line, whether an admin key was configured). `args` may start with
    --address=ADDR (default 0.0.0.0), --no-gate and --print; the rest goes to tritonserver after ours.
    With the gate, tritonserver's HTTP and gRPC listen on loopback upstream ports."""
    address, ports, rest = _split(args)
    configured = security.configured_admin_key(environ=environ)
    key = configured or security.unknowable_key()
    if "--no-gate" in args:
        listen = [f"--http-port={ports['http']}", f"--grpc-port={ports['grpc']}"]
        return [binary, *security.server_args(key, address), *listen, *rest], bool(configured)
    upstream = upstream_ports(environ)
    listen = [f"--http-port={upstream['http']}", f"--grpc-port={upstream['grpc']}"]
    return [binary, *security.server_args(key, "127.0.0.1", address), *listen, *rest], bool(configured)


def upstream_ports(environ=os.environ) -> dict[str, int]:
    return {name: int(environ.get(UPSTREAM_ENV[name], UPSTREAM_DEFAULTS[name])) for name in UPSTREAM_ENV}


def gate_command(args: list[str], environ=os.environ) -> list[str]:
    """The gate's command line: the public ports of `args` on --address, tritonserver's loopback ports behind."""
    address, ports, _ = _split(args)
    listen = f"[{address}]" if ":" in address else address
    upstream = upstream_ports(environ)
    return [sys.executable, "-m", "flux2_serving.server.gate", f"--http-listen={listen}:{ports['http']}",
            f"--grpc-listen={listen}:{ports['grpc']}", f"--http-upstream=127.0.0.1:{upstream['http']}",
            f"--grpc-upstream=127.0.0.1:{upstream['grpc']}"]


def supervise(server: subprocess.Popen, gate: subprocess.Popen) -> int:
    """Wait until either child exits or a signal comes; stop both (tritonserver first, bounded) and
    return tritonserver's status (1 if the gate was the one that ended)."""
    stopping = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: stopping.append(signum))
    while not stopping and server.poll() is None and gate.poll() is None:
        time.sleep(0.2)
        if os.getpid() == 1:  # orphaned stubs are reparented to us: reap them
            _reap(exclude=(server.pid, gate.pid))
    ended = "a signal" if stopping else "tritonserver's exit" if server.poll() is not None else "the gate's exit"
    print(f"flux2_serving.server.serve: stopping after {ended}", file=sys.stderr, flush=True)
    if server.poll() is None:
        server.terminate()
        try:
            server.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            server.kill()
    if gate.poll() is None:
        gate.terminate()
        try:
            gate.wait(10)
        except subprocess.TimeoutExpired:
            gate.kill()
    status = server.wait()
    return status if stopping or gate.returncode in (0, -signal.SIGTERM) else (status or 1)


def _reap(exclude=()) -> None:
    """Collect exited children other than `exclude` (whose status Popen reads), from /proc."""
    me = f"PPid:\t{os.getpid()}\n"
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in exclude:
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                text = status.read()
        except OSError:
            continue
        if me in text and "\nState:\tZ" in text:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(int(entry), os.WNOHANG)


def streamed_without_tensorrt(args: list[str]) -> str | None:
    """One line when the repository has components on the tensorrt_streamed runtime (the 32gb-fp8 tier's weight
    streaming, run inside the Python-backend stub) and this Python has no `tensorrt` package: the serving image
    installs none (its version would have to match the image's TensorRT libraries exactly), so it refuses the
    tier at start instead of failing each model's load with a traceback."""
    repository = next((arg.partition("=")[2] for arg in args if arg.startswith("--model-repository=")), None)
    if not repository or not os.path.isdir(repository):
        return None
    streamed = sorted(name for name in os.listdir(repository)
                      if "tensorrt_streamed" in _read(os.path.join(repository, name, "config.pbtxt")))
    if not streamed:
        return None
    try:
        import tensorrt  # noqa: F401 - only whether it imports
    except ImportError:
        return (f"flux2_serving.server.serve: {', '.join(streamed)} stream their weights with TensorRT (runtime "
                "tensorrt_streamed, tier 32gb-fp8), which needs TensorRT's Python package in this image, and it has "
                "none: serve this tier from an image that adds the tensorrt wheel of the image's own TensorRT version")
    return None


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    cmd, configured = command(argv)
    if not configured:
        print(f"flux2_serving.server.serve: no ${security.ADMIN_KEY_ENV} or ${security.ADMIN_KEY_FILE_ENV}: "
              f"the admin APIs ({', '.join(security.RESTRICTED_APIS)}) are closed to everyone",
              file=sys.stderr, flush=True)
    gated = "--no-gate" not in argv
    if "--print" in argv:
        print(" ".join(security.mask(arg) for arg in cmd))
        if gated:
            print(" ".join(gate_command(argv)))
        return 0
    refused = streamed_without_tensorrt(argv)
    if refused:
        print(refused, file=sys.stderr, flush=True)
        return 2
    environment = security.server_environment(dict(os.environ))
    if not gated:
        os.execvpe(cmd[0], cmd, environment)
        return 1  # not reached
    server = subprocess.Popen(cmd, env=environment)
    gate = subprocess.Popen(gate_command(argv))
    return supervise(server, gate)


if __name__ == "__main__":
    raise SystemExit(main())
