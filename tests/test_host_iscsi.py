"""Host-side iSCSI scripts (oneiscsi.host.iscsi) on lab hosts with the iscsiadm stand-in.

Real parts: sshd hosts in network namespaces (oneiscsi.sim.hosts.Lab), the system
ssh client, tgtd in the lab's SAN namespace (CHAP checked by tgtd), the stand-in's
libiscsi logins and FUSE-exported LUNs. ONEISCSI_SSH points at a wrapper that logs
every ssh argv, so round trips can be counted and argv searched for secrets.
"""
from __future__ import annotations

import itertools
import os
import secrets
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from oneiscsi import log
from oneiscsi.errors import Failure, Invalid
from oneiscsi.host import iscsi
from oneiscsi.host.iscsi import Chap, Volume

LUN = 32 << 20
SEED_OFF = 1 << 20
_count = itertools.count()


# ---------------------------------------------------------------- no lab needed
def _render(monkeypatch, func, *args, **kw):
    seen = []

    class Res:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(iscsi.hostrun, "run", lambda host, script, **k: seen.append(script) or Res())
    try:
        func("h1", *args, **kw)
    except Failure:
        pass                                    # no result lines: expected
    return seen[0]


def test_rendered_scripts_are_valid_sh_and_keep_the_password_in_the_heredoc(monkeypatch):
    pw = "pa'ss$(x)`y`\"z;&|"
    v = [Volume("10.0.0.5:3260", "iqn.2001-05.com.equallogic:0-8a0906-0123456789-0123456789abcdef-v1", "v1",
                "/var/lib/one/datastores/0/1/disk.0", 1 << 20),
         Volume("[fe80::1]", "iqn.2024-01.org.x:y", "v2"), Volume("san.example:3261", "iqn.2024-01.org.x:z", "v3")]
    scripts = [_render(monkeypatch, iscsi.attach, v, Chap("u", pw), iface="eth1"),
               _render(monkeypatch, iscsi.detach, v), _render(monkeypatch, iscsi.rescan, v),
               _render(monkeypatch, iscsi.sessions), _render(monkeypatch, iscsi.logout_strays, [v[0].iqn])]
    for s in scripts:
        r = subprocess.run(["sh", "-n"], input=s, text=True, capture_output=True)
        assert r.returncode == 0, r.stderr
        assert s.rstrip().endswith("main < /dev/null")
    lines = scripts[0].splitlines()
    assert [i for i, line in enumerate(lines) if pw in line] == [lines.index("CHAP_PASS=$(cat <<'ONEISCSI_EOF'") + 1]
    assert "'[fe80::1]:3260' fe80::1 3260" in scripts[0]          # iscsiadm portal, by-path host, port
    assert "san.example:3261 '*' 3261" in scripts[0]             # DNS portal: any by-path address
    assert pw not in "".join(scripts[1:])


@pytest.mark.parametrize("make", [
    lambda: Volume("10.0.0.5;reboot", "iqn.2024-01.org.x:y", "v"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y z", "v"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:$(id)", "v"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "../v"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v/w"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v`id`"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v", link="disk.0"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v", link="/var/lib/one/../../etc/passwd"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v", link="/a b"),
    lambda: Volume("10.0.0.5", "iqn.2024-01.org.x:y", "v", size_bytes="1; rm"),
    lambda: Chap("u;id", "secret"),
    lambda: Chap("u", "two\nlines"),
    lambda: Chap("u", ""),
])
def test_hostile_values_are_refused_at_construction(make):
    with pytest.raises(Invalid):
        make()


# ---------------------------------------------------------------- the lab
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespaces, tgtd)")
    from oneiscsi.sim.hosts import Lab
    from oneiscsi.sim.tgt import Tgtd
    work = tmp_path_factory.mktemp("hostiscsi")
    lab = Lab(str(work / "lab"), hosts=("host1", "host2"))
    tgtd = None
    try:
        lab.start()
        tgtd = Tgtd(str(work / "tgtd"), portal=lab.san.addr + ":0", netns=lab.san.netns)
        tgtd.start()
        wrapper = work / "ssh-wrapper"
        wrapper.write_text('#!/bin/sh\nprintf \'%%s\\n\' "$*" >> "$ONEISCSI_TEST_SSH_LOG"\n'
                           'exec ssh -F %s "$@"\n' % lab.ssh_config)
        wrapper.chmod(0o755)
        yield dict(lab=lab, tgtd=tgtd, work=work, wrapper=str(wrapper))
    finally:
        if tgtd is not None:
            tgtd.stop()
        lab.stop()


