"""Host-side steps of backups and in-place restores: sh scripts run in one ssh round trip each.

Files follow what OpenNebula's backup datastore drivers pick up (src/tm_mad/qcow2/prebackup
and src/tm_mad/lib/backup_kvm.rb `backup_full`, release-6.6.0 to release-7.4.0): in the backup
folder, `vm.xml` (the VM XML, base64, as upstream writes it) and `disk.<id>.<backup id>`, a qcow2
file (`qemu-img convert -m 4 -O qcow2`). An increment is a qcow2 file holding only the clusters
that differ from the previous backup, with that file as backing: restores rebuild the chain with
`qemu-img rebase -u -F qcow2 -b <previous> <increment>` and flatten it with `qemu-img convert`
(src/tm_mad/lib/backup.rb `reconstruct_chain` / `merge_chain`, release-7.4.0).

Volumes and snapshots are read through qemu-img's own iSCSI initiator (libiscsi: host/libiscsi.py):
no kernel login, no device on the host.
"""
from __future__ import annotations

from oneiscsi import validate
from oneiscsi.host import q
from oneiscsi.host.libiscsi import QEMU_IMG, find, json_name, opts, prelude, secrets, shell


def prepare_dir(backup_dir: str, vm_xml_b64: str, fresh: bool, tpm=None) -> str:
    """The backup folder as upstream's prebackup leaves it: emptied (fresh), vm.xml written and,
    for a VM with a TPM (tpm = (deploy id, vm_dir)), its state in `disk.tpm.0` as upstream's
    `save_tpm_sh` makes it (src/tm_mad/lib/backup_kvm.rb, release-7.4.0)."""
    d = q(validate.safe_path(backup_dir, "backup folder"))
    lines = []
    if fresh:
        lines.append("rm -rf %s" % d)
    lines += ["mkdir -p %s || { echo %s >&2; exit 3; }" % (d, q("cannot create the backup folder %s" % backup_dir)),
              "[ -e %s/vm.xml ] || cat > %s/vm.xml <<'ONEISCSI_VMXML'\n%s\nONEISCSI_VMXML"
              % (d, d, vm_xml_b64.strip())]
    if tpm:
        dom, vm_dir = q(tpm[0]), q(validate.safe_path(tpm[1], "VM folder"))
        lines += ["(sudo -n -l 2>/dev/null | grep -q vtpm_setup) && sudo -n /var/tmp/one/vtpm_setup backup %s %s"
                  % (dom, vm_dir),
                  "tar zcf %s/disk.tpm.0 -C %s tpm || { echo 'cannot save the TPM state' >&2; exit 3; }" % (d, vm_dir)]
    return "\n".join(lines) + "\n"


def restore_tpm(staged: str, vm_dir: str) -> str:
    """upstream's `restore_tpm_sh`: the TPM state folder replaced from the backup's tar."""
    s, d = q(validate.safe_path(staged, "staged TPM state")), q(validate.safe_path(vm_dir, "VM folder"))
    return "rm -rf %s/tpm && tar zxf %s -C %s; rc=$?; rm -f %s; exit $rc\n" % (d, s, d, s)


