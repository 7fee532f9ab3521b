"""Fixtures of the cluster tests: a fake ``scontrol`` on PATH."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def fake_scontrol(tmp_path) -> Path:
    """A ``scontrol`` on PATH that records its arguments and, as Slurm does on ``requeue``, sends SIGTERM to the job
    task (its parent, the Lightning process). Returns the log file."""
    folder = tmp_path / "bin"
    folder.mkdir()
    log = tmp_path / "scontrol.log"
    script = folder / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\nkill -TERM $PPID\n')
    script.chmod(0o755)
    return log
