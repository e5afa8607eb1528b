"""One trainer per workdir: an advisory lock held for the life of the run.

`fcntl.flock` on `WORKDIR/.lock`: the kernel releases it when the holder exits, however it
exits (a crash, SIGKILL), so a lock left by a dead process is simply free and the next run takes
it. The file records the holder's pid and host, which a refused run names. (On network file
systems flock may be local to each node: run one trainer per workdir there by convention.)
"""

from __future__ import annotations

import fcntl
import os
import socket

LOCK_NAME = ".lock"


class WorkdirBusy(ValueError):
    """Another live process holds the workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` — raises `WorkdirBusy` at once if another process holds it."""

    def __init__(self, workdir: str) -> None:
        self.path = os.path.join(workdir, LOCK_NAME)
        self._file = None

    def __enter__(self) -> WorkdirLock:
        f = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise WorkdirBusy(
                f"{os.path.dirname(self.path)} is in use by {holder}: one trainer per workdir "
                "(wait for it to finish, stop it, or choose another --workdir)"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}")
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock; the file stays (harmless, reused)
            self._file = None
