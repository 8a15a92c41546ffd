"""Whether a process still runs: the run registry asks it of a stage's recorded pid, the
development services of the JVMs they started. Standard library only."""

from __future__ import annotations

import os


def process_running(pid: int) -> bool:
    """Whether a process of this host runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by a parent in this process) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except OSError:
        return True
