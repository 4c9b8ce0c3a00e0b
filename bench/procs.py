"""The processes a strategy runs in (a real Celery worker, or a polling/sweeping loop),
and a sampler of their memory and CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil  # type: ignore[import-untyped]

from bench.env import BASE_DIR, VAR_DIR

MB = 1024 * 1024


class BenchProcess:
    """A child process in its own session (so that it and its children are ended
    together, by the process group id the bench itself started), logging to var/."""

    ready_marker: bytes = b""

    def __init__(self, *, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = VAR_DIR / f"bench-{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 90) -> BenchProcess:
        VAR_DIR.mkdir(exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            self.args,
            cwd=BASE_DIR,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while self.ready_marker not in self.log_path.read_bytes():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                self.stop()
                raise RuntimeError(f"{self.name} did not start:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """End the process group at once. A killed worker leaves its timers unacked in
        Redis; the bench deletes its own keys after each strategy anyway."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self._log.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


class WorkerProcess(BenchProcess):
    """``celery -A config worker``, as in production (prefork, one child per core)."""

    ready_marker = b" ready."

    def __init__(self, *, name: str, env: dict[str, str], concurrency: int) -> None:
        super().__init__(
            name=name,
            env=env,
            args=[
                sys.executable,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                # Production's level; "ready." is logged at INFO.
                "-l",
                "info",
                "--pool",
                "prefork",
                "--concurrency",
                str(concurrency),
                "--without-mingle",
                "--without-gossip",
                "-n",
                f"{name}@%h",
            ],
        )


class LoopProcess(BenchProcess):
    """``python -m bench.loops poll|sweep``: the strategies without timers."""

    ready_marker = b"loop ready"

    def __init__(
        self, *, name: str, env: dict[str, str], mode: str, interval: float, status: Path
    ) -> None:
        super().__init__(
            name=name,
            env=env,
            args=[
                sys.executable,
                "-m",
                "bench.loops",
                mode,
                "--interval",
                str(interval),
                "--status",
                str(status),
            ],
        )


@dataclass
class MemorySample:
    main_rss: float  # bytes
    tree_rss: float
    tree_pss: float | None = None  # shared pages divided among the processes that map them
    processes: int = 1


def tree(pid: int) -> list[psutil.Process]:
    try:
        main = psutil.Process(pid)
        return [main, *main.children(recursive=True)]
    except psutil.Error:
        return []


def sample_memory(pid: int, *, pss: bool = False) -> MemorySample:
    procs = tree(pid)
    main_rss = tree_rss = 0.0
    tree_pss: float | None = 0.0 if pss else None
    for i, proc in enumerate(procs):
        try:
            if pss:
                info = proc.memory_full_info()
                assert tree_pss is not None
                tree_pss += float(getattr(info, "pss", info.rss))
            else:
                info = proc.memory_info()
        except psutil.Error:
            continue
        tree_rss += float(info.rss)
        if i == 0:
            main_rss = float(info.rss)
    return MemorySample(
        main_rss=main_rss, tree_rss=tree_rss, tree_pss=tree_pss, processes=len(procs)
    )


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for proc in tree(pid):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


class PeakSampler:
    """Samples a process tree's RSS in a thread and keeps the peak since the last reset."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self._lock = threading.Lock()
        self._peak_main = 0.0
        self._peak_tree = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> MemorySample:
        current = sample_memory(self.pid)
        with self._lock:
            self._peak_main = max(self._peak_main, current.main_rss)
            self._peak_tree = max(self._peak_tree, current.tree_rss)
        return current

    def reset(self) -> None:
        with self._lock:
            self._peak_main = self._peak_tree = 0.0

    def peak(self) -> tuple[float, float]:
        self.sample()
        with self._lock:
            return self._peak_main, self._peak_tree
