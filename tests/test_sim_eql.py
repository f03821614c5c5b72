"""oneiscsi.sim.eql: the EqualLogic group simulator, driven through real SSH clients
(paramiko shell/exec, OpenSSH) and checked against the reference output lines;
its volumes are real tgtd targets checked with qemu-img and libiscsi tools."""
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid

import paramiko
import pytest

from tests.oneutil import wait_for

from oneiscsi.san import parse
from oneiscsi.sim.eql import SESSION_LIMIT_LINE, EqlSim
from oneiscsi.sim.eql_group import format_size
from oneiscsi.sim.tgt import Tgtd

IQN_RE = r"iqn\.2001-05\.com\.equallogic:0-8a0906-[0-9a-f]{9}-[0-9a-f]{16}-%s"
H1 = "iqn.2024-01.org.example:host1"
H2 = "iqn.2024-01.org.example:host2"
ACCESS_HEADER = ["ID  Initiator       Ipaddress     AuthMethod UserName   Apply-To",
                 "--- --------------- ------------- ---------- ---------- --------"]


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def keydir(tmp_path_factory):
    """Host key and client keys, generated once per module."""
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "client")],
                   check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "other")],
                   check=True)
    return d


@pytest.fixture(scope="module")
def tgtd(tmp_path_factory):
    with Tgtd(str(tmp_path_factory.mktemp("tgtd"))) as t:
        yield t


@pytest.fixture
def make_sim(tmp_path, keydir):
    sims = []

    def make(**kw):
        kw.setdefault("host_key_file", str(keydir / "host_rsa"))
        s = EqlSim(str(tmp_path / ("sim%d" % len(sims))), **kw)
        sims.append(s)
        s.start()
        return s
    yield make
    for s in sims:
        s.stop()


@pytest.fixture
def sim(make_sim):
    return make_sim(pools={"default": "10GB", "fast": "1GB"})


@pytest.fixture
def dsim(make_sim, tgtd):
    """A simulator whose volumes are real tgtd targets."""
    return make_sim(tgtd=tgtd)


@pytest.fixture
def clients():
    opened = []

    def connect(s, user="grpadmin", password="secret", **kw):
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect("127.0.0.1", s.port, user, password, look_for_keys=False, allow_agent=False,
                  timeout=10, **kw)
        opened.append(c)
        return c
    yield connect
    for c in opened:
        c.close()


class Shell:
    """Prompt-driven interactive session, like the driver's SAN client."""

    def __init__(self, client, prompt="group-0> "):
        self.ch = client.invoke_shell()
        self.ch.settimeout(10)
        self.prompt = prompt
        self.banner = self.read_until(prompt)

    def read_until(self, ending):
        buf = b""
        while not buf.decode(errors="replace").endswith(ending):
            data = self.ch.recv(65536)
            if not data:
                raise EOFError(buf.decode(errors="replace"))
            buf += data
        return buf.decode()

    def raw(self, cmd, ending=None):
        self.ch.sendall((cmd + "\r").encode())
        return self.read_until(ending or self.prompt)

    def run(self, cmd, prompt=None):
        """Output lines of cmd, without the echoed command and the prompt."""
        text = self.raw(cmd, prompt)
        assert "\r\n" in text and "\n" not in text.replace("\r\n", "")   # CRLF only
        lines = text.split("\r\n")
        assert lines[0] == cmd                                           # pty echo
        assert lines[-1] == (prompt or self.prompt)
        return lines[1:-1]


def ex(client, cmd):
    """exec request -> (exit status, output lines)."""
    _i, o, _e = client.exec_command(cmd, timeout=10)
    out = o.read().decode()
    return o.channel.recv_exit_status(), out.split("\r\n")[:-1] if out else []


def value(lines, key):
    return [ln[len(key) + 2:] for ln in lines if ln.startswith(key + ": ")][0]


# ---------------------------------------------------------------- CLI outputs
def test_shell_banner_grpparams_and_session_settings(sim, clients):
    sh = Shell(clients(sim))
    assert "Group Manager" in sh.banner and sh.banner.endswith("\r\ngroup-0> ")
    for cmd in ("stty columns 255", "stty hardwrap off", "cli-settings paging off",
                "cli-settings confirmation off", "cli-settings events off",
                "cli-settings formatoutput off", "cli-settings displayinMB on",
                "cli-settings idlelogout off", "cli-settings reprintBadInput off",
                "grpparams info-messages disable"):
        assert sh.run(cmd) == []
    out = sh.run("grpparams show")
    assert "Group-Name: group-0" in out and "Group-Ipaddress: 127.0.0.1" in out
    assert "paging: off" in sh.run("cli-settings show")
    assert sh.run("whoami") == ["grpadmin"]
    assert sh.run("") == []
    assert sim.commands[:2] == ["stty columns 255", "stty hardwrap off"]
    assert sh.run("bogus") == ["% Error - Invalid command or argument 'bogus'."]
    assert sh.run("stty columns x")[0].startswith("% Error - ")


