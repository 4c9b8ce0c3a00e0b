"""The processes a strategy runs in (a real Celery worker, or a polling/sweeping loop),
and a sampler of their memory and CPU."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import psutil  # type: ignore[import-untyped]

import config.processes
from bench.env import VAR_DIR
from config.processes import ChildProcess

MB = 1024 * 1024


class BenchProcess(ChildProcess):
    """A strategy's process, logging to var/bench-<name>.log. Ended at once: a killed
    worker leaves its timers unacked in Redis, and the bench deletes its own keys after
    each strategy anyway."""

    def __init__(
        self, *, name: str, args: list[str], env: dict[str, str], log_path: Path | None = None
    ) -> None:
        log_path = log_path or VAR_DIR / f"bench-{name}.log"
        super().__init__(name=name, args=args, env=env, log_path=log_path)

    def start(self, timeout: float = 90) -> Self:
        super().start(timeout)
        return self

    def stop(self, sig: int = signal.SIGKILL, timeout: float = 30) -> None:
        super().stop(sig, timeout)


class WorkerProcess(config.processes.WorkerProcess, BenchProcess):
    """``celery -A config worker``, as in production (prefork, one child per core)."""

    def __init__(self, *, name: str, env: dict[str, str], concurrency: int) -> None:
        config.processes.WorkerProcess.__init__(
            self,
            name=name,
            env=env,
            concurrency=concurrency,
            log_path=VAR_DIR / f"bench-{name}.log",
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