def read_script(backup_dir: str, reads: list) -> str:
    """reads: [(disk_id, backup_id, Lun of the new snapshot, Lun of the reference or None)].
    A full read: `qemu-img convert -O qcow2` of the snapshot. An increment: a qcow2 over the new
    snapshot rebased (safe mode, which compares contents cluster by cluster) onto the reference
    snapshot keeps exactly the clusters that changed; then its backing becomes the previous
    backup file, by name, as upstream's chain expects. Each file appears only when complete."""
    d = validate.safe_path(backup_dir, "backup folder")
    luns = [r[2] for r in reads] + [r[3] for r in reads if r[3] is not None]
    lines = [prelude(), secrets(luns)]
    for n, (did, bid, new, ref) in enumerate(reads):
        did, bid = int(did), int(bid)
        out = "%s/disk.%d.%d" % (d, did, bid)
        part = out + ".part"
        lines.append(find(new, "ln%d" % n))
        lines.append("t0=$(date +%s%N)")
        if ref is None:
            lines.append("%s convert -m 4 -O qcow2 $objs --image-opts %s %s || { rm -f %s; fail %s; }" % (
                QEMU_IMG, shell(opts(new.spec("@LUN@", new.secret)), "ln%d" % n), q(part), q(part),
                q("reading disk %d (%s) failed" % (did, new.iqn))))
        else:
            lines.append(find(ref, "lr%d" % n))
            lines.append("{ %s create -q -f qcow2 -F raw $objs -b %s %s && "
                         "%s rebase -q -f qcow2 -F raw $objs -b %s %s && "
                         "%s rebase -q -u -f qcow2 -F qcow2 -b %s %s; } || { rm -f %s; fail %s; }" % (
                             QEMU_IMG, shell(json_name(new.spec("@LUN@", new.secret)), "ln%d" % n), q(part),
                             QEMU_IMG, shell(json_name(ref.spec("@LUN@", ref.secret)), "lr%d" % n), q(part),
                             QEMU_IMG, q("disk.%d.%d" % (did, bid - 1)), q(part), q(part),
                             q("the increment of disk %d (%s against %s) failed" % (did, new.iqn, ref.iqn))))
        lines.append("mv -f %s %s || fail %s" % (q(part), q(out), q("cannot write %s" % out)))
        lines.append("echo \"DONE %d $(stat -c %%s %s) $(( ($(date +%%s%%N) - t0) / 1000000 ))\"" % (did, q(out)))
    return "\n".join(lines) + "\n"


def cleanup_dirs(paths: list) -> str:
    """What upstream's postbackup removes (the backup folder, BACKUP_BASE_PATH/<vmid>)."""
    return "".join("rm -rf %s\n" % q(validate.safe_path(p, "backup folder")) for p in paths)


def write_script(staged: str, dest, link: str = "") -> str:
    """Write a downloaded qcow2 (`staged`, on the host) onto a volume: through the VM's disk
    link (`link`, a block device the host is logged in to) or through libiscsi (`dest`, a Lun).
    Refused before writing when the backup is larger than the volume; the staged file goes on
    every path."""
    s = q(validate.safe_path(staged, "staged backup file"))
    lines = ["staged=%s" % s, prelude('rm -f "$staged"')]
    if dest is not None:
        lines.append(secrets([dest]))
    lines += ["info=$(%s info --output=json -f qcow2 %s) || fail 'the downloaded backup is not a qcow2 image'"
              % (QEMU_IMG, s),
              # one standalone image (downloader.sh merges a chain): a backing or data file named
              # in it would be read from this host's disks into the VM's volume
              "case $info in *'\"backing-filename\"'*|*'\"data-file\"'*) "
              "fail 'the downloaded backup names a backing or data file: refused';; esac",
              "need=$(printf '%s' \"$info\" | sed -n 's/.*\"virtual-size\": *\\([0-9]*\\).*/\\1/p' | head -n 1)",
              "[ -n \"$need\" ] || fail 'the downloaded backup is not a qcow2 image'"]
    if link:
        lk = q(validate.safe_path(link, "disk link"))
        lines += ["[ -e %s ] || fail %s" % (lk, q("%s does not exist: the disk is not attached on this host" % link)),
                  "have=$(if [ -b %s ]; then blockdev --getsize64 %s; else stat -L -c %%s %s; fi)" % (lk, lk, lk),
                  "[ \"$have\" -ge \"$need\" ] || fail \"the backup ($need bytes) is larger than the volume "
                  "($have bytes): grow the disk first\"",
                  "%s convert -n -f qcow2 -O raw %s %s || fail %s" % (
                      QEMU_IMG, s, lk, q("writing the backup onto %s failed" % link)),
                  "sync"]
    else:
        lines += [find(dest, "lw", "\"$need\""),
                  "%s convert -n -W -m 8 -f qcow2 $objs %s --target-image-opts %s || fail %s" % (
                      QEMU_IMG, s, shell(opts(dest.spec("@LUN@", dest.secret)), "lw"),
                      q("writing the backup onto %s failed" % dest.iqn))]
    lines.append("echo \"DONE $need\"")
    return "\n".join(lines) + "\n"


def receive_command(path: str) -> str:
    """The remote command that stores ssh's stdin in `path` (0600), as upstream's restore
    streams the download (`ssh host dd of=<vm_dir>/disk.<id>.backup`, src/tm_mad/ssh/restore,
    release-6.10.5)."""
    p = q(validate.safe_path(path, "staged backup file"))
    return "umask 077; cat > %s || { rm -f %s; exit 3; }" % (p, p)
