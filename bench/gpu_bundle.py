"""python -m bench.gpu_bundle (make gpu-bundle): what a bare GPU machine lacks for `make gpu-check`,
gathered where packages can be installed, in one folder of at most 60 MiB.

A GPU machine lent to this project may have Python, PyTorch with CUDA, transformers and numpy 2.x
and nothing else, and no network. This writes OUT/ (default build/gpu_bundle, git-ignored):

  tritonserver.tar.xz  the tritonserver binary, its libraries and the Python backend from the
                       nvidia-pytriton wheel that the tests use, with only the backend stub of the GPU
                       machine's Python (--python; the stub needs that Python's libpython3.X.so there)
                       and without the wheel's own libpython 3.13
  site.tar.xz          unpacked wheels (for --python, manylinux x86_64) of the packages the GPU run
                       lacks: diffusers, numpy < 2 (the backend stub passes empty BLS tensors under
                       numpy 2), Pillow, fpng, requests, tritonclient with grpcio and protobuf, onnxscript
                       (the export stage); extracted into a venv by `python -m bench.gpu_check`
  bundle.json          what is inside, with versions and sizes

Unpacked wheels compress better with xz than the wheels' own zip deflate: that keeps it under 60 MiB.
"""

from __future__ import annotations

import io
import json
import lzma
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from flux2_serving.contract.cli_help import command_parser
from flux2_serving.server.launch import bundled_server

LIMIT_BYTES = 60 * 2**20
# What diffusers and tritonclient's gRPC client need beyond PyTorch, transformers and their
# dependencies, at the versions `make setup` resolves here.
PACKAGES = ["diffusers==0.42.1", "numpy==1.26.4", "Pillow==13.0.0", "requests==2.34.2", "urllib3==2.8.0",
            "certifi==2026.10.19.post1", "charset-normalizer==3.5.3", "idna==3.20", "importlib_metadata==10.2.0",
            "zipp==4.1.2", "tritonclient==2.73.0", "grpcio==1.85.3", "protobuf==6.33.6", "python-rapidjson==1.25",
            # stage e (the 9B export): torch.onnx's exporter needs onnxscript
            "onnxscript==0.7.2", "onnx-ir==1.1.0", "ml_dtypes==0.5.4",
            # the BLS's PNG encoder (it falls back to Pillow without it)
            "fpng==0.1.0", "lazy_loader==0.6"]
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64"]


def _tar_xz(path: Path, add) -> int:
    with lzma.open(path, "wb", preset=6) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        add(tar)
    return path.stat().st_size


def server_files(python: str) -> tuple[Path, list[tuple[Path, str]]]:
    """(site-packages root, [(file, name in the archive)]) of the server part, for Python `python`."""
    server = bundled_server()  # site-packages/pytriton/tritonserver
    site = server.parent.parent
    files = []
    for path in sorted(server.rglob("*")):
        relative = path.relative_to(site)
        parts = relative.parts
        if path.is_dir() or "__pycache__" in parts:
            continue
        if "python_backend_stubs" in parts and parts[parts.index("python_backend_stubs") + 1] != python:
            continue
        files.append((path, str(relative)))
    for path in sorted((site / "nvidia_pytriton.libs").iterdir()):
        if not path.name.startswith("libpython3"):  # the wheel's libpython 3.13: not the GPU machine's Python
            files.append((path, f"nvidia_pytriton.libs/{path.name}"))
    return site, files


def download_wheels(python: str, target: Path) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "--dest", str(target),
           *[arg for platform in PLATFORMS for arg in ("--platform", platform)], *PACKAGES]
    subprocess.run(cmd, check=True)
    return sorted(target.glob("*.whl"))


def add_wheels(tar: tarfile.TarFile, wheels: list[Path]) -> None:
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            for item in archive.infolist():
                if item.is_dir():
                    continue
                data = archive.read(item)
                info = tarfile.TarInfo(item.filename)
                info.size = len(data)
                info.mode = 0o755 if item.filename.endswith(".so") or ".so." in item.filename else 0o644
                tar.addfile(info, io.BytesIO(data))


def build(out: Path, python: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    _, files = server_files(python)

    def add_server(tar):
        for path, name in files:
            tar.add(path, arcname=name)

    server_bytes = _tar_xz(out / "tritonserver.tar.xz", add_server)
    with tempfile.TemporaryDirectory() as tmp:
        wheels = download_wheels(python, Path(tmp))
        names = [wheel.name for wheel in wheels]
        site_bytes = _tar_xz(out / "site.tar.xz", lambda tar: add_wheels(tar, wheels))
    info = {"python": python, "tritonserver.tar.xz": server_bytes, "site.tar.xz": site_bytes,
            "total_bytes": server_bytes + site_bytes, "wheels": names, "limit_bytes": LIMIT_BYTES}
    (out / "bundle.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    parser = command_parser("bench.gpu_bundle", __doc__)
    parser.add_argument("--out", type=Path, default=Path("build/gpu_bundle"), help="folder (default %(default)s)")
    parser.add_argument("--python", default="3.12", help="the GPU machine's Python, X.Y (default %(default)s)")
    args = parser.parse_args(argv)
    info = build(args.out, args.python)
    total = info["total_bytes"]
    print(f"wrote {args.out}: tritonserver {info['tritonserver.tar.xz'] / 2**20:.1f} MiB + packages "
          f"{info['site.tar.xz'] / 2**20:.1f} MiB = {total / 2**20:.1f} MiB (limit {LIMIT_BYTES / 2**20:.0f} MiB) "
          f"for Python {args.python}: {', '.join(info['wheels'])}")
    if total > LIMIT_BYTES:
        print("error: over the limit: the device tool carries at most 64 MiB", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
