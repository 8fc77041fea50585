"""python -m flux2_serving.server.gateway: nginx in front of several flux2 Triton replicas, routing edits by reference.

The configuration is deploy/nginx/flux2-gateway.conf (the shipped reference): requests with the
`x-flux2-reference-key` header (gRPC metadata or HTTP header; clients/api.py sets it) are hashed
to one replica, so its reference K/V cache stays hot; requests without it go to the replica with
the fewest connections. `--policy round-robin` replaces the hash by nginx's round robin (for
comparisons: bench/scaleout.py).

nginx: the one on PATH, else Debian's `nginx` package unpacked into build/tools/nginx
(perf.provision.unpack_debian_package: `apt-get download` + `dpkg -x`, no root install).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flux2_serving import CHECKOUT
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.names import ROUTING_HEADER
from flux2_serving.devtools.debian import PackageUnavailable, unpack_debian_package
from flux2_serving.server.launch import free_port

TEMPLATE = CHECKOUT / "deploy" / "nginx" / "flux2-gateway.conf"
TOOLS = CHECKOUT / "build" / "tools" / "nginx"
POLICIES = {"affinity": f"hash $http_{ROUTING_HEADER.replace('-', '_')};",
            "round-robin": "# round robin (nginx's default): the comparison policy"}


class GatewayError(RuntimeError):
    """nginx could not be found, provisioned or started; the message is the one line to show."""


@dataclass(frozen=True)
class Replica:
    """One Triton replica, as host:port strings."""
    http: str
    grpc: str


def nginx_binary() -> Path:
    """nginx from PATH or /usr/sbin, else Debian's package unpacked under build/tools/nginx."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx", TOOLS / "usr" / "sbin" / "nginx"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    try:
        unpack_debian_package("nginx", TOOLS)  # a failure to unpack what was fetched is an error, not this
    except PackageUnavailable as exc:
        raise GatewayError(f"nginx is not installed and could not be unpacked from Debian's package: {exc}") from None
    binary = TOOLS / "usr" / "sbin" / "nginx"
    if not binary.exists():
        raise GatewayError("Debian's nginx package holds no usr/sbin/nginx here "
                           "(another release may put it in nginx-core)")
    return binary


def render(replicas: list[Replica], listen_http: str, listen_grpc: str, prefix: Path,
           policy: str = "affinity") -> str:
    """deploy/nginx/flux2-gateway.conf with its placeholders filled in."""
    def servers(kind: str) -> str:
        return "\n".join(f"        server {getattr(r, kind)} max_fails=1 fail_timeout=5s;" for r in replicas)

    text = TEMPLATE.read_text()
    user = pwd.getpwuid(os.geteuid()).pw_name  # workers write temp files under prefix: run them as its owner
    for key, value in {"@USER@": user, "@PREFIX@": str(prefix), "@AFFINE_POLICY@": POLICIES[policy],
                       "@HTTP_SERVERS@": servers("http"), "@GRPC_SERVERS@": servers("grpc"),
                       "@LISTEN_HTTP@": listen_http, "@LISTEN_GRPC@": listen_grpc}.items():
        text = text.replace(key, value)
    return text


def _wait_listening(address: str, process: subprocess.Popen, timeout: float = 20) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GatewayError(f"nginx exited with status {process.returncode} (see its error.log)")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=1):
            return
        time.sleep(0.1)
    raise GatewayError(f"nginx not listening on {address} after {timeout:.0f} s")


@dataclass
class Gateway:
    process: subprocess.Popen
    http: str
    grpc: str
    prefix: Path

    def access_log(self) -> list[str]:
        path = self.prefix / "access.log"
        return path.read_text().splitlines() if path.exists() else []


@contextlib.contextmanager
def running_gateway(replicas: list[Replica], prefix, policy: str = "affinity", http_port: int | None = None,
                    grpc_port: int | None = None, host: str = "127.0.0.1"):
    """nginx on loopback (free ports unless given) in front of `replicas`; stopped on the way out."""
    prefix = Path(prefix).resolve()
    prefix.mkdir(parents=True, exist_ok=True)
    http = f"{host}:{http_port or free_port()}"
    grpc = f"{host}:{grpc_port or free_port()}"
    config = prefix / "nginx.conf"
    config.write_text(render(replicas, http, grpc, prefix, policy))
    binary = nginx_binary()
    test = subprocess.run([str(binary), "-t", "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log")],
                          capture_output=True, text=True)
    if test.returncode != 0:
        raise GatewayError(f"nginx -t rejected {config}: {(test.stderr.strip().splitlines() or ['?'])[-1]}")
    process = subprocess.Popen([str(binary), "-p", str(prefix), "-c", str(config), "-e", str(prefix / "error.log"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(http, process)
        _wait_listening(grpc, process)
        yield Gateway(process, http, grpc, prefix)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # graceful: finish requests in flight
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.server.gateway", __doc__)
    parser.add_argument("--replica", action="append", required=True, metavar="HOST:HTTP_PORT:GRPC_PORT",
                        help="a Triton replica (repeat for each), e.g. 127.0.0.1:8000:8001")
    parser.add_argument("--http-port", type=int, default=8080, help="gateway HTTP port")
    parser.add_argument("--grpc-port", type=int, default=8081, help="gateway gRPC port")
    parser.add_argument("--policy", choices=sorted(POLICIES), default="affinity",
                        help="how requests with the routing header pick a replica")
    parser.add_argument("--prefix", default="build/gateway", help="nginx's folder: config, logs, temp files")
    args = parser.parse_args(argv)
    replicas = []
    for spec in args.replica:
        try:
            host, http, grpc = spec.rsplit(":", 2)
            replicas.append(Replica(f"{host}:{int(http)}", f"{host}:{int(grpc)}"))
        except ValueError:
            parser.error(f"--replica {spec!r}: expected HOST:HTTP_PORT:GRPC_PORT")
    try:
        with running_gateway(replicas, args.prefix, args.policy, args.http_port, args.grpc_port) as gateway:
            print(f"gateway ({args.policy}) on HTTP {gateway.http}, gRPC {gateway.grpc} -> "
                  f"{', '.join(r.http for r in replicas)}; logs in {gateway.prefix} (Ctrl-C stops it)", flush=True)
            signal.signal(signal.SIGTERM, lambda *_: gateway.process.send_signal(signal.SIGQUIT))
            with contextlib.suppress(KeyboardInterrupt):
                gateway.process.wait()
    except GatewayError as exc:
        print(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
