"""python -m flux2_serving.front: the OpenAI Images API (generations, edits) in front of Triton's flux2_klein_kv.

Serves http://HOST:PORT/v1 for the official `openai` client (base_url=...) and forwards each request
to Triton over gRPC. API keys are off unless given: --api-keys-file (one key per line; blank lines
and lines starting with # are skipped) and/or $FLUX2_FRONT_API_KEYS (comma-separated); with keys,
/v1/* needs `Authorization: Bearer <key>` (GET /health, /health/ready and /metrics stay open).
Listens on loopback unless --host says otherwise.

examples:
  python -m flux2_serving.front --triton-grpc 127.0.0.1:8001
  FLUX2_FRONT_API_KEYS=$(cat key.txt) python -m flux2_serving.front --triton-grpc triton:8001 --host 0.0.0.0
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flux2_serving.contract.cli_help import command_parser

KEYS_VARIABLE = "FLUX2_FRONT_API_KEYS"


def api_keys(keys_file: str | None, environ=os.environ) -> frozenset:
    """The keys of --api-keys-file and $FLUX2_FRONT_API_KEYS together (none: authentication off)."""
    keys = {key.strip() for key in environ.get(KEYS_VARIABLE, "").split(",")}
    if keys_file:
        keys |= {line.strip() for line in Path(keys_file).read_text().splitlines()
                 if line.strip() and not line.strip().startswith("#")}
    keys = frozenset(key for key in keys if key)
    # A key with a space in it cannot be sent in a Bearer header: the manifests' placeholder
    # (deploy/kubernetes/front-api-keys-secret.yaml) is one, so a front started with it stops here.
    if any(any(ch.isspace() for ch in key) for key in keys):
        raise ValueError("an API key contains whitespace (the manifests' placeholder?): set real keys, "
                         "e.g. openssl rand -hex 32")
    return keys


def parser():
    from flux2_serving.front.app import DEFAULT_MAX_BODY_BYTES, DEFAULT_MODEL_ID, FrontSettings

    defaults = FrontSettings("")
    p = command_parser("flux2_serving.front", __doc__)
    p.add_argument("--triton-grpc", required=True, metavar="HOST:PORT", help="Triton's gRPC endpoint (required)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=9000, help="port to listen on")
    p.add_argument("--model-id", default=DEFAULT_MODEL_ID, help="the model name callers use and GET /v1/models lists")
    p.add_argument("--api-keys-file", metavar="FILE",
                   help=f"accepted API keys, one per line (default: none, and none in ${KEYS_VARIABLE}: keys off)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body (an edit with its references); larger ones get 413")
    p.add_argument("--max-image-bytes", type=int, default=defaults.max_image_bytes,
                   help="largest reference image, encoded")
    p.add_argument("--url-base", metavar="URL",
                   help="the address callers reach this front at (e.g. https://images.example.com): enables "
                        "response_format=url, images kept an hour in this process's memory (default: off, url "
                        "answered with 400)")
    p.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                   help="a generation's deadline in seconds, passed to Triton (it stops the request)")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                   help="log level (info: one line per request)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    import uvicorn

    from flux2_serving.front.app import FrontSettings, create_app

    try:
        keys = api_keys(args.api_keys_file)
        settings = FrontSettings(args.triton_grpc, args.model_id, keys, args.max_body_bytes, args.max_image_bytes,
                                 args.url_base, args.timeout_s)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("flux2_serving.front").info(
        "OpenAI Images API at http://%s:%d/v1 -> Triton gRPC %s, model id %r, API keys %s", args.host, args.port,
        args.triton_grpc, args.model_id, f"on ({len(keys)})" if keys else "off")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                timeout_graceful_shutdown=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
