"""Cross-process locks with flock(2): one holder per lock file, a bounded wait, a clear error.

* `lock(name, wait, what)`: an exclusive lock (for example one SAN volume while it
  is changed, or one iSCSI target on a host).
* `semaphore(name, slots, wait, what)`: at most `slots` holders at once (for example
  CLI sessions to one EqualLogic group, which refuses sessions past its limit).
  It holds one of `slots` lock files `<name>.<i>.slot`.

The kernel drops a flock when its holder dies, so a killed process never leaves a
stale lock. Lock files live in ONEISCSI_LOCK_DIR, else /var/lock/one/oneiscsi, else
a per-user directory under the temp dir; names are reduced to safe file names.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import tempfile
import time

from oneiscsi.errors import Failure

DEFAULT_DIRS = ("/var/lock/one/oneiscsi",)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")


class LockTimeout(Failure):
    """A lock or semaphore slot stayed busy for the whole wait limit."""


def lock_dir() -> str:
    """The directory for lock files, created if needed (0700 when we create it)."""
    candidates = [os.environ["ONEISCSI_LOCK_DIR"]] if os.environ.get("ONEISCSI_LOCK_DIR") else []
    candidates += list(DEFAULT_DIRS)
    candidates.append(os.path.join(tempfile.gettempdir(), "oneiscsi-locks-%d" % os.getuid()))
    for d in candidates:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if os.access(d, os.W_OK | os.X_OK):
            return d
    raise Failure("no writable lock directory (tried %s); set ONEISCSI_LOCK_DIR" % ", ".join(candidates))


def file_name(name: str) -> str:
    """A lock name as a file name: safe characters, a hash suffix when anything was changed."""
    safe = _SAFE.sub("_", name)[:120]
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode("utf-8", "replace")).hexdigest()[:10]
    return safe


def _open(path: str) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)


def _try(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _pause(started: float) -> None:
    """Polling interval: short at first, at most 50 ms, jittered so waiters do not march."""
    waited = time.monotonic() - started
    time.sleep(random.uniform(0.002, 0.01) if waited < 0.2 else random.uniform(0.02, 0.05))


@contextlib.contextmanager
def lock(name: str, wait: float, what: str, directory: str = ""):
    """Hold the exclusive lock `name`; LockTimeout after `wait` seconds."""
    path = os.path.join(directory or lock_dir(), file_name(name) + ".lock")
    fd = _open(path)
    try:
        started = time.monotonic()
        while not _try(fd):
            if time.monotonic() - started >= wait:
                raise LockTimeout("%s is busy: another oneiscsi action held it for %d s (lock %s)"
                                  % (what, wait, path))
            _pause(started)
        yield path
    finally:
        os.close(fd)  # closing drops the flock


@contextlib.contextmanager
def semaphore(name: str, slots: int, wait: float, what: str, directory: str = "", hint: str = ""):
    """Hold one of `slots` slots of `name`; LockTimeout naming `what` after `wait` seconds."""
    if slots < 1:
        raise Failure("%s: the number of slots must be at least 1" % what)
    base = os.path.join(directory or lock_dir(), file_name(name))
    fds = [_open("%s.%d.slot" % (base, i)) for i in range(slots)]
    held = None
    try:
        started = time.monotonic()
        order = list(range(slots))
        while held is None:
            random.shuffle(order)
            for i in order:
                if _try(fds[i]):
                    held = i
                    break
            if held is None:
                if time.monotonic() - started >= wait:
                    raise LockTimeout("%s: all %d slots stayed busy for %d s%s (slot files %s.*.slot)"
                                      % (what, slots, wait, hint, base))
                _pause(started)
        for i, fd in enumerate(fds):  # keep only the slot we hold open
            if i != held:
                os.close(fd)
        fds = [fds[held]]
        yield held
    finally:
        for fd in fds:
            os.close(fd)
