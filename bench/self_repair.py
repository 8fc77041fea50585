"""python -m bench.self_repair: kill -9 of a BLS process, of a component's process and of tritonserver
itself under a request stream, on the default serve command (python -m flux2_serving.server.launch:
the supervisor of flux2_serving/server/supervisor.py on).

The launcher runs as a user runs it, in a process group of its own, on the tiny model with 2 BLS
instances. Two gRPC clients send text-to-image requests (256x256, 1 step) back to back, through the
launcher's public ports; a failed one waits 0.1 s before the next. Per kill: when the supervisor saw
it, the first good answer to a request sent after the kill, when the repair was done, the failures
(their kinds, whether Flux2Error.retryable says each can be sent again, NOT_FOUND answers), and the
processes of the old version (or of the dead server) and its /dev/shm regions left afterwards; then
how long the launcher's stop takes. Numbers, no pass/fail (tests/test_self_repair.py checks them).

    python -m bench.self_repair         # writes the "Self-repair after kill -9" section of BENCHMARKS.md
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish
from flux2_serving.clients.api import Flux2Client, Flux2Error
from flux2_serving.server.launch import EXIT_TIMEOUT_S, STOP_TIMEOUT_S, free_ports, live_processes, process_table
from flux2_serving.server.supervisor import SHM, read_stub
from flux2_serving.serving.repository import assemble

NOT_FOUND_MARKS = ("NOT_FOUND", "has no available versions", "unknown model", "is not found")
SIDE, STEPS, CLIENTS = 256, 1, 2


# ---------------------------------------------------------------------------------------------- the launcher

class Launcher:
    """`python -m flux2_serving.server.launch` in a process group of its own; its output lines are
    kept with the time each was read (time.time())."""

    def __init__(self, repository: Path, log_file: Path, *extra: str):
        self.ports = free_ports()
        self.log_file = log_file
        self.lines: list[tuple[float, str]] = []
        self.regions: set[str] = set()  # every /dev/shm region its tritonservers' stubs named (sampled)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flux2_serving.server.launch", "--repository", str(repository),
             "--http-port", str(self.ports["http"]), "--grpc-port", str(self.ports["grpc"]),
             "--metrics-port", str(self.ports["metrics"]), "--log-file", str(log_file), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        threading.Thread(target=self._read, daemon=True).start()
        if self.wait_line("tritonserver ready", 0, 600) is None:
            self.stop()
            raise RuntimeError("the launcher did not get ready:\n" + "\n".join(self.said()))
        threading.Thread(target=self._sample, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append((time.time(), line.rstrip()))

    def _sample(self) -> None:
        while self.process.poll() is None:
            with contextlib.suppress(RuntimeError):
                self.regions |= {stub.region for stub in stubs_of(self.server_pid())}
            time.sleep(0.5)

    @property
    def grpc(self) -> str:
        return f"127.0.0.1:{self.ports['grpc']}"

    def wait_line(self, pattern: str, since: float, timeout: float) -> tuple[float, str] | None:
        """The first output line matching the regular expression `pattern` read after `since`; None after
        `timeout` s or once the launcher exited."""
        deadline, exited = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            for when, line in list(self.lines):
                if when >= since and re.search(pattern, line):
                    return when, line
            if self.process.poll() is not None:
                exited = exited or time.monotonic()
                if time.monotonic() - exited > 1:  # what it said last has been read
                    return None
            time.sleep(0.1)
        return None

    def said(self, since: float = 0) -> list[str]:
        return [line for when, line in self.lines if when >= since]

    def server_pid(self) -> int:
        """The tritonserver this launcher runs now."""
        for pid, (state, ppid, _) in process_table().items():
            if ppid == self.process.pid and state != "Z":
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].endswith(b"/tritonserver"):
                        return pid
        raise RuntimeError("the launcher runs no tritonserver")

    def children(self) -> list[int]:
        return [pid for pid, (state, ppid, _) in process_table().items() if ppid == self.process.pid and state != "Z"]

    def stop(self, timeout: float = STOP_TIMEOUT_S + 30) -> float:
        """Ctrl-C, as a terminal sends it (SIGINT to the group); seconds until the launcher exited."""
        started = time.monotonic()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        return time.monotonic() - started


def stubs_of(server_pid: int) -> list:
    """The live Python-backend stubs tritonserver `server_pid` started (read_stub records)."""
    return [stub for pid, (state, ppid, _) in process_table().items()
            if ppid == server_pid and state != "Z" and (stub := read_stub(pid)) is not None]


def regions_left(names) -> list[str]:
    return [name for name in names if (SHM / name).exists()]


# ---------------------------------------------------------------------------------------------- the request stream

@dataclass
class Outcome:
    sent: float  # time.time()
    done: float
    error: str | None = None
    status: str | None = None
    retryable: bool = True


@dataclass
class Stream:
    """CLIENTS threads sending requests back to back to `grpc` until stopped."""
    grpc: str
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> Stream:
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()
        return self

    def _client(self, index: int) -> None:
        with Flux2Client(self.grpc, timeout_s=300) as client:
            sent = 0
            while not self._stop.is_set():
                started = time.time()
                try:
                    client.generate("a lighthouse at dawn", height=SIDE, width=SIDE, seed=index * 100_000 + sent,
                                    num_inference_steps=STEPS)
                    self.outcomes.append(Outcome(started, time.time()))
                except Flux2Error as exc:
                    self.outcomes.append(Outcome(started, time.time(), str(exc), exc.status, exc.retryable))
                    time.sleep(0.1)  # a dead process fails at once: do not spin
                sent += 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(300)

    def wait_for_success(self, since: float, count: int = 1, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(1 for o in list(self.outcomes) if o.sent >= since and o.error is None) >= count:
                return
            time.sleep(0.1)
        raise TimeoutError(f"no {count} good answers to requests sent after the mark within {timeout:.0f} s")


def kind(outcome: Outcome) -> str:
    """A failure's kind: its status and the words that say what happened."""
    message = outcome.error or ""
    for words, name in (("is not healthy", "process died"), ("not answering", "tritonserver restarting"),
                        ("failed to connect", "connection refused"),
                        ("Socket closed", "connection closed"), ("not ready", "not ready"),
                        ("being replaced", "process died"), ("overloaded", "overloaded")):
        if words in message:
            return f"{outcome.status} ({name})"
    return f"{outcome.status} ({message[:60]})"


