"""python -m clients.demo: start tritonserver on the assembled repository, run one text-to-image
and one 2-reference edit over gRPC, write the PNGs, stop the server."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from bench.helpers import synthetic_reference
from clients.api import Flux2Client
from server.launch import free_port, running


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", default="build/model_repository")
    parser.add_argument("--out", default="build/demo", help="directory for the PNGs")
    parser.add_argument("--grpc-port", type=int, default=8001)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("starting tritonserver ...", flush=True)
    with running(args.repository, ports={"http": free_port(), "grpc": args.grpc_port, "metrics": free_port()},
                 log_file=out / "server.log") as server:
        url = server.grpc
        jobs = [
            ("text_to_image", dict(prompt="a lighthouse on a cliff at dawn", height=512, width=512, seed=7)),
            ("edit_2_references", dict(prompt="combine both pictures into one poster", seed=11,
                                       images=[synthetic_reference((384, 384), 40),
                                               synthetic_reference((320, 256), 160)])),
        ]
        for name, request in jobs:
            start_time = time.perf_counter()
            with Flux2Client(url) as client:
                images = client.generate(**request)
            for index, image in enumerate(images):
                path = out / f"{name}_{index}.png"
                image.save(path)
                print(f"{name}: wrote {path} ({image.width}x{image.height}) "
                      f"in {time.perf_counter() - start_time:.1f} s", flush=True)
    print("tritonserver stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
