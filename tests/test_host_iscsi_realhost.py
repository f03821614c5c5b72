"""Host-side iSCSI scripts with the REAL kernel initiator (QEMU TCG guest, open-iscsi,
udev with the project's rules), next to a stand-in host on the same lab bridge and
the same tgtd, so both initiators can be compared on identical targets.

One guest boot per test session. The scripts reach the guest as oneadmin through the
system ssh client (ONEISCSI_SSH), so they take the `sudo -n` path.
"""
from __future__ import annotations

import os
import secrets
import shlex
import subprocess

import pytest

from oneiscsi import log
from oneiscsi.errors import Failure
from oneiscsi.host import iscsi
from oneiscsi.host.iscsi import Chap, Volume
import tests.realhost as realhost_tests
from tests.realhost import probe

pytestmark = pytest.mark.realhost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULES = [(os.path.join(ROOT, "udev/61-oneiscsi-eql.rules"), "/etc/udev/rules.d/61-oneiscsi-eql.rules"),
         (os.path.join(ROOT, "udev/oneiscsi-eql-volume"), "/etc/udev/scripts/oneiscsi-eql-volume")]
LUN = 64 << 20
SEED_OFF = 2 << 20
WRITE_OFF = 4 << 20
DISK = "/var/lib/one/datastores/0/%d/disk.%d"
CHAP_USER = "hsuser"


def eql_iqn(volume):
    return "iqn.2001-05.com.equallogic:0-8a0906-%s-%s-%s" % (secrets.token_hex(5)[:9], secrets.token_hex(8), volume)


@pytest.fixture(scope="session")
def rig(tmp_path_factory):
    from oneiscsi.sim import realhost
    from oneiscsi.sim.hosts import Lab
    from oneiscsi.sim.tgt import Tgtd
    ok, why = realhost.available()
    if not ok:
        realhost_tests.unavailable(why)
    work = tmp_path_factory.mktemp("hsreal")
    lab = Lab(str(work / "lab"), hosts=("sa1",))
    tgtd = rh = None
    cfg = str(work / "ssh_config")
    try:
        lab.start()
        tgtd = Tgtd(str(work / "tgtd"), portal=lab.san.addr + ":3260", netns=lab.san.netns)
        tgtd.start()
        net = lab.subnet.rsplit(".", 1)[0]
        rh = realhost.RealHost(work / "kvm1", lab.bridge, net + ".50/24", name="kvm1", udev_rules=RULES)
        rh.start(timeout=180)
        print("real host boot %.1f s" % rh.boot_seconds)
        cm = str(work / "cm-%r")
        if len(cm) > 90:
            cm = "/tmp/oneiscsi-hs-%d-%%r" % os.getpid()
        with open(lab.ssh_config) as f:
            text = f.read()
        text += "\n".join(["", "Host kvm1", "  HostName " + rh.addr, "  User oneadmin",
                           "  IdentityFile " + rh.identity, "  IdentitiesOnly yes",
                           "  UserKnownHostsFile " + rh.known_hosts, "  GlobalKnownHostsFile /dev/null",
                           "  StrictHostKeyChecking yes", "  BatchMode yes", "  LogLevel ERROR",
                           "  ControlMaster auto", "  ControlPath " + cm, "  ControlPersist 120",
                           "  ServerAliveInterval 5", ""])
        with open(cfg, "w") as f:
            f.write(text)
        yield dict(lab=lab, tgtd=tgtd, rh=rh, work=work, ssh="ssh -F " + shlex.quote(cfg))
    finally:
        subprocess.run(["ssh", "-F", cfg, "-O", "exit", "kvm1"], capture_output=True, timeout=20)
        if rh is not None:
            rh.stop()
        if tgtd is not None:
            tgtd.stop()
        lab.stop()