class Env:
    def __init__(self, lab, tmp_path):
        self.lab, self.tgtd, self.tmp = lab["lab"], lab["tgtd"], tmp_path
        self.sshlog = tmp_path / "ssh-argv.log"
        self.logfile = tmp_path / "oneiscsi.log"
        self.iqns = []

    def target(self, size=LUN, chap=None):
        """A tgtd target with LUN 1 seeded with a token at SEED_OFF -> (Volume factory, token)."""
        n = next(_count)
        name = "hv%d-%s" % (n, secrets.token_hex(3))
        iqn = "iqn.2024-01.org.oneiscsi.test:" + name
        backing = self.tmp / (name + ".img")
        token = "SEED-" + secrets.token_hex(6)
        with open(backing, "wb") as f:
            f.truncate(size)
            f.seek(SEED_OFF)
            f.write(token.encode())
        self.tgtd.add_target(iqn, str(backing))
        self.tgtd.bind(iqn)
        if chap:
            self.tgtd.set_chap(iqn, *chap)
        self.iqns.append(iqn)

        def vol(link=None, size_bytes=None):
            return Volume(self.tgtd.portal, iqn, name, link, size_bytes)
        vol.iqn, vol.name, vol.backing, vol.token = iqn, name, backing, token
        return vol

    def host(self, name="host1"):
        return self.lab.hosts[name]

    def ssh_calls(self):
        return self.sshlog.read_text().splitlines() if self.sshlog.exists() else []

    def state(self, host="host1", iqn=None):
        """(sessions on the host for iqn, node records for iqn) as the stand-in sees them."""
        h = self.host(host)
        s = h.run("iscsiadm -m session", check=False).stdout
        n = h.run("iscsiadm -m node", check=False).stdout
        return ([x for x in s.splitlines() if x.split()[3:4] == [iqn]],
                [x for x in n.splitlines() if x.split()[1:2] == [iqn]])

    def link(self, host, path):
        r = self.host(host).run(["readlink", path], check=False)
        return r.stdout.strip() if r.returncode == 0 else None


@pytest.fixture
def env(lab, tmp_path, monkeypatch):
    e = Env(lab, tmp_path)
    monkeypatch.setenv("ONEISCSI_SSH", lab["wrapper"])
    monkeypatch.setenv("ONEISCSI_TEST_SSH_LOG", str(e.sshlog))
    monkeypatch.setenv("ONEISCSI_LOG", str(e.logfile))
    monkeypatch.setitem(log._state, "opened", False)        # reopen ONEISCSI_LOG for this test
    monkeypatch.setitem(log._state, "debug", True)          # ONEISCSI_DEBUG=1: scripts go to the log too
    monkeypatch.setitem(log._state, "file", None)
    try:
        yield e
    finally:
        f = log._state.get("file")
        if f is not None:
            f.close()
        for h in e.lab.hosts.values():
            if not h._down:
                h.run("iscsiadm -m node -U all; rm -rf /etc/iscsi/nodes /etc/iscsi/send_targets "
                      "/var/lib/one/datastores/*", check=False)
        for iqn in e.iqns:
            e.tgtd.delete_target(iqn)


needs_root = pytest.mark.needs_root
DISK = "/var/lib/one/datastores/0/%d/disk.%d"