# ---------------------------------------------------------------------------------------------- the scenarios

def kill_stub(launcher: Launcher, stream: Stream, instance: str, timeout: float = 600) -> dict:
    """kill -9 of the stub `instance` while `stream` runs; the figures once its model is repaired and
    the old version's processes are gone (or `timeout` s passed)."""
    server = launcher.server_pid()
    stubs = stubs_of(server)
    victim = next(stub for stub in stubs if stub.instance == instance)
    old = [stub.pid for stub in stubs if stub.model == victim.model]
    stream.wait_for_success(time.time(), 2)
    killed = time.time()
    os.kill(victim.pid, signal.SIGKILL)
    seen = launcher.wait_line(rf"{re.escape(instance)} \(pid {victim.pid}.*died", killed, timeout)
    repaired = launcher.wait_line(rf"{re.escape(victim.model)} reloaded", killed, timeout)
    deadline = time.monotonic() + timeout
    while live_processes(old) and time.monotonic() < deadline:  # the old version's processes: ended or retired
        time.sleep(0.2)
    settled = time.time()
    stream.wait_for_success(settled, CLIENTS)
    result = figures(stream, killed, time.time())
    result.update(what=f"kill -9 of `{instance}` ({victim.model}: {len(old)} instance(s))",
                  seen_s=seen[0] - killed if seen else None, repaired_s=repaired[0] - killed if repaired else None,
                  old_left=live_processes(old), old=old, server_restarted=launcher.server_pid() != server,
                  failed_after_repair=[o for o in stream.outcomes if o.error and repaired and o.sent > repaired[0]])
    return result


def kill_server(launcher: Launcher, stream: Stream, timeout: float = 600) -> dict:
    """SIGSEGV to tritonserver while `stream` runs: the launcher kills what is left, sweeps, starts it again."""
    server = launcher.server_pid()
    stubs = stubs_of(server)
    stream.wait_for_success(time.time(), 2)
    killed = time.time()
    os.kill(server, signal.SIGSEGV)
    seen = launcher.wait_line(rf"tritonserver \(pid {server}\)", killed, timeout)
    restarted = launcher.wait_line("tritonserver ready again", killed, timeout)
    stream.wait_for_success(time.time(), CLIENTS, timeout)
    result = figures(stream, killed, time.time())
    result.update(what="SIGSEGV to tritonserver", seen_s=seen[0] - killed if seen else None,
                  repaired_s=restarted[0] - killed if restarted else None,
                  old_left=live_processes(s.pid for s in stubs),
                  old=[s.pid for s in stubs], regions=[s.region for s in stubs],
                  regions_left=regions_left(s.region for s in stubs), launcher_alive=launcher.process.poll() is None,
                  new_server=launcher.server_pid(), old_server=server)
    return result


def figures(stream: Stream, killed: float, until: float) -> dict:
    """The requests that ended between the kill and `until`."""
    window = [o for o in list(stream.outcomes) if killed <= o.done <= until]
    failures = [o for o in window if o.error]
    good = [o for o in window if o.error is None and o.sent >= killed]
    return {"requests": len(window), "failures": failures, "kinds": collections.Counter(map(kind, failures)),
            "not_retryable": [o.error for o in failures if not o.retryable],
            "not_found": [o.error for o in failures if any(mark in o.error for mark in NOT_FOUND_MARKS)],
            "first_good_s": min(o.done for o in good) - killed if good else None,
            "last_failure_s": max((o.done for o in failures), default=killed) - killed if failures else None}


