"""The lab hosts: network namespaces on a bridge, sshd, private dirs, faults, libvirtd."""
import os
import subprocess
import time

import pytest

from oneiscsi.sim.hosts import Lab

pytestmark = pytest.mark.needs_root
BLOCK_ISCSI = "/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"


@pytest.fixture
def lab(tmp_path):
    lab = Lab(str(tmp_path / "lab"), hosts=("host1", "host2"))
    try:
        lab.start()
        yield lab
    finally:
        lab.stop()


def netns_names():
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_lab_up_and_down(tmp_path):
    lab = Lab(str(tmp_path / "lab"))
    try:
        lab.start()
        # brief's budget: < 2 s for 2 hosts without libvirtd (measured ~0.1 s here)
        assert lab.start_seconds < 2.0
        assert lab.subnet.endswith(".0/24") and lab.frontend_addr.endswith(".1")
        assert lab.san is not None and lab.san.addr.endswith(".5")
        assert set(lab.hosts) == {"host1", "host2"}
        names = netns_names()
        assert all(h.netns in names for h in list(lab.hosts.values()) + [lab.san])
        pids = [h.sshd_pid for h in lab.hosts.values()]
        for name, host in lab.hosts.items():
            p = host.ssh("hostname; id -un; cat /etc/iscsi/initiatorname.iscsi")
            assert p.returncode == 0, p.stderr
            out = p.stdout.split()
            assert out[:2] == [name, "oneadmin"]
            assert out[2] == "InitiatorName=" + host.initiator and name in host.initiator
        bridge, netns = lab.bridge, [h.netns for h in lab.hosts.values()] + [lab.san.netns]
    finally:
        lab.stop()
    lab.stop()      # idempotent
    names = netns_names()
    assert not any(n in names for n in netns)
    assert not os.path.exists("/sys/class/net/" + bridge)
    assert not any(os.path.exists("/proc/%d" % pid) for pid in pids)
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()


def test_parallel_labs_get_distinct_subnets(tmp_path):
    with Lab(str(tmp_path / "a"), hosts=("h",), san=False) as a, \
            Lab(str(tmp_path / "b"), hosts=("h",), san=False) as b:
        assert a.subnet != b.subnet and a.bridge != b.bridge
        assert a.hosts["h"].netns != b.hosts["h"].netns
        assert a.hosts["h"].ssh("hostname").stdout.strip() == "h"
        assert b.hosts["h"].ssh("hostname").stdout.strip() == "h"


def test_hosts_have_private_dirs_and_standin_path(lab):
    h1, h2 = lab.hosts["host1"], lab.hosts["host2"]
    with open(os.path.join(h1.datastores, "only-on-host1"), "w"):
        pass
    assert h1.ssh("ls /var/lib/one/datastores").stdout.split() == ["only-on-host1"]
    assert h2.ssh("ls /var/lib/one/datastores").stdout.split() == []
    # oneadmin can write its datastores, /etc/iscsi and /dev/disk/by-path
    p = h2.ssh("touch /var/lib/one/datastores/x /etc/iscsi/x /dev/disk/by-path/x && echo ok")
    assert p.stdout.strip() == "ok", p.stderr
    assert os.path.exists(os.path.join(h2.datastores, "x")) and not os.path.exists(os.path.join(h1.datastores, "x"))
    assert h1.run("ls /dev/disk/by-path").stdout.split() == []
    # the stand-in is first in PATH for ssh commands, sh -s scripts and run()
    standin = os.path.join(lab.standin_dir, "iscsiadm")
    assert h1.ssh("command -v iscsiadm").stdout.strip() == standin
    assert h1.ssh("sh -s", input="command -v iscsiadm\nhostname\n").stdout.split() == [standin, "host1"]
    assert h1.run(["sh", "-c", "command -v iscsiadm; id -un"], user="oneadmin").stdout.split() == [standin, "oneadmin"]
    # the host's /dev is private and still usable by ssh sessions
    assert h1.ssh("echo x > /dev/null && head -c 4 /dev/urandom | wc -c").stdout.strip() == "4"
    assert h1.run("hostname").stdout.strip() == "host1"


