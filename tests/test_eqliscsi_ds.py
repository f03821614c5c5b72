"""The eqliscsi datastore actions through the installed links, against the EqualLogic
simulator whose volumes are real tgtd targets (data is read back through iSCSI)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile

import pytest

from oneiscsi.sim import onexml
from oneiscsi.sim.eql import EqlSim
from oneiscsi.sim.tgt import Tgtd
from tests import oneutil

VERSIONS = list(oneutil.VERSIONS.items())
MiB = 1024 * 1024
READER = "iqn.2024-01.org.oneiscsi.test:reader"
WRITER = "iqn.2024-01.org.oneiscsi.test:frontend"


# ---- the lab: a group simulator backed by tgtd -------------------------------------------
@pytest.fixture(scope="session")
def sim_host_key(tmp_path_factory):
    """One RSA host key for every simulator of the session (generating one is slow)."""
    return str(tmp_path_factory.mktemp("eqlkey") / "ssh_host_rsa_key")


class Lab:
    """A running EqlSim + Tgtd and the environment an action needs to reach it."""

    def __init__(self, root, host_key, tgt=True, **sim_kw):
        self.root = root
        os.makedirs(root, exist_ok=True)
        self.tgtd = Tgtd(os.path.join(root, "tgt")) if tgt else None
        if self.tgtd:
            self.tgtd.start()
        try:
            self.sim = EqlSim(os.path.join(root, "sim"), tgtd=self.tgtd, host_key_file=host_key, **sim_kw)
            self.sim.start()
        except BaseException:
            self.stop()
            raise
        self.known_hosts = os.path.join(root, "known_hosts")
        with open(self.known_hosts, "w") as f:
            f.write(self.sim.host_key_line() + "\n")
        self.locks = os.path.join(root, "locks")
        self.staging = os.path.join(root, "staging")
        os.makedirs(self.staging, exist_ok=True)
        self.conf_path = os.path.join(root, "eqliscsi.conf")
        self.log = os.path.join(root, "oneiscsi.log")
        self.conf()

    @property
    def group(self):
        return self.sim.group

    @property
    def portal(self):
        return self.tgtd.portal if self.tgtd else "127.0.0.1:3260"

    def conf(self, **kv):
        values = {"EQL_HOST": "127.0.0.1:%d" % self.sim.port, "EQL_USER": "grpadmin", "EQL_PASS": "secret",
                  "EQL_KNOWN_HOSTS": self.known_hosts, "EQL_PORTAL": self.portal, "EQL_POOL": "default",
                  "EQL_INITIATOR": WRITER, "EQL_STAGING_DIR": self.staging, "EQL_CLI_TIMEOUT": "10"}
        values.update(kv)
        with open(self.conf_path, "w") as f:
            f.write("# written by the test\n")
            for k, v in values.items():
                if v is not None:
                    f.write('%s="%s"\n' % (k, v))
        os.chmod(self.conf_path, 0o600)

    def env(self, **extra):
        e = {"ONEISCSI_EQL_CONF": self.conf_path, "ONEISCSI_LOCK_DIR": self.locks, "ONEISCSI_LOG": self.log}
        e.update(extra)
        return e

    def call(self, remotes, action, b64, obj_id=7, version=(6, 8), env=None):
        ensure_links(remotes)
        return oneutil.ds_call(remotes, "eqliscsi", action, b64, obj_id, version, env=self.env(**(env or {})))

    def stop(self):
        if getattr(self, "sim", None) is not None:
            self.sim.stop()
        if self.tgtd is not None:
            self.tgtd.stop()

    # ---- state the tests compare ----
    def state(self) -> dict:
        """Everything a DS action may change on the group."""
        g = self.group
        with g.lock:
            return {name: {"size": v.size_mb, "online": v.online, "multihost": v.multihost,
                           "pool": v.pool, "thin": v.thin,
                           "access": sorted((a.initiator or "", a.ipaddress or "", a.username or "", a.authmethod,
                                             a.apply_to) for a in v.access),
                           "snapshots": sorted(v.snapshots)}
                    for name, v in g.volumes.items()}

    def read_back(self, volume, out, initiator=READER, size=None):
        v = self.group.volumes[volume]
        opts = "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,initiator-name=%s" % (
            self.portal, v.iqn, initiator)
        subprocess.run(["qemu-img", "convert", "-O", "raw", "--image-opts", opts, out],
                       check=True, capture_output=True)
        if size is not None:
            os.truncate(out, size)
        return out


@pytest.fixture
def lab(tmp_path, sim_host_key):
    root = tempfile.mkdtemp(prefix="eqlds-", dir=str(tmp_path))
    lab = Lab(root, sim_host_key)
    try:
        yield lab
    finally:
        lab.stop()


def ensure_links(remotes):
    """The datastore/eqliscsi/<action> links install makes. Until tm.py exists install skips the
    whole eqliscsi driver, so make the same links it would (to the same launcher)."""
    from oneiscsi.drivers.eqliscsi.ds import DS
    d = os.path.join(str(remotes), "datastore", "eqliscsi")
    os.makedirs(d, exist_ok=True)
    for action in DS:
        path = os.path.join(d, action)
        if not os.path.lexists(path):
            os.symlink(os.path.join("..", "..", "oneiscsi", "oneiscsi"), path)


# ---- OpenNebula data ----------------------------------------------------------------------
def ds_data(version=(6, 8), iid=7, name="Ubuntu 22.04", path="", source="", size_mb=0, img_tpl=None,
            ds_tpl=None, fs=None, fmt="raw", target_snapshot=None, persistent=True, image=True):
    ds = onexml.datastore_xml(ds_id=110, name="eql", ds_mad="eqliscsi", tm_mad="eqliscsi",
                              template=ds_tpl or {}, version=version)
    if not image:
        return onexml.ds_action_data("", ds)
    img = onexml.image_xml(iid=iid, name=name, path=path, source=source, persistent=persistent, size_mb=size_mb,
                           ds_id=110, ds_name="eql", template=img_tpl or {}, version=version, fmt=fmt,
                           image_type=2 if fs is not None else 0, target_snapshot=target_snapshot)
    if fs is not None:
        tag = "FS" if tuple(version) >= (6, 0) else "FSTYPE"
        img = img.replace("<%s></%s>" % (tag, tag), "<%s>%s</%s>" % (tag, fs, tag))
    return onexml.ds_action_data(img, ds)


def stat_data(path, version=(6, 8), ds_tpl=None):
    img = "<IMAGE><PATH>%s</PATH></IMAGE>" % path
    return onexml.ds_action_data(img, onexml.datastore_xml(ds_id=110, ds_mad="eqliscsi", tm_mad="eqliscsi",
                                                           template=ds_tpl or {}, version=version))


def random_file(path, size, seed=1):
    """A file of pseudo-random bytes (zeros would be skipped by qemu-img)."""
    with open(path, "wb") as f:
        block = hashlib.sha512(str(seed).encode()).digest() * 2048  # 128 KiB
        written = 0
        n = 0
        while written < size:
            chunk = hashlib.sha256(b"%d" % n).digest() + block[32:]
            chunk = chunk[: size - written]
            f.write(chunk)
            written += len(chunk)
            n += 1
    return path


def same_bytes(a, b, size):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read(size) == fb.read(size)


def one_line(res, version):
    """The failure text oned shows; assert it is one line without a traceback."""
    assert res.rc != 0, res
    assert "Traceback" not in res.err, res.err
    text = oneutil.error_text(res, version)
    assert text and "\n" not in text, res.err
    return text


def cp_ok(lab, remotes, src, version=(6, 8), iid=7, name="Ubuntu 22.04", **kw):
    res = lab.call(remotes, "cp", ds_data(version, iid=iid, name=name, path=src, **kw), iid, version)
    assert res.rc == 0, res
    return res


# ---- cp --------------------------------------------------------------------------------------
@pytest.mark.parametrize("vname,version", VERSIONS)
def test_cp_raw_every_version_reads_back(lab, remotes_factory, tmp_path, vname, version):
    remotes = remotes_factory(vname)
    src = random_file(str(tmp_path / "disk.raw"), 3 * MiB + 12345)
    res = cp_ok(lab, remotes, src, version, size_mb=4)
    expected = "ubuntu-22-04.7"
    assert res.out == (expected + " raw\n" if version >= (6, 0) else expected + "\n")
    st = lab.state()
    assert list(st) == [expected]
    assert st[expected]["size"] == 4 and st[expected]["multihost"] and st[expected]["online"]
    out = lab.read_back(expected, str(tmp_path / "back.raw"))
    assert same_bytes(src, out, os.path.getsize(src))
    if (6, 0, 3) <= version < (7, 0):  # 6.0.3-6.10 take the whole stderr as the error
        assert res.err == ""
    assert "secret" not in res.err and "secret" not in open(lab.log).read()


def test_cp_qcow2_virtual_size_and_bytes(lab, remotes, tmp_path):
    raw = random_file(str(tmp_path / "src.raw"), 5 * MiB)
    q = str(tmp_path / "src.qcow2")
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, q], check=True)
    subprocess.run(["qemu-img", "resize", "-f", "qcow2", q, "8M"], check=True, capture_output=True)
    cp_ok(lab, remotes, q, iid=9, name="q")
    assert lab.state()["q.9"]["size"] == 8
    out = lab.read_back("q.9", str(tmp_path / "back.raw"))
    assert same_bytes(raw, out, 5 * MiB)
    with open(out, "rb") as f:
        f.seek(5 * MiB)
        assert f.read() == b"\0" * (3 * MiB)


def test_cp_gzip_unpacked_md5_checked_and_no_decompress(lab, remotes, tmp_path):
    import gzip
    raw = random_file(str(tmp_path / "src.raw"), 2 * MiB)
    gz = str(tmp_path / "src.raw.gz")
    with open(raw, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    md5 = hashlib.md5(open(gz, "rb").read()).hexdigest()
    cp_ok(lab, remotes, gz, iid=1, name="gz", img_tpl={"MD5": md5})
    assert same_bytes(raw, lab.read_back("gz.1", str(tmp_path / "b1")), 2 * MiB)
    cp_ok(lab, remotes, gz, iid=2, name="gz", ds_tpl={"NO_DECOMPRESS": "yes"})
    assert same_bytes(gz, lab.read_back("gz.2", str(tmp_path / "b2")), os.path.getsize(gz))
    assert os.listdir(lab.staging) == []


def test_cp_checksum_mismatch_fails_before_any_session(lab, remotes, tmp_path):
    src = random_file(str(tmp_path / "s.raw"), MiB)
    res = lab.call(remotes, "cp", ds_data(path=src, img_tpl={"SHA1": "0" * 40}), 7)
    text = one_line(res, (6, 8))
    assert "SHA1" in text
    assert lab.sim.connections_total == 0 and lab.state() == {}


@pytest.fixture
def http_dir(tmp_path):
    import functools
    import http.server
    import threading
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield root, "http://127.0.0.1:%d" % srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_cp_and_stat_http_source(lab, remotes, tmp_path, http_dir):
    root, url = http_dir
    src = random_file(str(root / "img.raw"), 3 * MiB + 1)
    sha1 = hashlib.sha1(open(src, "rb").read()).hexdigest()
    res = lab.call(remotes, "stat", stat_data(url + "/img.raw"), 55)
    assert (res.rc, res.out) == (0, "4\n"), res
    cp_ok(lab, remotes, url + "/img.raw", iid=3, name="web", size_mb=4, img_tpl={"SHA1": sha1})
    assert same_bytes(src, lab.read_back("web.3", str(tmp_path / "b")), os.path.getsize(src))
    res = lab.call(remotes, "cp", ds_data(iid=4, path=url + "/missing.raw"), 4)
    assert "HTTP 404" in one_line(res, (6, 8)) and "web.3" in lab.state() and len(lab.state()) == 1


def test_cp_restricted_access_writer_record_removed_and_chap(lab, remotes, tmp_path):
    lab.group.create_chapuser("onechap", "chapsecret123")
    pw = tmp_path / "chap.pass"
    pw.write_text("chapsecret123\n")
    os.chmod(str(pw), 0o600)
    lab.conf(EQL_SECURITY_ACCESS="initiator %s authmethod chap username onechap, ipaddress 10.9.*.*" % READER,
             EQL_CHAP_USER="onechap", EQL_CHAP_PASS_FILE=str(pw))
    src = random_file(str(tmp_path / "s.raw"), 2 * MiB)
    res = cp_ok(lab, remotes, src, iid=5, name="locked")
    access = lab.state()["locked.5"]["access"]
    assert access == sorted([(READER, "", "onechap", "chap", "both"), ("", "10.9.*.*", "", "none", "both")])
    cmds = "\n".join(lab.sim.commands)
    assert "access create initiator %s" % WRITER in cmds and "access delete" in cmds
    assert "chapsecret123" not in res.err + open(lab.log).read() + cmds
    # read back as the allowed initiator, with CHAP
    v = lab.group.volumes["locked.5"]
    sec = tmp_path / "sec"
    sec.write_text("chapsecret123")
    out = str(tmp_path / "back")
    subprocess.run(["qemu-img", "convert", "-O", "raw", "--object", "secret,id=s0,file=%s" % sec, "--image-opts",
                    "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,initiator-name=%s,user=onechap,"
                    "password-secret=s0" % (lab.portal, v.iqn, READER), out], check=True, capture_output=True)
    assert same_bytes(src, out, 2 * MiB)


def test_cp_write_failure_deletes_volume(lab, remotes, tmp_path):
    lab.conf(EQL_PORTAL="127.0.0.1:1")  # nothing listens there: qemu-img cannot connect
    src = random_file(str(tmp_path / "s.raw"), MiB)
    res = lab.call(remotes, "cp", ds_data(path=src), 7)
    text = one_line(res, (6, 8))
    assert "LUN" in text and "deleted" in text, text
    assert lab.state() == {}
    assert any(c.startswith("volume create") for c in lab.sim.commands)


@pytest.mark.parametrize("path,words", [
    ("relative/disk.raw", "absolute"),
    ("/etc/one/oned.conf", "restricted"),
    ("s3://bucket/x", "only local files"),
    ("/no/such/file.raw", "not a regular file"),
])
def test_cp_bad_paths_refused_before_any_session(lab, remotes, path, words):
    res = lab.call(remotes, "cp", ds_data(path=path), 7)
    assert words in one_line(res, (6, 8))
    assert lab.sim.connections_total == 0


def test_cp_refuses_backing_file(lab, remotes, tmp_path):
    base = str(tmp_path / "base.raw")
    random_file(base, MiB)
    top = str(tmp_path / "top.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-b", base, "-F", "raw", top], check=True, capture_output=True)
    res = lab.call(remotes, "cp", ds_data(path=top), 7)
    assert "backing file" in one_line(res, (6, 8)) and lab.sim.connections_total == 0
    vmdk = str(tmp_path / "x.vmdk")  # a vmdk descriptor can name any file as an extent
    subprocess.run(["qemu-img", "create", "-f", "vmdk", vmdk, "1M"], check=True, capture_output=True)
    res = lab.call(remotes, "cp", ds_data(path=vmdk), 7)
    assert "is a vmdk image; supported: raw, qcow2" in one_line(res, (6, 8)) and lab.sim.connections_total == 0


# ---- every action, every version shape ------------------------------------------------------
@pytest.mark.parametrize("vname,version", VERSIONS)
def test_every_action_every_version(lab, remotes_factory, tmp_path, vname, version):
    remotes = remotes_factory(vname)
    fmt_line = (lambda s: s + " raw\n") if version >= (6, 0) else (lambda s: s + "\n")
    src = random_file(str(tmp_path / "s.raw"), 2 * MiB)
    # stat
    res = lab.call(remotes, "stat", stat_data(src, version), 99, version)
    assert (res.rc, res.out) == (0, "2\n"), res
    # cp
    res = lab.call(remotes, "cp", ds_data(version, iid=10, name="base", path=src, size_mb=2), 10, version)
    assert (res.rc, res.out) == (0, fmt_line("base.10")), res
    # clone: oned gives the new image with PATH = the source image's SOURCE
    res = lab.call(remotes, "clone", ds_data(version, iid=11, name="copy", path="base.10", size_mb=2), 11, version)
    # 6.0.0-6.4.1 store the whole clone reply as SOURCE (ImageManager::_clone): SOURCE alone there
    assert (res.rc, res.out) == (0, "copy.11 raw\n" if version >= (6, 4, 2) else "copy.11\n"), res
    assert same_bytes(src, lab.read_back("copy.11", str(tmp_path / "c")), 2 * MiB)
    # mkfs raw and save_as
    res = lab.call(remotes, "mkfs", ds_data(version, iid=12, name="blank", size_mb=5, fs="raw"), 12, version)
    assert (res.rc, res.out) == (0, "blank.12\n"), res
    res = lab.call(remotes, "mkfs", ds_data(version, iid=13, name="saved", size_mb=5, fs="save_as"), 13, version)
    assert (res.rc, res.out) == (0, "saved.13\n"), res
    assert "saved.13" not in lab.state() and lab.state()["blank.12"]["size"] == 5
    # monitor
    res = lab.call(remotes, "monitor", ds_data(version, image=False), 110, version)
    assert_monitor(lab, res)
    # snapshots: the group snapshot one-snap-<id> stands for image snapshot <id>
    for sid in (0, 1):
        s = lab.group.create_snapshot("base.10", "snap %d" % sid)
        lab.group.rename_snapshot("base.10", s.name, "one-snap-%d" % sid)
    res = lab.call(remotes, "snap_revert", ds_data(version, iid=10, source="base.10", target_snapshot=1), 10, version)
    assert (res.rc, res.out) == (0, ""), res
    assert lab.state()["base.10"]["snapshots"] == ["one-snap-0", "one-snap-1"]
    res = lab.call(remotes, "snap_delete", ds_data(version, iid=10, source="base.10", target_snapshot=0), 10, version)
    assert res.rc == 0 and lab.state()["base.10"]["snapshots"] == ["one-snap-1"], res
    res = lab.call(remotes, "snap_flatten", ds_data(version, iid=10, source="base.10", target_snapshot=1), 10, version)
    assert res.rc == 0 and lab.state()["base.10"]["snapshots"] == [], res
    # rm (twice: the second finds nothing and succeeds); the old host:volume SOURCE form
    for source in ("frontend:copy.11", "copy.11", "base.10", "blank.12"):
        res = lab.call(remotes, "rm", ds_data(version, iid=11, source=source), 11, version)
        assert (res.rc, res.out) == (0, ""), res
    assert lab.state() == {}


def assert_monitor(lab, res):
    """monitor's three lines match the pool exactly (the session asks for sizes in MB)."""
    assert res.rc == 0, res
    got = dict(line.split("=") for line in res.out.splitlines())
    assert list(got) == ["USED_MB", "TOTAL_MB", "FREE_MB"], res.out
    u = lab.group.pool_usage("default")
    assert int(got["TOTAL_MB"]) == u["total"]
    assert int(got["FREE_MB"]) == u["free"]
    assert int(got["USED_MB"]) == int(got["TOTAL_MB"]) - int(got["FREE_MB"])


