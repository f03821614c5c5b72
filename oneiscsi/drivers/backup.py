"""Backups and in-place restores of VMs with oneiscsi disks (OpenNebula 6.6+).

oned sends a backup to the *system* datastore's TM (`tm/<system TM>/prebackup[_live]`, the
backup datastore's `backup`, then `postbackup[_live]`, also on failure: src/vmm_mad/exec/
one_vmm_exec.rb `backup`, release-6.6.0 to release-7.4.0), and `onevm restore` to
`tm/<system TM>/restore` (6.10+). There is no per-disk delegation, so `install` puts this
dispatcher over those scripts (kept beside it as `<action>.oneiscsi-orig`, as the 4.x migrate
wrappers). For every DISK of the VM whose TM_MAD is one of ours, oneiscsi does the work; the
other disks go to the original script with the remaining ids; a VM without our disks goes to
the original untouched.

Why never the original for our disks (reference opennebula-backups.md, each from the source):
it reads `<vm_dir>/disk.<id>` as a file, switches a live VM onto an overlay in `tmp/` with
`virsh snapshot-create-as` (an ISCSI network disk then stays on it, and the next backup's
`rm -rf tmp` removes what the VM wrote), turns raw disks into snapshot chains for increments
(backup_kvm.rb `backup_full`, INCREMENT_MODE snapshot, 7.x), and `restore` replaces the device
link with a local file (tm/ssh/restore, 6.10+).

Arguments (`BACKUP` line of src/tm/TransferManager.cc `backup_transfer_commands`):
  6.6        host:vm_dir disk_ids deploy_id vmid sys_dsid
  6.8+       host:vm_dir disk_ids deploy_id bj_id|- vmid sys_dsid   (release-6.8.0 qcow2/prebackup)
  restore    host:vm_dir vmid image_id inc_id disk_id|-1            (6.10+, no stdin)
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

from oneiscsi import log, validate
from oneiscsi.errors import Failure, Invalid
from oneiscsi.one.action import host_path, int_arg

ACTIONS = ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore")
ORIG_SUFFIX = ".oneiscsi-orig"
ISCSI = ("iscsi", "iscsi_libvirt")
OURS = ("eqliscsi",) + ISCSI
BACKUP_SINCE = (6, 6)
DATASTORE_CONF = os.path.join("etc", "datastore", "datastore.conf")


class Job:
    """One pre/postbackup call: where, which disks, which backup of the chain."""

    def __init__(self, call):
        a = call.args
        if len(a) not in (5, 6):
            raise Invalid("%s needs HOST:VM_DIR DISK_IDS DEPLOY_ID [BJ_ID] VMID SYS_DSID, got %d argument(s) %s: "
                          "run it from oned" % (call.action, len(a), validate.show(" ".join(a))))
        self.call = call
        self.action, self.live = call.action, call.action.endswith("_live")
        host, self.vm_dir = host_path(a[0])
        self.host = validate.hostname(host, "host")
        self.vm_dir = validate.safe_path(self.vm_dir.rstrip("/"), "VM folder")
        self.ids = [i for i in a[1].split(":") if i != ""]
        for i in self.ids:
            int_arg(i, "disk id")
        self.deploy_id = a[2]
        self.vmid = int_arg(a[-2], "VMID")
        text = call.stdin_text()
        if not text.strip():
            raise Failure("%s: no VM XML on stdin: oned sends it (one_vmm_exec.rb `backup`)" % call.action)
        from oneiscsi.one import xml
        self.vm_xml = text
        self.vm = xml.vm(text)
        cfg = "BACKUPS/BACKUP_CONFIG/"
        self.incremental = self.vm[cfg + "MODE"].upper() == "INCREMENT"
        last = self.vm[cfg + "LAST_INCREMENT_ID"]
        self.parent = int(last) if self.incremental and re.fullmatch(r"-?\d+", last or "") else -1
        self.backup_id = self.parent + 1 if self.incremental else 0   # backup_kvm.rb `initialize`
        self.fs_freeze = self.vm[cfg + "FS_FREEZE"] or "NONE"
        bridge = self.vm[cfg + "LAST_BRIDGE"]   # the backup datastore's BRIDGE_LIST host (7.x)
        self.backup_host = validate.hostname(bridge, "LAST_BRIDGE") if bridge else self.host
        self.base_path = _base_path(call)
        self.backup_dir = ("%s/%d/backup" % (self.base_path, self.vmid) if self.base_path
                           else "%s/backup" % self.vm_dir)

    def disks(self, drivers) -> list:
        return [d for d in self.vm.disks if d.disk_id in self.ids and d.tm_mad in drivers]


def _base_path(call) -> str:
    """BACKUP_BASE_PATH from remotes/etc/datastore/datastore.conf, as upstream's scripts load it
    (src/tm_mad/lib/datastore.rb `load_env`, 6.10+; 6.6/6.8 always use <vm_dir>/backup)."""
    if call.wire.version < (6, 10):
        return ""
    from oneiscsi.one.version import remotes_dir
    value = os.environ.get("BACKUP_BASE_PATH", "")
    try:
        with open(os.path.join(remotes_dir(call.argv0), DATASTORE_CONF), encoding="utf-8") as f:
            for line in f:
                m = re.match(r'^\s*(?:export\s+)?BACKUP_BASE_PATH\s*=\s*"?([^"\n]*)"?\s*$', line)
                if m:
                    value = m.group(1)
    except OSError:
        pass
    return validate.safe_path(value.rstrip("/"), "BACKUP_BASE_PATH") if value.strip() else ""


def original_path(argv0: str) -> str:
    """The saved original of the script we run as: `<path>.oneiscsi-orig`, following the links
    an installed tree may have on the way (tm/ssh/prebackup -> ../qcow2/prebackup, upstream's
    src/tm_mad/ssh, release-7.4.0): install wraps the file they end at."""
    p = os.path.abspath(argv0)
    for _ in range(10):
        if os.path.lexists(p + ORIG_SUFFIX):
            return p + ORIG_SUFFIX
        if not os.path.islink(p):
            break
        p = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
    raise Failure("the original %s script of this system TM is missing (install keeps it as %s%s): re-run "
                  "`oneiscsi.pyz install`" % (os.path.basename(argv0), os.path.abspath(argv0), ORIG_SUFFIX))


def _original(call, args) -> int:
    """Run the system TM's own script (saved by install) with these arguments and stdin."""
    orig = original_path(call.argv0)
    res = subprocess.run([orig] + list(args), input=call.stdin_text(), text=True)
    return res.returncode