@pytest.fixture
def env(rig, monkeypatch, tmp_path):
    monkeypatch.setenv("ONEISCSI_SSH", rig["ssh"])
    monkeypatch.setenv("ONEISCSI_LOG", str(tmp_path / "oneiscsi.log"))
    monkeypatch.setitem(log._state, "opened", False)        # reopen ONEISCSI_LOG for this test
    monkeypatch.setitem(log._state, "file", None)
    made = []

    def target(chap_pw=None, params=None):
        vol = "hsv-" + secrets.token_hex(3)
        iqn = eql_iqn(vol)
        backing = rig["work"] / (vol + ".img")
        token = "SEED-" + secrets.token_hex(6)
        with open(backing, "wb") as f:
            f.truncate(LUN)
            f.seek(SEED_OFF)
            f.write(token.encode())
        rig["tgtd"].add_target(iqn, str(backing), params=params)
        rig["tgtd"].bind(iqn)
        if chap_pw:
            rig["tgtd"].set_chap(iqn, CHAP_USER, chap_pw)
        made.append(iqn)
        return dict(vol=vol, iqn=iqn, backing=backing, token=token)

    yield dict(rig, target=target, logfile=tmp_path / "oneiscsi.log")
    if log._state.get("file") is not None:
        log._state["file"].close()
    for iqn in made:
        rig["tgtd"].delete_target(iqn)


def guest(rig, cmd, check=True):
    return rig["rh"].ssh(cmd, check=check)


def vol_of(rig, t, link=None, size=None):
    return Volume(rig["tgtd"].portal, t["iqn"], t["vol"], link, size)