def test_snap_revert_restores_data(lab, remotes, tmp_path):
    a = random_file(str(tmp_path / "a"), 2 * MiB, seed=1)
    b = random_file(str(tmp_path / "b"), 2 * MiB, seed=2)
    cp_ok(lab, remotes, a, iid=20, name="s")
    snap = lab.group.create_snapshot("s.20")
    lab.group.rename_snapshot("s.20", snap.name, "one-snap-3")
    v = lab.group.volumes["s.20"]
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", b, "--target-image-opts",
                    "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1" % (lab.portal, v.iqn)], check=True)
    assert same_bytes(b, lab.read_back("s.20", str(tmp_path / "x")), 2 * MiB)
    res = lab.call(remotes, "snap_revert", ds_data(iid=20, source="s.20", target_snapshot=3), 20)
    assert res.rc == 0, res
    assert same_bytes(a, lab.read_back("s.20", str(tmp_path / "y")), 2 * MiB)
    st = lab.state()["s.20"]
    assert st["online"] and st["snapshots"] == ["one-snap-3"]
    res = lab.call(remotes, "snap_revert", ds_data(iid=20, source="s.20", target_snapshot=4), 20)
    assert "no snapshot one-snap-4" in one_line(res, (6, 8))
    assert lab.state()["s.20"]["online"]