@needs_root
def test_attach_links_a_disk_that_reaches_the_lun_and_detach_undoes_it(env):
    t = env.target()
    v = t(link=DISK % (7, 0), size_bytes=LUN)
    devs = iscsi.attach("host1", [v])
    dev = devs[t.name]
    assert dev == "/dev/disk/by-path/ip-%s-iscsi-%s-lun-1" % (env.tgtd.portal, t.iqn)
    assert env.link("host1", DISK % (7, 0)) == dev
    h = env.host()
    read = h.run("dd if=%s bs=512 skip=%d count=1 2>/dev/null | head -c %d"
                 % (DISK % (7, 0), SEED_OFF // 512, len(t.token)))
    assert read.stdout == t.token                      # reads through the link reach the LUN
    written = "WRITTEN-" + secrets.token_hex(6)
    h.run("printf %s | dd of=%s bs=512 seek=4096 conv=notrunc 2>/dev/null" % (written, DISK % (7, 0)))
    sessions, records = env.state(iqn=t.iqn)
    assert len(sessions) == 1 and len(records) == 1 and env.tgtd.sessions(t.iqn) == 1
    assert h.run("iscsiadm -m node -T %s -p %s | grep '^node.startup'" % (t.iqn, env.tgtd.portal)).stdout.split() \
        == ["node.startup", "=", "manual"]

    iscsi.detach("host1", [v])
    assert env.link("host1", DISK % (7, 0)) is None
    assert env.state(iqn=t.iqn) == ([], [])
    assert env.tgtd.sessions(t.iqn) == 0
    assert h.run("ls /dev/disk/by-path /sys/block").stdout.split() == ["/dev/disk/by-path:", "/sys/block:"]
    with open(t.backing, "rb") as f:
        f.seek(4096 * 512)
        assert f.read(len(written)).decode() == written   # the write went through to the backing file
    iscsi.detach("host1", [v])                              # twice: still fine
    assert len(env.ssh_calls()) == 3


@needs_root
def test_attach_twice_keeps_one_session(env):
    t = env.target()
    first = iscsi.attach("host1", [t(link=DISK % (8, 0))])
    second = iscsi.attach("host1", [t(link=DISK % (8, 0))])
    assert first == second
    assert len(env.state(iqn=t.iqn)[0]) == 1 and env.tgtd.sessions(t.iqn) == 1
    # the session stayed but its disk was deleted (a detach that stopped half way): a rescan brings it back
    h = env.host()
    h.run("echo 1 > /sys/block/$(basename $(readlink -f %s))/device/delete; iscsiadm -m session" % first[t.name])
    assert h.run(["test", "-e", first[t.name]], check=False).returncode == 1
    assert iscsi.attach("host1", [t(link=DISK % (8, 0))]) == first
    assert h.run(["test", "-e", first[t.name]], check=False).returncode == 0
    assert len(env.state(iqn=t.iqn)[0]) == 1


def test_the_chap_password_reaches_no_command_line_on_the_host(monkeypatch):
    """In the rendered attach script "$CHAP_PASS" is used once: as an argument of printf,
    a builtin of the host's sh (dash, bash), piped into `tee -a <record file>`."""
    v = Volume("10.0.0.5:3260", "iqn.2024-01.org.x:y", "v1")
    script = _render(monkeypatch, iscsi.attach, [v], Chap("u", "pw-x"))
    uses = [line for line in script.splitlines() if "CHAP_PASS" in line]
    assert uses == ["CHAP_PASS=$(cat <<'ONEISCSI_EOF'", '      "$CHAP_USER" "$CHAP_PASS" | $SUDO tee -a "$f" > /dev/null 2> "$T/$N.tee" ||']
    prev = script.splitlines()[script.splitlines().index(uses[1]) - 1]
    assert prev.strip().startswith("printf 'node.session.auth.authmethod = CHAP") and prev.endswith("\\")
    for shell in ("dash", "bash"):
        r = subprocess.run([shell, "-c", "type printf"], capture_output=True, text=True)
        assert "builtin" in r.stdout, (shell, r.stdout)


def test_sudoers_line_names_each_command_and_keeps_the_record_rule_last():
    line = iscsi.SUDOERS_LINE
    assert line.startswith("oneadmin ALL=(root) NOPASSWD: /usr/sbin/iscsiadm, ")
    assert "/usr/bin/cat /etc/iscsi/initiatorname.iscsi, " in line
    # tags carry over to later commands: the tagged tee rule is the last one
    assert line.endswith("NOLOG_INPUT: NOLOG_OUTPUT: /usr/bin/tee " + iscsi.NODE_RECORD_RE)
    import re
    rx = re.compile(iscsi.NODE_RECORD_RE)
    assert rx.match("-a /etc/iscsi/nodes/iqn.2001-05.com.equallogic:0-8a0906-x-v1/10.0.0.5,3260,1/default")
    assert rx.match("-a /var/lib/iscsi/nodes/iqn.2024-01.org.x:y/10.0.0.5,3260")
    for bad in ("-a /etc/iscsi/nodes/../../shadow", "-a /etc/iscsi/nodes/iqn.x/..,1/default",
                "-a /etc/iscsi/nodes/iqn.x/1.2.3.4,3260,1/../../../shadow", "/etc/iscsi/nodes/iqn.x/1.2.3.4,3260",
                "-a /etc/iscsi/nodes/iqn.x/1.2.3.4,3260 /etc/shadow", "-a /etc/iscsi/nodes/iqn.x/1.2.3.4,3260\n/x"):
        assert not rx.match(bad), bad


@needs_root
def test_initiator_name_read_and_one_clear_line_when_root_only(env):
    h = env.host("host2")
    assert iscsi.initiator_name("host2") == h.initiator
    ini = "/etc/iscsi/initiatorname.iscsi"
    owner = h.run(["stat", "-c", "%u:%g %a", ini]).stdout.split()
    assert owner[1] == "600"
    h.run(["chown", "0:0", ini])
    try:
        with pytest.raises(Failure) as ei:
            iscsi.initiator_name("host2")
    finally:
        h.run(["chown", owner[0], ini])
    msg = str(ei.value)
    assert len(msg.splitlines()) == 1 and msg.startswith("host host2: cannot read the initiator name (")
    assert "not readable by oneadmin" in msg and "/usr/bin/cat /etc/iscsi/initiatorname.iscsi" in msg
    saved = h.run(["cat", ini]).stdout
    h.run(["sh", "-c", "cat > " + ini], input="InitiatorName=iqn.x:y;reboot\n")
    try:
        with pytest.raises(Invalid):
            iscsi.initiator_name("host2")
    finally:
        h.run(["sh", "-c", "cat > " + ini], input=saved)
    assert iscsi.initiator_name("host2") == h.initiator


@needs_root
def test_chap_attach_over_a_discovered_and_an_old_style_record(env):
    """Both record layouts of one portal (discovery's <ip>,<port>,1/default and -o new's
    old-style file): the CHAP lines go into both, the update that converts them may exit 6
    once (retried), the login uses CHAP, one record is left."""
    user, pw = "hvuser", "pw" + secrets.token_hex(8)
    t = env.target(chap=(user, pw))
    h = env.host()
    n = "iscsiadm -m node -T %s -p %s" % (t.iqn, env.tgtd.portal)
    h.run("%s,1 -o new && %s -o new" % (n, n), user="oneadmin")
    assert len(h.run(n + " -o show", user="oneadmin").stdout.split("# BEGIN RECORD")) == 3
    devs = iscsi.attach("host1", [t(link=DISK % (11, 0))], chap=Chap(user, pw))
    assert env.tgtd.sessions(t.iqn) == 1 and env.link("host1", DISK % (11, 0)) == devs[t.name]
    shown = h.run(n + " -o show -S", user="oneadmin").stdout
    assert shown.count("# BEGIN RECORD") == 1 and "node.tpgt = 1\n" in shown
    assert "node.session.auth.password = %s\n" % pw in shown
    iscsi.detach("host1", [t()])


@needs_root
def test_chap_attach_and_wrong_password(env, capsys):
    user, pw = "hvuser", "pw" + secrets.token_hex(8)
    t = env.target(chap=(user, pw))
    # without CHAP the target refuses, and the host is left as it was
    with pytest.raises(Failure) as ei:
        iscsi.attach("host1", [t(link=DISK % (9, 0))])
    assert "host1" in str(ei.value) and t.name in str(ei.value)
    assert env.state(iqn=t.iqn) == ([], []) and env.link("host1", DISK % (9, 0)) is None

    wrong = "wrong" + secrets.token_hex(8)
    with pytest.raises(Failure) as ei:
        iscsi.attach("host1", [t(link=DISK % (9, 0))], chap=Chap(user, wrong))
    msg = str(ei.value)
    assert "host1" in msg and "CHAP" in msg and t.name in msg and len(msg.splitlines()) == 1
    assert wrong not in msg and pw not in msg
    assert env.state(iqn=t.iqn) == ([], [])             # this run's node record was deleted again

    devs = iscsi.attach("host1", [t(link=DISK % (9, 0))], chap=Chap(user, pw))
    assert env.link("host1", DISK % (9, 0)) == devs[t.name]
    assert env.tgtd.sessions(t.iqn) == 1
    shown = env.host().run("iscsiadm -m node -T %s -p %s -S" % (t.iqn, env.tgtd.portal)).stdout
    assert "node.session.auth.authmethod = CHAP" in shown and "node.session.auth.username = %s" % user in shown
    iscsi.detach("host1", [t()])
    # the password is on no ssh argv, in no log line and on no stderr
    argv = "\n".join(env.ssh_calls())
    assert argv and pw not in argv and wrong not in argv
    text = env.logfile.read_text()
    assert "CHAP_PASS" in text and pw not in text and wrong not in text
    assert pw not in capsys.readouterr().err


@needs_root
def test_15_concurrent_attaches_of_one_volume_give_one_session(env):
    t = env.target()
    t0 = time.monotonic()
    with ThreadPoolExecutor(15) as ex:
        results = list(ex.map(lambda i: iscsi.attach("host1", [t(link=DISK % (10, i))]), range(15)))
    elapsed = time.monotonic() - t0
    print("15 concurrent attaches: %.2f s" % elapsed)
    dev = results[0][t.name]
    assert all(r == {t.name: dev} for r in results)
    assert len(env.state(iqn=t.iqn)[0]) == 1 and env.tgtd.sessions(t.iqn) == 1
    assert [env.link("host1", DISK % (10, i)) for i in range(15)] == [dev] * 15
    assert len(env.ssh_calls()) == 15


@needs_root
def test_three_volumes_in_one_round_trip_run_in_parallel(env):
    ts = [env.target() for _ in range(3)]
    vols = [t(link=DISK % (11, i)) for i, t in enumerate(ts)]
    hold = 3.0
    locks = " ".join('"/run/lock/oneiscsi-$(id -u)/%s"' % iscsi.lock_file(t.iqn) for t in ts)
    # another action holds each target's lock for `hold` s: serial jobs would need 3 x hold
    env.host().run("mkdir -p -m 700 /run/lock/oneiscsi-$(id -u); for f in %s; do (flock \"$f\" sleep %s > /dev/null 2>&1 &); done; "
                   "for f in %s; do i=0; while flock -n \"$f\" true; do i=$((i+1)); [ $i -lt 500 ] || exit 1; "
                   "sleep 0.01; done; done" % (locks, hold, locks), user="oneadmin")
    t0 = time.monotonic()
    devs = iscsi.attach("host1", vols)
    elapsed = time.monotonic() - t0
    print("3 volumes behind %.1f s locks: %.2f s" % (hold, elapsed))
    assert sorted(devs) == sorted(t.name for t in ts)
    assert hold * 0.8 < elapsed < 2 * hold           # the locks were honoured, the jobs overlapped
    assert len(env.ssh_calls()) == 1
    for t in ts:
        assert env.tgtd.sessions(t.iqn) == 1
    iscsi.detach("host1", vols)
    assert len(env.ssh_calls()) == 2
    assert all(env.tgtd.sessions(t.iqn) == 0 for t in ts)


@needs_root
def test_detach_of_a_never_attached_volume_and_a_foreign_link(env):
    t = env.target()
    h = env.host()
    h.run("mkdir -p /var/lib/one/datastores/0/12 && ln -s /dev/null %s" % (DISK % (12, 0)), user="oneadmin")
    iscsi.detach("host1", [t(link=DISK % (12, 0))])
    iscsi.detach("host1", [t(link=DISK % (12, 1))])
    assert env.link("host1", DISK % (12, 0)) == "/dev/null"   # not ours: left alone
    assert env.state(iqn=t.iqn) == ([], [])


@needs_root
def test_detach_on_a_dead_host(env, capsys):
    t = env.target()
    iscsi.attach("host2", [t(link=DISK % (13, 0))])
    h2 = env.host("host2")
    h2.down()
    try:
        t0 = time.monotonic()
        iscsi.detach("host2", [t()], missing_ok_host=True)      # a warning only
        assert time.monotonic() - t0 < 10
        err = capsys.readouterr().err
        assert "WARN" in err and "host2" in err and "not reachable" in err
        with pytest.raises(Failure) as ei:
            iscsi.detach("host2", [t()])
        assert "host2" in str(ei.value) and "not reachable" in str(ei.value)
        assert iscsi.logout_strays("host2", [t.iqn]) == []
    finally:
        h2.up()
    assert len(env.state("host2", t.iqn)[0]) == 1                # nothing happened there
    iscsi.detach("host2", [t(link=DISK % (13, 0))])
    assert env.state("host2", t.iqn) == ([], [])


@needs_root
def test_failure_leaves_the_host_as_it_was(env):
    t = env.target()
    # too small: this run's login and node record are undone, no link
    with pytest.raises(Failure) as ei:
        iscsi.attach("host1", [t(link=DISK % (14, 0), size_bytes=2 * LUN)], wait=1)
    assert "host1: %s:" % t.name in str(ei.value) and "smaller" in str(ei.value)
    assert env.state(iqn=t.iqn) == ([], []) and env.tgtd.sessions(t.iqn) == 0
    assert env.link("host1", DISK % (14, 0)) is None
    # a session that was there before stays
    iscsi.attach("host1", [t()])
    with pytest.raises(Failure):
        iscsi.attach("host1", [t(link=DISK % (14, 1), size_bytes=2 * LUN)], wait=1)
    sessions, records = env.state(iqn=t.iqn)
    assert len(sessions) == 1 and len(records) == 1
    # one bad volume among good ones: the good ones attach, the failure names the bad one
    good = env.target()
    with pytest.raises(iscsi.HostFailure) as ei:
        iscsi.attach("host1", [good(), t(size_bytes=2 * LUN)], wait=1)
    assert ei.value.failed == [t.name] and list(ei.value.devices) == [good.name]


@needs_root
def test_rescan_after_a_resize(env):
    t = env.target()
    devs = iscsi.attach("host1", [t(link=DISK % (15, 0), size_bytes=LUN)])
    h = env.host()
    sd = os.path.basename(h.run(["readlink", "-f", devs[t.name]]).stdout.strip())
    env.tgtd.resize_lun(t.iqn, 2 * LUN)
    assert int(h.run(["cat", "/sys/block/%s/size" % sd]).stdout) * 512 == LUN      # not seen yet
    iscsi.rescan("host1", [t(size_bytes=2 * LUN)])
    assert int(h.run(["cat", "/sys/block/%s/size" % sd]).stdout) * 512 == 2 * LUN
    assert h.run("dd if=%s bs=512 skip=%d count=1 2>/dev/null | head -c %d"
                 % (DISK % (15, 0), SEED_OFF // 512, len(t.token))).stdout == t.token
    with pytest.raises(Failure) as ei:
        iscsi.rescan("host2", [t()])
    assert "host2" in str(ei.value) and "rescan" in str(ei.value)


@needs_root
def test_sessions_and_stray_cleanup(env):
    a, b = env.target(), env.target()
    iscsi.attach("host1", [a(), b()])
    assert sorted(iscsi.sessions("host1")) == sorted([(env.tgtd.portal, a.iqn), (env.tgtd.portal, b.iqn)])
    assert iscsi.sessions("host2") == []
    assert iscsi.logout_strays("host1", [a.iqn, "iqn.2024-01.org.oneiscsi.test:none"]) == [a.iqn]
    assert iscsi.sessions("host1") == [(env.tgtd.portal, b.iqn)]
    assert env.state(iqn=a.iqn) == ([], []) and env.tgtd.sessions(a.iqn) == 0
    assert iscsi.logout_strays("host1", [a.iqn]) == []
    assert iscsi.logout_strays("host2", [a.iqn, b.iqn]) == []


@needs_root
def test_hostile_names_never_reach_ssh(env):
    t = env.target()
    for call in (
        lambda: iscsi.attach("host1;id", [t()]),
        lambda: iscsi.attach("-oProxyCommand=touch /tmp/x", [t()]),
        lambda: iscsi.attach("host1", [t()], iface="eth0 -o x"),
        lambda: iscsi.attach("host1", [t()], base_device="dev/eql"),
        lambda: iscsi.attach("host1", [t(), t()]),
        lambda: iscsi.attach("host1", []),
        lambda: iscsi.detach("host1", [t()], base_device="/dev/$(id)"),
        lambda: iscsi.logout_strays("host1", ["iqn.2024-01.x:y;reboot"]),
        lambda: iscsi.attach("host1", [Volume(env.tgtd.portal, t.iqn, "v;rm -rf /")]),
    ):
        with pytest.raises(Invalid):
            call()
    assert env.ssh_calls() == []


def test_eql_iface_lists_and_multipath_scripts(monkeypatch):
    assert iscsi.ifaces_of("eql0, eql1") == ["eql0", "eql1"] == iscsi.ifaces_of("eql0 eql1")
    assert iscsi.ifaces_of("eql0") == ["eql0"] and iscsi.ifaces_of("") == [] and iscsi.ifaces_of(None) == []
    for bad in ("eql0,eql0", "eql0,$(x)", "eql0;rm", "-I"):
        with pytest.raises(Invalid):
            iscsi.ifaces_of(bad)
    v = [Volume("10.0.0.5:3260", "iqn.2001-05.com.equallogic:0-8a0906-0123456789-0123456789abcdef-v1", "v1",
                "/var/lib/one/datastores/0/1/disk.0", 1 << 20)]
    single = _render(monkeypatch, iscsi.attach, v, iface="eth1")
    multi = _render(monkeypatch, iscsi.attach, v, iface="eql0,eql1")
    detach = _render(monkeypatch, iscsi.detach, v, iface="eql0,eql1", force=True)
    for s in (single, multi, detach):
        assert subprocess.run(["sh", "-n"], input=s, text=True, capture_output=True).returncode == 0
    # one iface: today's single path (attach_one, -I eth1, no multipath preflight)
    assert "IFACE=eth1\nIFACES=''\nMULTIPATH=\n" in single and " attach_one " in single
    assert "multipathd show status" not in single.split("main() {")[1].split("attach_one()")[0]
    # several: attach_mp under the target's lock, multipathd asked first
    assert "IFACE=''\nIFACES='eql0 eql1'\nMULTIPATH=1\n" in multi and " attach_mp " in multi
    assert "FORCE=1" in detach and "MULTIPATH=1" in detach


@needs_root
def test_multipath_attach_on_a_host_without_multipathd_logs_nothing_in(env):
    """The stand-in host has no multipath-tools (the stand-in cannot do dm-multipath): the
    preflight refuses before any record or login; single-path attaches there are unchanged."""
    t = env.target()
    with pytest.raises(Failure) as ei:
        iscsi.attach("host1", [t(link=DISK % (40, 0), size_bytes=LUN)], iface="eql0,eql1")
    assert "host1" in str(ei.value) and "multipath" in str(ei.value), str(ei.value)
    assert env.state(iqn=t.iqn) == ([], []) and env.tgtd.sessions(t.iqn) == 0
    assert env.link("host1", DISK % (40, 0)) is None
    # detach with the list on a host that never attached: success ("already gone")
    iscsi.detach("host1", [t(link=DISK % (40, 0))], iface="eql0,eql1")
