"""Child processes that get no signal meant for our process group, yet never outlive us.

A child in a session of its own misses a terminal's Ctrl-C or a supervisor's group SIGTERM, so we
can stop it in order; PR_SET_PDEATHSIG has the kernel send it SIGTERM if we die first (Linux; on
other systems only the first half holds).
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # linux/prctl.h
# resolved here, in the parent: between fork and exec the child should not have to load anything
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """A preexec_fn: runs in the child between fork and exec, and survives the exec.

    The kernel watches the thread that started the child: start it from one that lives as long as
    the process (the main thread, or an event loop's).
    """
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def is_alive(pid: int) -> bool:
    """Whether a process runs: files and namespaces named by the pid of a dead one are leftovers."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True