def test_volume_create_options_show_and_iqn(sim, clients):
    sh = Shell(clients(sim))
    sh.run("stty columns 255")
    sh.run("cli-settings confirmation off")
    out = sh.run("volume create vol.1 1GB description 'an image: x' thin-provision "
                 "pool fast thin-min-reserve 20% unrestricted")
    assert out[0] == "Volume creation succeeded."
    m = re.match(r"^iSCSI target name is (%s)\.$" % (IQN_RE % r"vol\.1"), out[1])
    assert m and len(out) == 2
    iqn = m.group(1)
    v = sim.group.volumes["vol.1"]
    assert (v.pool, v.thin, v.thin_min_reserve, v.description, v.online, v.iqn) == \
        ("fast", True, 20, "an image: x", True, iqn)
    assert [(a.ipaddress, a.authmethod) for a in v.access] == [("*.*.*.*", "none")]
    sh.run('volume create OTHER:2 100 offline description "two words"')
    assert sim.group.volumes["OTHER:2"].iqn.endswith("-other:2")          # lowercased
    assert sim.group.volumes["OTHER:2"].size_mb == 100 and not sim.group.volumes["OTHER:2"].online
    sh.run("volume select vol.1 multihost-access enable")
    detail = sh.run("volume select vol.1 show")
    assert "Volume Information" in detail[0]
    assert detail[7] == "iSCSI Name: " + iqn          # index 8 counting the echo (flocker)
    for key, want in (("Name", "vol.1"), ("Size", "1GB"), ("Status", "online"),
                      ("Connections", "0"), ("Pool", "fast"), ("Description", "an image: x"),
                      ("Thin-Provision", "enabled"), ("Multihost-access", "enabled")):
        assert value(detail, key) == want
    assert sh.run("volume show vol.1") == detail
    assert sh.run("vol sel vol.1 show") == detail     # unique prefixes
    sh.run("volume select vol.1 multihost-access disable")
    sh.run("volume select vol.1 description 'new text'")
    sh.run("volume select vol.1 offline")
    detail = sh.run("volume show vol.1")
    assert value(detail, "Multihost-access") == "disabled"
    assert value(detail, "Status") == "offline" and value(detail, "Description") == "new text"
    sh.run("volume rename vol.1 vol.2")
    assert value(sh.run("volume show vol.2"), "iSCSI Name") == iqn   # IQN never changes
    assert sh.run("volume delete vol.2") == ["Volume deletion succeeded."]


def test_wrapping(sim, clients):
    sh = Shell(clients(sim))
    sh.run("cli-settings confirmation off")
    name = "a-lun-with-a-very-long-lun-name"
    out = sh.run("volume create %s 100MB" % name)
    line = "iSCSI target name is %s." % sim.group.volumes[name].iqn
    assert len(line) > 80
    assert out[1:] == [line[i:i + 80] for i in range(0, len(line), 80)]   # 80 columns
    assert "".join(out[1:]) == line
    detail = sh.run("volume show " + name)
    assert "iSCSI Name: " + sim.group.volumes[name].iqn == "".join(detail[7:9])
    sh.run("stty hardwrap off")
    assert sh.run("volume show " + name)[7] == "iSCSI Name: " + sim.group.volumes[name].iqn
    sh.run("stty hardwrap on")
    sh.run("stty columns 255")
    table = sh.run("volume show")
    assert table[0].split() == ["Name", "Size", "SnapShots", "Status", "Permission",
                                "Connections", "T"]
    # openQRM's example: the name continues in its column, indented by two spaces
    assert table[2].split() == ["a-lun-with-a-ve", "100MB", "0", "online", "read-write", "0", "N"]
    assert table[3:] == ["  ry-long-lun-n", "  ame"]


