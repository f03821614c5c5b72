"""`oneimage restore` into an eqliscsi datastore: the backup datastore's restore allocates images
with PATH=rsync://... (or restic://) and FROM_BACKUP_DS, then our DS `cp` runs. cp hands the URL
to `<remotes>/datastore/downloader.sh --nodecomp URL -`; here that is the stand-in
oneiscsi/sim/downloader.sh (it merges a qcow2 increment chain with qemu-img as rsync_downloader.rb
does) in the installed remotes tree, reading a local folder that stands for the backup server.
The volume is read back through iSCSI (qemu-img + libiscsi) and compared byte for byte."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from tests.test_eqliscsi_ds import MiB, Lab, ds_data, one_line, random_file

STANDIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "oneiscsi", "sim",
                       "downloader.sh")
BKDS = 105     # the backup datastore's id in the URLs


@pytest.fixture(scope="module")
def host_key(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bxrkey") / "ssh_host_rsa_key")


@pytest.fixture(scope="module")
def rlab(tmp_path_factory, host_key):
    lab = Lab(tempfile.mkdtemp(prefix="bxr-", dir=str(tmp_path_factory.mktemp("bxr"))), host_key)
    try:
        yield lab
    finally:
        lab.stop()


def with_standin(remotes):
    """An installed remotes tree plus the downloader.sh stand-in where OpenNebula keeps its own."""
    dl = remotes / "datastore" / "downloader.sh"
    shutil.copyfile(STANDIN, str(dl))
    os.chmod(str(dl), 0o755)
    return remotes


@pytest.fixture
def setup(rlab, remotes, tmp_path):
    """The remotes tree with the downloader.sh stand-in, and the backup server's folder."""
    with_standin(remotes)
    root = tmp_path / "backup-server"
    root.mkdir()
    calls = tmp_path / "downloader.calls"
    env = {"ONEISCSI_SIM_BACKUP_ROOT": str(root), "ONEISCSI_SIM_DOWNLOADER_LOG": str(calls),
           "TMPDIR": str(tmp_path)}
    return rlab, remotes, root, env, calls


def qemu_img(*args):
    subprocess.run(["qemu-img"] + list(args), check=True, capture_output=True)


def backup_file(root, vmid, snap, name):
    """<root>/var/lib/one/datastores/<BKDS>/<vmid>/<snap>/<name>: the backup server's layout."""
    d = root / "var/lib/one/datastores" / str(BKDS) / str(vmid) / snap
    d.mkdir(parents=True, exist_ok=True)
    return d / name


def url(vmid, chain, name, scheme="rsync"):
    last_snap = chain[-1][1]
    return "%s://%d/7/%s//var/lib/one/datastores/%d/%d/%s/%s" % (
        scheme, BKDS, ",".join("%d:%s" % c for c in chain), BKDS, vmid, last_snap, name)


def restore(lab, remotes, path, env, iid, version=(6, 8), size_mb=0, tpl=None):
    img_tpl = {"FROM_BACKUP_DS": str(BKDS)}
    img_tpl.update(tpl or {})
    return lab.call(remotes, "cp", ds_data(version, iid=iid, name="restored-disk-0", path=path, size_mb=size_mb,
                                           img_tpl=img_tpl), iid, version, env=env)


def test_full_backup_restored_byte_for_byte(setup, tmp_path, remotes_factory):
    lab, remotes, root, env, calls = setup
    raw = random_file(str(tmp_path / "disk.raw"), 3 * MiB + 4096, seed=11)
    full = backup_file(root, 40, "8a3454", "disk.0.0")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, str(full))
    path = url(40, [(0, "8a3454")], "disk.0.0")
    res = restore(lab, remotes, path, env, 301, size_mb=4)
    assert res.rc == 0, res
    assert res.out == "restored-disk-0.301 raw\n"            # `SOURCE FORMAT` as for every cp (6.0+)
    assert open(str(calls)).read().split() == ["--nodecomp", path, "-"]
    back = lab.read_back("restored-disk-0.301", str(tmp_path / "back.raw"))
    with open(raw, "rb") as a, open(back, "rb") as b:
        data = a.read()
        assert b.read(len(data)) == data
    assert os.listdir(lab.staging) == []                       # the staged stream is gone
    # 5.x prints SOURCE alone; restic:// goes through the same tool
    r512 = with_standin(remotes_factory("5.12"))
    res = restore(lab, r512, url(40, [(0, "8a3454")], "disk.0.0", "restic"), env, 302, version=(5, 12))
    assert res.rc == 0 and res.out == "restored-disk-0.302\n", res


