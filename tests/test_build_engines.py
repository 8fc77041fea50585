"""The engine builder's checks that run without TensorRT, and the Docker files that run it.

TensorRT is not installable on the development machines: the timing cache check is exercised with
a stand-in for TensorRT's IBuilderConfig (FakeBuilderConfig below), not with TensorRT. Nothing here
needs exported ONNX graphs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.specs import graph_specs
from flux2_serving.export.build_engines import (
    RECORD,
    TimingCacheRejected,
    apply_timing_cache,
    engine_name,
    engine_record,
    timing_cache_name,
    update_record,
    write_buffer,
)
from flux2_serving.serving import memory_plan
from tests.support import modules_imported_by

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
TINY_DIMS = {"text_hidden": 64, "heads": 4, "head_dim": 16, "kv_layers": 4, "in_channels": 128}


class FakeBuilderConfig:
    """Stand-in for tensorrt.IBuilderConfig: create_timing_cache / set_timing_cache only; set_timing_cache
    returns `accept`, as TensorRT 10's does (False: a cache from another TensorRT version or GPU)."""

    def __init__(self, accept: bool):
        self.accept = accept
        self.loaded = None
        self.set_calls = []

    def create_timing_cache(self, data: bytes):
        self.loaded = bytes(data)
        return ("cache", self.loaded)

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        self.set_calls.append((cache, ignore_mismatch))
        return self.accept


def test_timing_cache_name_carries_trt_version_and_sm():
    assert timing_cache_name("10.5.0", "90") == "timing.trt10.5.0.sm90.cache"
    assert engine_name("vae_decoder", "10.5.0", "90") == "vae_decoder.trt10.5.0.sm90.plan"
    # flux2_serving.serving.repository picks plans by `{component}.trt*.plan`: the cache must never match it.
    assert not timing_cache_name("10.5.0", "90").endswith(".plan")


def test_rejected_timing_cache_raises_naming_the_file(tmp_path):
    cache = tmp_path / timing_cache_name("10.5.0", "90")
    cache.write_bytes(b"written by another TensorRT")
    config = FakeBuilderConfig(accept=False)
    with pytest.raises(TimingCacheRejected) as info:
        apply_timing_cache(config, cache, "10.5.0", "90")
    message = str(info.value)
    assert str(cache) in message
    assert "TensorRT 10.5.0" in message and "--timing-cache" in message and "delete it" in message
    assert config.set_calls[0][1] is False  # never ignore_mismatch


def test_accepted_timing_cache_is_loaded(tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"\x01\x02cache")
    config = FakeBuilderConfig(accept=True)
    assert apply_timing_cache(config, cache, "10.5.0", "90") == ("cache", b"\x01\x02cache")
    assert config.set_calls == [(("cache", b"\x01\x02cache"), False)]


def test_missing_timing_cache_starts_empty(tmp_path):
    config = FakeBuilderConfig(accept=True)
    apply_timing_cache(config, tmp_path / "absent.cache", "10.5.0", "90")
    assert config.loaded == b""


@pytest.mark.parametrize("make", [bytearray, lambda data: memoryview(bytes(data))])
def test_write_buffer_writes_exact_bytes_and_leaves_no_temp_file(tmp_path, make):
    data = bytes(range(256)) * 4099  # not a multiple of any chunk size
    target = tmp_path / "model.plan"
    target.write_bytes(b"old plan")  # replaced atomically
    assert write_buffer(target, make(data)) == len(data)
    assert target.read_bytes() == data
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan"]


