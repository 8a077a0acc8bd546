"""Kill a child process with SIGKILL once it has printed enough: the crash tests' one way."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def child_env(workdir: Path, **extra: str) -> dict[str, str]:
    """The environment of a child run in ``workdir``: ``workdir`` and the repository root
    (for ``tests.support``) first on ``PYTHONPATH``, plus ``extra``."""
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(workdir), ROOT, env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def kill_after(workdir: Path, args: list[str], words: int) -> list[str]:
    """Run ``python args...`` in ``workdir``; read the words it prints (one line at a time)
    until at least ``words`` were read or it exits, then SIGKILL it. The words read."""
    child = subprocess.Popen(
        [sys.executable, *args],
        cwd=workdir,
        env=child_env(workdir),
        stdout=subprocess.PIPE,
        text=True,
    )
    read: list[str] = []
    try:
        assert child.stdout is not None
        for line in child.stdout:  # bounded by the child's output and by ``words``
            read += line.split()
            if len(read) >= words:
                break
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=10)
        if child.stdout is not None:
            child.stdout.close()
    return read
