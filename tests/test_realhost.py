"""The real-kernel hypervisor host (QEMU TCG guest, Debian kernel, open-iscsi).

One guest boots per module on a private bridge; a private tgtd listens on the
bridge address.  The iSCSI probe (tests/realhost/probe.py) runs once through
ssh and its results are checked piece by piece; a summary JSON (exit codes,
by-path names) is written to ``<pytest basetemp>/realhost-summary.json`` for
the stand-in comparison test.
"""
from __future__ import annotations

import contextlib
import copy
import fcntl
import ipaddress
import json
import os
import secrets
import subprocess
import tarfile
import time

import pytest

from oneiscsi.sim import realhost
from oneiscsi.sim.realhost import RealHost
from oneiscsi.sim.tgt import Tgtd
import tests.realhost as realhost_tests
from tests.realhost import probe

LOCKDIR = "/tmp/oneiscsi-locks"
SEEDED_OFFSET = 2 << 20
LUN_SIZE = 64 << 20


# --------------------------------------------------------------------------
# quick checks that need no guest

def test_build_key_is_stable_and_covers_inputs(monkeypatch):
    k = realhost.build_key()
    assert k == realhost.build_key() and len(k) == 16
    monkeypatch.setattr(realhost, "PACKAGES", realhost.PACKAGES + ("python3",))
    assert realhost.build_key() != k


