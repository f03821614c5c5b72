"""Cross-process locks with flock(2): one holder per lock file, a bounded wait, a clear error.

* `lock(name, wait, what)`: an exclusive lock (for example one SAN volume while it
  is changed, or one iSCSI target on a host).
* `semaphore(name, slots, wait, what)`: at most `slots` holders at once (for example
  CLI sessions to one EqualLogic group, which refuses sessions past its limit).
  It holds one of `slots` lock files `<name>.<i>.slot`.

The kernel drops a flock when its holder dies, so a killed process never leaves a
stale lock. Lock files live in ONEISCSI_LOCK_DIR, else /var/lock/one/oneiscsi (the
directory OpenNebula's packages give oneadmin); there is no fallback elsewhere: a
directory that other users can write would let any local user block actions.
Names are reduced to safe file names.

Ownership: the lock directory must not be writable by group or others. Lock files are
created 0600. Run as root (a cron job, for example), a new lock directory gets the
owner of its parent and every lock file the owner of the lock directory, so a later
run as oneadmin can still open them.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import stat
import time

from oneiscsi.errors import Failure

DEFAULT_DIRS = ("/var/lock/one/oneiscsi",)
_SAFE = re.compile(r"[^A-Za-z0-9._-]")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class LockTimeout(Failure):
    """A lock or semaphore slot stayed busy for the whole wait limit."""


def _make_dir(d: str) -> None:
    """Create `d` 0700. As root, a lock directory owned by root (new, or left by an older
    version run as root) gets the owner of its parent directory (oneadmin for /var/lock/one)."""
    try:
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(os.path.dirname(d) or ".", 0o755, exist_ok=True)
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass
    if os.geteuid() == 0:
        st = os.lstat(d)
        parent = os.stat(os.path.dirname(os.path.abspath(d)))
        if stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and parent.st_uid != 0:
            os.chown(d, parent.st_uid, parent.st_gid, follow_symlinks=False)


def _usable(d: str) -> str:
    """'' when `d` is a safe lock directory for this process, else why not (with the fix)."""
    try:
        _make_dir(d)
        st = os.lstat(d)
    except OSError as e:
        return "%s: %s" % (d, e.strerror or e)
    if not stat.S_ISDIR(st.st_mode):
        return "%s is not a directory" % d
    if st.st_mode & 0o022:
        return ("%s is writable by group or others (mode %04o): any local user could hold its locks; "
                "run chmod 700 %s" % (d, stat.S_IMODE(st.st_mode), d))
    if os.geteuid() not in (0, st.st_uid):
        return "%s belongs to uid %d, not to this user (uid %d): run chown -R %d %s" % (
            d, st.st_uid, os.geteuid(), os.geteuid(), d)
    return ""


def lock_dir() -> str:
    """The directory for lock files (ONEISCSI_LOCK_DIR, else /var/lock/one/oneiscsi), checked."""
    candidates = [os.environ["ONEISCSI_LOCK_DIR"]] if os.environ.get("ONEISCSI_LOCK_DIR") else list(DEFAULT_DIRS)
    reasons = []
    for d in candidates:
        why = _usable(d)
        if not why:
            return d
        reasons.append(why)
    raise Failure("no usable lock directory (%s); set ONEISCSI_LOCK_DIR to a directory of the "
                  "oneadmin user with mode 0700" % "; ".join(reasons))


def file_name(name: str) -> str:
    """A lock name as a file name: safe characters, a hash suffix when anything was changed."""
    safe = _SAFE.sub("_", name)[:120]
    if safe != name:
        safe += "-" + hashlib.sha1(name.encode("utf-8", "replace")).hexdigest()[:10]
    return safe


def _open(path: str) -> int:
    """Open (create 0600) a lock file, never through a symbolic link; as root, the file
    gets the owner of its directory."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise Failure("lock file %s is a symbolic link: refusing it (remove it)" % path) from None
        try:
            owner = " (it belongs to uid %d)" % os.lstat(path).st_uid
        except OSError:
            owner = ""
        raise Failure("cannot open lock file %s%s: %s; lock files must belong to the user that runs "
                      "the drivers (oneadmin): run chown -R oneadmin %s" % (
                          path, owner, e.strerror or e, os.path.dirname(path))) from None
    try:
        st = os.fstat(fd)
        if os.geteuid() == 0:
            dst = os.stat(os.path.dirname(path))
            if (st.st_uid, st.st_gid) != (dst.st_uid, dst.st_gid):
                os.fchown(fd, dst.st_uid, dst.st_gid)
        if stat.S_IMODE(st.st_mode) != 0o600 and st.st_uid == os.geteuid():
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


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