def test_increment_chain_is_merged_and_restored(setup, tmp_path):
    """A base and an increment made with real qemu-img (the increment holds only the changed
    clusters, backed by the base): the restored volume holds the merged data."""
    lab, remotes, root, env, calls = setup
    raw = random_file(str(tmp_path / "disk.raw"), 4 * MiB, seed=21)
    base = backup_file(root, 41, "aa01", "disk.2.0")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, str(base))
    inc = backup_file(root, 41, "bb02", "disk.2.1")
    qemu_img("create", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(inc))
    changed = os.urandom(65536)
    _write_at(inc, changed, 3 * MiB)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 1M 64k", str(inc)], check=True,
                   capture_output=True)
    with open(raw, "r+b") as f:                                 # what the disk held at backup 1
        f.seek(MiB)
        f.write(b"\x5a" * 65536)
        f.seek(3 * MiB)
        f.write(changed)
    info = subprocess.run(["qemu-img", "info", str(inc)], capture_output=True, text=True).stdout
    assert "disk size: 2" in info or os.path.getsize(str(inc)) < MiB      # only the changed clusters
    # as stored on the backup server the increment names its backing file where it was made
    qemu_img("rebase", "-u", "-F", "qcow2", "-b", "/var/lib/one/datastores/0/41/backup/disk.2.0", str(inc))
    path = url(41, [(0, "aa01"), (1, "bb02")], "disk.2.1")
    res = restore(lab, remotes, path, env, 303, size_mb=4)
    assert res.rc == 0, res
    back = lab.read_back("restored-disk-0.303", str(tmp_path / "back.raw"))
    with open(raw, "rb") as a, open(back, "rb") as b:
        assert b.read(4 * MiB) == a.read()
    assert [n for n in os.listdir(str(tmp_path)) if n.startswith("downloader-standin")] == []


def _write_at(qcow2, data, offset):
    """Write `data` into a qcow2 image at `offset` through qemu-io (no guest needed)."""
    src = qcow2.parent / "chunk.bin"
    src.write_bytes(data)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -s %s %d %d" % (src, offset, len(data)), str(qcow2)],
                   check=True, capture_output=True)
    src.unlink()


def test_failing_download_leaves_no_volume(setup, tmp_path):
    lab, remotes, root, env, calls = setup
    raw = random_file(str(tmp_path / "disk.raw"), MiB, seed=31)
    base = backup_file(root, 42, "cc01", "disk.0.0")
    qemu_img("convert", "-f", "raw", "-O", "qcow2", raw, str(base))
    before = lab.state()
    path = url(42, [(0, "cc01"), (1, "dd02")], "disk.0.1")      # the increment is missing
    res = restore(lab, remotes, path, env, 304, size_mb=1)
    text = one_line(res, (6, 8))
    assert "downloader.sh could not fetch" in text and "disk.0.1 is missing" in text, text
    assert lab.state() == before and os.listdir(lab.staging) == []
    # the download works, the write fails: the volume this cp made is deleted, the stream too
    lab.conf(EQL_PORTAL="127.0.0.1:1")                         # nothing listens there
    try:
        res = restore(lab, remotes, url(42, [(0, "cc01")], "disk.0.0"), env, 305, size_mb=1)
    finally:
        lab.conf()
    text = one_line(res, (6, 8))
    assert "volume restored-disk-0.305 deleted" in text, text
    assert lab.state() == before and os.listdir(lab.staging) == []
    assert any(c.startswith("volume create restored-disk-0.305") for c in lab.sim.commands)


@pytest.mark.parametrize("path,words", [
    ("rsync://105/7/0:ab'c//var/lib/one/datastores/105/1/abc/disk.0.0", "not a backup URL"),
    ("rsync://105/7/0:abc//var/lib/one/datastores/105/1/../../../etc/disk.0.0", "not a backup URL"),
    ("rsync://105/7/0:abc//var/lib/one/$(id)/disk.0.0", "not a backup URL"),
    ("rsync://105/7/0:abc//var/lib/one/datastores/105/1/abc/passwd", "not a backup URL"),
    ("rsync://106/7/0:abc//var/lib/one/datastores/106/1/abc/disk.0.0", "FROM_BACKUP_DS is '105'"),
    ("rsync+rbd://105/7/0:abc//var/lib/one/datastores/105/1/abc/disk.0.0", "Ceph"),
    ("restic+rbd://105/7/0:abc//var/lib/one/datastores/105/1/abc/disk.0.0", "Ceph"),
])
def test_hostile_backup_urls_refused_before_anything_runs(setup, path, words):
    lab, remotes, root, env, calls = setup
    before = lab.state()
    res = restore(lab, remotes, path, env, 306, size_mb=1)
    text = one_line(res, (6, 8))
    assert words in text, text
    assert not calls.exists() and lab.state() == before


def test_stat_of_a_backup_url_points_to_oneimage_restore(setup):
    """Without FROM_BACKUP_DS oned asks this datastore's stat: it says how such images are made."""
    from tests.test_eqliscsi_ds import stat_data
    lab, remotes, root, env, calls = setup
    res = lab.call(remotes, "stat", stat_data(url(43, [(0, "ab12")], "disk.0.0")), 307, env=env)
    assert "oneimage restore" in one_line(res, (6, 8)) and not calls.exists()
