"""The one reader of /proc figures (engine/procstat.py), used by the engine and the bench."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from engine.cursor import pid_alive
from engine.procstat import cpu_times, process_cpu_s, process_state, stat_fields


def _wait_state(pid: int, want: str) -> str | None:
    for _ in range(200):
        if process_state(pid) == want:
            break
        time.sleep(0.01)
    return process_state(pid)


def test_states_of_a_process_whose_name_has_spaces_and_parentheses():
    # A process may rename only itself; the name ends at the *last* ")" of the line.
    code = "open('/proc/self/comm', 'w').write('a) b (c'); import time; time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        for _ in range(500):
            with open(f"/proc/{child.pid}/comm") as f:
                if f.read().strip() == "a) b (c":
                    break
            time.sleep(0.01)
        assert _wait_state(child.pid, "S") == "S"
        assert len(stat_fields(child.pid)) > 40
        os.kill(child.pid, signal.SIGSTOP)
        assert _wait_state(child.pid, "T") == "T"
        child.kill()
        assert _wait_state(child.pid, "Z") == "Z"  # not reaped yet
        assert not pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()
    assert process_state(child.pid) is None and stat_fields(child.pid) is None
    assert process_cpu_s(child.pid) == 0.0


def test_cpu_seconds_grow_with_work():
    before = process_cpu_s(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.3:
        pass
    assert process_cpu_s(os.getpid()) >= before + 0.1
    busy, total = cpu_times()
    assert 0 < busy <= total
