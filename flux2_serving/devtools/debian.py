"""System tools and libraries these machines lack, set up without root: Debian packages unpacked
(`apt-get download` + `dpkg -x`), each step failing with one line (ToolError)."""

from __future__ import annotations

import os
import subprocess
import tempfile
from pathlib import Path


class ToolError(RuntimeError):
    """One step failed; the message is the one line shown to the user."""


class PackageUnavailable(ToolError):
    """`apt-get download` could not fetch a Debian package (no repository or network here)."""


def glibc_version() -> tuple[int, int]:
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION") or ""  # "glibc 2.36"
        major, minor = text.split()[1].split(".")[:2]
        return int(major), int(minor)
    except (ValueError, IndexError, OSError, AttributeError):
        return (0, 0)  # not glibc (or unknown): the pypi wheel will not run either


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def run_step(cmd: list[str], what: str, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one step of a tool's setup; its failure is a ToolError with one line naming `what`."""
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ToolError(f"{what}: {exc.filename} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise ToolError(f"{what}: no answer after {timeout:.0f} s") from exc
    if result.returncode != 0:
        raise ToolError(f"{what} failed (status {result.returncode}): "
                             f"{last_line(result.stderr) if result.stderr.strip() else last_line(result.stdout)}")
    return result


def unpack_debian_package(package: str, target: Path) -> Path:
    """Debian's `package` unpacked into `target` without installing it (`apt-get download` + `dpkg -x`,
    no root needed; as root, the package lists are fetched first if a fresh container has none)."""
    with tempfile.TemporaryDirectory(prefix="debian_package_") as scratch:
        debs = Path(scratch)
        try:
            try:
                run_step(["apt-get", "download", package], f"apt-get download {package}", cwd=debs)
            except ToolError:
                if os.geteuid() != 0:
                    raise
                run_step(["apt-get", "update", "-qq"], "apt-get update")  # fresh containers ship without package lists
                run_step(["apt-get", "download", package], f"apt-get download {package}", cwd=debs)
        except ToolError as exc:
            raise PackageUnavailable(str(exc)) from None
        packages = sorted(debs.glob("*.deb"))
        if not packages:
            raise PackageUnavailable(f"apt-get download {package} wrote no .deb")
        target.mkdir(parents=True, exist_ok=True)  # dpkg -x creates the last folder only
        run_step(["dpkg", "-x", str(packages[0]), str(target)], f"dpkg -x {packages[0].name}")
    return target
