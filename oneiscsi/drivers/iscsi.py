"""The libvirt-iSCSI driver (`iscsi`, also installed as `iscsi_libvirt`).

It registers LUNs that already exist; QEMU's own initiator (libiscsi) connects
to them when the VM starts, so nothing is logged in on the hosts and the LUN
is never touched. What the driver adds over upstream's no-op scripts: every
value is validated when the image is registered, non-persistent use is refused
with the reason, and `ln`/`premigrate` check the destination host (QEMU's iSCSI
support, the libvirt CHAP secret) in one ssh round trip before QEMU would fail.
"""
from __future__ import annotations

from oneiscsi import log, validate
from oneiscsi.errors import Failure, Invalid, NotSupported
from oneiscsi.one.action import disk_id, host_path

OURS = ("iscsi", "iscsi_libvirt")
NON_PERSISTENT = ("non-persistent use of an iSCSI LUN is refused: every VM would write the same "
                  "LUN and corrupt it; register the image with PERSISTENT=YES")


class Target:
    """The effective iSCSI attributes of an image or a VM disk, validated."""

    def __init__(self, source: str, iqn_override: str, hosts: str, user: str, usage: str, where: str):
        name = iqn_override or source
        self.iqn, self.lun = validate.iqn_lun(name, "ISCSI_IQN" if iqn_override else "SOURCE/PATH")
        if not hosts:
            raise Invalid("ISCSI_HOST is not set on the %s or its datastore: give host[:port]" % where)
        self.portals = validate.portals(hosts, "ISCSI_HOST")
        self.user = validate.chap_user(user) if user else ""
        self.usage = validate.usage(usage) if usage else ""
        if self.user and not self.usage:
            raise Invalid("ISCSI_USER is set but ISCSI_USAGE is not: CHAP needs the usage of the "
                          "libvirt secret that holds the password")
        if self.usage and not self.user:
            raise Invalid("ISCSI_USAGE is set but ISCSI_USER is not: CHAP needs both")
        self.name = name

    def for_libvirt(self) -> "Target":
        """libvirt takes exactly one <host> for an iSCSI disk ("protocol iscsi accepts only one
        host"), while oned writes one per ISCSI_HOST entry: refuse before QEMU would."""
        if len(self.portals) > 1:
            raise Invalid("ISCSI_HOST lists %d portals for %s, but libvirt's iSCSI disks take exactly one; "
                          "set a single host[:port] (an image's ISCSI_HOST overrides the datastore's)"
                          % (len(self.portals), self.name))
        return self

    @classmethod
    def of_image(cls, image, datastore):
        def attr(key):  # the image template overrides the datastore template
            return image.tpl(key) or datastore.tpl(key)
        return cls(image["PATH"], attr("ISCSI_IQN"), attr("ISCSI_HOST"),
                   attr("ISCSI_USER"), attr("ISCSI_USAGE"), "image")

    @classmethod
    def of_disk(cls, disk):
        # oned copies the inherited ISCSI_* attributes into each DISK (image over datastore)
        return cls(disk["SOURCE"], disk["ISCSI_IQN"], disk["ISCSI_HOST"], disk["ISCSI_USER"],
                   disk["ISCSI_USAGE"], "disk %s" % disk.disk_id)


def _refuse_non_persistent(image) -> None:
    if not image.persistent:
        raise Invalid(NON_PERSISTENT)


# ---- datastore actions ------------------------------------------------------------
def ds_cp(call):
    ds = call.ds()
    _refuse_non_persistent(ds.image)
    path = ds.image["PATH"]
    validate.iqn_lun(path, "PATH")
    t = Target.of_image(ds.image, ds.datastore)
    log.info("registering %s on %s" % (t.name, " ".join(validate.format_portal(*p) for p in t.portals)))
    call.cp_result(path)


def ds_stat(call):
    ds = call.ds()
    path = ds.image["PATH"]
    if path:  # refuse a bad PATH at `oneimage create`, before the image exists
        validate.iqn_lun(path, "PATH")
    call.result("0")


def ds_monitor(call):
    # registered LUNs take no space from the datastore (upstream semantics)
    call.result("USED_MB=0\nTOTAL_MB=1\nFREE_MB=1")


def ds_rm(call):
    log.info("image unregistered; the LUN is left untouched")


def _not_supported(what):
    def action(call):
        raise NotSupported("%s: %s" % (call.action, what))
    return action


DS = {
    "cp": ds_cp,
    "stat": ds_stat,
    "monitor": ds_monitor,
    "rm": ds_rm,
    "mkfs": _not_supported("not supported: the iSCSI datastore only registers existing LUNs"),
    "clone": _not_supported("not supported: clone the LUN on the target, then register it"),
    "snap_delete": _not_supported("not supported: take snapshots on the target"),
    "snap_revert": _not_supported("not supported: take snapshots on the target"),
    "snap_flatten": _not_supported("not supported: take snapshots on the target"),
    # the marketplace runs datastore/<driver>/export (src/market_mad/one_market.rb `import`)
    "export": _not_supported("not supported: an iSCSI LUN cannot be exported to a marketplace"),
}