def _parts(job, mine) -> list:
    by = {}
    for d in mine:
        by.setdefault("eqliscsi" if d.tm_mad == "eqliscsi" else "iscsi", []).append(d)
    parts = []
    if "eqliscsi" in by:
        from oneiscsi.drivers.eqliscsi import backup as eql
        parts.append(eql.Part(job, by["eqliscsi"]))
    if "iscsi" in by:
        from oneiscsi.drivers import iscsi_backup
        parts.append(iscsi_backup.Part(job, by["iscsi"]))
    return parts


def run(call, system_tm: str) -> int:
    if call.action == "restore":
        return restore(call)
    job = Job(call)
    mine = job.disks(OURS)
    if not mine:
        return _original(call, call.args)
    rest = [i for i in job.ids if i not in {d.disk_id for d in mine}]
    args = list(call.args)
    args[1] = ":".join(rest)
    if call.action.startswith("pre"):
        return _pre(job, mine, rest, args)
    return _post(job, rest, args)


def _pre(job, mine, rest, args) -> int:
    from oneiscsi.host import backup as hostbackup
    parts = _parts(job, mine)
    for p in parts:            # every refusal before anything changes
        p.check()
    done = False
    try:
        for p in parts:        # the points in time (group snapshots, the guest frozen around them)
            p.snapshot()
        if rest:
            rc = _original(job.call, args)
            if rc != 0:
                raise Failure("the system TM's %s of disk(s) %s failed (exit %d); oneiscsi's disks were not read"
                              % (job.action, ", ".join(rest), rc))
        # the folder made ready in the same ssh round trip as the first read
        fresh = not rest or job.backup_host != job.host
        # the TPM state goes with the original when it runs (its own save_tpm_sh), else with us
        tpm = (job.deploy_id, job.vm_dir) if fresh and job.vm["TEMPLATE/TPM/MODEL"] else None
        prefix = hostbackup.prepare_dir(job.backup_dir, _b64(job.vm_xml), fresh, tpm)
        for p in parts:
            p.read(prefix)
            prefix = ""
        done = True
    finally:
        for p in parts:
            p.finish(done)
    log.info("VM %d: backup %d of disk(s) %s written to %s:%s" % (
        job.vmid, job.backup_id, ", ".join(d.disk_id for d in mine), job.backup_host, job.backup_dir))
    return 0


