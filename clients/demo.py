"""python -m flux2_serving.clients.demo (make demo): serve the assembled repository, send a text-to-image request
and a 2-reference edit over gRPC, and show what that proves: each served image next to
`Flux2KleinKVPipeline`'s on the same weights, inputs and seed, with their difference map.

The embedded checkpoint has random weights, so both images are noise; what matters is that they
are the same noise. One picture per request goes to OUT/<request>_compare.png (served | diffusers |
|difference| x 64, under them the prompt and the references, small), the served PNGs to
OUT/<request>_<i>.png, and one line per request is printed: max difference, share of equal values,
served vs in-process time. tritonserver's own log goes to
OUT/server.log; the frameworks' progress bars and warnings are off unless --verbose.
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from flux2_serving.clients.api import Flux2Client
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.contract.names import BLS_MODEL
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.export.quiet import quiet_frameworks
from flux2_serving.server.launch import busy_ports, running

DEFAULT_REPOSITORY = "build/model_repository"
REQUESTS = [
    ("text_to_image", dict(prompt="a lighthouse on a cliff at dawn", height=512, width=512, seed=7)),
    ("edit_2_references", dict(prompt="combine both pictures into one poster", seed=11,
                               references=[((384, 384), 40), ((320, 256), 160)])),
]
AMPLIFY = 64  # the difference map's gain: a 1-level difference shows as 64


THUMBNAIL = 128  # the references are shown at most this many pixels a side
LINE = 14  # caption line height (Pillow's default font)
BLACK = (0, 0, 0)


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` pixels (words longer than a line are cut)."""
    lines, line = [], ""
    for word in text.split(" "):
        candidate = f"{line} {word}" if line else word
        if line and draw.textlength(candidate) > width:
            lines.append(line)
            candidate = word
        while len(candidate) > 1 and draw.textlength(candidate) > width:  # a word wider than the picture
            cut = len(candidate) - 1
            while cut > 1 and draw.textlength(candidate[:cut]) > width:
                cut -= 1
            lines.append(candidate[:cut])
            candidate = candidate[cut:]
        line = candidate
    return [*lines, line]


