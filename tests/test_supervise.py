"""config/supervise.py, what ``manage.py up`` runs: a process that exits is started again
(with a growing delay) while the others keep running; SIGTERM stops them all, SIGKILL for
one that ignores it. ``tests/test_up.py`` kills the worker under ``manage.py up`` itself."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import BASE_DIR


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def pids(log: Path, name: str) -> list[int]:
    return [int(p) for p in re.findall(rf"{name} started \(pid=(\d+)\)", log.read_text())]


def test_a_process_that_exits_is_restarted_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    python = sys.executable
    (tmp_path / "Procfile").write_text(
        f"crasher: {python} -c 'import sys; print(\"crashing\"); sys.exit(3)'\n"
        f"steady: exec {python} -c 'import signal, sys, time; "
        'signal.signal(signal.SIGTERM, lambda *a: (open("steady-got-term", "w"), sys.exit(0))); '
        'print("steady up", flush=True); time.sleep(600)\'\n'
        "stubborn: trap '' TERM; exec sleep 600\n"
    )
    log = tmp_path / "supervise.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *(python, "-m", "config.supervise", "--procfile", "Procfile"),
                *("--first-delay", "0.2", "--max-delay", "0.4", "--stop-timeout", "2"),
            ],
            cwd=tmp_path,
            env=os.environ | {"PYTHONPATH": str(BASE_DIR)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: len(pids(log, "crasher")) >= 4, 20, "the crasher to be restarted")
        text = log.read_text()
        assert re.search(r"crasher +\| crashing", text), "its output is printed behind its name"
        assert "crasher exited with code 3 after 0s; starting it again in 0.2s" in text
        assert "starting it again in 0.4s" in text, "the delay grows while it keeps failing"
        assert "starting it again in 0.8s" not in text, "up to --max-delay"
        [steady] = pids(log, "steady")
        [stubborn] = pids(log, "stubborn")
        assert alive(steady), "the others keep running"
        assert alive(stubborn)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert (tmp_path / "steady-got-term").exists(), "SIGTERM is passed on"
    assert not alive(steady)
    assert not alive(stubborn), "SIGKILLed after --stop-timeout"