def _post(job, rest, args) -> int:
    from oneiscsi.host import backup as hostbackup
    rc = _original(job.call, args) if rest else 0
    dirs = [job.backup_dir] + (["%s/%d" % (job.base_path, job.vmid)] if job.base_path else [])
    if not rest or job.backup_host != job.host:
        try:
            _host_step(job.backup_host, hostbackup.cleanup_dirs(dirs), "backup folder cleanup")
        except Failure as e:
            log.warn(str(e))
    # nothing on the group: prebackup removed what it made on every path it could see, and what a
    # killed one left goes with the next backup of the disk or the VM's end (eqliscsi/backup.py)
    # upstream's postbackup_live always exits 0 (qcow2/postbackup_live, release-7.4.0)
    return 0 if job.live else rc


def _b64(text: str) -> str:
    import base64
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _host_step(host: str, script: str, what: str, timeout: float = 86400):
    from oneiscsi import host as hostrun
    res = hostrun.run(host, script, timeout=timeout, what=what)
    if hostrun.unreachable(res):
        raise Failure("%s: host %s is not reachable over ssh (%s)" % (what, host, hostrun.last_line(res.stderr)))
    if res.returncode != 0:
        raise Failure("%s on %s failed: %s" % (what, host, log.mask(hostrun.last_line(res.stderr))
                                                or "exit %d" % res.returncode))
    return res


# ---- in-place restore (`onevm restore`, 6.10+) ---------------------------------------------------
def restore(call) -> int:
    a = call.args
    if len(a) != 5:
        raise Invalid("restore needs HOST:VM_DIR VMID IMAGE_ID INCREMENT_ID DISK_ID, got %d argument(s) %s: run it "
                      "from oned" % (len(a), validate.show(" ".join(a))))
    host, vm_dir = host_path(a[0])
    host = validate.hostname(host, "host")
    vm_dir = validate.safe_path(vm_dir.rstrip("/"), "VM folder")
    vmid, img_id = int_arg(a[1], "VMID"), int_arg(a[2], "IMAGE_ID")
    inc_id, disk_id = int_arg(a[3], "INCREMENT_ID"), int_arg(a[4], "DISK_ID")
    vm = call.one.vm(vmid)
    wanted = [d for d in vm.disks if disk_id == -1 or d.disk_id == str(disk_id)]
    mine = [d for d in wanted if d.tm_mad in OURS]
    if not mine:
        return _original(call, a)
    urls = backup_urls(call, vm, img_id, inc_id)
    mine = [d for d in mine if d.disk_id in urls]
    # the original restores every disk the backup holds, links included: one call per other disk
    # (its TPM state comes with disk 0: src/tm_mad/lib/datastore.rb `ls_increment`, 7.4.0)
    others = [d.disk_id for d in wanted if d.tm_mad not in OURS and d.disk_id in urls]
    targets = [_restore_target(call, vm, d, host, vm_dir) for d in mine]
    for t in targets:
        t.check()
    for t in targets:
        t.write(download(call, urls[t.did], host, "%s/disk.%s.backup" % (vm_dir, t.did)))
        log.info("disk %s of VM %d restored from backup image %d (increment %d)" % (t.did, vmid, img_id, inc_id))
    # the TPM state comes back with disk 0 (src/tm_mad/lib/datastore.rb `ls_increment`, 7.4.0)
    if "tpm" in urls and any(t.did == "0" for t in targets):
        from oneiscsi.host import backup as hostbackup
        staged = download(call, urls["tpm"], host, "%s/disk.tpm.backup" % vm_dir)
        _host_step(host, hostbackup.restore_tpm(staged, vm_dir), "TPM state restore")
    rc = 0
    for did in others:
        rc = rc or _original(call, [a[0], a[1], a[2], a[3], did])
    return rc