def test_mkfs_ext4_and_refusals(lab, remotes, tmp_path):
    res = lab.call(remotes, "mkfs", ds_data(iid=30, name="data", size_mb=16, fs="ext4"), 30)
    assert (res.rc, res.out) == (0, "data.30\n"), res
    out = lab.read_back("data.30", str(tmp_path / "fs"))
    with open(out, "rb") as f:
        f.seek(1080)
        assert f.read(2) == b"\x53\xef"  # the ext superblock magic
    assert lab.state()["data.30"]["access"] == [("", "*.*.*.*", "", "none", "both")]
    for kw, words in (({"fs": "ntfs-3g;rm"}, "FS"), ({"fs": "raw", "fmt": "qcow2"}, "FORMAT=raw"),
                      ({"fs": "raw", "size_mb": 0}, "SIZE")):
        kw.setdefault("size_mb", 4)
        res = lab.call(remotes, "mkfs", ds_data(iid=31, name="bad", **kw), 31)
        assert words in one_line(res, (6, 8)), res
    assert list(lab.state()) == ["data.30"]


def test_stat_sizes(lab, remotes, tmp_path):
    import gzip
    raw = random_file(str(tmp_path / "r.raw"), 3 * MiB + 5)
    q = str(tmp_path / "q.qcow2")
    subprocess.run(["qemu-img", "create", "-f", "qcow2", q, "100M"], check=True, capture_output=True)
    gz = str(tmp_path / "r.gz")
    with open(raw, "rb") as f, gzip.open(gz, "wb") as g:
        g.write(f.read())
    for path, mb in ((raw, 4), (q, 100), (gz, 4)):
        res = lab.call(remotes, "stat", stat_data(path), 1)
        assert (res.rc, res.out) == (0, "%d\n" % mb), (path, res)
    assert lab.sim.connections_total == 0  # stat never talks to the group


