"""python -m flux2_serving.server.serve [tritonserver options]: the serving container's entry point.

Runs `tritonserver` (on PATH: NVIDIA's image) with the hardening of flux2_serving/contract/security.py in front
of the options given: admin APIs (model repository, shared memory, logging, trace, statistics)
behind $FLUX2_ADMIN_KEY or the file named by $FLUX2_ADMIN_KEY_FILE (neither: closed to everyone),
an internal secret for the internal models, and listeners on --address (0.0.0.0 in a container:
the pod's network is its boundary). The process becomes tritonserver (exec), so signals from
Docker or Kubernetes reach it directly.

    python3 -m flux2_serving.server.serve --model-repository=/models --model-control-mode=explicit --load-model=*
    python3 -m flux2_serving.server.serve --print -- --model-repository=/models   # show the command, key masked

Standard library only (it runs in NVIDIA's image before anything else is installed).
"""

from __future__ import annotations

import os
import sys

try:
    from flux2_serving.contract import security
except ImportError:  # run as a file, next to security.py
    import security  # type: ignore[no-redef]

USAGE = __doc__.split("\n\n", 1)[0]


def command(args: list[str], environ=os.environ, binary: str = "tritonserver") -> tuple[list[str], bool]:
    """(tritonserver's command line, whether an admin key was configured). `args` may start with
    --address=ADDR (default 0.0.0.0) and --print; the rest goes to tritonserver after ours."""
    address = "0.0.0.0"
    rest = []
    for arg in args:
        if arg.startswith("--address="):
            address = arg.split("=", 1)[1]
        elif arg not in ("--print", "--"):
            rest.append(arg)
    configured = security.configured_admin_key(environ=environ)
    return [binary, *security.server_args(configured or security.unknowable_key(), address), *rest], bool(configured)


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
    if "--print" in argv:
        print(" ".join(security.mask(arg) for arg in cmd))
        return 0
    os.execvpe(cmd[0], cmd, security.server_environment(dict(os.environ)))
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
