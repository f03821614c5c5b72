"""oneiscsi.sim.tgt: a real tgtd, checked with real initiators (libiscsi tools, qemu)."""
import os
import socket
import subprocess
import uuid

import pytest

from tests.oneutil import wait_for

from oneiscsi.sim.tgt import CTL_LOCK_DIR, Tgtd, TgtError, parse_show_target

H1 = "iqn.2024-01.org.example:host1"
H2 = "iqn.2024-01.org.example:host2"


def iqn(tag="t"):
    return "iqn.2024-01.org.example:%s-%s" % (tag, uuid.uuid4().hex[:8])


@pytest.fixture
def tgtd(tmp_path):
    with Tgtd(str(tmp_path / "tgtd")) as t:
        yield t


def url(t, name, lun=1):
    return "iscsi://%s/%s/%d" % (t.portal, name, lun)


def inq(t, name, initiator=H1, user=None, password=None):
    """rc of iscsi-inq against LUN 1 (0 = logged in and answered)."""
    env = dict(os.environ)
    env.pop("LIBISCSI_CHAP_USERNAME", None)
    env.pop("LIBISCSI_CHAP_PASSWORD", None)
    if user:
        env.update(LIBISCSI_CHAP_USERNAME=user, LIBISCSI_CHAP_PASSWORD=password)
    return subprocess.run(["iscsi-inq", "-i", initiator, url(t, name)], env=env,
                          capture_output=True, timeout=20).returncode


def capacity(t, name):
    out = subprocess.run(["iscsi-readcapacity16", "-i", H1, url(t, name)], capture_output=True,
                         text=True, timeout=20, check=True).stdout
    return int(out.split("Total size:")[1].split()[0])


class Holder:
    """An idle initiator session held open by qemu-io (reconnects when kicked)."""

    def __init__(self, t, name, initiator=H1):
        opts = "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,initiator-name=%s" % (
            t.portal, name, initiator)
        self.proc = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdin.close()


@pytest.fixture
def holder():
    held = []

    def make(t, name, initiator=H1):
        h = Holder(t, name, initiator)
        held.append(h)
        return h
    yield make
    for h in held:
        h.close()




def test_start_stop_and_unique_control_numbers(tmp_path):
    a, b = Tgtd(str(tmp_path / "a")), Tgtd(str(tmp_path / "b"))
    try:
        a.start()
        b.start()
        assert a.control != b.control
        assert a.portal != b.portal and a.portal.startswith("127.0.0.1:")
        for t in (a, b):
            host, port = t.portal.rsplit(":", 1)
            socket.create_connection((host, int(port)), timeout=2).close()
            assert os.path.exists(os.path.join(CTL_LOCK_DIR, "ctl.%d.lock" % t.control))
        pid = a.pid
    finally:
        a.stop()
        b.stop()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    a.stop()    # idempotent
    with pytest.raises(TgtError):
        a.targets()


