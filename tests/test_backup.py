"""Backups and in-place restores of VMs with oneiscsi disks (OpenNebula 6.6-7.4 call shapes),
through the system TM scripts `install` wraps, against the real parts of test_eqliscsi_tm's
World (sshd hosts, tgtd, the EqualLogic simulator, FakeOned with onemodel's VM XML).

Stand-ins, since OpenNebula's own parts cannot run here (each follows
shared/reference/opennebula-backups.md):
- the system TM's original scripts (`tm/qcow2/*`, with `tm/ssh/*` links to them as upstream
  ships them): prebackup empties the backup folder, writes vm.xml and converts each disk it is
  given with qemu-img (qcow2/prebackup, release-7.4.0); postbackup removes the folder; every
  call is logged with its arguments;
- the backup datastore (`datastore/rsync/ls`) answers `{disk id: url}` for an increment, and
  `datastore/downloader.sh` is oneiscsi/sim/downloader.sh (its header says what it follows),
  reading a local folder that stands in for the backup server;
- `virsh` on the hosts is oneiscsi/sim/virsh_standin/virsh (freeze/thaw/suspend/resume only).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess

import pytest

from oneiscsi.sim import onexml
from tests import oneutil
from tests.test_eqliscsi_tm import MiB, SYSDS, eql_host_key, local, rand_bytes, world_on_lab  # noqa: F401

pytestmark = pytest.mark.needs_root

BKDS = 100
ORIG = r"""#!/bin/sh
# stand-in for OpenNebula's tm/qcow2/%(action)s (see the module docstring)
echo "%(action)s $*" >> %(log)s
cat > /dev/null
case %(action)s in
  prebackup*)
    loc=$1; ids=$2; h=${loc%%%%:*}; d=${loc#*:}
    $ONEISCSI_SSH "$h" "rm -rf $d/backup && mkdir -p $d/backup && echo vmxml > $d/backup/vm.xml" || exit 1
    for i in $(echo "$ids" | tr ':' ' '); do
      $ONEISCSI_SSH "$h" "qemu-img convert -m 4 -O qcow2 -U $d/disk.$i $d/backup/disk.$i.0" || exit 1
    done ;;
  postbackup*)
    loc=$1; h=${loc%%%%:*}; d=${loc#*:}
    $ONEISCSI_SSH "$h" "rm -rf $d/backup $d/tmp" ;;
esac
exit 0
"""
LS = r"""#!/bin/sh
# stand-in for the rsync backup datastore's ls -i <inc>: {disk id: url} of the files kept
cat > /dev/null
cat %(answer)s
"""


@pytest.fixture(scope="module")
def bw(tmp_path_factory, eql_host_key):
    with world_on_lab(tmp_path_factory.mktemp("bk"), eql_host_key, ("host1", "host2"), virsh_standin=True) as w:
        yield w


def virsh_calls(w, host="host1"):
    """[(time, verb, domain)] the virsh stand-in recorded on the host."""
    d = w.lab.hosts[host].virsh_dir
    try:
        with open(os.path.join(d, "calls.log")) as f:
            return [(float(a), b, c) for a, b, c in (ln.split() for ln in f if ln.strip())]
    except FileNotFoundError:
        return []


def virsh_reset(w, host="host1"):
    d = w.lab.hosts[host].virsh_dir
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o777)                      # the stand-in runs as oneadmin
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))


def make_tree(root: pathlib.Path, version: str, log: pathlib.Path, base_path="") -> pathlib.Path:
    """An OpenNebula remotes tree of `version` with stand-in system TM scripts, oneiscsi installed."""
    q = root / "tm" / "qcow2"
    q.mkdir(parents=True)
    for action in ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore"):
        p = q / action
        p.write_text(ORIG % {"action": action, "log": log})
        p.chmod(0o755)
    for sys_tm in ("ssh", "shared"):
        (root / "tm" / sys_tm).mkdir()
        for action in ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore"):
            os.symlink("../qcow2/" + action, root / "tm" / sys_tm / action)
    (root / "etc" / "datastore").mkdir(parents=True)
    (root / "etc" / "datastore" / "datastore.conf").write_text(
        '#BACKUP_BASE_PATH="/path/in/the/hosts"\n' + ('BACKUP_BASE_PATH="%s"\n' % base_path if base_path else ""))
    (root / "datastore" / "rsync").mkdir(parents=True)
    oneutil.install(root, version)
    return root


class Env:
    def __init__(self, w, tmp_path, version="7.4", base_path=""):
        from oneiscsi.sim.onemodel import Cloud
        self.w, self.tmp = w, tmp_path
        self.log = tmp_path / "orig.log"
        self.log.write_text("")
        self.r = make_tree(tmp_path / ("r" + version), version, self.log, base_path)
        self.version = tuple(int(x) for x in version.split("."))
        self.cloud = Cloud(w.oned, version=self.version, system_tm="ssh", system_ds=SYSDS)
        w.cloud, w.remotes = self.cloud, self.r
        w.reset_ssh()

    def orig_calls(self):
        return [ln.split() for ln in self.log.read_text().splitlines()]

    def call(self, action, vmid, ids, host="host1", ok=True, bjid=True):
        xml = self.w.oned.vms[vmid]
        args = ["%s:/var/lib/one/datastores/%d/%d" % (host, SYSDS, vmid), ":".join(map(str, ids)), "one-%d" % vmid]
        args += (["-"] if bjid else []) + [vmid, SYSDS]
        res = oneutil.run(self.r / "tm" / "shared" / action, args, stdin=xml, env=self.w.env, timeout=300)
        if ok:
            assert res.rc == 0, res
        return res


def img_bytes(w, host, path) -> bytes:
    """The guest-visible bytes of a qcow2 file (its chain) on a host."""
    h = w.hosts[host]
    h.run(["qemu-img", "convert", "-O", "raw", path, "/var/lib/one/datastores/out.raw"], user="oneadmin")
    try:
        return h.run(["cat", "/var/lib/one/datastores/out.raw"], user="oneadmin", input=b"").stdout
    finally:
        h.run(["rm", "-f", "/var/lib/one/datastores/out.raw"])


def backup_snaps(w, volume):
    return sorted(n for n in w.volume(volume).snapshots if n.startswith("oneiscsi-bk"))


def _vm(w, env, disks, vmid, extra_file=False):
    """A running VM with eqliscsi disks (and a plain file disk 9 of another driver)."""
    others = []
    if extra_file:
        others = [{"DISK_ID": "9", "TM_MAD": "ssh", "TYPE": "FILE", "SOURCE": "/x", "DATASTORE_ID": "1"}]
    env.cloud.vm(vmid, disks, hosts=("host1",), others=others)
    w.deploy(vmid, "host1")
    if extra_file:
        w.hosts["host1"].run(["sh", "-c", "head -c 1048576 /dev/urandom > %s" % local(vmid, 9)], user="oneadmin")


_ids = iter(range(5000, 90000))


def _image(w, env, size=2 * MiB, persistent=True):
    iid = next(_ids)
    img = w.register(iid, "bk %d" % iid, size=size, seed=iid, persistent=persistent)
    env.cloud.image(img)
    return img


def test_live_backup_7x_reads_group_snapshots_and_never_touches_the_running_disk(bw, tmp_path):
    """7.4 prebackup_live of a VM with a persistent and a cloned eqliscsi disk and a disk of
    another driver: ours come from group snapshots (read through libiscsi), the other goes to
    the original script with only its id; the VM's links stay the volumes, no tmp/ overlay,
    no snapshot left (MODE FULL); postbackup_live cleans up through the original."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a, b = _image(w, env), _image(w, env, persistent=False)
    vmid = next(_ids)
    _vm(w, env, [(0, a), (1, b)], vmid, extra_file=True)
    links = {d: w.link("host1", local(vmid, d)) for d in (0, 1)}
    w.write("host1", local(vmid, 1), b"\x5a" * 65536, offset=65536)
    want = {0: w.read("host1", local(vmid, 0), 2 * MiB), 1: w.read("host1", local(vmid, 1), 2 * MiB)}
    env.cloud.backup(vmid, live=True)
    res = env.call("prebackup_live", vmid, [0, 1, 9])
    assert env.orig_calls() == [["prebackup_live", "host1:/var/lib/one/datastores/0/%d" % vmid, "9", "one-%d" % vmid,
                                 "-", str(vmid), "0"]], res
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    files = sorted(w.hosts["host1"].run(["ls", bdir]).stdout.split())
    assert files == ["disk.0.0", "disk.1.0", "disk.9.0", "vm.xml"]
    for d in (0, 1):
        assert img_bytes(w, "host1", "%s/disk.%d.0" % (bdir, d)) == want[d]
        assert w.link("host1", local(vmid, d)) == links[d]
    assert not w.hosts["host1"].run(["test", "-e", "/var/lib/one/datastores/0/%d/tmp" % vmid], check=False).returncode == 0
    assert backup_snaps(w, a.volume) == [] and backup_snaps(w, w.clone_of(b, vmid)) == []
    env.call("postbackup_live", vmid, [0, 1, 9])
    assert env.orig_calls()[-1][:3] == ["postbackup_live", "host1:/var/lib/one/datastores/0/%d" % vmid, "9"]
    assert w.hosts["host1"].run(["test", "-e", bdir], check=False).returncode != 0
    w.terminate(vmid, "host1")


def test_tpm_state_is_saved_and_restored_with_disk_0(bw, tmp_path):
    """A VM with a TPM and only oneiscsi disks: its tpm/ folder goes into disk.tpm.0 as upstream's
    save_tpm_sh makes it, and `onevm restore` with disk 0 puts it back (restore_tpm_sh)."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a = _image(w, env)
    vmid = next(_ids)
    env.cloud.vm(vmid, [(0, a)], hosts=("host1",), tpm={"MODEL": "tpm-crb"})
    w.deploy(vmid, "host1")
    vmdir = "/var/lib/one/datastores/0/%d" % vmid
    h = w.hosts["host1"]
    h.run(["sh", "-c", "mkdir -p %s/tpm && echo state-1 > %s/tpm/tpm2-00.permall" % (vmdir, vmdir)], user="oneadmin")
    env.cloud.backup(vmid, live=False)
    env.call("prebackup", vmid, [0])
    listing = h.run(["tar", "tzf", vmdir + "/backup/disk.tpm.0"]).stdout.split()
    assert "tpm/tpm2-00.permall" in listing, listing
    _restore(w, env, vmid, {"0": [vmdir + "/backup/disk.0.0"], "tpm": [vmdir + "/backup/disk.tpm.0"]})
    env.call("postbackup", vmid, [0])
    h.run(["sh", "-c", "echo state-2 > %s/tpm/tpm2-00.permall" % vmdir], user="oneadmin")
    env.cloud.state(vmid, 0, state=8)
    res = oneutil.run(env.r / "tm" / "shared" / "restore", ["host1:" + vmdir, vmid, 77, 0, -1],
                      env=w.env, timeout=300)
    assert res.rc == 0, res
    assert h.run(["cat", vmdir + "/tpm/tpm2-00.permall"]).stdout == "state-1\n"
    w.terminate(vmid, "host1")


def test_6_6_shape_only_oneiscsi_disks_original_not_run(bw, tmp_path):
    """6.6: `host:dir ids deploy vmid dsid` (no bj_id); with only eqliscsi disks the original
    never runs and oneiscsi writes vm.xml (base64 of the VM XML, as upstream) itself."""
    import base64
    w, env = bw, Env(bw, tmp_path, "6.6")
    a = _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    env.cloud.backup(vmid, live=False)
    env.call("prebackup", vmid, [0], bjid=False)
    assert env.orig_calls() == []
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    vmxml = w.hosts["host1"].run(["cat", bdir + "/vm.xml"]).stdout
    assert base64.b64decode(vmxml) == w.oned.vms[vmid].encode()
    assert img_bytes(w, "host1", bdir + "/disk.0.0") == a.data
    env.call("postbackup", vmid, [0], bjid=False)
    assert env.orig_calls() == [] and w.hosts["host1"].run(["test", "-e", bdir], check=False).returncode != 0
    w.terminate(vmid, "host1")


def test_increments_hold_only_changed_clusters_and_restore_with_standard_tools(bw, tmp_path):
    """7.4 MODE INCREMENT of a raw eqliscsi disk: backup 0 is full, 1 and 2 hold only what
    changed (data and zeroes), the previous snapshot is the reference kept on the group; the
    chain rebuilt with `qemu-img rebase -u` + `convert` (upstream's restore) gives the disk;
    a missing reference is refused with the way out; --reset (LAST_INCREMENT_ID -1) starts over."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    size = 8 * MiB
    a = _image(w, env, size=size)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    keep = "/var/lib/one/datastores/keep-%d" % vmid
    h = w.hosts["host1"]
    h.run(["mkdir", "-p", keep], user="oneadmin")

    def backup(last):
        env.cloud.backup(vmid, live=True, mode="INCREMENT", last_increment=last)
        env.call("prebackup_live", vmid, [0])
        bid = last + 1
        h.run(["cp", "%s/disk.0.%d" % (bdir, bid), keep], user="oneadmin")
        env.call("postbackup_live", vmid, [0])
        return int(h.run(["stat", "-c", "%s", "%s/disk.0.%d" % (keep, bid)]).stdout)

    full = backup(-1)
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-0" % vmid]
    w.write("host1", local(vmid, 0), rand_bytes(5 * 65536, 77), offset=3 * 65536)      # ~5 % changed
    inc1 = backup(0)
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-0" % vmid, "oneiscsi-bk-v%d-d0-1" % vmid]
    w.write("host1", local(vmid, 0), b"\0" * 65536, offset=0)                          # zeroes over data
    inc2 = backup(1)
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-1" % vmid, "oneiscsi-bk-v%d-d0-2" % vmid]
    assert full > size // 2 and inc1 < full // 4 and inc2 < full // 4, (full, inc1, inc2)
    # upstream's chain rebuild: each increment rebased onto the previous file, then flattened
    h.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", keep + "/disk.0.0", keep + "/disk.0.1"], user="oneadmin")
    h.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", keep + "/disk.0.1", keep + "/disk.0.2"], user="oneadmin")
    assert img_bytes(w, "host1", keep + "/disk.0.2") == w.read("host1", local(vmid, 0), size)
    assert img_bytes(w, "host1", keep + "/disk.0.1")[:65536] == a.data[:65536]
    # the reference is gone from the group: refused in one line, nothing written
    w.sim.group.delete_snapshot(a.volume, "oneiscsi-bk-v%d-d0-2" % vmid)
    env.cloud.backup(vmid, live=True, mode="INCREMENT", last_increment=2)
    res = env.call("prebackup_live", vmid, [0], ok=False)
    assert res.rc != 0 and "onevm backup --reset" in res.err and len(res.err.strip().splitlines()) == 1, res
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-1" % vmid]
    env.call("postbackup_live", vmid, [0])
    # --reset: a full backup, the older snapshots go
    assert backup(-1) > size // 2
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-0" % vmid]
    h.run(["rm", "-rf", keep])
    w.terminate(vmid, "host1")       # the VM is gone: its reference snapshot goes, the volume stays
    assert a.volume in w.sim.group.volumes and backup_snaps(w, a.volume) == []


def test_base_path_and_bridge_put_the_files_where_the_backup_datastore_reads(bw, tmp_path):
    """7.x: BACKUP_BASE_PATH (datastore.conf) and LAST_BRIDGE (the backup datastore's bridge):
    the files land in <base>/<vmid>/backup on the bridge host; postbackup removes <base>/<vmid>."""
    w = bw
    env = Env(w, tmp_path, "7.4", base_path="/var/lib/one/datastores/bkbase")
    a = _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    env.cloud.backup(vmid, live=True, bridge="host2")
    env.call("prebackup_live", vmid, [0])
    bdir = "/var/lib/one/datastores/bkbase/%d/backup" % vmid
    assert img_bytes(w, "host2", bdir + "/disk.0.0") == a.data
    assert w.hosts["host1"].run(["test", "-e", bdir], check=False).returncode != 0
    env.call("postbackup_live", vmid, [0])
    assert w.hosts["host2"].run(["test", "-e", "/var/lib/one/datastores/bkbase/%d" % vmid], check=False).returncode != 0
    w.terminate(vmid, "host1")


def _iscsi_disk(w, vol_name, did=1):
    """An iscsi-driver DISK for an existing target (a simulator volume used as a plain LUN)."""
    v = w.sim.group.volumes.get(vol_name) or w.sim.group.create_volume(vol_name, "2MB", unrestricted=True)
    return {"DISK_ID": str(did), "TM_MAD": "iscsi", "TYPE": "ISCSI", "DISK_TYPE": "ISCSI", "SOURCE": v.iqn,
            "ISCSI_HOST": "%s:3260" % w.lab.san.addr, "PERSISTENT": "YES", "DATASTORE_ID": "101", "IMAGE_ID": "0"}, v


def test_iscsi_live_backup_is_refused_before_anything_changes(bw, tmp_path):
    w, env = bw, Env(bw, tmp_path, "7.4")
    vmid = next(_ids)
    disk, _ = _iscsi_disk(w, "plainlun-a")
    env.cloud.vm(vmid, [], hosts=("host1",), others=[disk, {"DISK_ID": "9", "TM_MAD": "ssh", "TYPE": "FILE"}])
    env.cloud.backup(vmid, live=True)
    res = env.call("prebackup_live", vmid, [1, 9], ok=False)
    assert res.rc != 0 and "live backup of iscsi disk 1 is refused" in res.err, res
    assert len(res.err.strip().splitlines()) == 1 and env.orig_calls() == []
    env.cloud.done(vmid)


def test_iscsi_powered_off_backup_and_restore_through_libiscsi(bw, tmp_path):
    """A powered-off VM's iscsi LUN is read through libiscsi (no login) into disk.1.0; `onevm
    restore` writes the backup back onto the LUN (6.10+ restore shape), the other driver's disk
    goes to the original restore alone."""
    w, env = bw, Env(bw, tmp_path, "6.10")
    vmid = next(_ids)
    disk, v = _iscsi_disk(w, "plainlun-b")
    data = rand_bytes(2 * MiB, 5)
    with open(v.backing, "r+b") as f:
        f.write(data)
    env.cloud.vm(vmid, [], hosts=("host1",), others=[disk, {"DISK_ID": "9", "TM_MAD": "ssh", "TYPE": "FILE"}],
                 lcm_state=0, state=8)
    env.cloud.backup(vmid, live=False)
    w.hosts["host1"].run(["mkdir", "-p", "/var/lib/one/datastores/0/%d" % vmid], user="oneadmin")
    env.call("prebackup", vmid, [1])
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    assert img_bytes(w, "host1", bdir + "/disk.1.0") == data
    _restore(w, env, vmid, {"1": [bdir + "/disk.1.0"], "9": [bdir + "/disk.1.0"]})
    with open(v.backing, "r+b") as f:
        f.write(b"\xff" * len(data))
    res = oneutil.run(env.r / "tm" / "shared" / "restore",
                      ["host1:/var/lib/one/datastores/0/%d" % vmid, vmid, 77, 0, -1], env=w.env, timeout=300)
    assert res.rc == 0, res
    with open(v.backing, "rb") as f:
        assert f.read(len(data)) == data
    assert env.orig_calls()[-1] == ["restore", "host1:/var/lib/one/datastores/0/%d" % vmid, str(vmid), "77", "0", "9"]
    env.cloud.done(vmid)


def _restore(w, env, vmid, files, chain="0:abc"):
    """The backup image 77 in backup datastore 100 (rsync) whose ls answers `files` {disk id:
    [paths on host1 of the chain's files]}, kept as the backup server would
    (<base>/<vmid>/<snap>/disk.<id>.<inc>) in a local folder, and the downloader stand-in."""
    import shutil
    root = env.tmp / "bkserver"
    env.w.env["ONEISCSI_SIM_BACKUP_ROOT"] = str(root)
    answer = {}
    for did, paths in files.items():
        for (inc, snap), path in zip((x.split(":") for x in chain.split(",")), paths):
            d = root / "bk" / str(vmid) / snap
            d.mkdir(parents=True, exist_ok=True)
            name = "disk.%s.%s" % (did, inc)
            (d / name).write_bytes(w.hosts["host1"].run(["cat", path], input=b"").stdout)
        # upstream's shape: rsync://<ds>/<bj>/<inc:snap,...>/<path without its leading '/'> (rsync/ls)
        answer[did] = "rsync://%d/0/%s/bk/%d/%s/%s" % (BKDS, chain, vmid, snap, name)
    (env.tmp / "ls.json").write_text(json.dumps(answer))
    p = env.r / "datastore" / "rsync" / "ls"
    p.write_text(LS % {"answer": env.tmp / "ls.json"})
    p.chmod(0o755)
    shutil.copy(os.path.join(os.path.dirname(onexml.__file__), "downloader.sh"), env.r / "datastore" / "downloader.sh")
    (env.r / "datastore" / "downloader.sh").chmod(0o755)
    w.oned.images[77] = onexml.image_xml(iid=77, name="backup", path="", source="abc", ds_id=BKDS, ds_name="bk")
    w.oned.datastores[BKDS] = onexml.datastore_xml(ds_id=BKDS, name="bk", ds_mad="rsync", tm_mad="-", ds_type=2)


def test_restore_in_place_writes_the_volume_and_keeps_the_device_link(bw, tmp_path):
    """`onevm restore` (7.4 shape) of a powered-off VM: the eqliscsi disk's backup goes onto the
    volume through its link (the link stays the device), a shared (IMMUTABLE) volume is refused
    before anything is written."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a = _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    env.cloud.backup(vmid, live=False)
    env.call("prebackup", vmid, [0])
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    _restore(w, env, vmid, {"0": [bdir + "/disk.0.0"]})
    env.call("postbackup", vmid, [0])
    link = w.link("host1", local(vmid, 0))
    w.write("host1", local(vmid, 0), b"\x11" * (2 * MiB))
    env.cloud.state(vmid, 0, state=8)   # POWEROFF
    # a backup that names a backing file (a file of the host) is refused, nothing is written
    h = w.hosts["host1"]
    h.run(["sh", "-c", "cd /var/lib/one/datastores && head -c 2097152 /dev/urandom > hostfile.raw && "
           "qemu-img create -q -f qcow2 -F raw -b /var/lib/one/datastores/hostfile.raw hostile.qcow2"], user="oneadmin")
    _restore(w, env, vmid, {"0": ["/var/lib/one/datastores/hostile.qcow2"]}, chain="0:evil")
    res = oneutil.run(env.r / "tm" / "ssh" / "restore", ["host1:/var/lib/one/datastores/0/%d" % vmid, vmid, 77, 0, 0],
                      env=w.env, timeout=300)
    assert res.rc != 0 and "names a backing or data file" in res.err, res
    assert w.read("host1", local(vmid, 0), 2 * MiB) == b"\x11" * (2 * MiB)
    h.run(["rm", "-f", "/var/lib/one/datastores/hostfile.raw", "/var/lib/one/datastores/hostile.qcow2"])
    (env.tmp / "ls.json").write_text(json.dumps({"0": "rsync://%d/0/0:abc/bk/%d/abc/disk.0.0" % (BKDS, vmid)}))
    res = oneutil.run(env.r / "tm" / "ssh" / "restore", ["host1:/var/lib/one/datastores/0/%d" % vmid, vmid, 77, 0, 0],
                      env=w.env, timeout=300)
    assert res.rc == 0, res
    assert w.link("host1", local(vmid, 0)) == link
    assert w.read("host1", local(vmid, 0), 2 * MiB) == a.data
    assert env.orig_calls() == []
    assert w.hosts["host1"].run(["sh", "-c", "ls /var/lib/one/datastores/0/%d/*.backup" % vmid],
                                check=False).returncode != 0
    w.terminate(vmid, "host1")


def test_install_wraps_backup_scripts_once_and_uninstall_restores_them(tmp_path, pyz):
    """7.4 tree: tm/qcow2 files wrapped, tm/ssh and tm/shared links to them reach the wrapper;
    an OpenNebula upgrade that rewrote an original is kept by the next install; uninstall puts
    every file back byte for byte. 6.4 trees get no backup wrappers."""
    log = tmp_path / "log"
    r = tmp_path / "r"
    q = r / "tm" / "qcow2"
    q.mkdir(parents=True)
    (r / "VERSION").write_text("7.4.0\n")
    for action in ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore"):
        (q / action).write_text(ORIG % {"action": action, "log": log})
        (q / action).chmod(0o755)
        (r / "tm" / "ssh").mkdir(exist_ok=True)
        os.symlink("../qcow2/" + action, r / "tm" / "ssh" / action)

    def tree():
        return sorted((str(p.relative_to(r)), os.readlink(p) if p.is_symlink() else p.read_bytes())
                      for p in r.rglob("*") if (p.is_file() or p.is_symlink()) and "oneiscsi" not in p.parts)
    before = tree()
    out = subprocess.run([oneutil.PYTHON, str(pyz), "install", "--remotes", str(r), "--python", oneutil.PYTHON],
                         capture_output=True, text=True, check=True).stdout
    wrapped = re.findall(r"^wrapped (\S+)", out, re.M)
    assert sorted(wrapped) == sorted("tm/qcow2/" + a for a in ("prebackup", "prebackup_live", "postbackup",
                                                               "postbackup_live", "restore")), out
    assert os.readlink(r / "tm" / "ssh" / "prebackup") == "../qcow2/prebackup"
    # an upgrade writes a new original over the wrapper; install again keeps the new one
    os.remove(q / "restore")
    (q / "restore").write_text("#!/bin/sh\necho new\n")
    subprocess.run([oneutil.PYTHON, str(pyz), "install", "--remotes", str(r), "--python", oneutil.PYTHON],
                   capture_output=True, text=True, check=True)
    assert (q / "restore.oneiscsi-orig").read_text() == "#!/bin/sh\necho new\n"
    subprocess.run([oneutil.PYTHON, str(pyz), "uninstall", "--remotes", str(r)], capture_output=True, check=True)
    after = tree()
    assert [x for x in after if x[0] != "tm/qcow2/restore"] == [x for x in before if x[0] != "tm/qcow2/restore"]
    assert (q / "restore").read_text() == "#!/bin/sh\necho new\n"
    r64 = tmp_path / "r64"
    (r64 / "tm" / "qcow2").mkdir(parents=True)
    (r64 / "VERSION").write_text("6.4.0\n")
    (r64 / "tm" / "qcow2" / "prebackup").write_text("#!/bin/sh\n")
    out = subprocess.run([oneutil.PYTHON, str(pyz), "install", "--remotes", str(r64), "--python", oneutil.PYTHON],
                         capture_output=True, text=True, check=True).stdout
    assert "wrapped" not in out


@pytest.mark.parametrize("version", ["6.6", "6.8", "6.10", "7.0", "7.4"])
def test_every_backup_call_shape_lands_where_that_version_reads(bw, tmp_path, version):
    """Arguments per version (6.6: no bj_id; 6.8+: bj_id, release-6.8.0 qcow2/prebackup) and
    BACKUP_BASE_PATH honoured from 6.10 only (6.6/6.8 scripts always use <vm_dir>/backup); a VM
    without oneiscsi disks goes to the original with the very same arguments and stdin."""
    w = bw
    env = Env(w, tmp_path, version, base_path="/var/lib/one/datastores/bb")
    a = _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    env.cloud.backup(vmid, live=False)
    bjid = version != "6.6"
    env.call("prebackup", vmid, [0], bjid=bjid)
    bdir = ("/var/lib/one/datastores/bb/%d/backup" % vmid if env.version >= (6, 10)
            else "/var/lib/one/datastores/0/%d/backup" % vmid)
    assert img_bytes(w, "host1", bdir + "/disk.0.0") == a.data
    env.call("postbackup", vmid, [0], bjid=bjid)
    assert w.hosts["host1"].run(["test", "-e", bdir], check=False).returncode != 0
    assert env.orig_calls() == []
    # another VM with no oneiscsi disk: the original alone, untouched
    other = next(_ids)
    env.cloud.vm(other, [], hosts=("host1",), others=[{"DISK_ID": "0", "TM_MAD": "ssh", "TYPE": "FILE"}])
    w.hosts["host1"].run(["sh", "-c", "mkdir -p %s && head -c 65536 /dev/urandom > %s"
                          % (os.path.dirname(local(other, 0)), local(other, 0))], user="oneadmin")
    env.cloud.backup(other, live=True)
    res = env.call("prebackup_live", other, [0], bjid=bjid)
    want = ["prebackup_live", "host1:/var/lib/one/datastores/0/%d" % other, "0", "one-%d" % other]
    want += (["-"] if bjid else []) + [str(other), "0"]
    assert env.orig_calls() == [want], res
    env.cloud.done(other)
    w.terminate(vmid, "host1")


def test_live_backup_freezes_the_guest_once_around_every_snapshot(bw, tmp_path):
    """FS_FREEZE=AGENT: one domfsfreeze before the first group snapshot, one domfsthaw after the
    last (snapshot creation times from the simulator); the thaw also runs when the group fails
    a snapshot, and then no snapshot and no backup file is left."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a, b = _image(w, env), _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a), (1, b)], vmid)
    virsh_reset(w)
    env.cloud.backup(vmid, live=True, mode="INCREMENT", fs_freeze="AGENT")
    created = {}
    real = w.sim.group.create_snapshot

    def spy(vol, description=""):
        snap = real(vol, description)
        created[vol] = snap.created
        return snap
    w.sim.group.create_snapshot = spy
    try:
        env.call("prebackup_live", vmid, [0, 1])
    finally:
        w.sim.group.create_snapshot = real
    calls = virsh_calls(w)
    assert [(v, d) for _, v, d in calls] == [("domfsfreeze", "one-%d" % vmid), ("domfsthaw", "one-%d" % vmid)]
    assert calls[0][0] < min(created.values()) and max(created.values()) < calls[1][0], (calls, created)
    env.call("postbackup_live", vmid, [0, 1])
    # the group refuses a snapshot: thawed, nothing new left, the references of the chain stay
    virsh_reset(w)
    env.cloud.backup(vmid, live=True, mode="INCREMENT", last_increment=0, fs_freeze="AGENT")
    w.sim.faults.fail_next(r"create-now", "% Error - Not enough free space in the snapshot reserve.")
    res = env.call("prebackup_live", vmid, [0, 1], ok=False)
    assert res.rc != 0 and "snapshot reserve" in res.err, res
    assert [v for _, v, _ in virsh_calls(w)] == ["domfsfreeze", "domfsthaw"]
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-0" % vmid]      # the chain's reference stays
    assert backup_snaps(w, b.volume) == ["oneiscsi-bk-v%d-d1-0" % vmid]
    env.call("postbackup_live", vmid, [0, 1])
    w.sim.faults.clear()
    w.terminate(vmid, "host1")


def test_restore_of_an_increment_writes_the_merged_chain(bw, tmp_path):
    """`onevm restore` of increment 1: the downloader merges full + increment; the volume gets
    the data as it was at backup 1, not at backup 0 nor now."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a = _image(w, env)
    vmid = next(_ids)
    _vm(w, env, [(0, a)], vmid)
    bdir = "/var/lib/one/datastores/0/%d/backup" % vmid
    keep = "/var/lib/one/datastores/keep-%d" % vmid
    w.hosts["host1"].run(["mkdir", "-p", keep], user="oneadmin")
    for last in (-1, 0):
        env.cloud.backup(vmid, live=True, mode="INCREMENT", last_increment=last)
        env.call("prebackup_live", vmid, [0])
        w.hosts["host1"].run(["cp", "%s/disk.0.%d" % (bdir, last + 1), keep], user="oneadmin")
        env.call("postbackup_live", vmid, [0])
        if last == -1:
            w.write("host1", local(vmid, 0), b"\x42" * 65536, offset=65536)
    at_backup_1 = w.read("host1", local(vmid, 0), 2 * MiB)
    assert at_backup_1 != a.data
    w.write("host1", local(vmid, 0), b"\x99" * (2 * MiB))
    _restore(w, env, vmid, {"0": [keep + "/disk.0.0", keep + "/disk.0.1"]}, chain="0:s0,1:s1")
    env.cloud.state(vmid, 0, state=8)
    res = oneutil.run(env.r / "tm" / "shared" / "restore", ["host1:/var/lib/one/datastores/0/%d" % vmid, vmid, 77, 1,
                                                            -1], env=w.env, timeout=300)
    assert res.rc == 0, res
    assert w.read("host1", local(vmid, 0), 2 * MiB) == at_backup_1
    w.hosts["host1"].run(["rm", "-rf", keep])
    w.terminate(vmid, "host1")


def test_reconcile_removes_backup_references_of_vms_that_ended(bw, tmp_path):
    """A VM whose epilog could not reach the group keeps its backup reference snapshot on the
    image's volume: reconcile (any frontend, from oned and the group) lists it, --fix removes it
    once oned confirms the VM has ended; a running VM's reference is never touched."""
    w, env = bw, Env(bw, tmp_path, "7.4")
    a, b = _image(w, env), _image(w, env)
    gone, alive = next(_ids), next(_ids)
    for vmid, img in ((gone, a), (alive, b)):
        _vm(w, env, [(0, img)], vmid)
        env.cloud.backup(vmid, live=True, mode="INCREMENT")
        env.call("prebackup_live", vmid, [0])
        env.call("postbackup_live", vmid, [0])
    env.cloud.state(gone, 11)                          # terminate: its epilog cannot delete the snapshot
    w.sim.faults.fail_next(r"snapshot delete", "Unable to contact the group member holding the snapshot.")
    res = w.tm("mvds", "host1:" + local(gone, 0), a.volume, gone, 110)
    assert "backup reference snapshots of VM %d stay" % gone in w.new_log(), res
    env.cloud.done(gone)                               # oned forgets the VM
    assert backup_snaps(w, a.volume) == ["oneiscsi-bk-v%d-d0-0" % gone]
    run = [oneutil.PYTHON, str(oneutil.PYZ), "reconcile"]
    rec = subprocess.run(run, capture_output=True, text=True, env=dict(os.environ, **w.env))
    assert rec.returncode == 1 and "STRAY backup-snapshot volume=%s snapshot=oneiscsi-bk-v%d-d0-0" % (
        a.volume, gone) in rec.stdout, rec
    assert "v%d-" % alive not in rec.stdout
    rec = subprocess.run(run + ["--fix"], capture_output=True, text=True, env=dict(os.environ, **w.env))
    assert rec.returncode == 0 and "FIXED STRAY backup-snapshot" in rec.stdout, rec
    assert backup_snaps(w, a.volume) == [] and backup_snaps(w, b.volume) == ["oneiscsi-bk-v%d-d0-0" % alive]
    w.terminate(alive, "host1")
    assert backup_snaps(w, b.volume) == []
