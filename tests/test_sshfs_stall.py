"""A stalled real server must never hold the serving process (issue: zombie for minutes).

On sshfs, a read the client daemon has taken waits uninterruptibly for the server, and a
process ends only when all its threads do. The default backend on network filesystems
reads in a reader process (`engine.reader_process`), so the serving process cancels and
exits at once; the in-process ``sendfile`` backend shows what happens otherwise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from test_sshfs import SLOW, backing  # noqa: F401  (the module's fixture)

from bench.sshfs import mounted
from engine.cursor import pid_alive

pytestmark = [pytest.mark.fuse, pytest.mark.timeout(90)]

_SCRIPT = textwrap.dedent(
    """
    import json, os, sys, time
    import psutil
    from engine import start_prefetch
    path, backend = sys.argv[1], sys.argv[2]
    os.stat(path)                     # attributes cached: planning asks nothing of the server
    print("ready", flush=True)
    sys.stdin.readline()              # the server is stopped now
    h = start_prefetch([path], backend=backend, chunk_bytes=1 << 20, skip_cached=False)
    time.sleep(1.0)                   # the first open waits for the server, uninterruptibly
    t0 = time.monotonic()
    h.cancel()
    cancel_s = time.monotonic() - t0
    kids = [p.pid for p in psutil.Process().children(recursive=True)]
    print(json.dumps({"cancel_s": cancel_s, "children": kids, "t": time.time()}), flush=True)
    """
)


def _run_with_the_server_stopped(fs, backend: str) -> tuple[subprocess.Popen[str], dict]:
    """A prefetch that starts while the server is stopped: its first open is a FUSE
    request the sshfs daemon has taken, which nothing interrupts until the server answers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(fs.path / "big.bin"), backend],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()},
    )  # fmt: skip
    assert proc.stdout is not None and proc.stdin is not None
    assert proc.stdout.readline().strip() == "ready"
    fs.stall("server")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return proc, json.loads(proc.stdout.readline())


def test_cancel_and_exit_are_prompt_while_the_real_server_is_stopped(
    backing: tuple[Path, dict[str, bytes]],  # noqa: F811
) -> None:
    with mounted(backing[0], profile="sshfs-quick", bandwidth_bps=SLOW) as fs:
        fs.evict()
        proc, out = _run_with_the_server_stopped(fs, "auto")
        try:
            proc.wait(timeout=10)
            exited = time.time()
        finally:
            proc.kill()
            fs.unstall()
        assert out["cancel_s"] < 1.0
        assert exited - out["t"] < 2.0, f"exit took {exited - out['t']:.1f} s"
        assert out["children"], "the open should be waiting in a reader process"
        deadline = time.monotonic() + 20
        while any(pid_alive(p) for p in out["children"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(pid_alive(p) for p in out["children"]), (
            "a reader outlived the server's return"
        )


def test_an_in_process_read_holds_the_process_until_the_server_answers(
    backing: tuple[Path, dict[str, bytes]],  # noqa: F811
) -> None:
    """What the reader process prevents (and proof that the test above can fail)."""
    with mounted(backing[0], profile="sshfs-quick", bandwidth_bps=SLOW) as fs:
        fs.evict()
        proc, out = _run_with_the_server_stopped(fs, "sendfile")
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                proc.wait(timeout=3)  # cancelled, its work done, yet it cannot end
        finally:
            fs.unstall()
        assert proc.wait(timeout=20) == 0
        assert out["cancel_s"] < 1.0