def test_write_buffer_crash_keeps_old_file_and_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "model.plan"
    target.write_bytes(b"old plan")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("flux2_serving.export.build_engines.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_buffer(target, bytearray(b"new plan, never complete"))
    assert target.read_bytes() == b"old plan"
    assert [p.name for p in tmp_path.iterdir()] == ["model.plan"]


def test_builder_imports_neither_torch_nor_diffusers():
    assert modules_imported_by("flux2_serving.export.build_engines",
                               ("torch", "diffusers", "transformers", "onnx", "numpy")) == []


def test_the_engines_image_holds_everything_the_builder_imports(tmp_path):
    """The builder run from a folder holding exactly what docker/engines.Dockerfile copies (the list
    read from the Dockerfile), with only the standard library on the path: it imports and answers
    --help (a missing module would kill the container's CMD at import; the image build would not see it)."""
    text = (DOCKER / "engines.Dockerfile").read_text().split("\nFROM engines AS engine-check", 1)[0]  # the builder
    copies = re.findall(r"^COPY\s+(.+?)\s+/opt/flux2/(\S+)/\s*$", text, flags=re.MULTILINE)
    assert copies
    for sources, target in copies:  # the build context is the repository root
        (tmp_path / target).mkdir(parents=True, exist_ok=True)
        for source in sources.split():
            (tmp_path / target / Path(source).name).write_bytes((ROOT / source).read_bytes())
    workdir = re.search(r"^WORKDIR\s+(\S+)", text, flags=re.MULTILINE).group(1)
    assert workdir == "/opt/flux2"  # the image runs `python3 -m flux2_serving.export.build_engines` from there
    # As `python3 -m` from WORKDIR: the working folder first; -S: no site-packages (nor this venv's
    # editable install of the package), so only the copied files can be imported.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-S", "-m", "flux2_serving.export.build_engines", "--help"],
                            capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert "--onnx-dir" in result.stdout


def _manifest_dir(tmp_path) -> Path:
    specs = graph_specs(TINY_DIMS)
    manifest = {"model": "tiny", "dtype": "bf16", "opset": 18, "dims": TINY_DIMS,
                "graphs": {name: {"path": f"{name}/model.onnx", **asdict(spec)} for name, spec in specs.items()}}
    onnx_dir = tmp_path / "onnx"
    onnx_dir.mkdir()
    (onnx_dir / "manifest.json").write_text(json.dumps(manifest))
    return onnx_dir


def test_make_engines_runs_the_builder_without_the_project_installed(tmp_path):
    """`make engines` on a GPU host runs ENGINE_PYTHON (NVIDIA's python3: tensorrt, no venv, this project not
    installed) on the top-level export/ folder: here python -S (no site-packages, so not this venv's editable
    install either) through the Makefile's own recipe, as a dry run."""
    onnx_dir = _manifest_dir(tmp_path)
    result = subprocess.run(["make", "-s", "engines-dry-run", f"ONNX={onnx_dir}", f"ENGINES={tmp_path / 'engines'}",
                             f"ENGINE_PYTHON={sys.executable} -S"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "transformer_cached" in result.stdout


def test_make_docker_engines_passes_the_tier_to_the_image(tmp_path):
    """make docker-engines TIER=...: the arguments after the image name reach the builder (the image's ENTRYPOINT
    holds the fixed part). Run as the container would, with its paths pointed at a manifest here: a dry run."""
    dry = subprocess.run(["make", "-n", "docker-engines", "TIER=32gb-fp8"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    run_line = next(line for line in dry.replace("\\\n", " ").splitlines() if line.startswith("docker run"))
    image_args = run_line.split("flux2-klein-kv-engines:", 1)[1].split()[1:]
    assert image_args == ["--tier", "32gb-fp8"], run_line
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (.+)$", (DOCKER / "engines.Dockerfile").read_text(),
                                      flags=re.MULTILINE).group(1))
    assert entrypoint[:3] == ["python3", "-m", "flux2_serving.export.build_engines"]
    onnx_dir = _manifest_dir(tmp_path)
    argv = [{"/work/onnx": str(onnx_dir), "/work/engines": str(tmp_path / "engines")}.get(a, a)
            for a in entrypoint[1:]] + image_args + ["--dry-run"]
    result = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "serving envelope of tier 32gb-fp8" in result.stdout and "weight streaming (tier 32gb-fp8)" in result.stdout


def test_without_tensorrt_exits_2_with_one_line(tmp_path):
    onnx_dir = _manifest_dir(tmp_path)
    # `python -m flux2_serving.export.build_engines` with `import tensorrt` failing, whether or not it is installed.
    code = ("import runpy, sys; sys.modules['tensorrt'] = None; "
            f"sys.argv = ['build_engines', '--onnx-dir', {str(onnx_dir)!r}, '--out', {str(tmp_path / 'engines')!r}]; "
            "runpy.run_module('flux2_serving.export.build_engines', run_name='__main__', alter_sys=True)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: TensorRT Python package not found")
    assert not (tmp_path / "engines").exists()


# --- docker/ -------------------------------------------------------------------------------------

def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*(==|<|<=|>=)\s*([^\s;]+)", line)
        if match:
            pins[match.group(1).lower()] = match.group(2) + match.group(3)
    return pins


def _from_tag(dockerfile: Path) -> str:
    images = [image for image in re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(), flags=re.MULTILINE)
              if ":" in image]  # NVIDIA's image; a later stage may build FROM an earlier one (engines.Dockerfile)
    assert len(images) == 1, images
    return images[0].rsplit(":", 1)[1]


def _project_modules(module: str, seen: set) -> set:
    """The project's modules `module` imports, transitively (module-level and function-level imports)."""
    import ast
    import importlib.util

    if module in seen:
        return seen
    seen.add(module)
    path = Path(importlib.util.find_spec(module).origin)
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("flux2_serving"):
            _project_modules(node.module, seen)
    return seen


def test_the_engine_check_image_holds_what_the_check_imports_and_pins_the_toolchain():
    """make docker-engine-check runs engine_check in the engines image's engine-check stage: every project module
    it reaches is copied there (the builder stage's files included), and its packages carry the tests' pins."""
    text = (DOCKER / "engines.Dockerfile").read_text()
    assert "\nFROM engines AS engine-check\n" in text
    copies = re.findall(r"^COPY\s+(.+?)\s+/opt/flux2/(\S+)/\s*$", text, flags=re.MULTILINE)
    copied = {f"{target}/{Path(source).name}" for sources, target in copies for source in sources.split()}
    needed = _project_modules("flux2_serving.export.engine_check", set())
    files = {f"{module.replace('.', '/')}.py" for module in needed}
    files |= {f"{'/'.join(module.split('.')[:i])}/__init__.py" for module in needed
              for i in range(1, module.count(".") + 1)}
    assert files <= copied, sorted(files - copied)
    entrypoint = json.loads(text.rsplit("ENTRYPOINT ", 1)[1].splitlines()[0])
    assert entrypoint[:3] == ["python3", "-m", "flux2_serving.export.engine_check"]
    check, toolchain = _pins(DOCKER / "requirements-engine-check.txt"), _pins(ROOT / "requirements.txt")
    for name in ("polygraphy", "onnxruntime", "numpy"):
        assert check[name] == toolchain[name], name
    assert check["torch"] == toolchain["torch"] + "+cpu"
    dry = subprocess.run(["make", "-n", "docker-engine-check", "REFERENCE_ONNX=build/onnx/fp32"], capture_output=True,
                         text=True, cwd=ROOT, check=True).stdout
    assert "--target engine-check" in dry and "--gpus" in dry and "--reference-onnx-dir /work/reference" in dry


def test_dockerfiles_share_the_release_and_serve_with_complete_configs():
    serving, engines = DOCKER / "serving.Dockerfile", DOCKER / "engines.Dockerfile"
    # Engines only load on the TensorRT that built them: both images come from one NVIDIA release, the Makefile's
    # RELEASE (the one place): the Dockerfiles' ARG defaults (a plain docker build), the images make docker-* tags
    # and passes --build-arg to, and the Kubernetes images all say it.
    makefile = (ROOT / "Makefile").read_text()
    release = re.search(r"^RELEASE := (\d\d\.\d\d)$", makefile, flags=re.MULTILINE).group(1)
    for dockerfile in (serving, engines):
        assert _from_tag(dockerfile) == "${RELEASE}-py3"
        assert re.search(rf"^ARG RELEASE={re.escape(release)}$", dockerfile.read_text(), flags=re.MULTILINE)
    assert makefile.count("--build-arg RELEASE=$(RELEASE)") == 3  # engines, its engine-check target, serving
    images = re.findall(r"image: (flux2-klein-kv-\S+)", "".join(
        (ROOT / "deploy" / "kubernetes" / name).read_text() for name in ("deployment.yaml", "front-deployment.yaml")))
    assert images and all(image.endswith(f":{release}") for image in images), images
    for doc in ("docs/runbook.md", "docs/security.md"):
        text = (ROOT / doc).read_text()
        assert f"tritonserver:{release}-py3" in text or f"Triton {release}" in text, doc
    text = serving.read_text()
    cmd = [line for line in text.splitlines() if line.startswith("CMD")]
    assert len(cmd) == 1
    for flag in ("python3 -m flux2_serving.server.serve", "--model-repository=/models",
                 "--disable-auto-complete-config", "--cuda-memory-pool-byte-size=0:${CUDA_POOL_BYTES}"):
        assert flag in cmd[0]
    assert re.search(r"^(ARG|ENV) CUDA_POOL_BYTES=\d+$", text, flags=re.MULTILINE)  # the plan's value: test_envelope
    assert re.search(r"^EXPOSE 8000 8001 8002$", text, flags=re.MULTILINE)
    build = ["python3", "-m", "flux2_serving.export.build_engines", "--onnx-dir", "/work/onnx",
             "--out", "/work/engines"]
    assert f"ENTRYPOINT {json.dumps(build)}" in engines.read_text()
    for path in (serving, engines):
        assert "not built or run yet" in path.read_text().lower()


def test_serving_requirements_match_the_toolchain_pins():
    serving, toolchain = _pins(DOCKER / "requirements-serving.txt"), _pins(ROOT / "requirements.txt")
    for name in ("torch", "diffusers", "transformers", "accelerate", "safetensors", "pillow", "numpy", "aiohttp",
                 "grpcio"):
        assert serving[name] == toolchain[name], name
    assert serving["numpy"].startswith("==1.")  # numpy < 2: the Python backend's BLS tensors
    assert "--index-url" not in (DOCKER / "requirements-serving.txt").read_text()  # torch with CUDA, not the CPU index


def test_the_serving_image_cannot_hit_debian_s_setuptools():
    """torch requires setuptools newer than the image's Debian package, which pip cannot uninstall: the Dockerfile
    installs the pinned one --ignore-installed before the requirements, and the pin satisfies torch's metadata."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    dockerfile = (DOCKER / "serving.Dockerfile").read_text()
    installs = re.findall(r"python3 -m pip install [^\n&]+", dockerfile)
    assert "--ignore-installed" in installs[0] and "setuptools==" in installs[0], installs
    assert "-r /opt/flux2/requirements-serving.txt" in installs[1], installs
    pinned = _pins(DOCKER / "requirements-serving.txt")["setuptools"]
    assert pinned.startswith("==")
    needed = [Requirement(r) for r in requires("torch") if r.startswith("setuptools")]
    assert needed and all(pinned[2:] in r.specifier for r in needed), needed


class BuiltEngine:
    """Stand-in for a deserialized tensorrt.ICudaEngine: the properties engine_record reads."""

    device_memory_size_v2 = 3 * 2**30
    streamable_weights_size = 0
    num_optimization_profiles = 1


def test_build_record_feeds_the_memory_plan(tmp_path):
    """build_engines records each engine's context memory next to the plans; the memory plan uses it
    instead of its estimate, and says which is which."""
    record = engine_record(BuiltEngine(), tmp_path / "vae_decoder.trt10.13.0.sm90.plan", 170 * 2**20, "10.13.0", "90")
    assert record["device_memory_bytes"] == 3 * 2**30 and record["plan"] == "vae_decoder.trt10.13.0.sm90.plan"
    update_record(tmp_path, "vae_decoder", record)
    update_record(tmp_path, "vae_encoder", {**record, "device_memory_bytes": 2**30})
    assert set(json.loads((tmp_path / RECORD).read_text())) == {"vae_decoder", "vae_encoder"}
    size = memory_plan.ModelSize(TINY_DIMS, dict.fromkeys(["text_encoder", "vae_encoder", "transformer_prefill",
                                                           "transformer_cached", "vae_decoder"], 1000), 96, 64, 32)
    rows = memory_plan.plan(size, "bf16", replace(DEFAULT_ENVELOPE, reference_cache_bytes=0), 1,
                            built=memory_plan.built_records(tmp_path))
    activations = {who: (what, b) for what, who, b in rows if what.startswith("activations")}
    assert activations["vae_decoder"] == ("activations (built engine)", 3 * 2**30)
    # The VAE encoder has two profiles (landscape, portrait): Triton makes a context for each.
    assert activations["vae_encoder"] == ("activations (built engine)", 2 * 2**30)
    assert activations["text_encoder"][0] == "activations (estimate)"