# ---- transfer actions ---------------------------------------------------------------
def no_check_lines(host: str, rc: int, err: str) -> str:
    """The failure when the host check's script printed none of its CHECK lines: the
    shell at the other end did not run it. Names what it saw, the likely cause, the fix."""
    if rc == 0 and not err:
        saw = "ssh to %s worked (exit 0) but the check script printed nothing, not even its CHECK lines" % host
    elif err:
        saw = "the check script on %s printed no CHECK lines and exited with %d: %s" % (host, rc, validate.show(err, 160))
    else:
        saw = "the check script on %s printed no CHECK lines and exited with %d, nothing on stderr" % (host, rc)
    return ("host %s: %s; cause: the account oned uses there did not run the script sent on stdin to 'sh -s' "
            "(a command= restriction in its authorized_keys, an sshd ForceCommand, or a shell profile that "
            "exits or swallows stdin); fix: make 'echo echo ok | ssh %s sh -s' print ok as oneadmin on the "
            "frontend" % (host, saw, host))


def check_host(host: str, targets: list) -> None:
    """QEMU's iSCSI support and, for CHAP, the libvirt secrets, on `host` in one ssh round trip."""
    from oneiscsi import host as hostrun
    from oneiscsi.host import checks
    usages = sorted({t.usage for t in targets if t.usage})
    res = hostrun.run(host, checks.script(usages=usages, libvirt=bool(usages)), timeout=120,
                      what="iSCSI host check")
    if hostrun.unreachable(res):
        raise Failure("host %s: cannot run the iSCSI check over ssh: %s" % (host, hostrun.last_line(res.stderr)))
    rows = checks.parse(res.stdout)
    if not rows:
        raise Failure(no_check_lines(host, res.returncode, hostrun.last_line(res.stderr)))
    failed = [r for r in rows if r[1] == "FAIL"]
    if failed:
        name, _, detail, fix = failed[0]
        raise Failure("host %s: %s; fix: %s" % (host, detail, fix))
    log.info("host %s: %s" % (host, ", ".join("%s %s" % (r[0], r[1]) for r in rows)))


def tm_ln(call):
    if len(call.args) < 3:
        raise Invalid("ln needs SOURCE HOST:PATH VMID [DSID], got %d argument(s) %s: run it from oned"
                      % (len(call.args), validate.show(" ".join(call.args))))
    host, path = host_path(call.args[1], "ln's HOST:PATH argument")
    did = disk_id(path)
    validate.hostname(host, "destination host")
    if did is None:
        raise Invalid("ln's destination %s is not a disk path (<system datastore>/<vmid>/disk.<id>): the arguments "
                      "are shifted or not oned's" % validate.show(call.args[1]))
    vm = call.one.vm(call.args[2])
    disk = vm.disk(did)
    if disk is None:
        raise Failure("VM %s has no DISK with DISK_ID %s (from %s): oned and the VM disagree; check "
                      "'onevm show %s'" % (call.args[2], did, validate.show(call.args[1]), call.args[2]))
    check_host(host, [Target.of_disk(disk).for_libvirt()])


def tm_clone(call):
    raise Invalid(NON_PERSISTENT)


def tm_premigrate(call):
    m = call.migrate()
    disks = m.disks_of(OURS)
    if not disks or m.src == m.dst:
        return
    validate.hostname(m.dst, "destination host")
    check_host(m.dst, [Target.of_disk(d).for_libvirt() for d in disks])


def tm_nothing(call):
    """QEMU connects to the LUN itself: nothing to do on the hosts, never touch the LUN."""


TM = {
    "ln": tm_ln,
    "clone": tm_clone,
    "premigrate": tm_premigrate,
    "mv": tm_nothing,
    "mvds": tm_nothing,
    "delete": tm_nothing,
    "postmigrate": tm_nothing,
    "failmigrate": tm_nothing,
    "cpds": _not_supported("not supported: copy the LUN on the target"),
    "resize": _not_supported("not supported: resize the LUN on the target"),
    "snap_create": _not_supported("not supported: take snapshots on the target"),
    "snap_create_live": _not_supported("not supported: take snapshots on the target"),
    "snap_delete": _not_supported("not supported: take snapshots on the target"),
    "snap_revert": _not_supported("not supported: take snapshots on the target"),
    "context": _not_supported("not supported: iscsi cannot be a system datastore"),
    "mkimage": _not_supported("not supported: iscsi cannot be a system datastore"),
    "mkswap": _not_supported("not supported: iscsi cannot be a system datastore"),
    "monitor": _not_supported("not supported: iscsi cannot be a system datastore"),
}
