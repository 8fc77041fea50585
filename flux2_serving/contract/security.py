"""Who may do what to a flux2 Triton server: the settings every way of starting one shares
(`python -m flux2_serving.server.launch`, `python -m flux2_serving.server.serve` in the container, the
Kubernetes manifests).

* **Admin APIs behind a key.** Triton's model-repository (load, unload, config and file overrides:
  code execution), shared-memory (system and CUDA), logging and trace APIs answer only
  requests that carry the admin key: the HTTP header `flux2-admin-key`, or the gRPC metadata key
  `triton-grpc-protocol-flux2-admin-key` (Triton prefixes restricted gRPC headers). The key comes
  from $FLUX2_ADMIN_KEY or a file ($FLUX2_ADMIN_KEY_FILE, e.g. a mounted Kubernetes Secret). No
  key configured means a random one that nobody is told: those APIs are off, not open.
* **Internal models answer only the BLS.** $FLUX2_INTERNAL_SECRET (random per server start unless
  given) is in tritonserver's environment, so every Python-backend process has it; the BLS sends
  it as a request parameter to every model it calls, and `reference_kv_cache` and the Python-backend
  component runners refuse requests without it (INTERNAL_ONLY). A caller cannot read the environment
  (the model-repository API, the only way to run code, is closed). TensorRT-backend components
  cannot read a parameter: there only the network boundary keeps callers out.
* Not set on purpose: the Python backend's `stub-timeout-seconds`. Its source (r24.10 and main)
  parses and logs it but never uses it, so it cannot help a slow start-up; flux2_serving.server.launch retries a
  start-up that aborts instead (a 2.51 server aborted once with boost's lock_exception while four
  BLS processes imported torch on a loaded machine).

Standard library only: it runs in the serving image next to the watchdog.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from .names import BLS_MODEL

ADMIN_KEY_ENV = "FLUX2_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "FLUX2_ADMIN_KEY_FILE"
ADMIN_HEADER = "flux2-admin-key"  # the HTTP header; Triton checks gRPC metadata under GRPC_ADMIN_HEADER
GRPC_ADMIN_HEADER = f"triton-grpc-protocol-{ADMIN_HEADER}"
# Triton's API groups that callers of the public model never need (tritonserver --help lists the groups).
# Statistics stay open: they are read-only (per-model request counts, queue and compute times; docs/security.md
# says what they reveal) and perf_analyzer needs them for every run (--bls-composing-models), so that a load
# test against the server a user starts works without a key.
RESTRICTED_APIS = ("model-repository", "shared-memory", "logging", "trace")
INTERNAL_SECRET_ENV = "FLUX2_INTERNAL_SECRET"
INTERNAL_PARAMETER = "flux2_internal"  # request parameter that carries the internal secret
# An internal model's answer to a request without the secret (INVALID_ARG): the same words from every one.
INTERNAL_ONLY = f"this model is internal: it answers only the {BLS_MODEL} model"


def configured_admin_key(explicit: str | None = None, environ=os.environ) -> str | None:
    """The admin key: `explicit`, else $FLUX2_ADMIN_KEY, else the file named by $FLUX2_ADMIN_KEY_FILE
    (stripped); None when none is configured."""
    if explicit:
        return explicit
    if environ.get(ADMIN_KEY_ENV):
        return environ[ADMIN_KEY_ENV]
    path = environ.get(ADMIN_KEY_FILE_ENV)
    if path:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"{ADMIN_KEY_FILE_ENV}={path} is empty")
        return key
    return None


def unknowable_key() -> str:
    """A key nobody is told: with it the admin APIs are closed to everyone."""
    return secrets.token_urlsafe(32)


def restriction_args(admin_key: str) -> list[str]:
    """tritonserver options restricting RESTRICTED_APIS to requests carrying `admin_key`, on HTTP and gRPC."""
    if not admin_key or any(c in admin_key for c in ",:= \t\n"):
        raise ValueError("the admin key must be non-empty, without spaces, ',', ':' or '=' (Triton's option syntax)")
    apis = ",".join(RESTRICTED_APIS)
    return [f"--http-restricted-api={apis}:{ADMIN_HEADER}={admin_key}",
            f"--grpc-restricted-protocol={apis}:{ADMIN_HEADER}={admin_key}"]


def server_args(admin_key: str, address: str, metrics_address: str | None = None) -> list[str]:
    """The hardening options of every tritonserver we start: restricted admin APIs and the bind
    address of HTTP and gRPC (loopback behind the launcher's gate) and of metrics (default: the same)."""
    return [*restriction_args(admin_key), f"--http-address={address}", f"--grpc-address={address}",
            f"--metrics-address={metrics_address or address}"]


def server_environment(environ: dict) -> dict:
    """tritonserver's environment with an internal secret (kept if already set)."""
    env = dict(environ)
    if not env.get(INTERNAL_SECRET_ENV):
        env[INTERNAL_SECRET_ENV] = secrets.token_hex(32)
    return env


def admin_headers(admin_key: str | None, protocol: str = "http") -> dict[str, str]:
    """Headers (HTTP) or metadata (gRPC) that open the restricted APIs; {} without a key."""
    if not admin_key:
        return {}
    return {GRPC_ADMIN_HEADER if protocol == "grpc" else ADMIN_HEADER: admin_key}


def internal_secret(environ=os.environ) -> str | None:
    """This process's internal secret (a Python-backend model inherits tritonserver's environment)."""
    return environ.get(INTERNAL_SECRET_ENV) or None


def is_internal(parameters: dict, secret: str | None) -> bool:
    """Whether a request's parameters carry the internal secret (constant-time comparison)."""
    given = parameters.get(INTERNAL_PARAMETER)
    return bool(secret) and isinstance(given, str) and hmac.compare_digest(given.encode(), secret.encode())


def mask(arg: str) -> str:
    """A command-line argument with a restriction's key replaced by '***' (for logs and --print)."""
    if arg.startswith(("--http-restricted-api=", "--grpc-restricted-protocol=")) and "=" in arg.split(":", 1)[-1]:
        head, _, _ = arg.rpartition("=")
        return f"{head}=***"
    return arg
