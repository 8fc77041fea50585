"""What a newcomer runs into first: tools that never delete what they did not make, and one clear
line (exit status 2) for the common mistakes."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from flux2_serving.clients.demo import THUMBNAIL, comparison
from flux2_serving.devtools.pictures import synthetic_reference
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


@pytest.mark.parametrize("module", ["flux2_serving.export", "flux2_serving.modeling.checkpoint",
                                    "flux2_serving.export.build_engines", "flux2_serving.serving.memory_plan",
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


def test_demo_shows_served_next_to_diffusers(tmp_path, small_repository):
    """make demo on an assembled repository: it starts its own server (one BLS instance: the demo sends one
    request at a time) and stops it."""
    out = tmp_path / "demo"
    ports = [arg for name, port in free_ports().items() for arg in (f"--{name}-port", str(port))]
    result = run_module("flux2_serving.clients.demo", "--repository", str(small_repository),
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


def _found(canvas: np.ndarray, patch: np.ndarray) -> bool:
    """Whether `patch` appears in `canvas` pixel for pixel."""
    height, width = patch.shape[:2]
    return any(np.array_equal(canvas[y:y + height, x:x + width], patch)
               for y, x in np.argwhere((canvas == patch[0, 0]).all(axis=-1)))


def test_the_compare_picture_shows_the_prompt_and_the_references_small(monkeypatch):
    """No server: the picture from small synthetic images has served, diffusers and the difference, and under
    them the prompt as a caption and each reference shrunk to at most THUMBNAIL px with its size as sent."""
    written = []
    draw_text = ImageDraw.ImageDraw.text

    def text(self, xy, value, *args, **kwargs):  # what the picture says, line by line
        written.append(value)
        return draw_text(self, xy, value, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    rng = np.random.default_rng(0)
    served = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    expected = served.copy()
    expected[0, 0] ^= 1
    references = [Image.open(io.BytesIO(synthetic_reference(size, hue))) for size, hue in (((384, 384), 40),
                                                                                          ((320, 256), 160))]
    prompt = "combine both pictures into one poster, " * 4  # longer than a line: wrapped, never cut
    picture, diff = comparison(served, expected, "edit: max difference 1 level(s)", prompt, references)
    pixels = np.asarray(picture)
    assert diff.max() == 1 and _found(pixels, served) and _found(pixels, expected)
    shown = [reference.copy() for reference in references]
    for thumbnail in shown:
        thumbnail.thumbnail((THUMBNAIL, THUMBNAIL))
        assert max(thumbnail.size) == THUMBNAIL and _found(pixels, np.asarray(thumbnail.convert("RGB")))
    joined = " ".join(" ".join(written).split())
    assert " ".join(f'prompt: "{prompt}"'.split()) in joined  # every word, in order, over several lines
    assert max(len(line) for line in written) < len(prompt)
    assert "references (2, in order" in joined and "384x384" in joined and "320x256" in joined
    assert "edit: max difference 1 level(s)" in joined
    # Text-to-image: the caption says there are no references.
    written.clear()
    comparison(served, served, "t2i", "a lighthouse")
    assert 'prompt: "a lighthouse"' in written and "references: none (text-to-image)" in written


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
