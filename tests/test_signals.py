"""Ctrl-C and SIGTERM: exit 130 or 143 without a traceback, and never a temporary file left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from sectorllm import cli
from sectorllm.atomic import write_atomically


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_mid_command_exits_quietly(stories260k, tok512, signum):
    """eval spends its first second loading and compiling, then scores prompts: the signal lands in numba's code."""
    proc = subprocess.Popen([sys.executable, "-m", "sectorllm", "eval", str(stories260k), "-z", str(tok512)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(1.5)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err.decode()
    assert b"Traceback" not in err and b"Exception ignored" not in err, err.decode()


def test_sigterm_during_a_write_leaves_no_temporary_file(tmp_path):
    """The CLI's handler turns SIGTERM into an exception, so the writer's cleanup runs as it does for Ctrl-C."""
    target = tmp_path / "out.bin"

    def parts():
        yield b"first half"
        os.kill(os.getpid(), signal.SIGTERM)  # delivered here, between the two halves
        yield b"second half"

    previous = signal.signal(signal.SIGTERM, cli._Signals())
    try:
        with pytest.raises(cli._Terminated):
            write_atomically(target, parts())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []
