"""The iscsiadm stand-in: open-iscsi's node DB, messages and exit codes; real logins
through libiscsi against tgtd on a lab host (CHAP, ACLs, by-path data path, concurrency)."""
import os
import shutil
import subprocess
import threading

import pytest

from oneiscsi.sim.hosts import Lab
from oneiscsi.sim.tgt import Tgtd

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "oneiscsi", "sim", "standin",
                       "iscsiadm")
IQN = "iqn.2024-01.org.example:t1"
P = "127.0.0.1:3260"
PYTHON = "/usr/bin/python3"      # what hosts run it with (env python3 may be a slow pyenv shim)


# ------------------------------------------------------------------ DB only (any user, no lab)

@pytest.fixture
def db(tmp_path):
    root = tmp_path / "root"
    (root / "etc/iscsi").mkdir(parents=True)
    (root / "etc/iscsi/initiatorname.iscsi").write_text("InitiatorName=iqn.1993-08.org.debian:01:t\n")

    def iscsiadm(*args):
        env = dict(os.environ, ISCSIADM_STANDIN_ROOT=str(root))
        return subprocess.run([PYTHON, STANDIN] + list(args), env=env, capture_output=True, text=True)
    iscsiadm.etc = root / "etc/iscsi"
    return iscsiadm


def test_node_new_layout_and_listing(db):
    p = db("-m", "node", "-o", "new", "-T", IQN, "-p", P)
    assert p.returncode == 0
    assert p.stdout == "New iSCSI node [tcp:[hw=,ip=,net_if=,iscsi_if=default] 127.0.0.1,3260,-1 %s] added\n" % IQN
    rec = db.etc / "nodes" / IQN / "127.0.0.1,3260"          # tpgt -1: a file, no iface level
    text = rec.read_text()
    assert text.startswith("# BEGIN RECORD 2.1.8\nnode.name = %s\nnode.tpgt = -1\n" % IQN)
    assert text.endswith("node.conn[0].iscsi.OFMarker = No\n# END RECORD\n")
    assert "<empty>" not in text and " = \n" not in text and len(text.splitlines()) == 67
    assert oct(rec.stat().st_mode & 0o777) == "0o600"
    p = db("-m", "node")
    assert (p.returncode, p.stdout) == (0, "127.0.0.1:3260,4294967295 %s\n" % IQN)
    p = db("-m", "node", "-o", "new", "-T", IQN + "b", "-p", "127.0.0.1:3261,1", "-I", "default")
    assert p.returncode == 0
    assert (db.etc / "nodes" / (IQN + "b") / "127.0.0.1,3261,1" / "default").is_file()
    assert db("-m", "node", "-P", "1").stdout == (
        "Target: %s\n\tPortal: 127.0.0.1:3260,-1\n\t\tIface Name: default\n"
        "Target: %sb\n\tPortal: 127.0.0.1:3261,1\n\t\tIface Name: default\n" % (IQN, IQN))