def test_rm_refuses_while_connected(lab, remotes, tmp_path):
    cp_ok(lab, remotes, random_file(str(tmp_path / "s"), MiB), iid=40, name="busy")
    v = lab.group.volumes["busy.40"]
    holder = subprocess.Popen(["qemu-io", "--image-opts", "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,"
                               "initiator-name=%s" % (lab.portal, v.iqn, READER), "-c", "sleep 20000"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if lab.group.connections().get(v.iqn):
                break
            import time
            time.sleep(0.02)
        res = lab.call(remotes, "rm", ds_data(iid=40, source="busy.40"), 40)
        text = one_line(res, (6, 8))
        assert "1 iSCSI connection" in text and "*.*.*.*" in text, text
        assert lab.state()["busy.40"]["online"]
    finally:
        holder.kill()
        holder.wait()


# ---- the group's identity and credentials ----------------------------------------------------
def test_unknown_host_key_refused_with_fix(lab, remotes):
    open(lab.known_hosts, "w").close()
    res = lab.call(remotes, "monitor", ds_data(image=False), 110)
    text = one_line(res, (6, 8))
    assert "unknown" in text and "ssh-keyscan -p %d 127.0.0.1 >> %s" % (lab.sim.port, lab.known_hosts) in text
    assert lab.sim.commands == []


def test_changed_host_key_refused(lab, remotes):
    import paramiko
    other = paramiko.RSAKey.generate(1024)
    with open(lab.known_hosts, "w") as f:
        f.write("[127.0.0.1]:%d %s %s\n" % (lab.sim.port, other.get_name(), other.get_base64()))
    res = lab.call(remotes, "monitor", ds_data(image=False), 110)
    assert "does NOT match" in one_line(res, (6, 8)) and lab.sim.commands == []


def test_wrong_password_one_line_never_shown(lab, remotes):
    lab.conf(EQL_PASS="Wr0ng-pass'word")
    res = lab.call(remotes, "monitor", ds_data(image=False), 110)
    text = one_line(res, (6, 8))
    assert "refused the login" in text and "Wr0ng" not in res.err + open(lab.log).read()


def test_password_file_and_mode_checks(lab, remotes, tmp_path):
    pw = tmp_path / "eql.pass"
    pw.write_text("secret\n")
    os.chmod(str(pw), 0o640)
    lab.conf(EQL_PASS=None, EQL_PASS_FILE=str(pw))
    res = lab.call(remotes, "monitor", ds_data(image=False), 110)
    assert "chmod 600 %s" % pw in one_line(res, (6, 8))
    os.chmod(str(pw), 0o600)
    assert lab.call(remotes, "monitor", ds_data(image=False), 110).rc == 0
    lab.conf()
    os.chmod(lab.conf_path, 0o644)
    res = lab.call(remotes, "monitor", ds_data(image=False), 110)
    text = one_line(res, (6, 8))
    assert "chmod 600 %s" % lab.conf_path in text and "secret" not in text


def test_key_auth(tmp_path, sim_host_key, remotes):
    import paramiko
    key = paramiko.RSAKey.generate(2048)
    kfile = str(tmp_path / "id_rsa")
    key.write_private_key_file(kfile)
    lab = Lab(str(tmp_path / "lab"), sim_host_key, pubkeys=["%s %s" % (key.get_name(), key.get_base64())])
    try:
        lab.conf(EQL_PASS=None, EQL_KEY=kfile)
        assert lab.call(remotes, "monitor", ds_data(image=False), 110).rc == 0
    finally:
        lab.stop()


# ---- hostile input -------------------------------------------------------------------------
HOSTILE_NAMES = ["a\nvolume delete x", "x; volume delete y", "it's \"quoted\"", "n" * 200, "Ünïcødé ñame €",
                 "--", "a\rb\tc\x7fd"]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_image_names_are_cleaned(lab, remotes, tmp_path, name):
    src = random_file(str(tmp_path / "s"), MiB)
    res = lab.call(remotes, "mkfs", ds_data(iid=5, name=name, size_mb=1, fs="raw",
                                            img_tpl={"DESCRIPTION": name + "'; volume delete z"}), 5)
    assert res.rc == 0, res
    vol = res.out.strip()
    assert vol.endswith(".5") and len(vol) <= 64 and list(lab.state()) == [vol]
    assert all(c.isalnum() and c.isascii() or c in ".-" for c in vol)
    from oneiscsi.sim.eql_cli import tokenize
    for cmd in lab.sim.commands:
        assert "\n" not in cmd and "\r" not in cmd and ";" not in cmd and '"' not in cmd
        assert cmd.count("'") in (0, 2) and not cmd.startswith("volume delete")
        if cmd.startswith("volume create"):
            words = tokenize(cmd)
            desc = words[words.index("description") + 1]
            assert desc.startswith("OpenNebula image 5: ") and len(desc) <= 127 and desc.isascii()
    del src


@pytest.mark.parametrize("tpl,words", [
    ({"EQL_POOL": "default; volume delete x"}, "EQL_POOL"),
    ({"EQL_POOL": "default\nvolume delete x"}, "EQL_POOL"),
    ({"EQL_SECURITY_ACCESS": "initiator iqn.2000-01.x:y\nvolume delete x"}, "EQL_SECURITY_ACCESS"),
    ({"EQL_SECURITY_ACCESS": "ipaddress 10.1.2.300"}, "ipaddress"),
    ({"EQL_SECURITY_ACCESS": "bogus value"}, "unknown or repeated key"),
    ({"EQL_THINPROVISION": "thin-provision 'x'"}, "EQL_THINPROVISION"),
    ({"EQL_MULTIHOST": "maybe"}, "EQL_MULTIHOST"),
])
def test_hostile_attributes_refused_before_any_session(lab, remotes, tmp_path, tpl, words):
    res = lab.call(remotes, "mkfs", ds_data(iid=5, name="x", size_mb=1, fs="raw", img_tpl=tpl), 5)
    assert words in one_line(res, (6, 8))
    assert lab.sim.connections_total == 0


def test_image_cannot_redirect_the_san_login(lab, remotes):
    res = lab.call(remotes, "mkfs", ds_data(iid=5, name="x", size_mb=1, fs="raw",
                                            img_tpl={"EQL_HOST": "evil.example", "EQL_PASS_FILE": "/etc/shadow"}), 5)
    assert res.rc == 0 and res.err == "", res  # 6.8: log lines go to the log file only
    assert "image attribute EQL_HOST is ignored" in open(lab.log).read()
    assert list(lab.state()) == ["x.5"]


# ---- BRIDGE_LIST: the write runs on a bridge host over ssh ---------------------------------------
@pytest.fixture
def bridge_sshd(tmp_path):
    """An sshd on a free loopback port standing for a bridge host, and an ssh client config
    naming it `bridge1` (and `bridge0`, which nothing answers)."""
    import socket
    import time
    d = tmp_path / "sshd"
    d.mkdir()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "hostkey")], check=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "id")], check=True)
    (d / "authorized_keys").write_text((d / "id.pub").read_text())

    def free_port():
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port
    port, dead = free_port(), free_port()
    (d / "sshd_config").write_text("\n".join([
        "Port %d" % port, "ListenAddress 127.0.0.1", "HostKey %s" % (d / "hostkey"), "PidFile none",
        "AuthorizedKeysFile %s" % (d / "authorized_keys"), "PermitRootLogin prohibit-password",
        "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no", "StrictModes no", ""]))
    hostkey = (d / "hostkey.pub").read_text().split()
    (d / "known_hosts").write_text("bridge1 %s %s\n" % (hostkey[0], hostkey[1]))
    (d / "ssh_config").write_text("\n".join([
        "Host bridge1", "  HostName 127.0.0.1", "  Port %d" % port, "  HostKeyAlias bridge1",
        "Host bridge0", "  HostName 127.0.0.1", "  Port %d" % dead,
        "Host *", "  User root", "  IdentityFile %s" % (d / "id"), "  UserKnownHostsFile %s" % (d / "known_hosts"),
        "  StrictHostKeyChecking yes", "  LogLevel ERROR", ""]))
    log = open(str(d / "sshd.log"), "w")
    proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=log)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.02)
        yield {"ONEISCSI_SSH": "ssh -F %s" % (d / "ssh_config")}, d / "sshd.log"
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_cp_through_first_reachable_bridge_host_with_chap(lab, remotes, tmp_path, bridge_sshd):
    env, sshd_log = bridge_sshd
    lab.group.create_chapuser("bridgechap", "br1dge-secret")
    pw = tmp_path / "chap.pass"
    pw.write_text("br1dge-secret\n")
    os.chmod(str(pw), 0o600)
    lab.conf(EQL_SECURITY_ACCESS="ipaddress 10.1.1.*", EQL_CHAP_USER="bridgechap", EQL_CHAP_PASS_FILE=str(pw))
    src = random_file(str(tmp_path / "s.raw"), 2 * MiB)
    before = set(os.listdir("/var/tmp"))
    res = lab.call(remotes, "cp", ds_data(iid=50, name="bridged", path=src, ds_tpl={"BRIDGE_LIST": "bridge0 bridge1"}),
                   50, env=env)
    assert res.rc == 0 and res.out == "bridged.50 raw\n", res
    assert "Accepted publickey for root" in sshd_log.read_text()
    logged = open(lab.log).read()
    assert "bridge0 is not reachable" in logged and "from bridge host bridge1" in logged
    assert "br1dge-secret" not in res.err + open(lab.log).read()
    assert lab.state()["bridged.50"]["access"] == [("", "10.1.1.*", "", "none", "both")]
    assert not {f for f in set(os.listdir("/var/tmp")) - before if f.startswith("oneiscsi-")}
    # the writer record (with CHAP) is gone: read the data back through the backing file
    with open(lab.group.volumes["bridged.50"].backing, "rb") as f, open(src, "rb") as g:
        assert f.read(2 * MiB) == g.read()


