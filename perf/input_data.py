"""perf_analyzer `--input-data` JSON files for the load-test cases of `flux2_klein_kv`.

Format (perf_analyzer docs, "Real Input Data"): one object per request under "data"; a fixed-shape
STRING tensor may be a list of JSON strings; a variable-shape BYTES tensor is
{"content": {"b64": ...}, "shape": [n]} where the base64 bytes are perf_analyzer's serialised
STRING layout: each element as a 4-byte little-endian length followed by its bytes.
Optional inputs that a case does not use are left out (text-to-image sends no `image`).

    python -m perf.input_data --out build/perf/inputs [--height 256 --width 256 --ref-size 256]
"""

from __future__ import annotations

import argparse
import base64
import json
import struct
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.contract.interface import INPUTS
from flux2_serving.devtools.pictures import synthetic_reference

# case name -> number of reference images
CASES = {"text_to_image": 0, "reference_1": 1, "reference_3": 3}
PROMPTS = {
    "text_to_image": "a lighthouse on a cliff at dawn, oil painting",
    "reference_1": "turn this picture into a watercolour poster",
    "reference_3": "combine the three pictures into one collage",
}


def serialize_bytes(items: list[bytes]) -> bytes:
    """Triton's serialised BYTES tensor: every element prefixed by its uint32 little-endian length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def bytes_tensor(items: list[bytes]) -> dict:
    return {"content": {"b64": base64.b64encode(serialize_bytes(items)).decode("ascii")}, "shape": [len(items)]}


def references(count: int, size: int) -> list[bytes]:
    """`count` deterministic PNG references of size x size pixels, each with its own hue."""
    return [synthetic_reference((size, size), (40 + 97 * index) % 256) for index in range(count)]


def request(case: str, height: int = 256, width: int = 256, ref_size: int = 256, num_inference_steps: int = 4,
            seed: int = 0, reuse_reference_cache: bool = True) -> dict:
    """One request of `case` as a perf_analyzer data entry. perf_analyzer repeats it, so with the
    reference K/V cache every request after the first reuses its K/V; `reuse_reference_cache=False`
    measures the full path (VAE encoding and prefill every time)."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; choose from {', '.join(CASES)}")
    entry = {"prompt": [PROMPTS[case]], "height": [height], "width": [width], "seed": [seed],
             "num_inference_steps": [num_inference_steps]}
    if CASES[case]:
        entry["image"] = bytes_tensor(references(CASES[case], ref_size))
        if not reuse_reference_cache:
            entry["reuse_reference_cache"] = [False]
    # the served model's own declaration of its inputs
    unknown = set(entry) - set(INPUTS)
    assert not unknown, f"not inputs of flux2_klein_kv: {unknown}"
    return entry


def write(case: str, path, **options) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"data": [request(case, **options)]}) + "\n")
    return path


def write_all(out_dir, cases=tuple(CASES), **options) -> dict[str, Path]:
    return {case: write(case, Path(out_dir) / f"{case}.json", **options) for case in cases}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.input_data", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", default="build/perf/inputs", help="directory for CASE.json")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {','.join(CASES)}")
    parser.add_argument("--height", type=int, default=256, help="output height, px")
    parser.add_argument("--width", type=int, default=256, help="output width, px")
    parser.add_argument("--ref-size", type=int, default=256, help="side of the square references, px")
    parser.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of every request")
    args = parser.parse_args(argv)
    paths = write_all(args.out, [c for c in args.cases.split(",") if c], height=args.height, width=args.width,
                      ref_size=args.ref_size, num_inference_steps=args.num_inference_steps, seed=args.seed)
    for case, path in paths.items():
        print(f"{case}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
