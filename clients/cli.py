"""python -m flux2_serving.clients.cli: generate or edit images with a running flux2_klein_kv server.

Examples:
  python -m flux2_serving.clients.cli --prompt "a lighthouse at dawn" --height 512 --width 512 --seed 7
  python -m flux2_serving.clients.cli --protocol http --url 127.0.0.1:8000 --prompt "make it winter" --image ref.png

It prints the seed the images came from (without --seed, the one the server drew: pass it as --seed to
reproduce them) and a "note:" line for each change the server made to the request (a prompt cut to
the text length, a reference's alpha channel dropped, a reference resized or cropped).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flux2_serving.clients.api import DEFAULT_URLS, UNAVAILABLE_HINT, Flux2Client, Flux2Error, WrongProtocol
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.interface import OPTIONS, PUBLIC_INPUTS


def output_paths(out: str, count: int) -> list[Path]:
    """`out` itself for one image; `<stem>_<i><suffix>` for several."""
    path = Path(out)
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{index}{path.suffix or '.png'}") for index in range(count)]


def parser() -> argparse.ArgumentParser:
    p = command_parser("flux2_serving.clients.cli", __doc__)
    p.add_argument("--prompt", required=True, help="the text prompt")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="a reference image (PNG/JPEG/WebP); repeat for up to 4, in order. The request then "
                        "carries the x-flux2-reference-key header, by which a gateway routes it to one replica")
    docs = {f.name: f.doc for f in PUBLIC_INPUTS}
    for name in OPTIONS:  # the request's options, diffusers' names as flags (--num-inference-steps ...)
        if name != "reuse_reference_cache":
            p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, help=docs[name])
    p.add_argument("--no-reference-cache", dest="reuse_reference_cache", action="store_const", const=False,
                   help="recompute the references' K/V instead of reusing the server's cached copy")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--url", help=f"server address (default {DEFAULT_URLS['grpc']} for gRPC, "
                                 f"{DEFAULT_URLS['http']} for HTTP)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds")
    p.add_argument("--out", default="flux2.png", help="PNG path; several images get _0, _1, ... (default flux2.png)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    for path in args.image:
        if not Path(path).is_file():
            print(f"error: --image {path}: no such file", file=sys.stderr)
            return 2
    if args.url and "://" in args.url:
        print(f"error: --url {args.url}: give host:port without a scheme, e.g. --url "
              f"{args.url.split('://', 1)[1].rstrip('/')}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        with Flux2Client(args.url, args.protocol, timeout_s=args.timeout) as client:
            images = client.generate(args.prompt, args.image, **{name: getattr(args, name) for name in OPTIONS})
    except WrongProtocol as exc:  # the command line names the wrong port or protocol: a usage error
        print(f"error: {exc.explain(f'--protocol {exc.answers}')}", file=sys.stderr)
        return 2
    except Flux2Error as exc:
        unreachable = exc.status is None or "UNAVAILABLE" in str(exc.status)
        hint = (f" (is tritonserver running at {args.url or DEFAULT_URLS[args.protocol]}? `make serve` starts one)"
                if unreachable else "")
        message = str(exc).replace(UNAVAILABLE_HINT, "") if hint else str(exc)  # one hint, the CLI's
        print(f"error: {message}{hint}", file=sys.stderr)
        return 1
    latency = time.perf_counter() - start
    for note in images.notes:
        print(f"note: {note}")
    for image, path in zip(images, output_paths(args.out, len(images)), strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        print(f"wrote {path} ({image.width}x{image.height})")
    reproduce = "" if args.seed is not None else f" (pass --seed {images.seed} to reproduce)"
    print(f"seed {images.seed}{reproduce}")
    print(f"latency {latency * 1000:.0f} ms over {args.protocol} for {len(images)} image(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
