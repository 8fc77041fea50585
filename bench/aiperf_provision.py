"""python -m bench.aiperf_provision: put NVIDIA's AIPerf in a venv of its own, build/tools/aiperf-venv (idempotent).

AIPerf (PyPI `aiperf`) pins packages the project pins otherwise (Pillow ~=12.3 against our 13.0,
pandas, dash, ...), so it cannot share .venv: it gets its own virtual environment, made with the
machine's `python3 -m venv` (AIPerf 0.13 needs Python 3.11-3.13), and `pip install aiperf==VERSION`
in it. DIR/bin/aiperf is then the command bench.front runs. A venv that already answers
`aiperf --version` with the pinned version is left as it is; --force makes it again.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.devtools.debian import ToolError, run_step

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DIR = ROOT / "build" / "tools" / "aiperf-venv"
VERSION = "0.13.0"
PACKAGE = f"aiperf=={VERSION}"
PYTHON_RANGE = ((3, 11), (3, 14))  # aiperf 0.13.0: Requires-Python >=3.11,<3.14


def executable(directory=DEFAULT_DIR) -> Path:
    return Path(directory) / "bin" / "aiperf"


def version(directory=DEFAULT_DIR) -> str | None:
    """The installed aiperf's version (from the venv's package metadata), None if there is no working one."""
    python = Path(directory) / "bin" / "python"
    if not python.exists() or not executable(directory).exists():
        return None
    try:
        result = subprocess.run([str(python), "-c", "import importlib.metadata as m; print(m.version('aiperf'))"],
                                capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip() or None


def _python_version(python: str) -> tuple[int, int]:
    result = run_step([python, "-c", "import sys; print(*sys.version_info[:2])"], f"{python} --version")
    major, minor = result.stdout.split()
    return int(major), int(minor)


def provision(directory=DEFAULT_DIR, python: str = "python3", force: bool = False, log=print) -> Path:
    """Return DIR/bin/aiperf, making the venv and installing aiperf==VERSION unless it is there already.
    Raises ToolError (one line) when a step fails."""
    directory = Path(directory).resolve()
    found = None if force else version(directory)
    if found == VERSION:
        log(f"aiperf {found} already provisioned: {executable(directory)}")
        return executable(directory)
    if found:
        log(f"aiperf {found} in {directory}, not {VERSION}: making the venv again")
    found_python = shutil.which(python) or python
    major_minor = _python_version(found_python)
    low, high = PYTHON_RANGE
    if not low <= major_minor < high:
        raise ToolError(f"{found_python} is Python {major_minor[0]}.{major_minor[1]}; {PACKAGE} needs "
                        f"{low[0]}.{low[1]} to below {high[0]}.{high[1]} (pass --python)")
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    log(f"creating {directory} with {found_python} -m venv (Python {major_minor[0]}.{major_minor[1]}) ...")
    run_step([found_python, "-m", "venv", str(directory)], f"{found_python} -m venv {directory}")
    pip = [str(directory / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    log("upgrading pip in it ...")
    run_step([*pip, "install", "--quiet", "--upgrade", "pip"], "pip install --upgrade pip", timeout=600)
    log(f"pip install {PACKAGE} (a few hundred MiB of dependencies; minutes) ...")
    run_step([*pip, "install", "--quiet", "--only-binary=:all:", PACKAGE], f"pip install {PACKAGE}", timeout=3600)
    found = version(directory)
    if found != VERSION:
        raise ToolError(f"after pip install {PACKAGE}, {executable(directory)} reports version {found!r}")
    log(f"aiperf {found} ready: {executable(directory)}")
    return executable(directory)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.aiperf_provision", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    parser.add_argument("--dir", default=None,
                        help=f"the venv to make (default: {DEFAULT_DIR.relative_to(ROOT)} of the repository)")
    parser.add_argument("--python", default="python3", help="the interpreter that makes the venv (3.11-3.13)")
    parser.add_argument("--force", action="store_true", help="make the venv again even if a working one is there")
    args = parser.parse_args(argv)
    try:
        provision(args.dir or DEFAULT_DIR, args.python, args.force)
    except ToolError as exc:
        print(f"error: aiperf provisioning: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
