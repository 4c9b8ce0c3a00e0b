"""Run the processes of a Procfile together and start again any that exits, as systemd's
``Restart=always`` does in production: what ``manage.py up`` runs.

One process dying (a worker after a broker outage, a web server that crashed) no longer
stops the others, which is what honcho did. Each process runs ``sh -c <command>`` in a
session of its own; its output is printed line by line behind its name. A process that
exits is started again after a delay that doubles from ``--first-delay`` up to
``--max-delay`` while it keeps failing, and starts over once it has run for a minute.
SIGTERM or SIGINT stops everything: SIGTERM to each process group, SIGKILL to whatever is
left after ``--stop-timeout`` seconds (longer than the worker's soft shutdown).

    python -m config.supervise [--procfile config/Procfile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

#: A process that ran this long before it exited was healthy: restart it at once.
STABLE_AFTER = 60.0


@dataclass
class Program:
    name: str
    command: str
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    delay: float = 0.0
    restart_at: float | None = None
    output: threading.Thread | None = None


def read_procfile(path: Path) -> list[Program]:
    programs = []
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, command = line.partition(":")
            programs.append(Program(name.strip(), command.strip()))
    return programs


class Supervisor:
    def __init__(
        self,
        programs: list[Program],
        *,
        first_delay: float = 1.0,
        max_delay: float = 30.0,
        stop_timeout: float = 20.0,
        out: IO[str] = sys.stdout,
    ) -> None:
        self.programs = programs
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.stop_timeout = stop_timeout
        self.out = out
        self.width = max(len(p.name) for p in programs)
        self.lock = threading.Lock()
        self.stopping = False

    def say(self, name: str, text: str) -> None:
        with self.lock:
            self.out.write(f"{time.strftime('%H:%M:%S')} {name:<{self.width}} | {text}\n")
            self.out.flush()

    def start(self, program: Program) -> None:
        proc = subprocess.Popen(
            ["/bin/sh", "-c", program.command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, signalled as a whole
        )
        program.proc, program.started_at, program.restart_at = proc, time.monotonic(), None
        self.say("system", f"{program.name} started (pid={proc.pid})")
        program.output = threading.Thread(target=self.pump, args=(program.name, proc), daemon=True)
        program.output.start()

    def pump(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.say(name, line.decode(errors="replace").rstrip("\n"))

    def check(self, program: Program, now: float) -> None:
        """Notice that a process exited and schedule its restart; restart it when due."""
        if program.proc is not None and program.proc.poll() is not None:
            ran = now - program.started_at
            program.delay = (
                self.first_delay
                if ran >= STABLE_AFTER or not program.delay
                else min(program.delay * 2, self.max_delay)
            )
            program.restart_at = now + program.delay
            self.say(
                "system",
                f"{program.name} exited with code {program.proc.returncode} after {ran:.0f}s; "
                f"starting it again in {program.delay:g}s",
            )
            program.proc = None
        if program.restart_at is not None and now >= program.restart_at:
            self.start(program)

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        for program in self.programs:
            self.start(program)
        while not self.stopping:
            now = time.monotonic()
            for program in self.programs:
                self.check(program, now)
            time.sleep(0.1)
        self.stop()
        return 0

    def stop(self) -> None:
        running = [p.proc for p in self.programs if p.proc is not None]
        self.say("system", f"stopping {len(running)} processes")
        for proc in running:
            self.signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + self.stop_timeout
        for proc in running:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.signal(proc, signal.SIGKILL)
                proc.wait()
        for proc in running:  # what a process left behind in its group (pool children)
            self.signal(proc, signal.SIGKILL)
        for program in self.programs:  # print the last lines they wrote
            if program.output is not None:
                program.output.join(1)

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m config.supervise", description=__doc__)
    parser.add_argument("--procfile", type=Path, default=Path("config/Procfile"))
    parser.add_argument("--first-delay", type=float, default=1.0)
    parser.add_argument("--max-delay", type=float, default=30.0)
    parser.add_argument("--stop-timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    programs = read_procfile(args.procfile)
    if not programs:
        parser.error(f"{args.procfile} names no process")
    return Supervisor(
        programs,
        first_delay=args.first_delay,
        max_delay=args.max_delay,
        stop_timeout=args.stop_timeout,
    ).run()


if __name__ == "__main__":
    sys.exit(main())
