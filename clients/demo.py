"""python -m clients.demo: start tritonserver on the assembled repository, run one text-to-image
and one 2-reference edit over gRPC, write the PNGs, stop the server."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from server.launch import start


def synthetic_reference(size: tuple[int, int], hue: int) -> bytes:
    """A deterministic reference picture (no image files ship with the repository)."""
    import io

    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to((x + hue) % 256, (height, width)), np.broadcast_to(y, (height, width)),
                       np.full((height, width), hue, np.float32)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 240, 240))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(url: str, prompt: str, images=(), **scalars) -> list[bytes]:
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(url)
    tensors = [("prompt", np.array([prompt.encode()], dtype=np.object_), "BYTES")]
    if images:
        tensors.append(("image", np.array(list(images), dtype=np.object_), "BYTES"))
    for name, value in scalars.items():
        dtype, triton = (np.int64, "INT64") if name == "seed" else (np.int32, "INT32")
        tensors.append((name, np.array([value], dtype=dtype), triton))
    inputs = []
    for name, array, triton in tensors:
        tensor = grpc.InferInput(name, list(array.shape), triton)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    result = client.infer("flux2_klein_kv", inputs, outputs=[grpc.InferRequestedOutput("png")])
    return list(result.as_numpy("png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", default="build/model_repository")
    parser.add_argument("--out", default="build/demo", help="directory for the PNGs")
    parser.add_argument("--grpc-port", type=int, default=8001)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    print("starting tritonserver ...", flush=True)
    process = start(args.repository, grpc=args.grpc_port, log_file=out / "server.log")
    url = f"127.0.0.1:{args.grpc_port}"
    try:
        jobs = [
            ("text_to_image", dict(prompt="a lighthouse on a cliff at dawn", height=512, width=512, seed=7)),
            ("edit_2_references", dict(prompt="combine both pictures into one poster", seed=11,
                                       images=[synthetic_reference((384, 384), 40),
                                               synthetic_reference((320, 256), 160)])),
        ]
        for name, request in jobs:
            start_time = time.perf_counter()
            pngs = generate(url, **request)
            for index, png in enumerate(pngs):
                path = out / f"{name}_{index}.png"
                path.write_bytes(png)
                width, height = Image.open(path).size
                print(f"{name}: wrote {path} ({width}x{height}) "
                      f"in {time.perf_counter() - start_time:.1f} s", flush=True)
    finally:
        process.terminate()
        process.wait(60)
        print("tritonserver stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