def test_lab_without_standin(tmp_path):
    with Lab(str(tmp_path / "lab"), hosts=("h1",), san=False, standin=False) as lab:
        p = lab.hosts["h1"].ssh("echo $PATH; command -v iscsiadm || echo none")
        assert "standin" not in p.stdout and p.stdout.split()[-1] in ("none", "/usr/sbin/iscsiadm", "/sbin/iscsiadm")


def test_host_down_fails_fast_and_comes_back(lab):
    h1, h2 = lab.hosts["host1"], lab.hosts["host2"]
    h1.down()
    t0 = time.monotonic()
    p = h1.ssh("true")
    assert p.returncode == 255
    assert time.monotonic() - t0 < 6.0       # at worst ConnectTimeout 5; here "No route to host" at once
    assert h2.ssh("hostname").stdout.strip() == "host2"
    h1.up()
    p = h1.ssh("hostname")
    assert p.returncode == 0 and p.stdout.strip() == "host1"


def test_hide_a_path_on_one_host(lab):
    h1, h2 = lab.hosts["host1"], lab.hosts["host2"]
    if not os.path.exists(BLOCK_ISCSI):
        pytest.skip("qemu-block-extra not installed")
    h1.hide(BLOCK_ISCSI)
    assert h1.run(["sh", "-c", "test -e %s && echo present || echo gone" % BLOCK_ISCSI]).stdout.strip() == "gone"
    assert h2.run(["sh", "-c", "test -e %s && echo present || echo gone" % BLOCK_ISCSI]).stdout.strip() == "present"
    assert os.path.getsize(BLOCK_ISCSI) > 0
    # qemu on host1 no longer speaks iSCSI; on host2 it still does (it only fails to connect)
    cmd = "qemu-img info iscsi://%s:1/iqn.2024-01.org.example:x/0 2>&1; true" % lab.frontend_addr
    assert "Unknown protocol 'iscsi'" in h1.ssh(cmd).stdout
    assert "Unknown protocol" not in h2.ssh(cmd).stdout
    # the other modules stay usable on host1
    assert h1.ssh("ls %s" % os.path.dirname(BLOCK_ISCSI)).stdout.split() == sorted(
        e for e in os.listdir(os.path.dirname(BLOCK_ISCSI)) if e != os.path.basename(BLOCK_ISCSI))
    h1.hide("/var/lib/one/datastores")
    assert h1.ssh("test -e /var/lib/one/datastores && echo present || echo gone").stdout.strip() == "gone"
    assert h2.ssh("test -e /var/lib/one/datastores && echo present || echo gone").stdout.strip() == "present"


@pytest.mark.slow
def test_libvirtd_per_host(tmp_path):
    t0 = time.monotonic()
    with Lab(str(tmp_path / "lab"), hosts=("host1", "host2"), san=False, libvirtd=True) as lab:
        started = time.monotonic() - t0
        for host in lab.hosts.values():
            assert host.libvirtd_pid and os.path.exists("/proc/%d" % host.libvirtd_pid)
            p = host.ssh("virsh -c qemu:///system secret-list")
            assert p.returncode == 0, p.stderr
            assert "UUID" in p.stdout
        # secrets are per host
        xml = ("<secret ephemeral='no' private='yes'><usage type='iscsi'><target>lab1</target>"
               "</usage></secret>")
        h1, h2 = lab.hosts["host1"], lab.hosts["host2"]
        p = h1.ssh("cat > /tmp/sec-%s.xml && virsh -c qemu:///system secret-define /tmp/sec-%s.xml && rm /tmp/sec-%s.xml"
                   % ((lab.n,) * 3), input=xml)
        assert p.returncode == 0, p.stderr
        assert "lab1" in h1.ssh("virsh -c qemu:///system secret-list").stdout
        assert "lab1" not in h2.ssh("virsh -c qemu:///system secret-list").stdout
    print("lab start with libvirtd: %.2f s" % started)
