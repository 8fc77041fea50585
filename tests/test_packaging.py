"""The one distribution as a user installs it: a wheel built from the checkout holds the top-level export/ and
clients/ folders as flux2_serving.export and flux2_serving.clients, and `pip install "<checkout>[client]"` into
a fresh venv in another directory gives a client that talks to the real server.

Both build from a copy of the checkout's sources (pyproject.toml, README.md and the three package folders), so
that setuptools' in-tree build folders land in the test's directory, not in the checkout's build/."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux2_serving.clients.api import Flux2Client

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "flux2_serving", "export", "clients")


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("checkout") / "flux2-serving"
    out.mkdir()
    for name in SOURCES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, out / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, out / name)
    return out


def test_the_wheel_holds_the_export_and_client_modules(source_copy, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(source_copy),
                             "-w", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = tmp_path.glob("flux2_serving-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for module in ("export/__main__.py", "export/onnx_export.py", "export/build_engines.py", "export/fp8.py",
                   "export/trt_supported_ops.tsv", "clients/api.py", "clients/cli.py", "clients/demo.py",
                   "modeling/components.py", "models/bls.py", "server/launch.py"):
        assert f"flux2_serving/{module}" in names, module
    # One copy of each module, under the one import name: no top-level export/ or clients/ package in the wheel.
    assert not any(name.startswith(("export/", "clients/")) for name in names)
    for script in ("flux2-export = flux2_serving.export.__main__:main", "flux2-client = flux2_serving.clients.cli:main",
                   "flux2-serve = flux2_serving.server.launch:main"):
        assert script in entry_points


def test_the_client_extra_installs_into_a_fresh_venv_elsewhere_and_talks_to_the_server(
        source_copy, triton_server, tmp_path):
    elsewhere = tmp_path / "service"
    elsewhere.mkdir()
    venv.create(elsewhere / "venv", with_pip=True)
    python = elsewhere / "venv" / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{source_copy}[client]"],
                             capture_output=True, text=True, cwd=elsewhere)
    assert install.returncode == 0, install.stdout + install.stderr
    # The client extra brings the client's needs and nothing of the model's.
    probe = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print([m for m in ('torch', 'diffusers', 'onnxruntime') if u.find_spec(m)])"],
                           capture_output=True, text=True, cwd=elsewhere, check=True)
    assert probe.stdout.strip() == "[]"
    run = subprocess.run([str(elsewhere / "venv" / "bin" / "flux2-client"), "--url", triton_server["grpc"],
                          "--prompt", "a lighthouse", "--seed", "3", "--height", "256", "--width", "256",
                          "--num-inference-steps", "2", "--out", "lighthouse.png"],
                         capture_output=True, text=True, cwd=elsewhere)
    assert run.returncode == 0, run.stdout + run.stderr
    with Flux2Client(triton_server["grpc"]) as client:
        (expected,) = client.generate("a lighthouse", seed=3, height=256, width=256, num_inference_steps=2)
    assert np.array_equal(np.asarray(Image.open(elsewhere / "lighthouse.png")), np.asarray(expected))