def test_update_with_old_style_and_discovered_record_follows_open_iscsi(db):
    """Measured on the real-kernel guest (open-iscsi 2.1.8): after discovery made
    <ip>,<port>,1/default, `-o new -p ip:port` adds the old-style file <ip>,<port>; the first
    update converts (deletes) the file and exits 6 when the directory lists the tpgt entry
    first; then one record is left and updates are 0. Several portals cover both orders."""
    orders = set()
    for i in range(1, 13):
        portal = "10.9.9.%d:3260" % i
        assert db("-m", "node", "-o", "new", "-T", IQN, "-p", portal + ",1").returncode == 0
        assert db("-m", "node", "-o", "new", "-T", IQN, "-p", portal).returncode == 0
        entries = [e for e in os.listdir(db.etc / "nodes" / IQN) if e.startswith("10.9.9.%d," % i)]
        assert sorted(entries) == ["10.9.9.%d,3260" % i, "10.9.9.%d,3260,1" % i]
        tpgt_first = entries[0].endswith(",1")
        orders.add(tpgt_first)
        p = db("-m", "node", "-T", IQN, "-p", portal, "-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP")
        if tpgt_first:
            assert p.returncode == 6
            assert p.stderr == ("iscsiadm: iface iter could not stat %s/nodes/%s/10.9.9.%d,3260.\niscsiadm: Could not "
                                "execute operation on all records: encountered iSCSI database failure\n"
                                % (db.etc, IQN, i))
        else:
            assert (p.returncode, p.stderr) == (0, "")
        assert not (db.etc / "nodes" / IQN / ("10.9.9.%d,3260" % i)).exists()
        p = db("-m", "node", "-T", IQN, "-p", portal, "-o", "update", "-n", "node.session.auth.username", "-v", "u")
        assert p.returncode == 0
        show = db("-m", "node", "-T", IQN, "-p", portal, "-o", "show").stdout
        assert show.count("# BEGIN RECORD") == 1 and "authmethod = CHAP" in show and "username = u\n" in show
    fstype = subprocess.run(["stat", "-f", "-c", "%T", str(db.etc)], capture_output=True, text=True).stdout.strip()
    if fstype == "ext2/ext3":          # hash-ordered directories (ext4): both orders occur in 12 portals
        assert orders == {True, False}, "the directory order never varied: both cases not covered"


def test_appended_auth_lines_win_and_an_update_rewrites_them(db):
    """set_chap's path: `name = value` lines appended to a record file count, the last
    one of a name wins (open-iscsi 2.1.8 idbm_recinfo_config), an update rewrites the file."""
    db("-m", "node", "-o", "new", "-T", IQN, "-p", P)
    rec = db.etc / "nodes" / IQN / "127.0.0.1,3260"
    with open(rec, "a") as f:
        f.write("node.session.auth.authmethod = CHAP\nnode.session.auth.username = u1\n"
                "node.session.auth.password = p w#1\n")
    show = db("-m", "node", "-T", IQN, "-p", P, "-o", "show", "-S").stdout
    assert "authmethod = CHAP\n" in show and "username = u1\n" in show and "password = p w#1\n" in show
    assert db("-m", "node", "-T", IQN, "-p", P, "-o", "update", "-n", "node.startup", "-v", "manual").returncode == 0
    text = rec.read_text()
    assert text.count("node.session.auth.password") == 1 and text.endswith("# END RECORD\n")


def test_node_update_show_delete_and_codes(db):
    (db.etc / "iscsid.conf").write_text("node.startup = automatic\nnode.session.auth.authmethod = CHAP\n")
    db("-m", "node", "-o", "new", "-T", IQN, "-p", P)
    show = db("-m", "node", "-T", IQN, "-p", P, "-o", "show").stdout
    assert "node.startup = automatic\n" in show and "node.session.auth.authmethod = CHAP\n" in show
    assert show.count("\n") == 109 and "node.session.auth.username = <empty>\n" in show
    p = db("-m", "node", "-T", IQN, "-p", "127.0.0.1", "-o", "update", "-n", "node.session.auth.username",
           "-v", "u1", "-n", "node.session.auth.password", "-v", "pw-secret")
    assert (p.returncode, p.stdout, p.stderr) == (0, "", "")
    show = db("-m", "node", "-T", IQN, "-o", "show").stdout
    assert "node.session.auth.username = u1\n" in show and "node.session.auth.password = ********\n" in show
    assert "pw-secret" not in show
    assert "node.session.auth.password = pw-secret\n" in db("-m", "node", "-T", IQN, "-o", "show", "-S").stdout
    p = db("-m", "node", "-T", IQN, "-p", P, "-o", "update", "-n", "node.bogus", "-v", "x")
    assert (p.returncode, p.stderr) == (7, "iscsiadm: Cannot modify node.bogus. Invalid param name.\n"
                                           "iscsiadm: Could not execute operation on all records: invalid parameter\n")
    for op in (["-o", "show"], ["-o", "delete"], ["-o", "update", "-n", "node.startup", "-v", "manual"], ["--login"]):
        p = db("-m", "node", "-T", "iqn.nosuch:x", "-p", P, *op)
        assert (p.returncode, p.stderr) == (21, "iscsiadm: No records found\n"), op
    # -o new on an existing record starts it again from the defaults
    db("-m", "node", "-o", "new", "-T", IQN, "-p", P)
    assert "node.session.auth.username = <empty>" in db("-m", "node", "-T", IQN, "-o", "show").stdout
    assert db("-m", "node", "-T", IQN, "-p", P, "-o", "delete").returncode == 0
    assert not (db.etc / "nodes" / IQN).exists()
    assert db("-m", "node").returncode == 21
    assert db("-m", "node", "-o", "frob").returncode == 7
    assert db("-m", "bogus").stderr == "iscsiadm: mode -1 is not yet supported\n"


def test_sessions_and_logout_without_sessions(db):
    assert (db("-m", "session").returncode, db("-m", "session").stderr) == (21, "iscsiadm: No active sessions.\n")
    assert db("-m", "session", "-P", "3").returncode == 21
    p = db("-m", "node", "-T", IQN, "-p", P, "--logout")
    assert (p.returncode, p.stderr) == (21, "iscsiadm: No matching sessions found\n")
    assert db("-m", "node", "-T", IQN, "-u").returncode == 21
    p = db("-m", "node", "-T", IQN, "-p", P, "--rescan")
    assert (p.returncode, p.stderr) == (21, "iscsiadm: No session found.\n")


def test_discoverydb_records(db):
    p = db("-m", "discoverydb", "-t", "st", "-p", P, "-o", "new")
    assert (p.returncode, p.stdout) == (0, "New discovery record for [127.0.0.1,3260] added.\n")
    assert (db.etc / "send_targets" / "127.0.0.1,3260" / "st_config").is_file()
    assert db("-m", "discoverydb", "-t", "st", "-p", P, "-o", "update", "-n",
              "discovery.sendtargets.auth.authmethod", "-v", "CHAP").returncode == 0
    show = db("-m", "discoverydb", "-t", "st", "-p", P, "-o", "show").stdout
    assert "discovery.sendtargets.auth.authmethod = CHAP\n" in show and show.count("\n") == 19
    p = db("-m", "discoverydb", "-t", "st", "-p", "10.9.9.9:3260", "-o", "update", "-n",
           "discovery.sendtargets.auth.authmethod", "-v", "CHAP")
    assert (p.returncode, p.stderr) == (6, "iscsiadm: Discovery record [10.9.9.9,3260] not found.\n")
    assert db("-m", "discoverydb").stdout == "127.0.0.1:3260 via sendtargets\n"
    assert db("-m", "discoverydb", "-t", "st", "-p", P, "-o", "delete").returncode == 0
    assert not (db.etc / "send_targets" / "127.0.0.1,3260").exists()


def test_iface_listing(db):
    p = db("-m", "iface")
    assert p.stdout == ("default tcp,<empty>,<empty>,<empty>,<empty>\n"
                        "iser iser,<empty>,<empty>,<empty>,<empty>\n")
    assert db("-m", "iface", "-I", "default").stdout.count("\n") == 57
    assert db("-m", "iface", "-I", "nosuch").returncode == 6


def real_iscsiadm():
    """The real open-iscsi iscsiadm, if installed (or named by ONEISCSI_REAL_ISCSIADM)."""
    path = os.environ.get("ONEISCSI_REAL_ISCSIADM") or shutil.which("iscsiadm", path="/usr/sbin:/sbin")
    return path if path and os.path.realpath(path) != os.path.realpath(STANDIN) else None


@pytest.mark.needs_root
@pytest.mark.skipif(real_iscsiadm() is None, reason="open-iscsi not installed (set ONEISCSI_REAL_ISCSIADM)")
def test_db_operations_match_real_open_iscsi(tmp_path):
    os.makedirs("/etc/iscsi", exist_ok=True)
    real_etc, fake_root = tmp_path / "real", tmp_path / "fake"
    (fake_root / "etc/iscsi").mkdir(parents=True)
    real_etc.mkdir()
    for d in (real_etc, fake_root / "etc/iscsi"):      # no iscsid: both use built-in defaults
        (d / "iscsid.conf").write_text("iscsid.startup = /bin/true\n")
        (d / "initiatorname.iscsi").write_text("InitiatorName=iqn.1993-08.org.debian:01:t\n")
    steps = [
        ["-m", "node", "-T", IQN, "-p", P, "-o", "new"],
        ["-m", "node"],
        ["-m", "node", "-T", IQN, "-p", P, "-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP",
         "-n", "node.session.auth.username", "-v", "u1", "-n", "node.session.auth.password", "-v", "pw"],
        ["-m", "node", "-T", IQN, "-o", "show"],
        ["-m", "node", "-T", IQN, "-p", P, "-o", "update", "-n", "node.bogus", "-v", "x"],
        ["-m", "node", "-T", IQN + "b", "-p", "127.0.0.1:3260,1", "-o", "new"],
        ["-m", "node", "-p", "127.0.0.1"],
        ["-m", "node", "-T", "iqn.nosuch:x", "-p", P, "-o", "show"],
        ["-m", "node", "-T", IQN, "-p", P, "--logout"],
        ["-m", "session"],
        ["-m", "iface"],
        ["-m", "iface", "-I", "default"],
        ["-m", "discoverydb", "-t", "st", "-p", P, "-o", "new"],
        ["-m", "discoverydb", "-t", "st", "-p", P, "-o", "show"],
        ["-m", "discoverydb", "-t", "st", "-p", "10.9.9.9:3260", "-o", "update", "-n",
         "discovery.sendtargets.auth.authmethod", "-v", "CHAP"],
        ["-m", "discoverydb", "-t", "st", "-p", P, "-o", "delete"],
        ["-m", "node", "-T", IQN + "b", "-o", "delete"],
        ["-m", "node", "-o", "frob"],
    ]
    noise = ("systemd", "Failed to connect to bus", "(111)", "iscsid is not running")
    for args in steps:
        r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$0" /etc/iscsi && exec "$@"',
                            str(real_etc), real_iscsiadm()] + args, capture_output=True, text=True)
        f = subprocess.run([PYTHON, STANDIN] + args, capture_output=True, text=True,
                           env=dict(os.environ, ISCSIADM_STANDIN_ROOT=str(fake_root)))
        r_err = "".join(l for l in r.stderr.splitlines(True) if not any(n in l for n in noise))
        assert (f.returncode, f.stdout, f.stderr) == (r.returncode, r.stdout, r_err), args
    for dirpath, dirs, files in os.walk(real_etc):
        rel = os.path.relpath(dirpath, real_etc)
        for name in files:
            with open(os.path.join(dirpath, name)) as a, open(fake_root / "etc/iscsi" / rel / name) as b:
                assert a.read() == b.read(), os.path.join(rel, name)


# ------------------------------------------------------------------ real logins on a lab host

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    work = tmp_path_factory.mktemp("standin-lab")
    lab = Lab(str(work / "lab"), hosts=("host1",))
    tgt = None
    try:
        lab.start()
        tgt = Tgtd(str(work / "tgt"), portal=lab.san.addr + ":0", netns=lab.san.netns)
        tgt.start()
        lab.tgt, lab.backing = tgt, work
        yield lab
    finally:
        if tgt is not None:
            tgt.stop()
        lab.stop()


@pytest.fixture
def target(lab, request):
    """A fresh 8 MiB target for this test, open to everybody; sessions logged out afterwards."""
    iqn = "iqn.2024-01.org.example:%s" % request.node.name.replace("_", "-")[:40].lower()
    lab.tgt.add_target(iqn, str(lab.backing / (iqn.split(":")[1] + ".img")), size_bytes=8 << 20)
    lab.tgt.bind(iqn)
    host = lab.hosts["host1"]
    try:
        yield iqn
    finally:
        host.run(["iscsiadm", "-m", "node", "-U", "all"], check=False)
        host.run(["iscsiadm", "-m", "node", "-T", iqn, "-o", "delete"], check=False)
        lab.tgt.delete_target(iqn)


def adm(host, *args, user="oneadmin"):
    return host.run(["iscsiadm"] + list(args), user=user, check=False)


def portal(lab):
    return lab.tgt.portal


def test_discovery_creates_node_records(lab, target):
    host = lab.hosts["host1"]
    p = host.ssh("iscsiadm -m discovery -t st -p %s" % portal(lab))
    assert p.returncode == 0, p.stderr
    assert "%s,1 %s" % (portal(lab), target) in p.stdout.splitlines()
    ip, port = portal(lab).split(":")
    rec = os.path.join(host.iscsi_etc, "nodes", target, "%s,%s,1" % (ip, port), "default")
    with open(rec) as f:
        text = f.read()
    assert "node.discovery_type = send_targets\n" in text and "node.discovery_address = %s\n" % ip in text
    assert os.stat(rec).st_uid == lab.oneadmin.pw_uid
    assert os.path.islink(os.path.join(host.iscsi_etc, "send_targets", "%s,%s" % (ip, port),
                                       "%s,%s,%s,1,default" % (target, ip, port)))
    p = adm(host, "-m", "discovery", "-t", "st", "-p", "%s:1" % ip)
    assert p.returncode == 4 and "Could not perform SendTargets discovery" in p.stderr


def test_login_data_path_and_logout(lab, target, tmp_path):
    host, tgt = lab.hosts["host1"], lab.tgt
    assert adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab)).returncode == 0
    p = adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login")
    desc = "[iface: default, target: %s, portal: %s]" % (target, portal(lab).replace(":", ","))
    assert (p.returncode, p.stdout) == (0, "Logging in to %s\nLogin to %s successful.\n" % (desc, desc)), p.stderr
    assert tgt.sessions(target) == 1
    link = "/dev/disk/by-path/ip-%s-iscsi-%s-lun-1" % (portal(lab), target)
    assert host.run(["readlink", link]).stdout.strip() == "../../sda"
    assert host.run(["cat", "/sys/block/sda/size"]).stdout.strip() == str((8 << 20) // 512)
    assert host.run(["stat", "-L", "-c", "%s", link]).stdout.strip() == str(8 << 20)
    line = adm(host, "-m", "session").stdout
    assert line.startswith("tcp: [") and line.endswith("] %s,1 %s (non-flash)\n" % (portal(lab), target))
    assert "Attached scsi disk sda" in adm(host, "-m", "session", "-P", "3").stdout
    # write through the by-path link as oneadmin, read back from the target with qemu-img
    data = os.urandom(4096)
    host.run("dd of=%s bs=4096 seek=3 conv=notrunc,fsync 2>/dev/null" % link, user="oneadmin", input=data)
    out = tmp_path / "lun.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw",
                    "iscsi://%s/%s/1" % (portal(lab), target), str(out)], check=True, capture_output=True)
    with open(out, "rb") as f:
        f.seek(3 * 4096)
        assert f.read(4096) == data
    # node delete refuses while logged in
    assert adm(host, "-m", "node", "-T", target, "-p", portal(lab), "-o", "delete").returncode == 15
    p = adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--logout")
    assert p.returncode == 0 and p.stdout.endswith("successful.\n")
    assert host.run(["sh", "-c", "ls /dev/disk/by-path; ls /dev | grep '^sd' || true"]).stdout.strip() == ""
    assert tgt.sessions(target) == 0
    assert adm(host, "-m", "session").returncode == 21
    assert adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--logout").returncode == 21


def test_chap_is_checked_by_the_target(lab, target):
    host, tgt = lab.hosts["host1"], lab.tgt
    tgt.set_chap(target, "chapuser", "chap-secret-1")
    adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab))
    base = ("-m", "node", "-T", target, "-p", portal(lab))
    p = adm(host, *base, "--login")
    assert p.returncode == 24
    assert "iscsiadm: initiator reported error (24 - iSCSI login failed due to authorization failure)" in p.stderr
    assert p.stderr.endswith("iscsiadm: Could not log into all portals\n")
    adm(host, *base, "-o", "update", "-n", "node.session.auth.authmethod", "-v", "CHAP",
        "-n", "node.session.auth.username", "-v", "chapuser", "-n", "node.session.auth.password", "-v", "wrong")
    assert adm(host, *base, "--login").returncode == 24
    assert tgt.sessions(target) == 0
    adm(host, *base, "-o", "update", "-n", "node.session.auth.password", "-v", "chap-secret-1")
    p = adm(host, *base, "--login")
    assert p.returncode == 0, p.stderr
    assert "chap-secret-1" not in p.stdout + p.stderr
    assert tgt.sessions(target) == 1
    # the secret file handed to qemu-storage-daemon is gone
    assert not [f for f in os.listdir(os.path.join(host.root, "run/iscsi-standin")) if f.startswith("secret")]


def test_initiator_acl_is_checked_by_the_target(lab, target):
    host, tgt = lab.hosts["host1"], lab.tgt
    tgt.unbind(target)
    tgt.bind(target, initiator="iqn.1993-08.org.debian:01:somebody-else")
    adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab))
    p = adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login")
    assert p.returncode == 19 and "encountered non-retryable iSCSI login failure" in p.stderr
    tgt.bind(target, initiator=host.initiator)
    assert adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login").returncode == 0


def test_concurrent_logins_make_one_session(lab, target):
    host, tgt = lab.hosts["host1"], lab.tgt
    adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab))
    results = []

    def login():
        results.append(adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login").returncode)
    threads = [threading.Thread(target=login) for _ in range(15)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [0] + [15] * 14
    assert tgt.sessions(target) == 1
    assert len(adm(host, "-m", "session").stdout.splitlines()) == 1


def test_root_and_oneadmin_share_one_db(lab, target):
    host = lab.hosts["host1"]
    adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab), user="root")
    assert adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login", user="root").returncode == 0
    assert target in adm(host, "-m", "session").stdout
    dev = host.run(["readlink", "-f", "/dev/disk/by-path/ip-%s-iscsi-%s-lun-1" % (portal(lab), target)]).stdout.strip()
    assert host.run(["stat", "-c", "%U", dev]).stdout.strip() == "oneadmin"
    assert host.run(["head", "-c", "512", dev], user="oneadmin").returncode == 0
    assert adm(host, "-m", "node", "-T", target, "-u").returncode == 0


def test_rescan_resize_and_sysfs_delete(lab, target):
    host, tgt = lab.hosts["host1"], lab.tgt
    adm(host, "-m", "node", "-o", "new", "-T", target, "-p", portal(lab))
    assert adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--login").returncode == 0
    link = "/dev/disk/by-path/ip-%s-iscsi-%s-lun-1" % (portal(lab), target)
    dev = host.run(["readlink", "-f", link]).stdout.strip()
    name = os.path.basename(dev)
    tgt.resize_lun(target, 12 << 20)
    p = adm(host, "-m", "node", "-T", target, "-p", portal(lab), "--rescan")
    assert p.returncode == 0 and p.stdout.startswith("Rescanning session [sid: ")
    assert host.run(["stat", "-L", "-c", "%s", link]).stdout.strip() == str(12 << 20)
    assert host.run(["cat", "/sys/block/%s/size" % name]).stdout.strip() == str((12 << 20) // 512)
    assert host.run(["readlink", "-f", link]).stdout.strip() == dev       # same sdX name
    # a SCSI device delete through the fake sysfs: the disk goes, the session stays
    host.run("echo 1 > /sys/block/%s/device/delete" % name, user="oneadmin")
    assert target in adm(host, "-m", "session").stdout
    assert host.run(["test", "-e", link], check=False).returncode == 1
    assert host.run(["test", "-e", dev], check=False).returncode == 1
    assert adm(host, "-m", "session", "--rescan").returncode == 0
    assert host.run(["test", "-e", link], check=False).returncode == 0