def test_pool_space_accounting(sim, clients):
    sh = Shell(clients(sim))
    sh.run("stty columns 255")

    def pool():
        out = sh.run("pool select default show")
        return {k: value(out, k) for k in ("TotalCapacity", "FreeSpace", "VolumeReportedSpace",
                                           "TotalVolumes")}
    assert pool() == {"TotalCapacity": "10GB", "FreeSpace": "10GB",
                      "VolumeReportedSpace": "0MB", "TotalVolumes": "0"}
    sh.run("volume create thick 1GB")
    assert pool()["FreeSpace"] == "9GB"
    sh.run("volume create thin 1GB thin-provision")            # 10% min reserve = 103MB
    p = pool()
    assert p["FreeSpace"] == format_size(9 * 1024 - 103) == "8.89GB"
    assert p["VolumeReportedSpace"] == "2GB" and p["TotalVolumes"] == "2"
    sh.run("volume select thick snapshot create-now")           # snapshot: 10% = 103MB
    assert sim.group.free_mb("default") == 9 * 1024 - 206
    sh.run("volume select thick size 2GB no-snap")
    assert sim.group.free_mb("default") == 8 * 1024 - 206
    sh.run("volume select thick size 3GB")                     # snapshot first, as a group does
    assert len(sim.group.volumes["thick"].snapshots) == 2
    assert sim.group.free_mb("default") == 7 * 1024 - 206 - 205
    sh.run("cli-settings displayinMB on")
    assert pool()["FreeSpace"] == "%dMB" % (7 * 1024 - 411)
    rows = sh.run("show pool")
    assert rows[0].split() == ["Name", "Default", "Members", "Volumes", "Capacity", "Free"]
    proxmox = re.compile(r"(\w+)\s+\w+\s+\d+\s+\d+\s+([\d\.]+)([MGT]B)\s+([\d\.]+)([MGT]B)")
    assert proxmox.match(rows[2]).groups() == ("default", "10240", "MB", str(7 * 1024 - 411), "MB")
    assert proxmox.match(rows[3]).group(1) == "fast"
    assert sh.run("volume create big 1TB") == [
        "% Error - Not enough free space in pool 'default' for this operation."]
    assert sh.run("volume create f2 2GB pool fast")[0].startswith("% Error - Not enough free")


@pytest.mark.parametrize("cmd, fragment", [
    ("volume show nosuch", "Volume 'nosuch' does not exist."),
    ("volume select nosuch offline", "does not exist."),
    ("volume select v snapshot select nosnap show", "does not exist."),
    ("volume create v 10", "already exists"),
    ("volume delete v", "Volume is online. Take the volume offline before deleting."),
    ("volume create x abc", "Invalid size 'abc'."),
    ("volume create x 0", "Invalid size '0'."),
    ("volume create x 10XB", "Invalid size"),
    ("volume create %s 10" % ("a" * 65), "Invalid volume name"),
    ("volume create bad_name 10", "Invalid volume name"),
    ("volume create 'bad name' 10", "Invalid volume name"),
    ("volume create x 10 pool nopool", "Pool 'nopool' does not exist."),
    ("volume create x 10 bogus", "Invalid command or argument 'bogus'."),
    ("volume select v size 5", "New size must be larger"),
    ("volume select v access delete 9", "does not exist."),
    ("volume select v access create ipaddress 10.*.1.1", "Invalid IP address"),
    ("volume select v access create authmethod chap", "Specify an initiator"),
    ("chapuser show nobody", "does not exist."),
    ("volume select v snapshot select s restore", "does not exist."),
    ("volume create x 'unterminated", "Unterminated quoted string."),
    ("volume", "Incomplete command."),
])
def test_errors(sim, clients, cmd, fragment):
    c = clients(sim)
    assert ex(c, "volume create v 10")[0] == 0
    rc, out = ex(c, cmd)
    assert rc == 1 and len(out) == 1
    assert out[0].startswith("% Error - ") and fragment in out[0]


def test_valid_names_and_restore_needs_offline(sim, clients):
    c = clients(sim)
    assert ex(c, "volume create %s 10" % ("A.b-9:" + "x" * 58))[0] == 0     # 64 chars
    assert ex(c, "volume create v 10")[0] == 0
    rc, out = ex(c, "volume select v snapshot create-now")
    snap = out[1].split()[3]
    rc, out = ex(c, "volume select v snapshot select %s restore" % snap)
    assert rc == 1 and "offline" in out[0] and out[0].startswith("% Error - ")
    rc, out = ex(c, "volume select v offline\nvolume select v snapshot select %s restore" % snap)
    assert (rc, out) == (0, [])


def test_access_records(sim, clients):
    c = clients(sim)
    ex(c, "volume create v 10\nchapuser create bob password bobsecret1234")
    long_init = "iqn.1993-08.org.debian:01:2227dab76162"
    assert ex(c, "volume select v access create initiator %s" % long_init) == \
        (0, ["Access control record created with ID 1."])
    assert ex(c, "volume select v access create ipaddress 10.1.2.* username bob authmethod chap "
                 "apply-to volume")[1] == ["Access control record created with ID 2."]
    assert ex(c, "volume select v access create username bob")[1][0].endswith("ID 3.")
    rc, out = ex(c, "volume select v access show")
    assert rc == 0 and out[:2] == ACCESS_HEADER
    # cinder's fixture, byte for byte: the initiator wraps onto a 7-space indented line
    assert out[2:4] == ["1   iqn.1993-08.org.debian:01:222 *.*.*.*       none        both",
                        "       7dab76162"]
    assert out[4].split() == ["2", "10.1.2.*", "chap", "bob", "volume"]
    assert out[5].split() == ["3", "*.*.*.*", "chap", "bob", "both"]
    # cinder's parser: a record line starts with the ID, a one-token line continues it
    records, i = {}, 2
    while i < len(out):
        words = out[i].split()
        init = words[1]
        if i + 1 < len(out) and len(out[i + 1].split()) == 1:
            init += out[i + 1].split()[0]
            i += 1
        records[init] = words[0]
        i += 1
    assert records[long_init] == "1"
    assert ex(c, "volume select v access delete 1") == (0, [])
    assert ex(c, "volume select v access create initiator %s" % H1)[1][0].endswith("ID 1.")
    assert [a.initiator for a in sim.group.volumes["v"].access][0] == H1


