"""The local qemu-img write has a no-progress limit: a target that stops answering (tgtd
stopped with SIGSTOP, by its PID) gets the copy killed with its process group after
EQL_WRITE_STALL seconds; a slow copy that keeps moving is never killed.

Real tgtd and real qemu-img (libiscsi); the Writer is built in-process so the limit can be
a few seconds.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from oneiscsi.drivers.eqliscsi import source, write
from oneiscsi.errors import Failure
from oneiscsi.sim.tgt import Tgtd

MiB = 1024 * 1024
IQN = "iqn.2001-05.com.equallogic:0-8a0906-0000000001-0000000000000001-stall"
WRITER = "iqn.2000-01.org.opennebula.oneiscsi:stall-test"


class Cfg:
    """What Writer reads from an EqlConfig."""

    chap_user = ""

    def __init__(self, portal, stall):
        host, _, port = portal.rpartition(":")
        self._portal, self._stall = (host.strip("[]"), int(port)), stall

    def portal(self):
        return self._portal

    def initiator(self):
        return WRITER

    def __getitem__(self, key):
        return {"EQL_WRITE_STALL": str(self._stall)}.get(key, "")


@pytest.fixture
def target(tmp_path):
    t = Tgtd(str(tmp_path / "tgt"))
    t.start()
    try:
        t.add_target(IQN, str(tmp_path / "lun.img"), size_bytes=64 * MiB)
        t.bind(IQN)
        yield t
    finally:
        os.kill(t.pid, signal.SIGCONT)
        t.stop()


def _source(tmp_path, size):
    path = str(tmp_path / "src.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    src = source.Source(path)
    src.size = size
    return src


def _qemu_img_of(path):
    """PIDs of processes whose command line names `path`."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                if path.encode() in f.read():
                    pids.append(int(pid))
        except OSError:
            pass
    return pids


def test_stopped_target_is_given_up_after_the_limit(target, tmp_path):
    src = _source(tmp_path, 48 * MiB)
    w = write.Writer(Cfg(target.portal, 5), IQN, rate=4 * MiB)   # ~12 s of copying
    assert w.stall == 5
    stop = threading.Timer(2.0, os.kill, (target.pid, signal.SIGSTOP))
    rescue = threading.Timer(40.0, os.kill, (target.pid, signal.SIGCONT))   # an unbounded copy ends too
    stop.start()
    rescue.start()
    t = time.monotonic()
    try:
        with pytest.raises(Failure, match=r"made no progress for 5 s .*the iSCSI target %s on %s stopped "
                                          r"answering; killed it" % (IQN, target.portal)):
            write.write_local(w, src)
        took = time.monotonic() - t
    finally:
        stop.cancel()
        rescue.cancel()
        os.kill(target.pid, signal.SIGCONT)
    assert 5 <= took < 15, took          # up to 2 s of copying, 5 s without progress, 1 s of polling
    assert _qemu_img_of(src.path) == []  # the whole process group is gone


def test_slow_copy_that_moves_is_not_killed(target, tmp_path):
    src = _source(tmp_path, 24 * MiB)
    w = write.Writer(Cfg(target.portal, 5), IQN, rate=3 * MiB)   # ~8 s, longer than the limit
    t = time.monotonic()
    write.write_local(w, src)
    assert time.monotonic() - t > 5
    with open(os.path.join(str(tmp_path), "lun.img"), "rb") as a, open(src.path, "rb") as b:
        assert a.read(src.size) == b.read()


def test_limit_setting_is_checked():
    assert write._stall({"EQL_WRITE_STALL": ""}) == write.STALL == 120
    assert write._stall({"EQL_WRITE_STALL": "30"}) == 30
    with pytest.raises(Failure, match="EQL_WRITE_STALL"):
        write._stall({"EQL_WRITE_STALL": "1"})


def test_oned_timeout_kills_the_copy_and_undoes(tmp_path):
    """oned's driver timeout sends TERM to the action's process group (CommandManager.rb
    capture3_timeout, release-6.10.5). qemu-img runs in its own group, so the action itself
    must kill it: no copy outlives the action and the new volume is deleted."""
    import subprocess
    from tests import oneutil
    from tests.test_eqliscsi_ds import Lab, ds_data, ensure_links, random_file
    key = str(tmp_path / "hostkey")
    lab = Lab(str(tmp_path / "lab"), key)
    try:
        remotes = tmp_path / "remotes"
        oneutil.build_if_stale()
        oneutil.install(remotes, "6.8")
        ensure_links(remotes)
        src = random_file(str(tmp_path / "big.raw"), 48 * MiB)
        b64 = ds_data(iid=9, name="slow", path=src, ds_tpl={"LIMIT_TRANSFER_BW": "4M"})
        env = dict(os.environ)
        env.pop("ONEISCSI_ONE_VERSION", None)
        env.update(lab.env())
        p = subprocess.Popen([str(remotes / "datastore" / "eqliscsi" / "cp"), "9"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                             start_new_session=True)  # like oned: the action leads its own group
        p.stdin.write(b64)
        p.stdin.close()
        deadline = time.monotonic() + 30
        # the copy runs once the volume exists and a process names the source (qemu-img's probe
        # of the source runs before the volume is created: wait for both)
        while not (_qemu_img_of(src) and "slow.9" in lab.state()) and time.monotonic() < deadline \
                and p.poll() is None:
            time.sleep(0.05)
        assert _qemu_img_of(src), p.stderr.read()
        assert "slow.9" in lab.state()
        os.killpg(p.pid, signal.SIGTERM)
        rc = p.wait(30)
        err = p.stderr.read()
        p.stdout.close()
        p.stderr.close()
        assert rc != 0 and "terminated by signal 15" in err, err
        assert _qemu_img_of(src) == []
        assert lab.state() == {}, err   # the volume it made is deleted
    finally:
        lab.stop()
