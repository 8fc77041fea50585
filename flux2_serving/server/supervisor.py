"""Self-repair of a tritonserver that flux2_serving.server.launch started: from the process table, not by probing.

The launcher is tritonserver's parent, and every Python-backend process (a "stub": one per model
instance) is tritonserver's child, with its model file, its /dev/shm region and its instance name
(<model>_<group>_<index>) in its argv. Every POLL_S seconds, on by default (`--no-repair` turns it off),
it reads the state of the stubs it knows; the whole process table only when a Python-backend region
it does not know appears in /dev/shm (a new stub: each one gets a region of its own), and every
FULL_SCAN_S regardless (reading every process's stat took 4.5 ms of CPU with 100 processes, 9 ms per
second at every poll, in the launcher's process, which is the client's in a benchmark or a test):

  - a stub that died (killed, crashed) stays a zombie child of tritonserver: Triton 2.51 reaps a
    stub only when it unloads its model, and until then routes requests to it, which fail with
    "Stub process '<instance>' is not healthy" forever (python_backend r24.06 dropped the restart of
    an unhealthy stub; r24.10, which 2.51 ships, has none). Its model is loaded again through the
    repository API with the current config and one parameter changed (REPAIR_PARAMETER): Triton then
    loads a new version while the old one serves, and swaps (model_lifecycle.cc: "the re-load of the
    version should be performed in background to avoid version downtime"); a plain load of an
    unchanged model does nothing, and unloading first leaves a NOT_FOUND window. Measured on 2.51
    here (BENCHMARKS.md, "Self-repair after kill -9");
  - 2.51 never finishes unloading an old version whose dead stub answered a request (each such
    failed request leaks a response factory that holds the model), so that version's live stubs (the
    BLS's other instance: ~460 MB) would stay until the server stops: once the new version serves,
    each of them is killed as soon as it has been idle for RETIRE_QUIET_S (CPU time), at most
    RETIRE_MAX_S after the swap. They stay zombies (no memory) until tritonserver exits;
  - tritonserver itself exited (a crash): its process group is killed (its stubs outlive it as
    orphans, which ignore SIGTERM), its /dev/shm regions are swept, and it is started again on the
    same ports, at most MAX_RESTARTS times in RESTART_WINDOW_S; one line each.

/dev/shm: each stub's region (triton_python_backend_shm_region_<uuid>) is recorded, as the stubs
are seen, in a ledger file per server (build/tritonserver/shm/<pid>.json). The launcher sweeps a
server's regions when it stops it (a stop after a repair leaves the old version's) and, at its
next start, those of any server whose ledger names a process that is gone (a launcher killed -9):
only regions that server's own stubs named, never another server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from flux2_serving import CHECKOUT
from flux2_serving.server.launch import (
    LaunchError,
    ServerExited,
    _reachable,
    group_members,
    kill_group,
    live_processes,
    process_state,
    process_table,
)
from flux2_serving.server.watchdog import reload_without_gap

POLL_S = 0.5  # a dead stub is seen within this, plus ZOMBIE_CONFIRM_S and one /proc scan
ZOMBIE_CONFIRM_S = 0.2
FULL_SCAN_S = 10.0  # the whole process table at least this often, whatever /dev/shm says
NEW_REGION_S = 5.0  # a region no stub of this server names after this long is another server's
RETIRE_QUIET_S = 3.0  # an old stub idle this long after the swap is killed ...
RETIRE_MIN_S = 3.0  # ... but not before this (Triton unloads an old version it can release itself at once)
RETIRE_MAX_S = 300.0  # ... and at the latest this long after the swap, idle or not
QUIET_TICKS = 2  # CPU clock ticks (10 ms) an idle stub may use in RETIRE_QUIET_S (its health thread)
REPAIR_ATTEMPTS = 3  # loads tried 2 s apart per round ...
REPAIR_ROUNDS = 10  # ... rounds REPAIR_BACKOFF_S apart
REPAIR_BACKOFF_S = 30.0
MAX_RESTARTS = 3  # tritonserver started again at most this often ...
RESTART_WINDOW_S = 600.0  # ... within this many seconds; then the launcher gives up and exits
LEDGERS = CHECKOUT / "build" / "tritonserver" / "shm"
SHM = Path("/dev/shm")
REGION_PREFIX = "triton_python_backend_shm_region_"
STUB_BINARY = b"triton_python_backend_stub"


def log(message: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}.{int(time.time() * 1000) % 1000:03d}] {message}", flush=True)


@dataclass(frozen=True)
class Stub:
    """A Python-backend process, from its argv: stub, model file, shm region, sizes, parent pid,
    library dir, IPC handle, instance name, model dir."""
    pid: int
    model: str
    instance: str
    region: str
    server: int  # the tritonserver pid it was started by (argv, so an orphan still names it)


def read_stub(pid: int) -> Stub | None:
    """The Stub of process `pid`, or None if it is not a (live) Python-backend stub."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if argv and argv[-1] == b"":
        argv = argv[:-1]
    if len(argv) < 9 or not argv[0].endswith(STUB_BINARY):
        return None
    try:
        model_file = Path(argv[1].decode())
        return Stub(pid, model_file.parent.parent.name, argv[8].decode(), argv[2].decode(), int(argv[5]))
    except (UnicodeDecodeError, ValueError):
        return None


def stub_states(pids) -> dict[int, tuple[str, int, int]]:
    """{pid: (state, parent pid, process group)} of those of `pids` that exist (zombies included): the
    rows of launch.process_table() for these processes alone."""
    states = {}
    for pid in pids:
        state = process_state(pid)
        if state is not None:
            states[pid] = state
    return states


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of `pid` in clock ticks; None if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def start_time(pid: int) -> int | None:
    """When the live process `pid` started (clock ticks since boot): with the pid, it names one process
    for good. None for no process or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return None if fields[0] == "Z" else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def describe_exit(status: int | None) -> str:
    if status is not None and status < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-status).name}"
    return f"exited with status {status}"


# ---------------------------------------------------------------------------------------------- /dev/shm

class Ledger:
    """The /dev/shm regions of one tritonserver, as its stubs name them, kept in a file so that the
    next start can sweep them if this launcher cannot (killed -9)."""

    def __init__(self, server_pid: int, directory: Path = LEDGERS):
        self.pid, self.started = server_pid, start_time(server_pid)
        self.path = Path(directory) / f"{server_pid}.json"
        self.regions: set[str] = set()
        self.unwritable = False

    def add(self, regions) -> None:
        new = set(regions) - self.regions
        if not new:
            return
        self.regions |= new
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            temporary = self.path.with_suffix(".tmp")
            temporary.write_text(json.dumps({"pid": self.pid, "started": self.started,
                                             "regions": sorted(self.regions)}))
            temporary.replace(self.path)
        except OSError as exc:  # a read-only checkout: this launcher still sweeps them, the next start cannot
            if not self.unwritable:
                log(f"cannot write {self.path} ({exc}): a launcher killed -9 would leave this server's /dev/shm "
                    "regions")
            self.unwritable = True

    def sweep(self) -> int:
        """Remove this server's regions that are still there (the server is gone); the ledger too."""
        swept = remove_regions(self.regions)
        with contextlib.suppress(OSError):
            self.path.unlink()
        return swept


def remove_regions(names) -> int:
    swept = 0
    for name in names:
        if "/" in name or not name:
            continue
        with contextlib.suppress(FileNotFoundError):
            (SHM / name).unlink()
            swept += 1
    return swept