def test_cp_no_bridge_reachable_leaves_nothing(lab, remotes, tmp_path, bridge_sshd):
    env, _ = bridge_sshd
    src = random_file(str(tmp_path / "s.raw"), MiB)
    res = lab.call(remotes, "cp", ds_data(iid=51, path=src, ds_tpl={"BRIDGE_LIST": "bridge0"}), 51, env=env)
    text = one_line(res, (6, 8))
    assert "no BRIDGE_LIST host is reachable" in text and "deleted" in text
    assert lab.state() == {}


def test_limit_transfer_bw(lab, remotes, tmp_path):
    src = random_file(str(tmp_path / "s.raw"), 4 * MiB)
    import time
    t = time.monotonic()
    cp_ok(lab, remotes, src, iid=60, name="slow", ds_tpl={"LIMIT_TRANSFER_BW": "2M"})
    assert time.monotonic() - t >= 0.8  # 4 MiB at 2 MiB/s, the first second's worth in one burst
    assert same_bytes(src, lab.read_back("slow.60", str(tmp_path / "b")), 4 * MiB)
    res = lab.call(remotes, "cp", ds_data(iid=61, path=src, ds_tpl={"LIMIT_TRANSFER_BW": "fast"}), 61)
    assert "LIMIT_TRANSFER_BW" in one_line(res, (6, 8)) and lab.sim.connections_total == 1
