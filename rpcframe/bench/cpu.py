"""CPU time of a process by PID (Linux ``/proc``), to charge a server per call.

``/proc/PID/stat`` sums every thread of the process, so this covers grpc's
C-core threads as well as Python's. Resolution is one clock tick (10 ms).
"""

from __future__ import annotations

import os

__all__ = ["process_cpu_seconds"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid``.

    Raises:
        OSError: the process does not exist (or this is not Linux).
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
        stat = f.read()
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / _TICKS