@pytest.mark.parametrize("ci,outcome", [("true", "fail"), ("1", "fail"), ("", "skip"), ("false", "skip")])
def test_unavailable_guest_fails_under_ci_and_skips_elsewhere(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    exc = pytest.fail.Exception if outcome == "fail" else pytest.skip.Exception
    with pytest.raises(exc) as ei:
        realhost_tests.unavailable("no /dev/net/tun")
    assert "no /dev/net/tun" in str(ei.value)


@pytest.mark.parametrize("kw", [
    {"name": "bad name"}, {"name": "x;rm"}, {"bridge": "br0; reboot"},
    {"bridge": "a-very-long-bridge-name"}, {"addr": "fe80::1/64"}, {"addr": "10.0.0.300"},
    {"gateway": "10.0.0.1; x"}, {"ssh_netns": "ns x"},
])
def test_hostile_parameters_are_refused(tmp_path, kw):
    args = dict(workdir=tmp_path, bridge="br0", addr="10.0.0.5/24")
    args.update(kw)
    with pytest.raises(ValueError):
        RealHost(**args)


def test_ssh_argv_pins_host_key_and_keeps_control_path_short(tmp_path):
    h = RealHost(tmp_path / ("w" * 90), "br0", "10.0.0.5", name="kvm3", ssh_netns="ns1")
    argv = h.ssh_argv("oneadmin")
    assert argv[:4] == ["ip", "netns", "exec", "ns1"] and argv[-1] == "oneadmin@10.0.0.5"
    assert "StrictHostKeyChecking=yes" in argv and "UserKnownHostsFile=" + h.known_hosts in argv
    cp = [a for a in argv if a.startswith("ControlPath=")][0]
    assert len(cp) < 60 and cp.endswith("%r")
    assert not any(a.startswith("Control") for a in h.ssh_argv(multiplex=False))
    with open(h.known_hosts) as f:
        assert f.read() == h.known_hosts_line + "\n"


def test_config_disk_places_rules_keys_and_initiator(tmp_path):
    rule = tmp_path / "99-x.rules"
    rule.write_text('KERNEL=="sd*", SYMLINK+="x/%k"\n')
    helper = tmp_path / "x_helper"
    helper.write_text("#!/bin/sh\necho hi\n")
    other = tmp_path / "y"
    other.write_text("y\n")
    h = RealHost(tmp_path / "w", "br0", "10.0.0.5", name="kvm7",
                 udev_rules=[str(rule), str(helper), (str(other), "/usr/local/sbin/y")])
    assert h.known_hosts_line.startswith("10.0.0.5 ssh-ed25519 ")
    assert h.initiator_name.startswith("iqn.1993-08.org.debian:01:")
    tar = tmp_path / "cfg.tar"
    h._config_tar(str(tar))
    assert os.path.getsize(tar) % 512 == 0
    with tarfile.open(tar) as tf:
        m = {x.name: x for x in tf.getmembers()}
        assert m["etc/udev/rules.d/99-x.rules"].mode == 0o644
        assert m["usr/lib/udev/x_helper"].mode == 0o755
        assert m["usr/local/sbin/y"].mode == 0o755
        assert m["etc/ssh/ssh_host_ed25519_key"].mode == 0o600
        assert m["var/lib/one/.ssh/authorized_keys"].uid == realhost.ONEADMIN_UID
        assert (m["etc/iscsi/initiatorname.iscsi"].mode, m["etc/iscsi/initiatorname.iscsi"].uid) == (0o600, 0)
        ini = tf.extractfile("etc/iscsi/initiatorname.iscsi").read().decode()
        assert ini == "InitiatorName=%s\n" % h.initiator_name
    with pytest.raises(ValueError):
        RealHost(tmp_path / "w2", "br0", "10.0.0.6",
                 udev_rules=[(str(other), "/etc/../x")])._config_tar(str(tmp_path / "c2.tar"))


# --------------------------------------------------------------------------
# the lab around the guest: bridge, address, tgtd

@contextlib.contextmanager
def _lock_one(kind, candidates):
    """Hold an exclusive lock file for the first free candidate."""
    os.makedirs(LOCKDIR, exist_ok=True)
    for n in candidates:
        f = open(os.path.join(LOCKDIR, "%s-%s.lock" % (kind, n)), "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            continue
        try:
            yield n
        finally:
            f.close()
        return
    raise RuntimeError("no free %s" % kind)


def _sh(*argv, check=True):
    return subprocess.run(argv, check=check, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _used_24s():
    out = _sh("ip", "-4", "-o", "addr").stdout
    return {str(ipaddress.ip_interface(w).network) for line in out.splitlines()
            for w in line.split()[3:4]}


@contextlib.contextmanager
def _bridge():
    nets = [n for n in range(1, 255)]
    used = _used_24s()
    nets = [n for n in nets if "10.247.%d.0/24" % n not in used]
    with _lock_one("net-10.247", nets) as n:
        br = "rhb" + secrets.token_hex(3)
        _sh("ip", "link", "add", br, "type", "bridge")
        try:
            _sh("ip", "addr", "add", "10.247.%d.1/24" % n, "dev", br)
            _sh("ip", "link", "set", br, "up")
            yield br, "10.247.%d" % n
        finally:
            _sh("ip", "link", "del", br, check=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ok, why = realhost.available()
    if not ok:
        realhost_tests.unavailable(why)
    t0 = time.monotonic()
    image = realhost.build_image()
    print("image %s: %s in %.1f s" % (image["key"], "built" if image["built"] else "cached",
                                      time.monotonic() - t0))
    work = tmp_path_factory.mktemp("realhost")
    rules = work / "99-oneiscsi-realhost-test.rules"
    rules.write_text('SUBSYSTEM=="block", ENV{DEVTYPE}=="disk", ENV{ID_PATH}=="ip-*-iscsi-*", '
                     'PROGRAM="oneiscsi-test-name %k", SYMLINK+="oneiscsi-test/%c"\n')
    helper = work / "oneiscsi-test-name"
    helper.write_text('#!/bin/sh\necho "lun-$1"\n')
    with contextlib.ExitStack() as stack:
        br, net = stack.enter_context(_bridge())
        tgtd = stack.enter_context(Tgtd(str(work / "tgtd"), portal=net + ".1:3260"))
        host = RealHost(work / "kvm1", br, net + ".5/24", gateway=net + ".1", name="kvm1",
                        udev_rules=[str(rules), str(helper)])
        stack.callback(host.stop)
        iqn = "iqn.2024-01.org.oneiscsi.test:realhost-" + secrets.token_hex(3)
        backing = work / "lun1.img"
        with open(backing, "wb") as f:
            f.truncate(LUN_SIZE)
            f.seek(SEEDED_OFFSET)
            seeded = "SEEDED-" + secrets.token_hex(8)
            f.write(seeded.encode())
        chap_user, chap_pass = "rhuser", secrets.token_hex(8)  # test-only secret
        tgtd.add_target(iqn, str(backing), lun=1)
        tgtd.bind(iqn, initiator=host.initiator_name)  # login proves the per-host name is used
        tgtd.set_chap(iqn, chap_user, chap_pass)
        host.start(timeout=180)
        print("boot %.1f s" % host.boot_seconds)
        yield dict(host=host, tgtd=tgtd, iqn=iqn, portal=net + ".1:3260", backing=backing, bridge=br, net=net,
                   seeded=seeded, chap_user=chap_user, chap_pass=chap_pass, work=work,
                   basetemp=tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def probed(lab):
    token = "GUEST-" + secrets.token_hex(8)
    t0 = time.monotonic()
    r = lab["host"].ssh(probe.probe_command(), input=probe.probe_input(
        lab["portal"], lab["iqn"], lab["chap_user"], lab["chap_pass"], "wrong" + lab["chap_pass"],
        token, SEEDED_OFFSET), timeout=300)
    print("probe %.1f s" % (time.monotonic() - t0))
    assert lab["chap_pass"] not in r.stdout + r.stderr
    res = probe.parse(r.stdout)
    assert res.get("done") == "1", r.stdout + r.stderr
    data = probe.summary(res, lab["portal"], lab["iqn"], "realhost")
    data["kernel"] = lab["host"].ssh("uname -r").stdout.strip()
    for path in (lab["work"] / probe.SUMMARY_NAME, lab["basetemp"] / probe.SUMMARY_NAME):
        probe.write_summary(path, data)
    print("realhost summary:", json.dumps(data, sort_keys=True))
    return dict(res=res, token=token, summary=data)


# --------------------------------------------------------------------------
# the guest itself

@pytest.mark.realhost
def test_guest_boots_with_debian_kernel_and_services(lab):
    h = lab["host"]
    r = h.ssh("uname -r; hostname; cat /etc/iscsi/initiatorname.iscsi; "
              "pgrep -x iscsid >/dev/null && echo iscsid-ok; pgrep -x systemd-udevd >/dev/null && echo udevd-ok; "
              "lsmod | grep -q '^iscsi_tcp ' && echo iscsi_tcp-ok; ip -4 -o addr show dev eth0; ip route",
              check=True)
    lines = r.stdout.splitlines()
    assert lines[0].endswith("-amd64")
    assert lines[1] == "kvm1"
    assert lines[2] == "InitiatorName=" + h.initiator_name
    for word in ("iscsid-ok", "udevd-ok", "iscsi_tcp-ok", h.addr + "/24", "default via " + lab["portal"][:-5]):
        assert word in r.stdout


@pytest.mark.realhost
def test_oneadmin_ssh_home_and_sudo(lab):
    r = lab["host"].ssh("id -u; echo $HOME; test -d /var/lib/one/datastores && echo ds; sudo -n iscsiadm -m iface",
                        user="oneadmin", check=True)
    lines = r.stdout.splitlines()
    assert lines[:3] == [str(realhost.ONEADMIN_UID), "/var/lib/one", "ds"]
    assert "default tcp" in r.stdout


@pytest.mark.realhost
def test_host_key_is_pinned(lab, tmp_path):
    h = lab["host"]
    bad = tmp_path / "kh"
    bad.write_text("%s ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGq6sm0aQ4y3dKXkzN1pQ7p1Ij0jCGrS8Bv5gXm1q4s2\n" % h.addr)
    argv = h.ssh_argv(multiplex=False)
    argv[argv.index("UserKnownHostsFile=" + h.known_hosts)] = "UserKnownHostsFile=%s" % bad
    r = subprocess.run(argv + ["true"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 255


@pytest.mark.realhost
def test_put_writes_file_as_user(lab):
    h = lab["host"]
    h.put("/var/lib/one/put-test", b"\x00bin\xffary", mode=0o640, user="oneadmin")
    r = h.ssh("stat -c '%U %a %s' /var/lib/one/put-test; od -An -tx1 /var/lib/one/put-test", check=True)
    assert r.stdout.split() == ["oneadmin", "640", "8", "00", "62", "69", "6e", "ff", "61", "72", "79"]


@pytest.mark.realhost
def test_ssh_from_a_namespace_on_the_bridge(lab):
    ns, veth = "rhn" + secrets.token_hex(3), "rhv" + secrets.token_hex(3)
    _sh("ip", "netns", "add", ns)
    try:
        _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        _sh("ip", "link", "set", veth, "master", lab["bridge"], "up")
        _sh("ip", "-n", ns, "addr", "add", lab["net"] + ".7/24", "dev", "eth0")
        _sh("ip", "-n", ns, "link", "set", "eth0", "up")
        h = copy.copy(lab["host"])
        h.ssh_netns = ns
        r = h.ssh("echo $SSH_CLIENT", multiplex=False, check=True)
        assert r.stdout.split()[0] == lab["net"] + ".7"
    finally:
        _sh("ip", "netns", "del", ns, check=False)
        _sh("ip", "link", "del", veth, check=False)


@pytest.mark.realhost
def test_failed_start_cleans_up(lab, tmp_path):
    h = RealHost(tmp_path / "bad", "rhnosuch" + secrets.token_hex(2), lab["net"] + ".9/24", name="kvm9")
    with pytest.raises(realhost.RealHostError):
        h.start(timeout=30)
    assert h.pid is None
    assert not os.path.exists("/sys/class/net/" + h.tap)
    assert not (tmp_path / "bad" / "root.qcow2").exists()


@pytest.mark.realhost
def test_init_reaps_orphans(lab):
    r = lab["host"].ssh("for i in 1 2 3 4; do sh -c 'sleep 0.2 & exit 0'; done; sleep 2; "
                        "ps -eo stat=,ppid=,comm= | awk '$1 ~ /^Z/ && $2 == 1' | wc -l", check=True)
    assert r.stdout.strip() == "0"


# --------------------------------------------------------------------------
# the real kernel initiator against tgtd

@pytest.mark.realhost
def test_discovery_lists_target_on_bridge_portal(lab, probed):
    res = probed["res"]
    assert res["rc"]["discovery"] == 0
    assert "%s,1 %s" % (lab["portal"], lab["iqn"]) in res["out"]["discovery"]
    assert res["initiator"] == lab["host"].initiator_name


@pytest.mark.realhost
def test_wrong_chap_is_exit_24_and_leaves_no_session(probed):
    rc = probed["res"]["rc"]
    assert rc["chap_badpass"] == 0
    assert rc["login_badchap"] == 24
    assert rc["session_after_badchap"] == 21


@pytest.mark.realhost
def test_login_makes_by_path_link_and_project_udev_rule_link(lab, probed):
    res = probed["res"]
    assert res["rc"]["login"] == 0
    assert res["links_after_login"] == "yes"
    assert res["by_path"] == ["ip-%s-iscsi-%s-lun-1" % (lab["portal"], lab["iqn"])]
    assert res["device"].startswith("/dev/sd")
    assert int(res["size"]) == LUN_SIZE
    links = res["link"]
    assert "/dev/disk/by-path/" + res["by_path"][0] in links
    assert "/dev/oneiscsi-test/lun-" + os.path.basename(res["device"]) in links  # rule + helper ran
    assert probed["summary"]["by_path"] == ["ip-{portal}-iscsi-{iqn}-lun-1"]


@pytest.mark.realhost
def test_guest_bytes_reach_backing_file_and_back(lab, probed):
    res = probed["res"]
    assert res["rc"]["write"] == 0 and res["rc"]["flush"] == 0
    with open(lab["backing"], "rb") as f:
        f.seek(probe.WRITE_OFFSET)
        block = f.read(4096)
    token = probed["token"].encode()
    assert block == token + b"\0" * (4096 - len(token))
    assert res["read_seeded"] == lab["seeded"]


@pytest.mark.realhost
def test_open_iscsi_exit_codes(probed):
    rc = probed["res"]["rc"]
    assert rc["login_again"] == 15          # already logged in
    assert rc["session"] == 0
    assert rc["logout"] == 0
    assert rc["logout_again"] == 21         # no session
    assert rc["session_none"] == 21
    assert rc["node_show_unknown"] == 21    # no record
    assert rc["node_delete"] == 0
    assert rc["node_show_deleted"] == 21
    # discovery record + -o new's old-style file: the first update converts, and exits 6
    # when the directory lists the tpgt entry first (open-iscsi 2.1.8 idbm_for_each_iface)
    assert rc["chap_method"] == (6 if probe.tpgt_entry_first(probed["res"]) else 0)
    assert len(probed["res"]["order_after"].split()) == 1
    assert probed["summary"]["exit_codes"] == dict(sorted(rc.items()))


@pytest.mark.realhost
def test_logout_removes_device_and_target_session(lab, probed):
    res = probed["res"]
    assert res["links_after_logout"] == "no"
    assert res["device_after_logout"] == "absent"
    t = lab["tgtd"].targets()[lab["iqn"]]
    assert t["sessions"] == 0 and t["acl"] == [lab["host"].initiator_name]


@pytest.mark.realhost
def test_target_sees_the_guest_initiator_while_logged_in(lab, probed):
    h, iqn, portal = lab["host"], lab["iqn"], lab["portal"]
    n = "iscsiadm -m node -T %s -p %s" % (iqn, portal)
    script = ('read -r P; %s -o new >/dev/null && %s -o update -n node.session.auth.authmethod -v CHAP '
              '&& %s -o update -n node.session.auth.username -v %s '
              '&& %s -o update -n node.session.auth.password -v "$P" && %s --login >/dev/null'
              % (n, n, n, lab["chap_user"], n, n))
    h.ssh(script, input=lab["chap_pass"] + "\n", check=True)
    try:
        t = lab["tgtd"].targets()[iqn]
        assert t["sessions"] == 1
        assert t["initiators"] == [h.initiator_name]
    finally:
        h.ssh("%s --logout; %s -o delete" % (n, n), check=True)
    assert lab["tgtd"].sessions(iqn) == 0


@pytest.mark.realhost
def test_summary_json_written(lab, probed):
    for path in (lab["work"] / probe.SUMMARY_NAME, lab["basetemp"] / probe.SUMMARY_NAME):
        with open(path) as f:
            data = json.load(f)
        assert data["initiator_kind"] == "realhost"
        assert data["exit_codes"]["login_badchap"] == 24
        assert lab["chap_pass"] not in json.dumps(data)


@pytest.mark.realhost
def test_stop_kills_qemu_and_removes_tap(lab):
    """Runs last in this module: the guest is gone afterwards."""
    h = lab["host"]
    pid, tap = h.pid, h.tap
    assert pid and os.path.exists("/proc/%d" % pid)
    h.stop()
    h.stop()  # idempotent
    assert not os.path.exists("/proc/%d" % pid)
    assert subprocess.run(["ip", "link", "show", tap], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL).returncode != 0
    assert not list(lab["work"].joinpath("kvm1").glob("cm-*"))