def comparison(served, expected, title: str, prompt: str = "", references=()):
    """One picture: served | diffusers | |difference| x AMPLIFY, then the request under them: the prompt as a
    caption, the references (PIL images, in order) small, and the `title` line."""
    diff = np.abs(served.astype(np.int16) - expected.astype(np.int16))
    amplified = np.clip(diff * AMPLIFY, 0, 255).astype(np.uint8)
    height, width = served.shape[:2]
    thumbnails = []
    for reference in references:
        thumbnail = reference.convert("RGB")
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        thumbnails.append((thumbnail, f"{reference.width}x{reference.height}"))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = (("served (Triton)", served), ("diffusers Flux2KleinKVPipeline", expected),
               (f"|difference| x {AMPLIFY}", amplified))
    pitch = max(width, *(int(measure.textlength(name)) for name, _ in columns)) + 10  # labels never overlap
    canvas_width = max(10 + 3 * pitch, 20 + sum(t.width + 10 for t, _ in thumbnails), 400)
    caption = _wrap(measure, f'prompt: "{prompt}"', canvas_width - 20) if prompt else []
    title_lines = _wrap(measure, title, canvas_width - 20)
    label = f"references ({len(thumbnails)}, in order; as sent, shown at most {THUMBNAIL} px)" if thumbnails \
        else "references: none (text-to-image)"
    strip = max(t.height for t, _ in thumbnails) + LINE + 4 if thumbnails else 0  # thumbnails and their sizes
    top = 30 + height + 10  # below the three pictures
    canvas_height = top + LINE * (len(caption) + 1 + len(title_lines)) + strip + 10
    canvas = Image.new("RGB", (canvas_width, canvas_height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for column, (name, pixels) in enumerate(columns):
        x = 10 + column * pitch
        canvas.paste(Image.fromarray(pixels), (x, 30))
        draw.text((x, 8), name, fill=BLACK)
    y = top
    for line in caption:
        draw.text((10, y), line, fill=BLACK)
        y += LINE
    draw.text((10, y), label, fill=BLACK)
    y += LINE
    x = 10
    for thumbnail, size in thumbnails:
        canvas.paste(thumbnail, (x, y))
        draw.text((x, y + strip - LINE - 2), size, fill=BLACK)  # each reference's size as sent, under it
        x += thumbnail.width + 10
    y += strip
    for line in title_lines:
        draw.text((10, y), line, fill=BLACK)
        y += LINE
    return canvas, diff


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.clients.demo", __doc__)
    parser.add_argument("--repository", default=DEFAULT_REPOSITORY,
                        help="model repository to serve (default %(default)s; make repository writes it)")
    parser.add_argument("--out", default="build/demo", help="folder for the pictures (default %(default)s)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port of the server (default %(default)s)")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port of the server (default %(default)s)")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="metrics port of the server (default %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="show the frameworks' progress bars and warnings")
    args = parser.parse_args(argv)
    repository = Path(args.repository)
    if not (repository / BLS_MODEL / "config.pbtxt").exists():
        print(f"error: --repository {repository}: no model repository there (make repository writes one)",
              file=sys.stderr)
        return 2

    ports = {"http": args.http_port, "grpc": args.grpc_port, "metrics": args.metrics_port}
    busy = busy_ports(ports)
    if busy:  # e.g. `make serve` runs in another terminal
        print(f"error: {', '.join(busy)} already in use (a tritonserver of make serve?): stop it, or pick free ports "
              "with --http-port/--grpc-port/--metrics-port (make demo HTTP_PORT=... GRPC_PORT=... METRICS_PORT=...)",
              file=sys.stderr)
        return 2
    if not args.verbose:
        quiet_frameworks()

    # torch and diffusers (through export.loading): heavy, imported once the options are checked and the
    # frameworks quieted, so --help and a port in use answer at once.
    import torch

    from flux2_serving.modeling.loading import DTYPES, load_pipeline

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(repository / BLS_MODEL / "1")
    print(f"loading Flux2KleinKVPipeline from {manifest.model} (the weights the repository serves) ...", flush=True)
    pipe = load_pipeline(manifest.model, DTYPES[manifest.dtype])
    pipe.set_progress_bar_config(disable=True)
    print(f"starting tritonserver on {repository} ...", flush=True)
    with running(repository, ports=ports, log_file=out / "server.log") as server, Flux2Client(server.grpc) as client:
        for name, request in REQUESTS:
            references = [synthetic_reference(size, hue) for size, hue in request.get("references", [])]
            kwargs = {k: request[k] for k in ("height", "width") if k in request}
            start = time.perf_counter()
            served = client.generate(request["prompt"], references, seed=request["seed"], **kwargs)
            served_s = time.perf_counter() - start
            start = time.perf_counter()
            images = [Image.open(io.BytesIO(r)).convert("RGB") for r in references]
            expected = pipe(prompt=request["prompt"], image=images or None, output_type="np",
                            generator=torch.Generator("cpu").manual_seed(request["seed"]), **kwargs).images
            in_process_s = time.perf_counter() - start
            expected = (expected * 255).round().astype(np.uint8)
            for index, image in enumerate(served):
                image.save(out / f"{name}_{index}.png")
            served_array = np.asarray(served[0])
            diff = np.abs(served_array.astype(np.int16) - expected[0].astype(np.int16))
            line = (f"{name}: max difference {diff.max()} level(s), {(diff == 0).mean():.2%} of values equal; "
                    f"served {served_s:.1f} s, in-process diffusers {in_process_s:.1f} s")
            picture, _ = comparison(served_array, expected[0], line, request["prompt"], images)
            picture.save(out / f"{name}_compare.png")
            print(f"{line} -> {out / f'{name}_compare.png'}", flush=True)
    print("tritonserver stopped. The images are noise because the embedded checkpoint's weights are random; "
          "served and in-process noise are the same, which is the point.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
