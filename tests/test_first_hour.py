"""What a newcomer runs into first: tools that never delete what they did not make, and one clear
line (exit status 2) for the common mistakes."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from PIL import Image

from flux2_serving.server.launch import free_port, free_ports
from flux2_serving.serving.repository import MARKER, assemble
from tests.support import ROOT, one_line_error, run_module


def test_repository_never_deletes_a_folder_it_did_not_make(tmp_path, onnx_fp32):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(SystemExit, match="was not written by python -m flux2_serving.serving.repository"):
        assemble(onnx_fp32, out=precious)
    assert (precious / "thesis.tex").read_text() == "years of work"
    # Its own repository it replaces; a missing input is reported before anything is touched.
    repo = assemble(onnx_fp32, out=tmp_path / "repo")
    assert (repo / MARKER).exists()
    with pytest.raises(SystemExit, match="expected one text_encoder"):
        assemble(onnx_fp32, out=repo, backend="tensorrt", engines_dir=tmp_path / "no_engines")
    assert (repo / "flux2_klein_kv" / "config.pbtxt").exists()
    assert assemble(onnx_fp32, out=repo) == repo


def test_make_clean_keeps_your_checkpoints_exports_and_engines(tmp_path):
    work = tmp_path / "work"
    for folder in ("checkpoints/tiny", "checkpoints/mine", "build/engines", "build/onnx/bf16", "build/onnx/fp32",
                   "build/model_repository"):
        (work / folder).mkdir(parents=True)
        (work / folder / "file").write_text("x")
    (work / "checkpoints/tiny/TINY_CHECKPOINT.json").write_text("{}")  # what `make checkpoint` writes
    shutil.copy(ROOT / "Makefile", work / "Makefile")
    result = subprocess.run(["make", "-C", str(work), "clean"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert not (work / "checkpoints/tiny").exists() and not (work / "build/model_repository").exists()
    for kept in ("checkpoints/mine", "build/engines", "build/onnx/bf16"):
        assert (work / kept / "file").exists(), kept
    assert "make clean" in subprocess.run(["make", "-C", str(ROOT), "help"], capture_output=True, text=True).stdout


def test_export_model_that_does_not_exist(tmp_path):
    result = run_module("flux2_serving.export", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    one_line_error(result, 2, "--model", "no such folder", "Hugging Face id")


def test_export_folder_without_the_diffusers_layout(tmp_path):
    (tmp_path / "weights").mkdir()
    result = run_module("flux2_serving.export", "--model", str(tmp_path / "weights"), "--out", str(tmp_path / "o"))
    one_line_error(result, 2, "not a diffusers checkpoint folder", "make checkpoint")


def test_repository_from_a_folder_without_manifest(tmp_path):
    result = run_module("flux2_serving.serving.repository", "--onnx-dir", str(tmp_path), "--out", str(tmp_path / "r"))
    one_line_error(result, 2, "manifest.json not found", "python -m flux2_serving.export")


def test_client_url_with_a_scheme(tmp_path):
    one_line_error(run_module("flux2_serving.clients.cli", "--url", "http://127.0.0.1:8000", "--protocol", "http",
                   "--prompt", "x"), 2, "without a scheme", "--url 127.0.0.1:8000")


def test_client_when_no_server_runs(tmp_path):
    one_line_error(run_module("flux2_serving.clients.cli", "--url", f"127.0.0.1:{free_port()}", "--prompt", "x",
                   "--out", str(tmp_path / "x.png")), 1, "is tritonserver running", "make serve")


@pytest.mark.parametrize("module", ["flux2_serving.export", "flux2_serving.export.checkpoint",
                                    "flux2_serving.export.build_engines", "flux2_serving.export.memory_plan",
                                    "flux2_serving.serving.repository", "flux2_serving.server.launch",
                                    "flux2_serving.clients.cli", "perf.run", "bench.gpu_check", "bench.gpu_probe",
                                    "bench.gpu_bundle"])
def test_help_answers_without_importing_torch(module):
    probe = (f"import runpy, sys; sys.argv = ['{module}', '--help']\n"
             f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('TORCH_LOADED' if 'torch' in sys.modules else 'TORCH_ABSENT')")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "usage:" in result.stdout and "TORCH_ABSENT" in result.stdout, result.stdout[-500:] + result.stderr[-500:]
    assert "default" in result.stdout  # defaults are shown


def test_demo_shows_served_next_to_diffusers(tmp_path, triton_server):

    out = tmp_path / "demo"
    ports = [arg for name, port in free_ports().items() for arg in (f"--{name}-port", str(port))]
    result = run_module("flux2_serving.clients.demo", "--repository", str(triton_server["repository"]),
                        "--out", str(out), *ports, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for name in ("text_to_image", "edit_2_references"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"{name}: max difference"))
        assert int(line.split("max difference ")[1].split()[0]) <= 4, line  # served equals diffusers
        picture = Image.open(out / f"{name}_compare.png")
        served = Image.open(out / f"{name}_0.png")
        assert picture.width > 3 * served.width  # served | diffusers | difference side by side
    assert "random" in result.stdout  # it says why the pictures are noise
    assert "Loading" not in result.stderr and "it/s" not in result.stderr  # no progress bars unless --verbose


def test_make_serve_serves_the_existing_repository(tmp_path, triton_server):
    """make serve must not reassemble (and so replace) a repository that is already there."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "python $*"\n')  # records what make would run
    (fake / "python").chmod(0o755)
    result = subprocess.run(["make", "-C", str(ROOT), "serve", f"REPO={triton_server['repository']}", f"BIN={fake}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "serving the existing repository" in result.stdout
    assert f"python -m flux2_serving.server.launch --repository {triton_server['repository']}" in result.stdout
    assert "flux2_serving.serving.repository" not in result.stdout  # not reassembled