def stop_launcher(launcher: Launcher) -> dict:
    """Ctrl-C to the launcher: how long it took, what it left (processes of its tritonservers' groups,
    /dev/shm regions its servers' stubs named)."""
    groups = {launcher.process.pid, *launcher.children()}
    stop_s = launcher.stop()
    left = [pid for pid, (state, _, pgid) in process_table().items() if pgid in groups and state != "Z"]
    return {"stop_s": stop_s, "processes_left": left, "regions": sorted(launcher.regions),
            "regions_left": regions_left(launcher.regions), "exit_timeout_s": EXIT_TIMEOUT_S}


def seconds(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def markdown(results: list[dict], stop: dict, args) -> str:
    lines = [
        "## Self-repair after kill -9",
        "",
        f"Machine: {machine()} (2-core CPU, shared). Command: `{args.command}` (the figures come from this script; "
        "`tests/test_self_repair.py` runs the same scenarios and asserts on them). Tiny model, onnxruntime "
        f"components, 2 BLS instances, the default serve command `python -m flux2_serving.server.launch` "
        f"(self-repair on, the gate in front); {CLIENTS} gRPC clients sending text-to-image {SIDE}x{SIDE}, "
        f"{STEPS} step, back to back; a failed request waits 0.1 s before the next. Seen: the supervisor's line "
        "about the death; first good answer: to a request sent after the kill; repaired: the model's new version "
        "serves (for tritonserver: ready again). Failures: requests that ended between the kill and the end of "
        "the repair.",
        "",
        "| killed | seen s | first good answer s | repaired s | requests | failed | kinds | retryable | NOT_FOUND | "
        "old processes left |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in results:
        kinds = "; ".join(f"{n} x {k}" for k, n in r["kinds"].most_common()) or "-"
        failed = len(r["failures"])
        lines.append(f"| {r['what']} | {seconds(r['seen_s'])} | {seconds(r['first_good_s'])} | "
                     f"{seconds(r['repaired_s'])} | {r['requests']} | {failed} | {kinds} | "
                     f"{failed - len(r['not_retryable'])} of {failed} | {len(r['not_found'])} | {len(r['old_left'])} |")
    crash = next((r for r in results if "regions" in r), None)
    lines += [""]
    if crash:
        lines.append(f"After the crash: the launcher {'kept running' if crash['launcher_alive'] else 'EXITED'}; "
                     f"{len(crash['old_left'])} of the dead server's {len(crash['old'])} Python-backend processes "
                     f"left, {len(crash['regions_left'])} of its {len(crash['regions'])} /dev/shm regions left. ")
    lines.append(f"Then Ctrl-C, after the repairs: the launcher stopped in {stop['stop_s']:.1f} s, leaving "
                 f"{len(stop['processes_left'])} processes and {len(stop['regions_left'])} of its servers' "
                 f"{len(stop['regions'])} /dev/shm regions (2.51 never unloads a repaired model's old version: "
                 f"tritonserver would wait its exit timeout, {stop['exit_timeout_s']} s, for it; the launcher ends it "
                 "once every model is unloaded, and sweeps the regions).")
    lines += ["", "Before (issue 27, measured on 2.51 with `--watchdog`, which unloaded the model before loading it): "
              "17-18 s of `NOT_FOUND` for every request after a BLS process was killed, the other BLS process left "
              "running until the server stopped, the next stop 12 s with two regions left in /dev/shm; a dead "
              "`transformer_cached` unnoticed for 34 s; without `--watchdog`, a dead BLS process never repaired."]
    return "\n".join(lines)


def run(args) -> tuple[list[dict], dict]:
    workdir = Path("build/bench/self_repair")
    repository = assemble(args.onnx_dir, args.checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=2)
    launcher = Launcher(repository, workdir / "server.log")
    stream = Stream(launcher.grpc).start()
    results = []
    try:  # the crash first, so that the stop comes after the repairs (2.51 keeps their old versions)
        results.append(kill_server(launcher, stream))
        print(f"[self_repair] {results[-1]['what']}: {results[-1]['kinds']}", flush=True)
        for instance in ("flux2_klein_kv_0_1", "transformer_cached_0_0"):
            results.append(kill_stub(launcher, stream, instance))
            print(f"[self_repair] {results[-1]['what']}: {results[-1]['kinds']}", flush=True)
    finally:
        stream.stop()
        stop = stop_launcher(launcher)
    print("\n".join(launcher.said()), flush=True)
    return results, stop


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.self_repair", __doc__, "checkpoints/tiny", "build/onnx/fp32",
                              "the checkpoint served (default: the tiny one)")
    args = parse_benchmark_args(parser, argv)
    results, stop = run(args)
    publish("self-repair", markdown(results, stop, args), write=not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