def test_snapshots(sim, clients):
    c = clients(sim)
    ex(c, "volume create v 100")
    rc, out = ex(c, "volume select v snapshot create-now description 'before upgrade'")
    assert rc == 0 and out[0] == "Snapshot creation succeeded."
    m = re.match(r"^Snapshot name is (v-\d{4}-\d\d-\d\d-\d\d:\d\d:\d\d\.\d+)$", out[1])
    assert m, out
    snap = m.group(1)
    assert out[1].split()[3] == snap                      # Proxmox: word 3 of line 2
    rc, out = ex(c, "volume select v snapshot show")
    assert out[0].split() == ["Name", "Permission", "Status", "Connections"]
    assert out[2].split()[0] == snap[:30] and out[2].split()[2] == "offline"
    detail = ex(c, "volume select v snapshot select %s show" % snap)[1]
    assert value(detail, "Status") == "offline" and value(detail, "Description") == "before upgrade"
    assert re.match(IQN_RE % re.escape(snap.lower()), value(detail, "iSCSI Name"))
    assert ex(c, "volume select v snapshot select %s online" % snap) == (0, [])
    assert value(ex(c, "volume select v snapshot show %s" % snap)[1], "Status") == "online"
    assert ex(c, "volume select v snapshot rename %s mysnap" % snap) == (0, [])
    rc, out = ex(c, "volume select v snapshot select mysnap clone fromsnap")
    assert re.match(r"^iSCSI target name is %s\.$" % (IQN_RE % "fromsnap"), "".join(out[1:]))
    assert sim.group.volumes["fromsnap"].size_mb == 100
    rc, out = ex(c, "volume select v clone copy description 'a copy' offline")
    assert out[0] == "Volume creation succeeded." and not sim.group.volumes["copy"].online
    assert sim.group.volumes["copy"].cloned_from == "v"
    assert ex(c, "volume select v snapshot delete mysnap") == (0, ["Snapshot deletion succeeded."])
    assert sim.group.volumes["v"].snapshots == {}
    assert ex(c, "volume select v offline\nvolume delete v")[1] == ["Volume deletion succeeded."]


def test_chapuser(sim, clients):
    c = clients(sim)
    rc, out = ex(c, "chapuser create alice")
    assert rc == 0 and re.match(r"^Password is (\S{12,})$", out[0])
    pw = out[0].split()[2]
    assert "Password: " + pw in ex(c, "chapuser show alice")[1]
    assert ex(c, "chapuser create bob password s3cretpassword") == (0, [])
    assert "Password: s3cretpassword" in ex(c, "chapuser show bob")[1]
    assert "already exists" in ex(c, "chapuser create bob")[1][0]
    assert ex(c, "chapuser delete bob") == (0, ["CHAP user deletion succeeded."])
    assert ex(c, "chapuser show bob")[0] == 1


def test_confirmation_context_and_logout(sim, clients):
    c = clients(sim)
    sh = Shell(c)
    sh.run("volume create v 10 offline")
    q = sh.raw("volume delete v", "[n]")
    assert q.endswith("Do you really want to delete the volume? (y/n) [n]")
    assert sh.run("n") == [] and "v" in sim.group.volumes
    sh.raw("volume delete v", "[n]")
    assert sh.run("y") == ["Volume deletion succeeded."] and "v" not in sim.group.volumes
    sh.run("volume create w 10")
    ctx = "group-0(volume_w)> "
    assert sh.run("volume select w", prompt=ctx) == []
    assert value(sh.run("show", prompt=ctx), "Name") == "w"
    assert sh.run("offline", prompt=ctx) == [] and not sim.group.volumes["w"].online
    assert sh.run("exit") == []
    assert sh.raw("logout", "[n]").endswith("Do you really want to logout? (y/n) [n]")
    sh.run("n")
    sh.ch.sendall(b"logout\ry\r")
    assert sh.ch.recv_exit_status() == 0
    sh2 = Shell(c)
    sh2.run("cli-settings confirmation off")
    sh2.ch.sendall(b"exit\r")
    assert sh2.ch.recv_exit_status() == 0
    assert wait_for(lambda: sim.sessions_now == 0)




