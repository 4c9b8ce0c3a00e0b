"""Child processes that the tests and the benchmark start: above all a real
``celery -A config worker``, as production runs it, in its own session so that it and its
pool children are ended together, logging to a file that ``start()`` watches."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

BASE_DIR = Path(__file__).resolve().parent.parent


class ChildProcess:
    #: Written to the log once the process is ready; ``start()`` waits for it.
    ready_marker: bytes = b""

    def __init__(self, *, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None, f"{self.name} is not running"
        return self.proc.pid

    def start(self, timeout: float = 60) -> Self:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
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
                tail = self.log()[-3000:]
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"{self.name} did not start:\n{tail}")
            time.sleep(0.05)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Signal the whole process group; SIGKILL it if it has not ended in ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


#: How every Celery process of the host project is started.
CELERY = [sys.executable, "-m", "celery", "-A", "config"]


class WorkerProcess(ChildProcess):
    """``celery -A config worker``: prefork, production's log level ("ready." is INFO)."""

    ready_marker = b" ready."

    def __init__(
        self,
        *,
        name: str,
        env: dict[str, str],
        log_path: Path,
        concurrency: int = 2,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        super().__init__(
            name=name,
            env=env,
            log_path=log_path,
            args=[
                *CELERY,
                "worker",
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
                *extra_args,
            ],
        )


class BeatProcess(ChildProcess):
    """``celery -A config beat`` with a schedule file of its own (as on its own machine)."""

    ready_marker = b"beat: Starting..."

    def __init__(self, *, name: str, env: dict[str, str], log_path: Path, schedule: Path):
        super().__init__(
            name=name,
            env=env,
            log_path=log_path,
            args=[*CELERY, "beat", "-l", "info", "--schedule", str(schedule)],
        )

    def sent(self) -> int:
        """How many sweeps this beat has sent."""
        return self.log().count("Sending due task orders-sweep")