def sweep_dead_servers(directory: Path = LEDGERS) -> int:
    """At a launcher's start: for every ledger whose tritonserver is gone (its pid is free or another
    process's now), kill that server's orphaned stubs (their argv names it) and remove its regions.
    Ledgers of live servers are left alone. Returns the number of regions removed."""
    total = 0
    for path in sorted(Path(directory).glob("*.json")):
        try:
            ledger = json.loads(path.read_text())
            pid, started, regions = int(ledger["pid"]), ledger.get("started"), set(ledger["regions"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if started is not None and start_time(pid) == started:
            continue  # that server runs
        orphans = [stub.pid for stub in map(read_stub, process_table()) if stub and stub.server == pid
                   and stub.region in regions]
        for orphan in orphans:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(orphan, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while orphans and time.monotonic() < deadline and live_processes(orphans):
            time.sleep(0.05)
        swept = remove_regions(regions)
        with contextlib.suppress(OSError):
            path.unlink()
        total += swept
        if swept or orphans:
            log(f"swept {swept} /dev/shm regions and {len(orphans)} orphaned Python-backend processes of tritonserver "
                f"pid {pid}, which died without its launcher")
    return total


# ---------------------------------------------------------------------------------------------- the supervisor

class Supervisor:
    """Watches `server` (a launch.Running) from the process table and repairs it. `enabled` False
    (--no-repair): only records and sweeps /dev/shm regions; nothing is reloaded or restarted."""

    def __init__(self, server, enabled: bool = True, poll_s: float = POLL_S):
        self.server, self.enabled, self.poll_s = server, enabled, poll_s
        self.gave_up = threading.Event()  # set when tritonserver died and is not started again
        self.events: list[tuple[float, str, str]] = []  # (time.time(), kind, detail): what it did
        self._closing = threading.Event()
        self._lock = threading.RLock()  # one restart at a time (the thread, Running.restart)
        self._stubs: dict[int, Stub] = {}  # live or dead-but-unreaped stubs of the current server
        self._dead: set[int] = set()  # stubs seen dead (zombies)
        self._killed: set[int] = set()  # stubs this supervisor killed (retired)
        self._repairing: dict[str, set[int]] = {}  # model -> the stubs its running repair replaces
        self._pending: set[str] = set()  # models to repair again once their running repair ends
        self._retiring: dict[int, tuple[float, list[tuple[float, int]]]] = {}  # pid -> (swapped at, cpu samples)
        self._restarts: list[float] = []
        self._buried: set[int] = set()  # tritonserver pids whose group was killed and regions swept
        self._generation = 0
        self._thread = None
        self.ledger = Ledger(server.process.pid)
        self._last_full_scan = -float("inf")  # time.monotonic() of the last whole-table scan
        self._new_regions: dict[str, float] = {}  # region no stub of ours names yet -> first seen
        self._foreign_regions: set[str] = set()  # regions other servers' stubs hold (or unclaimed ones)

    # ------------------------------------------------------------------ life cycle

    def start(self) -> Supervisor:
        self._scan()
        self._thread = threading.Thread(target=self._run, name="flux2-supervisor", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 60) -> None:
        """Stop watching, before the server is stopped. A start in progress (a restart) is cut short:
        the tritonserver it is starting is killed, so that it returns."""
        self._closing.set()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self._thread.is_alive() and time.monotonic() < deadline:
            for pid in self._starting():
                kill_group(pid)
            self._thread.join(0.5)
        if self._holds_old_versions():
            threading.Thread(target=self._hasten_stop, args=(self.server.process,), daemon=True).start()

    def _holds_old_versions(self) -> bool:
        """Whether tritonserver holds an old version it will never unload: a stub that died, whose model
        was repaired, is still its zombie child."""
        table = process_table()
        return any(table.get(pid, ("gone",))[0] == "Z" for pid in self._dead)

    def _hasten_stop(self, process) -> None:
        """While the server stops: once every stub has ended (its models unloaded, so the requests in
        flight were answered), tritonserver only waits out its exit timeout for the old versions 2.51
        never unloads; end it then, after a moment for the last answers to leave."""
        while process.poll() is None:
            if not [pid for pid in group_members(process.pid) if pid != process.pid]:
                time.sleep(0.5)
                if process.poll() is None:
                    log("every model is unloaded but the old versions tritonserver 2.51 never releases: ending it")
                    kill_group(process.pid)
                return
            time.sleep(0.1)

    def sweep(self) -> int:
        """After the server stopped: its regions still in /dev/shm (a stop leaves those of the versions
        2.51 never unloads); logged when there were any."""
        with self._lock:
            self._record_group(self.server.process.pid)
            swept = self.ledger.sweep()
        if swept:
            log(f"swept {swept} /dev/shm regions tritonserver left behind")
        return swept

    def _starting(self) -> list[int]:
        """tritonserver processes this launcher is starting for this server (its HTTP port in their
        argv; other servers of this process, e.g. replicas in a test, have other ports)."""
        me, current = os.getpid(), self.server.process.pid
        port = f"--http-port={self.server.tritonserver_ports()[0]}".encode()
        starting = []
        for pid, (state, ppid, _) in process_table().items():
            if ppid == me and pid != current and state != "Z":
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                    if argv[0].endswith(b"/tritonserver") and port in argv:
                        starting.append(pid)
        return starting

    def _run(self) -> None:
        while not self._closing.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # a supervisor that dies repairs nothing: log and keep watching
                log(f"unexpected error, watching on:\n{traceback.format_exc()}")

    def _note(self, kind: str, detail: str) -> None:
        self.events.append((time.time(), kind, detail))
        log(detail)

    # ------------------------------------------------------------------ one look at the process table

    def tick(self) -> None:
        process = self.server.process
        if process.poll() is not None:
            if process.pid not in self._buried:
                self._server_died(process)
            elif self.enabled and not self.gave_up.is_set():
                self._restart_after_death()  # an earlier start failed: try again (bounded)
            return
        with self._lock:
            self._look()

    def _look(self) -> None:
        now = time.monotonic()
        table = self._scan() if self._scan_due(now) else stub_states(self._stubs)
        fresh = []  # stubs seen as zombies for the first time
        for pid in list(self._stubs):
            state = table.get(pid, ("gone",))[0]
            if state == "gone":  # reaped: Triton ended it (an unload), not a death
                del self._stubs[pid]
                self._dead.discard(pid)
                continue
            if state == "Z" and pid not in self._dead:
                if pid in self._killed:
                    self._dead.add(pid)
                else:
                    fresh.append(pid)
        if fresh:  # Triton reaps a stub it ends at once: a zombie that stays a moment died on its own
            time.sleep(ZOMBIE_CONFIRM_S)
            table = stub_states(fresh)
        for pid in fresh:
            if table.get(pid, ("gone",))[0] != "Z":
                continue  # reaped meanwhile: Triton ended it; the next look forgets it
            stub = self._stubs[pid]
            self._dead.add(pid)
            self._note("stub died", f"{stub.instance} (pid {pid}, model {stub.model}) died"
                       + ("" if self.enabled else "; --no-repair: not repairing it"))
            if self.enabled:
                self._repair_async(stub.model, pid)
        self._retire(now)

    def _scan_due(self, now: float) -> bool:
        """Whether this look reads the whole process table: FULL_SCAN_S passed, or /dev/shm holds a
        Python-backend region that no stub of this server was seen to name (a stub starting; tritonserver
        makes its region just before it), until a stub names it or NEW_REGION_S passed (another
        server's). Always, if /dev/shm cannot be listed."""
        if now - self._last_full_scan >= FULL_SCAN_S:
            return True
        try:
            regions = {name for name in os.listdir(SHM) if name.startswith(REGION_PREFIX)}
        except OSError:
            return True
        known = self.ledger.regions
        self._new_regions = {name: self._new_regions.get(name, now) for name in regions
                             if name not in known and name not in self._foreign_regions}
        self._foreign_regions &= regions  # forget the ones removed
        for name, seen in list(self._new_regions.items()):
            if now - seen > NEW_REGION_S:
                self._foreign_regions.add(name)
                del self._new_regions[name]
        return bool(self._new_regions)

    def _scan(self) -> dict:
        """Read the process table; record the current server's new stubs (and their regions)."""
        self._last_full_scan = time.monotonic()
        table = process_table()
        server = self.server.process.pid
        for pid, (state, ppid, _) in table.items():
            if ppid == server and pid not in self._stubs and state != "Z":
                stub = read_stub(pid)
                if stub is not None:
                    self._stubs[pid] = stub
                    self.ledger.add([stub.region])
        return table

    def _record_group(self, pgid: int) -> int:
        """Record the regions named by live processes of process group `pgid` (orphaned stubs
        included); returns how many processes are in it."""
        members = group_members(pgid)
        self.ledger.add(stub.region for stub in map(read_stub, members) if stub)
        return len(members)

    # ------------------------------------------------------------------ a dead stub

    def _repair_async(self, model: str, dead_pid: int) -> None:
        with self._lock:
            if model in self._repairing:
                if dead_pid not in self._repairing[model]:  # not one the running repair replaces
                    self._pending.add(model)
                return
            self._repairing[model] = {pid for pid, stub in self._stubs.items() if stub.model == model}
        threading.Thread(target=self._repair_loop, args=(model,), name=f"flux2-repair-{model}", daemon=True).start()

    def _repair_loop(self, model: str) -> None:
        rounds = 0
        try:
            while not self._closing.is_set():
                rounds += 1
                if not self.reload_model(model, replaces=self._repairing[model]):
                    if rounds >= REPAIR_ROUNDS:
                        self._note("gave up", f"{model}: not repaired in {REPAIR_ROUNDS} rounds; restart the server")
                        return
                    self._closing.wait(REPAIR_BACKOFF_S)  # e.g. a load that fails for want of memory
                    continue
                with self._lock:
                    if model not in self._pending:
                        return
                    self._pending.discard(model)
                    self._repairing[model] = {pid for pid, stub in self._stubs.items() if stub.model == model}
        finally:
            with self._lock:
                self._repairing.pop(model, None)

    def reload_model(self, model: str, replaces: set[int] | None = None) -> bool:
        """Load `model` again without unloading it (Triton serves the old version until the new one is
        ready), then retire the old version's live processes. Also the probing watchdog's repair, when
        it runs in the launcher. Returns whether the new version serves."""
        with self._lock:
            old = set(replaces) if replaces is not None else {p for p, s in self._stubs.items() if s.model == model}
        started = time.monotonic()
        for attempt in range(1, REPAIR_ATTEMPTS + 1):
            if self._closing.is_set():
                return False
            self._generation += 1
            try:
                generation = f"{os.getpid()}.{self._generation}"
                reload_without_gap(self.triton_http(), model, self.server.admin_key, generation)
                break
            except (RuntimeError, OSError, ValueError) as exc:
                log(f"reloading {model} failed (attempt {attempt} of {REPAIR_ATTEMPTS}): {exc}")
                if attempt == REPAIR_ATTEMPTS:
                    self._note("repair failed", f"{model}: not repaired after {REPAIR_ATTEMPTS} attempts")
                    return False
                self._closing.wait(2.0)
        swapped = time.monotonic()
        with self._lock:
            live = [pid for pid in old if pid not in self._dead and pid in self._stubs]
            for pid in live:
                self._retiring[pid] = (swapped, [])
        self._note("reloaded", f"{model} reloaded in {swapped - started:.1f} s without unloading it (the old version "
                               f"served meanwhile); {len(live)} live process(es) of the old version to retire")
        return True

    def _retire(self, now: float) -> None:
        """Kill the old version's processes once idle (RETIRE_QUIET_S), at the latest RETIRE_MAX_S after the swap."""
        for pid, (swapped, samples) in list(self._retiring.items()):
            ticks = cpu_ticks(pid)
            if ticks is None or pid in self._dead or pid not in self._stubs:  # Triton ended it after all
                del self._retiring[pid]
                continue
            samples.append((now, ticks))
            while samples and samples[0][0] < now - RETIRE_QUIET_S:
                samples.pop(0)
            waited = now - swapped
            quiet = waited >= RETIRE_MIN_S + RETIRE_QUIET_S and samples[-1][1] - samples[0][1] <= QUIET_TICKS
            if quiet or waited >= RETIRE_MAX_S:
                stub = self._stubs[pid]
                self._killed.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                del self._retiring[pid]
                self._note("retired", f"killed {stub.instance} (pid {pid}) of the old {stub.model} version, "
                                      f"{'idle' if quiet else 'still busy'} {waited:.1f} s after the new one took over")

    def triton_http(self) -> str:
        """tritonserver's own HTTP address (behind the gate: its loopback port), for the repository API."""
        server = self.server
        host = "127.0.0.1" if getattr(server, "upstream", None) else _reachable(getattr(server, "address", "127.0.0.1"))
        return f"{host}:{server.tritonserver_ports()[0]}"

    # ------------------------------------------------------------------ tritonserver died

    def _bury(self, process) -> tuple[int, int]:
        """Kill what is left of `process`'s group (orphaned stubs) and sweep its regions:
        (processes killed, regions swept). Once per process."""
        if process.pid in self._buried:
            return 0, 0
        left = self._record_group(process.pid)
        kill_group(process.pid)
        deadline = time.monotonic() + 5
        while group_members(process.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        swept = self.ledger.sweep()
        self._buried.add(process.pid)
        return left, swept

    def _server_died(self, process) -> None:
        with self._lock:
            left, swept = self._bury(process)
        self._note("server died", f"tritonserver (pid {process.pid}) {describe_exit(process.returncode)}; killed the "
                                  f"{left} processes left in its group, swept {swept} /dev/shm regions")
        if not self.enabled:
            self.gave_up.set()
            return
        self._restart_after_death()

    def _restart_after_death(self) -> None:
        if self.server.process.poll() is None:
            return  # started again meanwhile (Running.restart)
        now = time.monotonic()
        self._restarts = [t for t in self._restarts if t > now - RESTART_WINDOW_S]
        if len(self._restarts) >= MAX_RESTARTS:
            self._note("gave up", f"tritonserver died {len(self._restarts) + 1} times within "
                                  f"{RESTART_WINDOW_S / 60:.0f} min: not starting it again")
            self.gave_up.set()
            return
        self._restarts.append(now)
        log(f"starting tritonserver again on the same ports (restart {len(self._restarts)} of at most "
            f"{MAX_RESTARTS} in {RESTART_WINDOW_S / 60:.0f} min)")
        try:
            if self.restart():
                self._note("restarted", f"tritonserver ready again (pid {self.server.process.pid}) "
                                        f"{time.monotonic() - now:.1f} s after it died was seen")
        except (ServerExited, TimeoutError, LaunchError, OSError) as exc:
            log(f"starting tritonserver again failed: {exc}")

    def restart(self) -> bool:
        """Start tritonserver again on the same ports, after its group is killed and its regions
        swept, unless it runs (then nothing: Running.restart() after a kill the supervisor has already
        answered). One start at a time. Returns whether it started one."""
        with self._lock:
            process = self.server.process
            if process.poll() is None or self._closing.is_set():
                return False
            self._bury(process)
            self.server.start_again()
            self._adopt()
            return True

    def _adopt(self) -> None:
        """Watch the server's new tritonserver from scratch."""
        self._stubs.clear()
        self._dead.clear()
        self._killed.clear()
        self._retiring.clear()
        self.ledger = Ledger(self.server.process.pid)
        self._scan()