# ------------------------------------------------------------ SSH behaviour
def test_exec_channels_share_one_connection(sim, clients):
    c = clients(sim)
    assert ex(c, "volume create a 10\nvolume create b 10") == (
        0, ["Volume creation succeeded.", "iSCSI target name is %s." % sim.group.volumes["a"].iqn,
            "Volume creation succeeded.", "iSCSI target name is %s." % sim.group.volumes["b"].iqn])
    assert ex(c, "volume show a\nvolume show nosuch")[0] == 1
    sh1, sh2 = Shell(c), Shell(c)
    assert value(sh1.run("volume show a"), "Name") == "a"
    assert ex(c, "volume select a offline") == (0, [])
    assert value(sh2.run("volume show a"), "Status") == "offline"
    assert sim.sessions_now == 2 and sim.sessions_max_seen == 3     # 2 shells + that exec
    assert sim.connections_total == 1 and sim.sessions_total == 5


def test_auth_password_and_keys(make_sim, clients, keydir):
    key = paramiko.Ed25519Key.from_private_key_file(str(keydir / "client"))
    other = paramiko.Ed25519Key.from_private_key_file(str(keydir / "other"))
    s = make_sim(users={"grpadmin": "pw1", "ops": "pw2"},
                 pubkeys=[(keydir / "client.pub").read_text(), ("robot", other)])
    assert ex(clients(s, password="pw1"), "whoami")[1] == ["grpadmin"]
    with pytest.raises(paramiko.AuthenticationException):
        clients(s, password="wrong")
    with pytest.raises(paramiko.AuthenticationException):
        clients(s, user="nobody", password="pw1")
    assert s.auth_failures >= 2
    assert ex(clients(s, user="ops", password=None, pkey=key), "whoami")[1] == ["ops"]
    assert ex(clients(s, user="robot", password=None, pkey=other), "whoami")[1] == ["robot"]
    with pytest.raises(paramiko.AuthenticationException):
        clients(s, user="robot", password=None, pkey=key)