def test_fixed_portal_in_use_is_an_error(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        t = Tgtd(str(tmp_path), "127.0.0.1:%d" % s.getsockname()[1])
        with pytest.raises(TgtError, match="could not bind portal"):
            t.start()
        assert t.pid is None
    finally:
        s.close()


def test_target_lun_acl_and_show(tgtd, tmp_path):
    name = iqn()
    backing = str(tmp_path / "lun.img")
    tid = tgtd.add_target(name, backing, 8 << 20, params={"vendor_id": "EQLOGIC"})
    assert os.path.getsize(backing) == 8 << 20
    assert os.stat(backing).st_blocks == 0            # sparse
    info = tgtd.targets()[name]
    assert info["tid"] == tid and info["luns"] == {1: backing}
    assert info["acl"] == [] and info["sessions"] == 0
    assert inq(tgtd, name) != 0                       # no ACL: nobody
    tgtd.bind(name, initiator=H1)
    tgtd.bind(name, initiator=H1)                     # idempotent
    assert tgtd.targets()[name]["acl"] == [H1]
    assert inq(tgtd, name, H1) == 0 and inq(tgtd, name, H2) != 0
    out = subprocess.run(["iscsi-inq", "-i", H1, url(tgtd, name)], capture_output=True,
                         text=True).stdout
    assert "Vendor:EQLOGIC" in out
    tgtd.unbind(name, initiator=H1)
    tgtd.bind(name, address="127.0.0.1")
    assert inq(tgtd, name, H2) == 0
    tgtd.unbind(name, address="127.0.0.1")
    tgtd.bind(name, address="10.9.9.0/24")            # loopback clients are 127.0.0.1
    assert inq(tgtd, name, H1) != 0
    tgtd.bind(name)                                   # ALL
    assert set(tgtd.targets()[name]["acl"]) == {"10.9.9.0/24", "ALL"}
    assert inq(tgtd, name, H2) == 0
    with pytest.raises(TgtError, match="already exists"):
        tgtd.add_target(name, backing)
    tgtd.delete_target(name)
    tgtd.delete_target(name)                          # idempotent
    assert name not in tgtd.targets()
    assert tgtd.add_target(iqn(), backing) > tid      # tids are never reused


def test_chap(tgtd, tmp_path):
    name, other = iqn(), iqn()
    for n in (name, other):
        tgtd.add_target(n, str(tmp_path / (n[-8:] + ".img")), 4 << 20)
        tgtd.bind(n)
    tgtd.set_chap(name, "alice", "alicesecret12")
    tgtd.set_chap(other, "alice", "alicesecret12")
    assert tgtd.targets()[name]["accounts"] == ["alice"]
    assert inq(tgtd, name) != 0
    assert inq(tgtd, name, user="alice", password="wrongsecret12") != 0
    assert inq(tgtd, name, user="alice", password="alicesecret12") == 0
    tgtd.set_chap(name, "alice", "newsecret1234")      # new password, both targets keep it
    assert inq(tgtd, other, user="alice", password="newsecret1234") == 0
    assert inq(tgtd, name, user="alice", password="alicesecret12") != 0
    tgtd.clear_chap(name, "alice")
    tgtd.clear_chap(name, "alice")                     # idempotent
    assert inq(tgtd, name) == 0
    assert tgtd.targets()[other]["accounts"] == ["alice"]
    tgtd.clear_chap(other, "alice")
    assert "alice" not in subprocess.run(
        ["tgtadm", "-C", str(tgtd.control), "--lld", "iscsi", "--op", "show", "--mode",
         "account"], capture_output=True, text=True).stdout


def test_sessions_kick_resize_and_delete_while_busy(tgtd, tmp_path, holder):
    name = iqn()
    tgtd.add_target(name, str(tmp_path / "busy.img"), 8 << 20)
    tgtd.bind(name, initiator=H1)
    holder(tgtd, name, H1)
    assert wait_for(lambda: tgtd.sessions(name) == 1)
    assert tgtd.targets()[name]["initiators"] == [H1]
    tgtd.resize_lun(name, 24 << 20)                   # LUN busy: still re-created
    assert capacity(tgtd, name) == 24 << 20
    assert os.path.getsize(str(tmp_path / "busy.img")) == 24 << 20
    assert tgtd.targets()[name]["acl"] == [H1]        # ACL restored after the swap
    assert wait_for(lambda: tgtd.sessions(name) >= 1)
    tgtd.unbind(name, initiator=H1)                   # existing session survives an unbind
    assert tgtd.sessions(name) >= 1
    tgtd.kick(name)                                   # ... but not a kick
    assert wait_for(lambda: tgtd.sessions(name) == 0)
    tgtd.bind(name, initiator=H1)
    holder(tgtd, name, H1)
    assert wait_for(lambda: tgtd.sessions(name) >= 1)
    tgtd.delete_target(name)                          # with an initiator logged in
    assert name not in tgtd.targets()
    assert tgtd.sessions(name) == 0


def test_netns(tmp_path):
    ns = "tgt%d%s" % (os.getpid() % 10000, uuid.uuid4().hex[:4])
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        with Tgtd(str(tmp_path), "127.0.0.1:0", netns=ns) as t:
            ns_inode = os.stat("/run/netns/" + ns).st_ino
            assert os.stat("/proc/%d/ns/net" % t.pid).st_ino == ns_inode
            name = iqn()
            t.add_target(name, str(tmp_path / "ns.img"), 4 << 20)
            t.bind(name)
            out = subprocess.run(["ip", "netns", "exec", ns, "iscsi-ls", "iscsi://%s/" % t.portal],
                                 capture_output=True, text=True, timeout=20).stdout
            assert name in out
            host, port = t.portal.rsplit(":", 1)
            with pytest.raises(OSError):      # not reachable from the root namespace
                socket.create_connection((host, int(port)), timeout=1).close()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


def test_parse_show_target():
    text = """Target 3: iqn.2024-01.org.example:a
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 7
            Initiator: iqn.2024-01.org.example:host1 alias: none
            Connection: 0
                IP Address: 127.0.0.1
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
        LUN: 1
            Type: disk
            Backing store path: /x/a.img
    Account information:
        bob
    ACL information:
        ALL
        iqn.2024-01.org.example:host1
Target 4: iqn.2024-01.org.example:b
    System information:
    I_T nexus information:
    LUN information:
        LUN: 0
            Backing store path: None
    Account information:
    ACL information:
"""
    t = parse_show_target(text)
    assert t["iqn.2024-01.org.example:a"] == {
        "tid": 3, "luns": {1: "/x/a.img"}, "acl": ["ALL", "iqn.2024-01.org.example:host1"],
        "accounts": ["bob"], "sessions": 1, "initiators": ["iqn.2024-01.org.example:host1"]}
    assert t["iqn.2024-01.org.example:b"]["luns"] == {} and t["iqn.2024-01.org.example:b"]["tid"] == 4
