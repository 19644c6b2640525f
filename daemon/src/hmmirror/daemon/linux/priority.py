"""hmmd's scheduling priority: every thread at the configured nice value.

A target thread in munmap, madvise(DONTNEED/FREE), mremap or fork waits in the kernel until
hmmd has read its userfaultfd event (``watch.uffd``). On a busy host hmmd competes for a core
with the very processes it serves, so each of those calls waits for hmmd's turn on the CPU:
the kernel's own MMU notifiers run in the invalidating thread, at its priority, while ours
run in another process at whatever priority that has. A nice value below the targets' lets
hmmd run as soon as an event wakes it (bench/README.md, the soak: "hmmd's priority").

Linux keeps the nice value per thread (setpriority(2), NOTES), so it is set on every thread
there is; threads made later (libzmq's, the copy thread) inherit it.
"""

from __future__ import annotations

import errno
import logging
import os

log = logging.getLogger(__name__)

NICE_MIN, NICE_MAX = -20, 19


def _threads() -> list[int]:
    """This process's thread ids."""
    try:
        return [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # 0: the calling thread


def apply_nice(nice: int) -> None:
    """Set every thread of this process to ``nice``, or warn once if the kernel refused:
    raising a priority needs CAP_SYS_NICE (or RLIMIT_NICE), and a unit's system call
    filter may refuse the call itself. A thread already there is left alone, so a service
    manager that set it (``Nice=`` in hmmd.service) needs no call allowed."""
    refused: OSError | None = None
    for tid in _threads():
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != nice:
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:
            continue  # the thread ended meanwhile
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM):
                raise
            refused = exc
    if refused is None:
        return
    log.warning(
        "cannot run at nice %d (%s; raising a priority needs CAP_SYS_NICE): staying at nice %d, "
        "so target threads in munmap or madvise may wait longer for hmmd on a busy host",
        nice,
        refused.strerror,
        os.getpriority(os.PRIO_PROCESS, 0),
    )