def test_real_attach_detach_with_chap_and_eql_udev_name(env):
    # oneadmin gets exactly the documented sudoers line (the guest image grants ALL)
    env["rh"].put("/etc/sudoers.d/oneadmin", (iscsi.SUDOERS_LINE + "\n").encode(), mode=0o440)
    r = guest(env, "visudo -c -f /etc/sudoers.d/oneadmin >/dev/null && echo valid; "
                   "su oneadmin -s /bin/sh -c 'sudo -n true 2>/dev/null && echo broad; "
                   "sudo -n iscsiadm --version >/dev/null && echo narrow'", check=False)
    assert r.stdout.split() == ["valid", "narrow"], r.stdout + r.stderr
    pw = "rh" + secrets.token_hex(8)
    t = env["target"](pw, params={"vendor_id": "EQLOGIC"})
    link = DISK % (21, 0)
    v = vol_of(env, t, link, LUN)
    with pytest.raises(Failure) as ei:
        iscsi.attach("kvm1", [v], chap=Chap(CHAP_USER, "wrong" + pw))
    assert "kvm1" in str(ei.value) and "CHAP" in str(ei.value) and pw not in str(ei.value)
    r = guest(env, "iscsiadm -m session; echo rc=$?; iscsiadm -m node; echo rc=$?", check=False)
    assert "rc=21\n" in r.stdout and t["iqn"] not in r.stdout        # no session, no record left

    devs = iscsi.attach("kvm1", [v], chap=Chap(CHAP_USER, pw))
    dev = devs[t["vol"]]
    assert dev == "/dev/disk/by-path/ip-%s-iscsi-%s-lun-1" % (env["tgtd"].portal, t["iqn"])
    again = iscsi.attach("kvm1", [v], chap=Chap(CHAP_USER, pw))
    assert again == devs
    tgt = env["tgtd"].targets()[t["iqn"]]
    assert tgt["sessions"] == 1 and tgt["initiators"] == [env["rh"].initiator_name]

    r = guest(env, "readlink %s; readlink -f %s; readlink -f /dev/eql/%s; cat /sys/block/$(basename $(readlink -f %s))/device/timeout"
              % (link, link, t["vol"], dev))
    target, real, eql, timeout = r.stdout.split()
    assert target == dev and real.startswith("/dev/sd") and eql == real     # /dev/eql/<volume> from the rules
    assert timeout == "60"                                                  # EQLOGIC tuning rule
    assert guest(env, "dd if=%s bs=512 skip=%d count=1 iflag=direct 2>/dev/null | head -c %d"
                 % (link, SEED_OFF // 512, len(t["token"]))).stdout == t["token"]
    written = "REAL-" + secrets.token_hex(6)
    guest(env, "{ printf %s; head -c %d /dev/zero; } | dd of=%s bs=4096 seek=%d oflag=direct conv=notrunc 2>/dev/null"
          % (written, 4096 - len(written), link, WRITE_OFF // 4096))
    with open(t["backing"], "rb") as f:
        f.seek(WRITE_OFF)
        assert f.read(len(written)).decode() == written                     # data is in the backing file

    sd = os.path.basename(real)
    iscsi.detach("kvm1", [v])
    r = guest(env, "test -e /sys/block/%s && echo sd-present; test -e /dev/eql/%s && echo eql-present; "
              "test -L %s && echo link-present; iscsiadm -m session; echo rc=$?; iscsiadm -m node; echo rc=$?"
              % (sd, t["vol"], link), check=False)
    assert "present" not in r.stdout and r.stdout.count("rc=21") == 2
    detail = [line for line in env["logfile"].read_text().splitlines() if "iSCSI detach on kvm1: rc=0" in line]
    assert detail and "logged out" in detail[0] and "failed" not in detail[0]   # flush + sysfs delete via sudo
    assert env["tgtd"].sessions(t["iqn"]) == 0
    iscsi.detach("kvm1", [v])                                               # twice is fine


def test_same_operations_same_names_on_stand_in_and_real_host(env):
    """The project's scripts on both initiators: the same device names and the same
    outcome; then the raw iscsiadm probe for exit codes and by-path names."""
    names, sess = {}, {}
    for host in ("sa1", "kvm1"):
        a, b = env["target"](), env["target"]()
        devs = iscsi.attach(host, [vol_of(env, a, DISK % (22, 0)), vol_of(env, b, DISK % (22, 1))])
        names[host] = sorted(d.replace(a["iqn"], "{a}").replace(b["iqn"], "{b}") for d in devs.values())
        sess[host] = sorted(iqn.replace(a["iqn"], "{a}").replace(b["iqn"], "{b}")
                            for _, iqn in iscsi.sessions(host))
        assert iscsi.logout_strays(host, [a["iqn"]]) == [a["iqn"]]
        assert iscsi.sessions(host) == [(env["tgtd"].portal, b["iqn"])]
        iscsi.detach(host, [vol_of(env, b, DISK % (22, 1))])
        assert iscsi.sessions(host) == []
    assert names["sa1"] == names["kvm1"] == [
        "/dev/disk/by-path/ip-%s-iscsi-{%s}-lun-1" % (env["tgtd"].portal, x) for x in "ab"]
    assert sess["sa1"] == sess["kvm1"] == ["{a}", "{b}"]

    pw = "pr" + secrets.token_hex(8)
    summaries, results = {}, {}
    for host in ("sa1", "kvm1"):
        t = env["target"](pw)
        stdin = probe.probe_input(env["tgtd"].portal, t["iqn"], CHAP_USER, pw, "bad" + pw,
                                  "TOKEN-" + secrets.token_hex(4), SEED_OFF)
        if host == "sa1":
            r = env["lab"].hosts["sa1"].run(probe.probe_command(), input=stdin, timeout=300)
            env["lab"].hosts["sa1"].run("iscsiadm -m node -o delete", check=False)
        else:
            r = env["rh"].ssh(probe.probe_command(), input=stdin, timeout=300)
            guest(env, "iscsiadm -m node -o delete", check=False)
        res = probe.parse(r.stdout)
        assert res.get("done") == "1", r.stdout + r.stderr
        summaries[host] = probe.summary(res, env["tgtd"].portal, t["iqn"], host)
        results[host] = res
    print("stand-in: %s\nreal:     %s" % (summaries["sa1"]["exit_codes"], summaries["kvm1"]["exit_codes"]))
    codes = {h: dict(s["exit_codes"]) for h, s in summaries.items()}
    # blockdev cannot work on the stand-in's LUN file (its documented difference): not iscsiadm
    assert codes["sa1"].pop("flush") == 1 and codes["kvm1"].pop("flush") == 0
    # discovery's <ip>,<port>,1 record next to -o new's old-style file: the first update exits 6
    # exactly when the directory (its file system's hash order) lists the tpgt entry first
    for host, res in results.items():
        want = 6 if probe.tpgt_entry_first(res) else 0
        print("%s: records %s-> first update %d" % (host, res["order_before"], codes[host]["chap_method"]))
        assert codes[host].pop("chap_method") == want, (host, res["order_before"])
        assert len(res["order_after"].split()) == 1 and res["order_after"].count(",") == 2
    assert codes["sa1"] == codes["kvm1"]
    assert codes["kvm1"]["login_badchap"] == 24 and codes["kvm1"]["login_again"] == 15
    assert summaries["sa1"]["by_path"] == summaries["kvm1"]["by_path"] == ["ip-{portal}-iscsi-{iqn}-lun-1"]


SUDO_LOGGING = ("Defaults logfile=/var/log/sudo.log\n"
                "Defaults log_input, log_output, !compress_io, iolog_dir=/var/log/sudo-io\n")


def _grep_guest(rig, needle, paths):
    """Root greps `paths` on the guest for `needle`, which travels on stdin (a grep
    argument would itself be visible in the process list): the matching file names."""
    r = rig["rh"].ssh("grep -rlaF -f /dev/stdin %s 2>/dev/null; true" % " ".join(paths), input=needle + "\n")
    return r.stdout.split()


def test_chap_secret_never_in_sudo_logs_io_logs_syslog_or_process_list(env):
    """The proof of the README's claim on the real kernel: sudo with its log file, syslog
    (rsyslog: auth.log, syslog) and I/O logging of input and output on; oneadmin with
    exactly the README's sudoers line; a ps loop of another user sampling every process's
    command line during the attach. Controls show that each log and the sampler would
    have caught a secret on a command line, on a pipe or in output."""
    rh = env["rh"]
    rh.put("/etc/sudoers.d/oneadmin", (iscsi.SUDOERS_LINE + "\n").encode(), mode=0o440)
    rh.put("/etc/sudoers.d/00-oneiscsi-logging", SUDO_LOGGING.encode(), mode=0o440)
    logs = ["/var/log", "/tmp/oneiscsi-ps.log"]
    try:
        assert guest(env, "visudo -c >/dev/null && echo ok").stdout.strip() == "ok"
        # controls: a secret on a sudo command line lands in auth.log and sudo.log; one on the
        # stdin/stdout of a sudo command without the NOLOG tags lands in the I/O log
        canary = "CANARY" + secrets.token_hex(6)
        rh.ssh("sudo -n iscsiadm -m node -T iqn.2000-01.invalid:oneiscsi-canary -p 192.0.2.1 -o update "
               "-n node.session.auth.password -v %s; true" % canary, user="oneadmin")
        canary_io = "CANARYIO" + secrets.token_hex(6)
        rh.ssh("echo %s | sudo -n tee /sys/block/sdzz/device/delete; true" % canary_io, user="oneadmin")
        found = _grep_guest(env, canary, ["/var/log"])
        assert "/var/log/auth.log" in found and "/var/log/sudo.log" in found, found
        assert any(f.startswith("/var/log/sudo-io/") for f in _grep_guest(env, canary_io, ["/var/log/sudo-io"]))

        # another user samples every command line while the driver attaches with CHAP
        rh.ssh("rm -f /tmp/oneiscsi-ps.log; su nobody -s /bin/sh -c 'while :; do ps -eo user=,args= "
               ">> /tmp/oneiscsi-ps.log; done' </dev/null >/dev/null 2>&1 & echo $! > /tmp/oneiscsi-ps.pid",
               check=True)
        pw = "Se" + secrets.token_hex(10)
        t = env["target"](pw)
        v = vol_of(env, t, DISK % (23, 0), LUN)
        try:
            dev = iscsi.attach("kvm1", [v], chap=Chap(CHAP_USER, pw))[t["vol"]]
            tgt = env["tgtd"].targets()[t["iqn"]]
            assert tgt["sessions"] == 1 and tgt["initiators"] == [rh.initiator_name]   # CHAP login done
            assert guest(env, "test -b $(readlink -f %s) && echo disk" % dev).stdout.strip() == "disk"
            assert _grep_guest(env, pw, ["/etc/iscsi/nodes"])   # the record holds it: the grep works
        finally:
            guest(env, "pkill -P $(cat /tmp/oneiscsi-ps.pid); kill $(cat /tmp/oneiscsi-ps.pid)", check=False)
        iscsi.detach("kvm1", [v])

        sampled = guest(env, "cat /tmp/oneiscsi-ps.log").stdout
        print("ps samples during attach: %d lines; sudo.log lines: %s" % (
            len(sampled.splitlines()), guest(env, "wc -l < /var/log/sudo.log").stdout.strip()))
        assert "sudo -n iscsiadm" in sampled and "iscsiadm -m node -T %s" % t["iqn"] in sampled  # it saw the attach
        sudolog = guest(env, "cat /var/log/sudo.log /var/log/auth.log").stdout
        assert "/usr/bin/tee -a /etc/iscsi/nodes/%s/" % t["iqn"] in sudolog        # the record path was used
        assert _grep_guest(env, pw, logs + ["/etc/sudoers.d", "/root", "/var/lib/one"]) == []
        assert _grep_guest(env, pw, ["/etc/iscsi/nodes"]) == []    # the record went with the detach
        assert pw not in env["logfile"].read_text()
    finally:
        guest(env, "rm -f /etc/sudoers.d/00-oneiscsi-logging /tmp/oneiscsi-ps.log /tmp/oneiscsi-ps.pid", check=False)


def test_initiator_name_and_selftest_row_through_sudo_on_a_root_only_file(env):
    from oneiscsi import selftest
    rh = env["rh"]
    rh.put("/etc/sudoers.d/oneadmin", (iscsi.SUDOERS_LINE + "\n").encode(), mode=0o440)
    assert guest(env, "stat -c '%U %a' /etc/iscsi/initiatorname.iscsi").stdout.split() == ["root", "600"]
    assert rh.ssh("cat /etc/iscsi/initiatorname.iscsi", user="oneadmin").returncode != 0   # as on Debian
    assert iscsi.initiator_name("kvm1") == rh.initiator_name
    plan = selftest.Plan()
    plan.drivers.add("eqliscsi")
    rows = {r[1]: r for r in selftest.check("kvm1", plan)}
    assert rows["initiator name"][2:4] == ("PASS", rh.initiator_name)
    # without the sudoers line: one clear line naming the host and the fix
    rh.put("/etc/sudoers.d/oneadmin", b"oneadmin ALL=(root) NOPASSWD: /usr/sbin/iscsiadm\n", mode=0o440)
    try:
        with pytest.raises(Failure) as ei:
            iscsi.initiator_name("kvm1")
        assert str(ei.value).startswith("host kvm1: cannot read the initiator name (")
        assert "/usr/bin/cat /etc/iscsi/initiatorname.iscsi" in str(ei.value)
        row = {r[1]: r for r in selftest.check("kvm1", plan)}["initiator name"]
        assert row[2] == "FAIL" and "sudoers" in row[4]
    finally:
        rh.put("/etc/sudoers.d/oneadmin", (iscsi.SUDOERS_LINE + "\n").encode(), mode=0o440)