def _restore_target(call, vm, disk, host, vm_dir):
    if disk.tm_mad == "eqliscsi":
        from oneiscsi.drivers.eqliscsi import backup as eql
        return eql.RestoreTarget(call, vm, disk, host, vm_dir)
    from oneiscsi.drivers import iscsi_backup
    return iscsi_backup.RestoreTarget(call, vm, disk, host, vm_dir)


def backup_urls(call, vm, img_id: int, inc_id: int) -> dict:
    """{disk id: url} from the backup datastore's `ls -i <inc>`, called as upstream's restore
    does (src/tm_mad/lib/datastore.rb `action` / `ls_increment`, release-7.4.0)."""
    from oneiscsi.one.version import remotes_dir
    image = call.one.image(img_id)
    ds = call.one.datastore(int(image["DATASTORE_ID"] or -1))
    mad = ds["DS_MAD"].lower()
    if not re.fullmatch(r"[a-z0-9_-]{1,64}", mad):
        raise Invalid("backup datastore %s has DS_MAD %s: not a driver name" % (ds.id, validate.show(mad)))
    cmd = os.path.join(remotes_dir(call.argv0), "datastore", mad, "ls")
    data = "<DS_DRIVER_ACTION_DATA>\n%s\n%s\n%s\n</DS_DRIVER_ACTION_DATA>\n" % (ds.xml(), vm.xml(), image.xml())
    try:
        res = subprocess.run([cmd, "-i", str(inc_id)], input=data, capture_output=True, text=True, timeout=600)
    except OSError as e:
        raise Failure("cannot run the backup datastore's ls (%s): %s" % (cmd, e)) from None
    if res.returncode != 0:
        raise Failure("the backup datastore's ls of image %d failed: %s" % (img_id, log.mask(
            (res.stderr or res.stdout).strip().splitlines()[-1] if (res.stderr or res.stdout).strip() else
            "exit %d" % res.returncode)))
    try:
        found = json.loads(res.stdout)
    except ValueError:
        raise Failure("the backup datastore's ls of image %d answered no JSON: %s"
                      % (img_id, validate.show(res.stdout))) from None
    return {str(k): str(v) for k, v in found.items() if re.fullmatch(r"\d+|tpm", str(k))}


def download(call, url: str, host: str, path: str) -> str:
    """`downloader.sh --nodecomp URL -` on the frontend, streamed into `path` on the host, as
    upstream's restore (src/tm_mad/ssh/restore, release-6.10.5). -> path."""
    from oneiscsi import host as hostrun
    from oneiscsi.host import backup as hostbackup
    from oneiscsi.one.version import remotes_dir
    if not re.fullmatch(r"[a-z0-9+]{1,20}://[^\s'\"`$\\;|&<>]+", url):
        raise Invalid("backup URL %s is refused" % validate.show(url))
    downloader = os.path.join(remotes_dir(call.argv0), "datastore", "downloader.sh")
    ssh = hostrun.ssh_command(host)[:-1] + [hostbackup.receive_command(path)]
    with tempfile.TemporaryFile() as errf:   # a file, not a pipe: a chatty downloader cannot block the stream
        try:
            dl = subprocess.Popen([downloader, "--nodecomp", url, "-"], stdout=subprocess.PIPE, stderr=errf)
        except OSError as e:
            raise Failure("cannot run %s: %s" % (downloader, e)) from None
        try:
            rx = subprocess.run(ssh, stdin=dl.stdout, capture_output=True, timeout=86400)
        finally:
            dl.stdout.close()
            dl.wait()
        errf.seek(0)
        err = errf.read().decode("utf-8", "replace")
    if dl.returncode != 0:
        hostrun.run(host, "rm -f %s\n" % hostrun.q(path), timeout=60, what="cleanup")
        raise Failure("downloading %s failed: %s" % (validate.show(url, 120), log.mask(hostrun.last_line(err))
                                                      or "exit %d" % dl.returncode))
    if rx.returncode != 0:
        raise Failure("cannot store the backup on host %s: %s" % (host, hostrun.last_line(
            rx.stderr.decode("utf-8", "replace")) or "exit %d" % rx.returncode))
    return path
