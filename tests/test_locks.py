"""Lock files and their owners: root (cron) and oneadmin share them; nobody else can hold them.

The tests run as root (test-infra.md); "oneadmin" is played by uid 65534 in a forked child
that drops to it with setgid/setuid, so the kernel really checks its permissions.
"""
from __future__ import annotations

import os
import stat
import tempfile
import traceback

import pytest

from oneiscsi import locks
from oneiscsi.errors import Failure
from oneiscsi.san import client

ONEADMIN = 65534  # nobody/nogroup stands in for oneadmin

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play root and oneadmin")


def as_user(uid, fn):
    """Run fn() in a child with uid/gid `uid`; -> '' on success, else the child's error text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(r)
        msg = ""
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fn()
        except BaseException as e:  # report everything to the parent
            msg = "%s: %s" % (type(e).__name__, e) or traceback.format_exc()
        os.write(w, msg.encode() or b"")
        os.close(w)
        os._exit(0)
    os.close(w)
    out = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    return out.decode()


@pytest.fixture
def tmp_path():
    """A temp dir the stand-in oneadmin can traverse (pytest's own is root-only)."""
    import pathlib
    import shutil
    d = tempfile.mkdtemp(prefix="oneiscsi-test-locks-")
    os.chmod(d, 0o755)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def oneadmin_dir(tmp_path, monkeypatch):
    """/var/lock/one as OpenNebula's packages make it: owned by oneadmin; the lock dir under it is not made yet."""
    parent = tmp_path / "lock-one"
    parent.mkdir()
    os.chown(str(parent), ONEADMIN, ONEADMIN)
    d = str(parent / "oneiscsi")
    monkeypatch.setenv("ONEISCSI_LOCK_DIR", d)
    return d


def _owner_mode(path):
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


def take_all():
    with locks.lock("eql-volume-g-v", 1, "volume v"):
        pass
    with locks.semaphore("eql-sessions-g", 3, 1, "CLI sessions"):
        pass


def test_root_run_leaves_files_oneadmin_can_use(oneadmin_dir):
    old = os.umask(0o022)
    try:
        take_all()  # as root, like reconcile from cron
    finally:
        os.umask(old)
    assert _owner_mode(oneadmin_dir) == (ONEADMIN, ONEADMIN, 0o700)
    names = sorted(os.listdir(oneadmin_dir))
    assert names == ["eql-sessions-g.0.slot", "eql-sessions-g.1.slot", "eql-sessions-g.2.slot",
                     "eql-volume-g-v.lock"]
    for n in names:
        assert _owner_mode(os.path.join(oneadmin_dir, n)) == (ONEADMIN, ONEADMIN, 0o600), n
    assert as_user(ONEADMIN, take_all) == ""


def test_root_owned_files_of_an_older_run_are_given_back(oneadmin_dir):
    assert as_user(ONEADMIN, take_all) == ""
    path = os.path.join(oneadmin_dir, "eql-volume-g-v.lock")
    os.chown(path, 0, 0)  # what an older version left after a root run
    assert "cannot open lock file %s (it belongs to uid 0)" % path in as_user(ONEADMIN, take_all)
    take_all()  # root again: fixes the owner
    assert _owner_mode(path) == (ONEADMIN, ONEADMIN, 0o600)
    assert as_user(ONEADMIN, take_all) == ""
    os.chown(oneadmin_dir, 0, 0)  # the directory itself, made by an older version run as root
    assert "belongs to uid 0" in as_user(ONEADMIN, take_all)
    take_all()
    assert _owner_mode(oneadmin_dir) == (ONEADMIN, ONEADMIN, 0o700)
    assert as_user(ONEADMIN, take_all) == ""


def test_no_world_writable_directory_and_no_tmp_fallback(tmp_path, monkeypatch):
    d = tmp_path / "open"
    d.mkdir()
    os.chmod(str(d), 0o1777)
    monkeypatch.setenv("ONEISCSI_LOCK_DIR", str(d))
    with pytest.raises(Failure, match=r"writable by group or others \(mode 1777\).*run chmod 700 %s" % d):
        locks.lock_dir()
    assert os.listdir(str(d)) == []
    # no setting and an unusable default: an error, never a directory in the temp dir
    monkeypatch.delenv("ONEISCSI_LOCK_DIR")
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(locks, "DEFAULT_DIRS", (str(blocker / "oneiscsi"),))
    before = set(os.listdir(tempfile.gettempdir()))
    with pytest.raises(Failure, match="no usable lock directory .*set ONEISCSI_LOCK_DIR"):
        locks.lock_dir()
    assert not [n for n in set(os.listdir(tempfile.gettempdir())) - before if "oneiscsi" in n]


def test_other_users_cannot_use_or_plant(oneadmin_dir, tmp_path):
    take_all()
    # a directory of another user is refused with its fix
    err = as_user(ONEADMIN + 1 if ONEADMIN + 1 != 0 else 1, locks.lock_dir)
    assert "belongs to uid %d" % ONEADMIN in err and "chown" in err
    # a symbolic link planted as a lock file is never followed (root would write through it)
    target = tmp_path / "victim"
    target.write_text("keep")
    link = os.path.join(oneadmin_dir, "eql-volume-g-w.lock")
    os.symlink(str(target), link)
    with pytest.raises(Failure, match="is a symbolic link"):
        with locks.lock("eql-volume-g-w", 1, "volume w"):
            pass
    assert target.read_text() == "keep" and _owner_mode(str(target))[0] == 0


def test_one_group_one_identity_one_limit(tmp_path):
    by_ip, by_name = client.Group("127.0.0.1", 22), client.Group("localhost", 22)
    assert by_ip.identity == by_name.identity == "127.0.0.1:22"
    assert client.group_identity("::ffff:127.0.0.1") == "127.0.0.1:22"
    assert client.group_identity("[::1]", 2222) == client.group_identity("0:0::1", 2222) == "[::1]:2222"
    assert client.Group("127.0.0.1", 2222).identity != by_ip.identity   # another port, another group
    assert client.group_identity("no-such-group.invalid") == "no-such-group.invalid:22"
    with locks.semaphore(by_ip.lock_name, 1, 1, "sessions", directory=str(tmp_path)):
        with pytest.raises(locks.LockTimeout):
            with locks.semaphore(by_name.lock_name, 1, 0.2, "sessions", directory=str(tmp_path)):
                pass