def test_openssh_client(make_sim, keydir, tmp_path):
    s = make_sim(pubkeys=[(keydir / "client.pub").read_text()])
    known = tmp_path / "known_hosts"
    known.write_text(s.host_key_line() + "\n")
    assert s.host_key_line().startswith("[127.0.0.1]:%d ssh-rsa AAAA" % s.port)
    base = ["ssh", "-p", str(s.port), "-o", "UserKnownHostsFile=" + str(known),
            "-o", "StrictHostKeyChecking=yes", "-o", "GlobalKnownHostsFile=/dev/null",
            "-F", "/dev/null"]
    keyed = base + ["-o", "BatchMode=yes", "-i", str(keydir / "client"), "grpadmin@127.0.0.1"]
    r = subprocess.run(keyed + ["volume create v 10"], capture_output=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and r.stdout == ("Volume creation succeeded.\r\niSCSI target name "
                                              "is %s.\r\n" % s.group.volumes["v"].iqn).encode()
    r = subprocess.run(keyed + ["volume show nosuch"], capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 1 and r.stdout.startswith("% Error - ")
    # password auth through SSH_ASKPASS (keeps the password off argv)
    askpass = tmp_path / "askpass"
    askpass.write_text("#!/bin/sh\necho secret\n")
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
    r = subprocess.run(base + ["-o", "PubkeyAuthentication=no", "-o", "NumberOfPasswordPrompts=1",
                               "grpadmin@127.0.0.1", "volume show v"], env=env,
                       capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert r.returncode == 0 and "Volume Information" in r.stdout
    # a wrong host key is refused by the client
    known.write_text("[127.0.0.1]:%d %s" % (s.port, (keydir / "other.pub").read_text()))
    r = subprocess.run(keyed + ["whoami"], capture_output=True, text=True, timeout=20,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 255


def test_session_limit(make_sim, clients):
    s = make_sim(max_sessions=2)
    c = clients(s)
    a, b = Shell(c), Shell(clients(s))
    ch = c.get_transport().open_session()
    ch.invoke_shell()
    assert ch.makefile().read().decode() == SESSION_LIMIT_LINE + "\r\n"
    assert ch.recv_exit_status() == 1
    assert ex(c, "whoami") == (1, [SESSION_LIMIT_LINE])
    assert s.sessions_refused == 2 and s.sessions_max_seen == 2
    a.ch.close()
    assert wait_for(lambda: s.sessions_now == 1)
    assert ex(c, "whoami") == (0, ["grpadmin"])
    assert value(b.run("grpparams show"), "Group-Name") == "group-0"


def test_shell_without_pty_does_not_echo(sim, clients):
    ch = clients(sim).get_transport().open_session()
    ch.settimeout(10)
    ch.invoke_shell()                       # no get_pty(): no echo, still 80 columns
    ch.sendall(b"cli-settings confirmation off\rvolume create v 10\rlogout\r")
    out = ch.makefile().read().decode()
    assert ch.recv_exit_status() == 0
    line = "iSCSI target name is %s." % sim.group.volumes["v"].iqn
    assert "cli-settings" not in out and "volume create" not in out
    assert "Volume creation succeeded.\r\n" + line[:80] + "\r\n" + line[80:] + "\r\n" in out


def test_listen_in_netns(make_sim, tmp_path):
    from oneiscsi.sim.eql import _socket_in_netns
    ns = "eql%d%s" % (os.getpid() % 10000, uuid.uuid4().hex[:4])
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
        s = make_sim(netns=ns)
        with pytest.raises(OSError):                 # not in the root namespace
            socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
        sock = _socket_in_netns(ns, socket.AF_INET)
        sock.connect(("127.0.0.1", s.port))
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect("127.0.0.1", s.port, "grpadmin", "secret", sock=sock, look_for_keys=False,
                  allow_agent=False)
        try:
            assert ex(c, "whoami") == (0, ["grpadmin"])
        finally:
            c.close()
        s.stop()
    finally:
        subprocess.run(["ip", "netns", "del", ns])


# ---------------------------------------------------------------- faults
def test_fault_drop_after(sim, clients):
    sim.faults.drop_after(2)
    sh = Shell(clients(sim))
    sh.run("stty columns 255")
    sh.run("volume create a 10")
    with pytest.raises((EOFError, OSError)):
        sh.run("volume create b 10")
    assert "b" not in sim.group.volumes and "a" in sim.group.volumes   # not executed
    assert ex(clients(sim), "volume create b 10")[0] == 0                # one-shot


def test_fault_drop_mid_output(sim, clients):
    sim.faults.drop_mid_output(r"^volume create")
    sh = Shell(clients(sim))
    with pytest.raises(EOFError) as e:
        sh.run("volume create a 10")
    got = str(e.value)
    full = "volume create a 10\r\nVolume creation succeeded.\r\niSCSI target name is "
    assert got.startswith("volume create a 10\r\nVolume") and "group-0> " not in got
    assert len(got) < len(full) + 40 and sim.group.volumes["a"].iqn not in got
    assert "a" in sim.group.volumes                                     # it did run
    assert ex(clients(sim), "volume show a")[0] == 0


def test_fault_latency_and_fail_next(sim, clients):
    c = clients(sim)
    sim.faults.fail_next(r"^volume create", "Pool is busy.", times=2)
    assert ex(c, "volume create a 10") == (1, ["% Error - Pool is busy."])
    assert ex(c, "volume show")[0] == 0                  # no match: runs
    assert ex(c, "volume create a 10")[1] == ["% Error - Pool is busy."]
    assert "a" not in sim.group.volumes
    assert ex(c, "volume create a 10")[0] == 0
    sim.faults.latency(0.3)
    t0 = time.monotonic()
    ex(c, "whoami\nwhoami")
    assert time.monotonic() - t0 >= 0.6
    sim.faults.clear()
    t0 = time.monotonic()
    ex(c, "whoami")
    assert time.monotonic() - t0 < 0.3


def test_fault_latency_hits_only_chosen_commands(sim, clients):
    c = clients(sim)
    sim.faults.latency(0.6, r"^volume create", times=1)
    t0 = time.monotonic()
    ex(c, "whoami\nvolume show")
    assert time.monotonic() - t0 < 0.5                   # other commands: no delay
    t0 = time.monotonic()
    assert ex(c, "volume create late.1 10")[0] == 0
    assert time.monotonic() - t0 >= 0.6
    t0 = time.monotonic()
    assert ex(c, "volume create late.2 10")[0] == 0      # times=1: used up
    assert time.monotonic() - t0 < 0.5
    sim.faults.clear()


def test_fault_latency_command_completes_after_the_client_left(sim, clients):
    """A late group: the command runs after the sleep even though nobody reads the answer."""
    c = clients(sim)
    sim.faults.latency(0.8, r"^volume create")
    ch = c.get_transport().open_session()
    ch.exec_command("volume create late.3 10")
    time.sleep(0.2)
    c.close()
    assert "late.3" not in sim.group.volumes
    deadline = time.monotonic() + 5
    while "late.3" not in sim.group.volumes and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "late.3" in sim.group.volumes
    sim.faults.clear()


@pytest.mark.parametrize("spelling", ["hyphen", "camel"])
def test_field_spelling_knob(sim, clients, spelling):
    """Both spellings of detail-view field names are read alike by the driver's parser."""
    sim.group.field_spelling = spelling
    sh = Shell(clients(sim))
    sh.run("stty columns 255")
    sh.run("volume create sp.1 10 description 'x y' thin-provision")
    sh.run("volume select sp.1 multihost-access enable")
    out = sh.run("volume select sp.1 show")
    key = "Multihost-access" if spelling == "hyphen" else "MultiHostAccess"
    assert value(out, key) == "enabled"
    assert not any(ln.startswith(("MultiHostAccess:" if spelling == "hyphen" else "Multihost-access:"))
                   for ln in out)
    info = parse.fields(out)
    assert parse.field(info, "multihost access") == "enabled" == info["Multihost-access"]
    assert parse.field(info, "thin provision") == "enabled" and info.get("Description") == "x y"
    assert parse.iqn_field(out) == sim.group.volumes["sp.1"].iqn
    assert parse.pool_space(sh.run("pool select default show"))[0] == 10 * 1024


def test_fault_refuse_sessions(sim, clients):
    c = clients(sim)
    sim.faults.refuse_sessions(True)
    assert ex(c, "whoami") == (1, [SESSION_LIMIT_LINE])
    sim.faults.refuse_sessions(False, limit=1)
    sh = Shell(c)
    assert ex(c, "whoami") == (1, [SESSION_LIMIT_LINE])
    sh.ch.close()
    assert wait_for(lambda: sim.sessions_now == 0)
    assert ex(c, "whoami") == (0, ["grpadmin"])
    sim.faults.clear()
    assert Shell(c) and ex(c, "whoami")[0] == 0


# ------------------------------------------------------- real data (tgtd)
def iscsi_env(user=None, password=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIBISCSI_CHAP")}
    if user:
        env.update(LIBISCSI_CHAP_USERNAME=user, LIBISCSI_CHAP_PASSWORD=password)
    return env


def inq(tgtd, iqn, initiator=H1, user=None, password=None):
    return subprocess.run(["iscsi-inq", "-i", initiator, "iscsi://%s/%s/1" % (tgtd.portal, iqn)],
                          env=iscsi_env(user, password), capture_output=True,
                          timeout=20).returncode


def qemu_convert(src, dst, tgtd):
    """qemu-img convert between a file and an iscsi://portal/iqn/1 LUN ('iqn:' prefix)."""
    def arg(x):
        return "iscsi://%s/%s/1" % (tgtd.portal, x[4:]) if x.startswith("iqn:") else x
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", arg(src), arg(dst)],
                   check=True, capture_output=True, timeout=60)


def read_lun(tgtd, iqn, tmp_path, n):
    out = tmp_path / ("read-%s.raw" % uuid.uuid4().hex[:6])
    out.write_bytes(b"")
    os.truncate(out, 16 << 20)
    qemu_convert("iqn:" + iqn, str(out), tgtd)
    return out.read_bytes()[:n]


def test_data_survives_clone_snapshot_and_restore(dsim, clients, tgtd, tmp_path):
    c = clients(dsim)
    ex(c, "stty columns 255\nvolume create v 16MB unrestricted")
    g = dsim.group
    data = os.urandom(3 << 20)
    src = tmp_path / "src.raw"
    src.write_bytes(data)
    qemu_convert(str(src), "iqn:" + g.volumes["v"].iqn, tgtd)
    rc, out = ex(c, "volume select v snapshot create-now")
    snap = out[1].split()[3]
    rc, out = ex(c, "stty columns 255\nvolume select v clone c1 unrestricted")
    iqn_c1 = out[1][len("iSCSI target name is "):-1]
    assert iqn_c1 == g.volumes["c1"].iqn and iqn_c1 in tgtd.targets()
    assert read_lun(tgtd, iqn_c1, tmp_path, len(data)) == data
    src.write_bytes(os.urandom(3 << 20))               # overwrite the original
    qemu_convert(str(src), "iqn:" + g.volumes["v"].iqn, tgtd)
    assert ex(c, "volume select v snapshot select %s clone c2 unrestricted" % snap)[0] == 0
    assert read_lun(tgtd, g.volumes["c2"].iqn, tmp_path, len(data)) == data
    assert ex(c, "volume select v offline")[0] == 0
    assert g.volumes["v"].iqn not in tgtd.targets()    # offline: no target
    assert ex(c, "volume select v snapshot select %s restore\nvolume select v online" % snap)[0] == 0
    assert read_lun(tgtd, g.volumes["v"].iqn, tmp_path, len(data)) == data
    assert len(g.volumes["v"].snapshots) == 2          # restore kept the overwritten data too


def test_acl_and_chap_enforced_by_target(dsim, clients, tgtd):
    c = clients(dsim)
    ex(c, "volume create v 8")
    iqn = dsim.group.volumes["v"].iqn
    assert inq(tgtd, iqn) != 0                          # no access record: nobody
    ex(c, "volume select v access create initiator %s" % H1)
    assert inq(tgtd, iqn, H1) == 0 and inq(tgtd, iqn, H2) != 0
    ex(c, "volume select v access create ipaddress 127.0.0.*")
    assert inq(tgtd, iqn, H2) == 0                      # OR-ed like separate records
    ex(c, "volume select v access delete 2")
    assert inq(tgtd, iqn, H2) != 0
    ex(c, "chapuser create bob password bobsecret1234")
    ex(c, "volume select v access delete 1\n"
          "volume select v access create initiator %s authmethod chap username bob" % H1)
    assert inq(tgtd, iqn, H1) != 0
    assert inq(tgtd, iqn, H1, "bob", "wrongsecret99") != 0
    assert inq(tgtd, iqn, H1, "bob", "bobsecret1234") == 0
    ex(c, "chapuser delete bob")                        # the record stays, nobody knows a secret
    assert inq(tgtd, iqn, H1, "bob", "bobsecret1234") != 0
    ex(c, "chapuser create bob password othersecret99")
    assert inq(tgtd, iqn, H1, "bob", "othersecret99") == 0
    ex(c, "volume create w 8\nvolume select w access create ipaddress 10.9.9.9")
    assert inq(tgtd, dsim.group.volumes["w"].iqn) != 0  # loopback clients are 127.0.0.1


def test_resize_offline_online_connections_and_delete(dsim, clients, tgtd, tmp_path):
    c = clients(dsim)
    ex(c, "volume create v 8 unrestricted")
    g = dsim.group
    iqn = g.volumes["v"].iqn
    path = tgtd.targets()[iqn]["luns"][1]
    assert os.path.getsize(path) == 8 << 20
    opts = "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,initiator-name=%s" % (
        tgtd.portal, iqn, H1)
    holder = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: tgtd.sessions(iqn) == 1)
        assert value(ex(c, "volume show v")[1], "Connections") == "1"
        assert ex(c, "volume select v size 24MB no-snap") == (0, [])
        out = subprocess.run(["iscsi-readcapacity16", "-i", H2, "iscsi://%s/%s/1" % (tgtd.portal, iqn)],
                             capture_output=True, text=True, timeout=20).stdout
        assert "Total size:%d" % (24 << 20) in out and g.volumes["v"].snapshots == {}
        assert ex(c, "volume select v offline") == (0, [])     # kicks the initiator out
        assert iqn not in tgtd.targets() and tgtd.sessions(iqn) == 0
    finally:
        holder.kill()
        holder.wait()
        holder.stdin.close()
    assert ex(c, "volume select v online")[0] == 0
    assert tgtd.targets()[iqn]["luns"] == {1: path} and tgtd.targets()[iqn]["acl"] == ["ALL"]
    assert ex(c, "volume select v offline\nvolume delete v")[0] == 0
    assert iqn not in tgtd.targets() and not os.path.exists(path)


def test_stop_removes_targets(make_sim, tgtd, clients):
    s = make_sim(tgtd=tgtd)
    ex(clients(s), "volume create v 8\nvolume select v snapshot create-now")
    vol = s.group.volumes["v"]
    snap = next(iter(vol.snapshots))
    ex(clients(s), "volume select v snapshot select %s online" % snap)
    assert {vol.iqn, vol.snapshots[snap].iqn} <= set(tgtd.targets())
    s.stop()
    assert not {vol.iqn, vol.snapshots[snap].iqn} & set(tgtd.targets())


# ------------------------------------------------------------ entry point
def test_main_foreground(tmp_path):
    pwfile = tmp_path / "pw"
    pwfile.write_text("pw-from-file\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "oneiscsi.sim.eql", "--workdir", str(tmp_path / "w"),
         "--user", "admin:@" + str(pwfile), "--pool", "default:5GB", "--group-name", "grp-x",
         "--fail", "^volume delete", "Nope."],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    tgtd_pid = None
    try:
        first = proc.stdout.readline()
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", first).group(1))
        lines = [proc.stdout.readline() for _ in range(3)]
        assert lines[0].startswith("known_hosts: [127.0.0.1]:%d ssh-rsa " % port)
        tgtd_pid = int(re.search(r"pid (\d+)", lines[1]).group(1))
        c = paramiko.SSHClient()
        c.set_missing_host_key_policy(paramiko.AutoAddPolicy())
        c.connect("127.0.0.1", port, "admin", "pw-from-file", look_for_keys=False,
                  allow_agent=False)
        try:
            assert ex(c, "volume create v 1GB")[0] == 0
            assert "TotalCapacity: 5GB" in ex(c, "pool select default show")[1]
            assert ex(c, "volume delete v") == (1, ["% Error - Nope."])
        finally:
            c.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
        with pytest.raises(ProcessLookupError):
            os.kill(tgtd_pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        if tgtd_pid:
            try:
                os.kill(tgtd_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
