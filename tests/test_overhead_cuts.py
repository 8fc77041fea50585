"""What keeps the per-request cost outside the components down, checked without a server: the
supervisor's cheap look at the process table (flux2_serving/server/supervisor.py) and the malloc
thresholds of the gate and the Python-backend models (flux2_serving/contract/heap.py). The served
effect is measured by bench.overhead (BENCHMARKS.md)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from types import SimpleNamespace

from flux2_serving.server import supervisor
from flux2_serving.server.launch import process_state, process_table
from flux2_serving.server.supervisor import FULL_SCAN_S, NEW_REGION_S, REGION_PREFIX, Supervisor, stub_states


def test_process_state_is_the_process_table_row():
    table = process_table()
    assert process_state(os.getpid()) == table[os.getpid()]
    assert process_state(os.getppid())[1] == table[os.getppid()][1]
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: gone
    assert process_state(child.pid) is None
    assert stub_states([os.getpid(), child.pid]) == {os.getpid(): table[os.getpid()]}


def test_the_whole_table_is_read_only_for_a_new_region_or_every_full_scan_s(tmp_path, monkeypatch):
    monkeypatch.setattr(supervisor, "SHM", tmp_path)
    watcher = Supervisor(SimpleNamespace(process=SimpleNamespace(pid=os.getpid())))  # writes no ledger here
    now = 1000.0
    watcher._last_full_scan = now
    assert not watcher._scan_due(now)  # nothing new: the known stubs' stat only
    (tmp_path / "unrelated").touch()
    assert not watcher._scan_due(now + 0.5)

    (tmp_path / f"{REGION_PREFIX}ours").touch()  # a stub starting
    assert watcher._scan_due(now + 1)
    assert watcher._scan_due(now + 1.5)  # its process not seen yet: again
    watcher.ledger.regions.add(f"{REGION_PREFIX}ours")  # what _scan records once it sees the stub
    assert not watcher._scan_due(now + 2)

    (tmp_path / f"{REGION_PREFIX}another_server").touch()  # no stub of ours will name it
    assert watcher._scan_due(now + 2.5)
    assert watcher._scan_due(now + 2.5 + NEW_REGION_S)
    assert not watcher._scan_due(now + 3 + NEW_REGION_S)  # given up on: another server's
    assert not watcher._scan_due(now + 4 + NEW_REGION_S)

    assert watcher._scan_due(now + FULL_SCAN_S)  # whatever /dev/shm says

    monkeypatch.setattr(supervisor, "SHM", tmp_path / "missing")
    watcher._last_full_scan = now
    assert watcher._scan_due(now)  # cannot list /dev/shm: the whole table every time


def test_malloc_thresholds_are_set_where_there_is_glibc():
    """In a process of its own (it changes that process's malloc for good); elsewhere it only says False."""
    code = ("from flux2_serving.contract.heap import keep_freed_memory\n"
            "raise SystemExit(0 if keep_freed_memory() else 1)")
    status = subprocess.run([sys.executable, "-c", code]).returncode
    assert status == (0 if platform.libc_ver()[0] == "glibc" else 1)
