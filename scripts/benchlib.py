"""What the benchmark scripts share: daemon processes, /proc readings, percentiles.

Standard library only, so that a benchmark's client processes start light.
"""

from __future__ import annotations

import contextlib
import http.client
import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start(argv: list[str], env: dict[str, str], log: Path, **popen) -> subprocess.Popen:
    """A daemon from the repository, its output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out, **popen
        )


def wait_ready(process: subprocess.Popen, port: int, path: str, deadline_s: float = 30) -> None:
    """Until ``GET path`` answers 200; fail early if the process exits."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}")
        # Short timeout: something else may hold the port and never answer.
        with contextlib.suppress(OSError, http.client.HTTPException):
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            try:
                conn.request("GET", path)
                if conn.getresponse().status == 200:
                    return
            finally:
                conn.close()
        time.sleep(0.05)
    raise RuntimeError(f"{process.args} not ready on {path} within {deadline_s}s")


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM for a clean shutdown, SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in MB, from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(value.split()[0]) / 1024  # kB
    return values


def load_average() -> str:
    """Other work on the machine skews every figure; the reader should see it."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(1, math.ceil(fraction * len(ordered))) - 1]


def ignore_sigint() -> None:
    """Pool initializer: Ctrl-C is the parent's to handle; it terminates the pool."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
