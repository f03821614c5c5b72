"""The eqliscsi datastore actions: images are volumes on a Dell EqualLogic PS group.

cp      validate; fetch the source (local file, http/https, a backup's rsync:// or restic://
        URL through OpenNebula's downloader.sh (source.py); MD5/SHA1 checked,
        gzip/bzip2/xz unpacked unless NO_DECOMPRESS, downloads staged in
        EQL_STAGING_DIR) and read its format (raw or qcow2) and size with qemu-img
        (backing and external data files are refused); create the
        volume (MB, pool, thin provisioning, description), multihost access and the
        access records; write it with qemu-img's own iSCSI initiator (libiscsi) from
        the frontend, or from the first reachable BRIDGE_LIST host (the file is sent
        there over ssh first); LIMIT_TRANSFER_BW caps downloads and the write; print
        `<volume> raw` (6.0+) or `<volume>`. Any failure once the volume exists
        deletes it: no volume is ever left behind.
mkfs    `save_as`: print the name only; raw: create the volume; a filesystem: made
        on a sparse local file and written like cp.
clone   SAN-side clone of the source image's volume; print `<volume> raw` (6.4.2+)
        or `<volume>` (6.0.0-6.4.1 store the whole reply as SOURCE).
rm      offline + delete; "does not exist" is success; refused while initiators are
        connected.
stat    MB of the source (virtual size for qcow2, gzip's recorded size, Content-Length
        for URLs).
monitor one `pool select <pool> show`.
export  for a marketplace app: the volume read into a qcow2 file (frontend or BRIDGE_LIST
        host) and `<IMPORT_INFO>` printed, DISPOSE=YES (see ds_export).
snap_delete / snap_revert / snap_flatten
        group snapshots `one-snap-<id>` stand for the image's snapshot ids.

SAN access: the long data copy runs with no CLI session held, so a cp takes a
session to create the volume, and (only when it added an access record for the
writer, or to clean up) a second one after the copy. Every other action uses one
session. A per-volume lock serialises actions on one volume.

Writer access: with EQL_SECURITY_ACCESS empty volumes are created `unrestricted`
(as the seed add-on did) and the writer needs nothing more; otherwise cp adds a
record for the writer's initiator name (EQL_INITIATOR, else the frontend's
/etc/iscsi/initiatorname.iscsi, else iqn.2000-01.org.opennebula.oneiscsi:<hostname>),
with CHAP when EQL_CHAP_USER is set, and deletes it after the copy.
LUN: the first of LUN 0 (a real group) and LUN 1 (tgtd, the simulator) that
`qemu-img info` opens with a size is written.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import tempfile

from oneiscsi import config, log, validate
from oneiscsi.drivers.eqliscsi import common, source, write
from oneiscsi.errors import Failure, Invalid
from oneiscsi.one.version import remotes_dir
from oneiscsi.san import cli, client, parse

MiB = source.MiB
MKFS = {"ext2": ["mkfs.ext2", "-F", "-q"], "ext3": ["mkfs.ext3", "-F", "-q"],
        "ext4": ["mkfs.ext4", "-F", "-q"], "xfs": ["mkfs.xfs", "-f", "-q"],
        "vfat": ["mkfs.vfat"], "swap": ["mkswap"]}


# ---- configuration and names ----------------------------------------------------------
def _setup(call, with_image=True):
    ds = call.ds()
    cfg = config.load(remotes_dir(call.argv0), ds.datastore, ds.image if with_image else None)
    return ds, cfg


def _image_id(call, image) -> str:
    return image.id or getattr(call, "obj_id", "")


def _description(image, image_id) -> str:
    text = image.tpl("DESCRIPTION") or image.name
    return cli.clean_description("OpenNebula image %s: %s" % (image_id, text))


# ---- creating a volume that never outlives a failure -------------------------------------
class NewVolume:
    """Create a volume (and its access settings) so that a failure at any step deletes it.

    `make(session) -> iqn` creates it; `fill(iqn)` (optional) writes it with no CLI
    session held. A command whose outcome is unknown (the connection broke while it
    ran) is checked afterwards: the volume is ours if its description is ours."""

    def __init__(self, cfg, name: str, description: str, writer_access: bool):
        self.cfg, self.name, self.description = cfg, name, description
        self.group = cfg.group()
        self.writer_access = writer_access and bool(cfg.access)
        self.created = self.unsure = False
        self.record = None

    def run(self, make, fill=None) -> str:
        with common.volume_lock(self.group, self.name, self.cfg.lock_wait):
            try:
                with client.session(self.group) as s:
                    try:
                        iqn = self._make(s, make)
                    except client.TransportError as e:
                        self.unsure = e.unsure
                        raise
                    self.created = True
                    log.info("created volume %s (%s)" % (self.name, iqn))
                    self._access(s)
                if fill is not None:
                    fill(iqn)
                    if self.record is not None:
                        with client.session(self.group) as s:
                            s.delete_access(self.name, self.record)
                        self.record = None
                return iqn
            except BaseException as e:
                suffix = self._undo()
                if isinstance(e, Failure):
                    err = Failure(str(e) + suffix)
                    err.exit_code = e.exit_code
                    raise err from None
                if suffix:
                    log.error(suffix.lstrip("; "))
                raise

    def _make(self, s, make) -> str:
        """make(s). When the group refuses it and a volume of this name exists with exactly
        this action's description, no connection and no snapshot, an earlier attempt for
        this image left it (a create the group finished after its answer was lost): it is
        deleted and made again (made again, not reused: its size, pool and access follow
        today's settings, and no half-written data stays)."""
        try:
            return make(s)
        except client.CliError as e:
            try:
                info = s.volume_info(self.name)
            except Failure:
                info = None
            if not (info and parse.field(info, "description") == self.description
                    and parse.field(info, "connections", "0").strip() == "0"
                    and parse.field(info, "snapshots", "0").strip() == "0"):
                raise e from None
        log.warn("volume %s exists with this image's description, no connection and no snapshot: an earlier "
                 "attempt left it; deleting and creating it again" % self.name)
        s.delete_volume(self.name)
        return make(s)

    def _access(self, s) -> None:
        s.set_multihost(self.name, self.cfg.multihost)
        for rec in self.cfg.access:
            s.add_access(self.name, rec)
        if self.writer_access:
            self.record = s.add_access(self.name, cli.initiator_record(self.cfg.initiator(), self.cfg.chap_user))

    def _undo(self) -> str:
        """Delete the volume this action made (the caller holds the volume lock)."""
        if not (self.created or self.unsure):
            return ""
        try:
            with client.session(self.group) as s:
                if not self.created:
                    info = s.await_volume(self.name, self.group.timeout)
                    if info is None:
                        return ("; volume %s did not appear within %d s after that: if the group still "
                                "creates it, delete it on the group" % (self.name, self.group.timeout))
                    if info.get("Description", "") != self.description:
                        return "; a volume %s exists that this action did not create: left alone" % self.name
                s.delete_volume(self.name)
            log.info("deleted volume %s after the failure" % self.name)
            return "; volume %s deleted" % self.name
        except Failure as e2:
            return "; and volume %s could NOT be deleted (%s): delete it on the group" % (self.name, e2)


# ---- actions -----------------------------------------------------------------------------
def ds_cp(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    name = common.volume_name(image.name, iid)
    write.check_write_settings(cfg, ds.datastore)  # before any data moves
    src = source.prepare_source(image, ds.datastore, cfg, remotes_dir(call.argv0))
    try:
        size_mb = max(image.size_mb, math.ceil(src.size / MiB), 1)
        vol = NewVolume(cfg, name, _description(image, iid), writer_access=True)
        vol.run(lambda s: s.create_volume(name, size_mb, cfg.pool, vol.description, cfg.thin,
                                          unrestricted=not cfg.access),
                lambda iqn: write.write(cfg, ds.datastore, iqn, src))
    finally:
        src.cleanup()
    call.cp_result(name, "raw")


def ds_mkfs(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    name = common.volume_name(image.name, iid)
    fs = (image.fs or "").strip().lower()
    if fs == "save_as":
        call.result(name)
        return
    fmt = (image.format or "raw").strip().lower()
    if fmt != "raw" or fs in ("qcow2",):
        raise Invalid("EqualLogic volumes are raw block devices: create the datablock with FORMAT=raw "
                      "(got %s)" % validate.show(fs if fs == "qcow2" else fmt))
    size_mb = image.size_mb
    if size_mb < 1:
        raise Invalid("the datablock needs a SIZE in MB (got %s)" % validate.show(image["SIZE"]))
    filesystem = fs not in ("", "raw", "none")
    if filesystem:
        if fs not in MKFS:
            raise Invalid("FS %s is refused: supported filesystems are %s" % (validate.show(fs), ", ".join(MKFS)))
        if not shutil.which(MKFS[fs][0]):
            raise Failure("%s is not installed on the frontend (needed for FS=%s)" % (MKFS[fs][0], fs))
        write.check_write_settings(cfg, ds.datastore)

    def fill(iqn):
        src = _make_fs(cfg, fs, size_mb)
        try:
            write.write(cfg, ds.datastore, iqn, src, zero_target=True)
        finally:
            src.cleanup()
    vol = NewVolume(cfg, name, _description(image, iid), writer_access=filesystem)
    vol.run(lambda s: s.create_volume(name, size_mb, cfg.pool, vol.description, cfg.thin,
                                      unrestricted=not cfg.access), fill if filesystem else None)
    call.result(name)


def _make_fs(cfg, fs: str, size_mb: int) -> source.Source:
    try:
        fd, path = tempfile.mkstemp(prefix="oneiscsi-mkfs-", suffix=".img", dir=cfg.staging_dir)
    except OSError as e:
        raise Failure("cannot create a file in EQL_STAGING_DIR %s: %s" % (cfg.staging_dir, e.strerror)) from None
    src = source.Source(path, staged=True)
    try:
        os.ftruncate(fd, size_mb * MiB)
        os.close(fd)
        source.run(MKFS[fs] + [path], "mkfs (%s)" % fs)
        src.size = size_mb * MiB
    except BaseException:
        src.cleanup()
        raise
    return src


def ds_clone(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    source = common.parse_source(image["PATH"] or image["SOURCE"], "PATH (the source image's SOURCE)")
    name = common.volume_name(image.name, iid)
    if name == source:
        raise Invalid("the clone would have the source's volume name %s: give the new image another name "
                      "or let OpenNebula give it a new id" % name)
    vol = NewVolume(cfg, name, _description(image, iid), writer_access=False)
    vol.run(lambda s: s.clone_volume(source, name, vol.description, unrestricted=not cfg.access))
    call.clone_result(name, "raw")


# OpenNebula 6.0.0-6.4.1 stored a clone reply `volume raw` whole as SOURCE
# (src/image/ImageManagerProtocol.cc ImageManager::_clone at release-6.4.1); older
# builds of this driver printed that, so such images exist.
LEAKED_CLONE = re.compile(r"^(\S+) (raw|qcow2)$")


def image_volume(image) -> str:
    """The volume of an image from its SOURCE, also from the leaked `volume raw` form,
    so those images can still be removed and snapshotted."""
    src = (image["SOURCE"] or "").strip()
    m = LEAKED_CLONE.match(src)
    if m:
        log.info("SOURCE %s holds a clone reply stored whole by OpenNebula 6.0-6.4.1: using volume %s"
                 % (validate.show(src), m.group(1)))
        src = m.group(1)
    return common.parse_source(src)


def ds_rm(call):
    ds, cfg = _setup(call)
    name = image_volume(ds.image)
    group = cfg.group()
    with common.volume_lock(group, name, cfg.lock_wait):
        with client.session(group) as s:
            info = s.volume_info(name)
            if info is None:
                log.info("volume %s does not exist: nothing to delete" % name)
                return
            _refuse_connected(s, name, info, "delete the image")
            try:
                s.delete_volume(name)
            except BaseException:
                _back_online(s, name)
                raise
    log.info("deleted volume %s" % name)


def _connections(info) -> int:
    m = re.match(r"\d+", info.get("Connections", "0") or "0")
    return int(m.group(0)) if m else 0


def _refuse_connected(s, name, info, doing):
    n = _connections(info)
    if n:
        allowed = sorted({r["initiator"] or r["ipaddress"] for r in s.access_records(name)})
        raise Failure("cannot %s: volume %s has %d iSCSI connection(s) (initiators allowed by its access "
                      "records: %s); log them out first (stop or undeploy the VMs using it)"
                      % (doing, name, n, ", ".join(allowed) or "none"))


def _back_online(s, name):
    try:
        s.set_online(name, True)
    except Failure as e:
        log.error("volume %s could not be put back online: %s" % (name, e))


def ds_stat(call):
    ds = call.ds()
    size = source.size_of(ds.image["PATH"], ds.datastore)
    call.result(str(max(1, math.ceil(size / source.MiB))))


def ds_monitor(call):
    ds, cfg = _setup(call, with_image=False)
    with client.session(cfg.group()) as s:
        total, free = s.pool_space(cfg.pool)
    call.result("USED_MB=%d\nTOTAL_MB=%d\nFREE_MB=%d" % (max(0, total - free), total, free))


# ---- snapshots ---------------------------------------------------------------------------
def _snap_target(call):
    ds, cfg = _setup(call)
    name = image_volume(ds.image)
    sid = ds.image["TARGET_SNAPSHOT"]
    if not re.fullmatch(r"\d{1,9}", sid or ""):
        raise Invalid("TARGET_SNAPSHOT %s is refused: not a snapshot id" % validate.show(sid))
    return cfg, name, common.snapshot_name(sid)


def ds_snap_delete(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group, name, cfg.lock_wait):
        with client.session(group) as s:
            if not s.delete_snapshot(name, snap):
                log.warn("snapshot %s of volume %s does not exist: nothing to delete" % (snap, name))


def revert(s, name, snap) -> None:
    """Volume offline, restore the snapshot, online. Up to the restore a failure leaves the
    volume as it was (back online); the restore is the point of no return. The snapshot a
    group makes of the current data on a restore is deleted, so the snapshot set stays
    what OpenNebula knows."""
    info = s.volume_info(name)
    if info is None:
        raise Failure("volume %s does not exist" % name)
    _refuse_connected(s, name, info, "revert to a snapshot")
    before = {r["name"] for r in s.snapshots(name)}
    if snap not in before:
        raise Failure("volume %s has no snapshot %s" % (name, snap))
    s.set_online(name, False)
    try:
        s.restore_snapshot(name, snap)
    except client.TransportError as e:
        if not e.unsure or not _new_snapshots(s, name, before):
            _back_online(s, name)
            raise
        log.info("the connection broke during the restore, which the group did")
    except BaseException:
        _back_online(s, name)
        raise
    try:
        s.set_online(name, True)
    except Failure as e:
        raise Failure("volume %s was reverted to %s but could not be put back online: %s" % (name, snap, e)) from None
    try:
        for extra in _new_snapshots(s, name, before):
            s.delete_snapshot(name, extra)
    except Failure as e:
        log.warn("volume %s was reverted to %s; the snapshot the group took before the restore could not "
                 "be deleted: %s" % (name, snap, e))


def _new_snapshots(s, name, before) -> list:
    try:
        return sorted({r["name"] for r in s.snapshots(name)} - before)
    except Failure:
        return []


def ds_snap_revert(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group, name, cfg.lock_wait):
        with client.session(group) as s:
            revert(s, name, snap)
    log.info("volume %s reverted to %s" % (name, snap))


def ds_snap_flatten(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group, name, cfg.lock_wait):
        with client.session(group) as s:
            revert(s, name, snap)
            try:
                for r in s.snapshots(name):
                    if common.snapshot_id(r["name"]) is not None:
                        s.delete_snapshot(name, r["name"])
            except Failure as e:
                raise Failure("volume %s was reverted to %s but its snapshots could not all be deleted: %s"
                              % (name, snap, e)) from None
    log.info("volume %s flattened to %s; its snapshots are deleted" % (name, snap))


def ds_export(call):
    """The marketplace's `export` (src/market_mad/one_market.rb `import`, release-5.0 to 7.4.0):
    the volume is read into a qcow2 file on the frontend (EQL_STAGING_DIR) or the first
    reachable BRIDGE_LIST host and the market driver gets `<IMPORT_INFO>` with IMPORT_SOURCE
    (the file's path; `ssh://<host>:<path>` on a bridge host, as src/datastore_mad/remotes/
    fs/export does), MD5 and FORMAT of that file, SIZE in MB, DISPOSE=YES and (6.0+) DISPOSE_CMD,
    which the market driver runs after the upload (src/market_mad/remotes/http/import and s3/import,
    release-6.0.0+). 5.x has no DISPOSE_CMD: its http import removes a frontend IMPORT_SOURCE
    itself when DISPOSE=YES (release-5.12.0), so a file on a bridge host is DISPOSE=NO there.

    The volume is read directly, without a snapshot: oned makes the app only from an image in
    READY, USED or CLONE state and moves a persistent one to CLONE for the copy, refusing
    USED_PERS (ImageManager::set_clone_state, src/image/ImageManagerActions.cc, release-5.12.0
    and 7.4.0), so no VM writes the volume meanwhile (non-persistent VMs use their own clones,
    IMMUTABLE and CDROM images are attached read-only). With EQL_SECURITY_ACCESS set, a record for
    the reader's initiator is added for the read and removed after it, on every path."""
    ds, cfg = _setup(call)
    image = ds.image
    name = image_volume(image)
    write.check_write_settings(cfg, ds.datastore)  # before any session
    group = cfg.group()
    record = None
    with common.volume_lock(group, name, cfg.lock_wait):
        with client.session(group) as s:
            info = s.volume_info(name)
            if info is None:
                raise Failure("volume %s of image %s does not exist on the group" % (name, _image_id(call, image)))
            try:
                size = parse.size_mb(info.get("Size", "")) * MiB
            except parse.ParseError:
                raise Failure("the group shows no size for volume %s" % name) from None
            if cfg.access:
                record = s.add_access(name, cli.initiator_record(cfg.initiator(), cfg.chap_user))
        staged = None
        try:
            staged = write.read(cfg, ds.datastore, info["iqn"], size, "qcow2")
        finally:
            if record is not None:
                try:
                    with client.session(group) as s:
                        s.delete_access(name, record)
                except Failure as e:
                    if staged is not None:
                        _dispose(staged)
                    raise Failure("the access record %s added to volume %s for the read could NOT be removed (%s): "
                                  "remove it on the group" % (record, name, e)) from None
    host, path, md5 = staged
    import_source = "ssh://%s:%s" % (host, path) if host else path
    dispose = "YES"
    extra = ""
    if call.wire.version >= (6, 0, 0):
        extra = "<DISPOSE_CMD><![CDATA[%s]]></DISPOSE_CMD>" % " ".join(_dispose_argv(host, path))
    elif host:
        dispose = "NO"
        log.warn("OpenNebula 5.x removes only a frontend file after the upload: remove %s on %s once the "
                 "app is READY" % (path, host))
    call.result("<IMPORT_INFO><IMPORT_SOURCE><![CDATA[%s]]></IMPORT_SOURCE><MD5><![CDATA[%s]]></MD5>"
                "<SIZE><![CDATA[%d]]></SIZE><FORMAT><![CDATA[qcow2]]></FORMAT><DISPOSE>%s</DISPOSE>%s"
                "</IMPORT_INFO>" % (import_source, md5, math.ceil(size / MiB), dispose, extra))
    log.info("volume %s exported to %s (%d MB, md5 %s)" % (name, import_source, math.ceil(size / MiB), md5))


def _dispose_argv(host: str, path: str) -> list:
    """What removes a staged export file: run by the market driver as `$DISPOSE_CMD` (word split)."""
    return (["ssh", host] if host else []) + ["rm", "-f", path]


def _dispose(staged) -> None:
    host, path, _ = staged
    if not host:
        source._unlink(path)
        return
    from oneiscsi import host as hostrun
    hostrun.run(host, "rm -f %s\n" % hostrun.q(path), timeout=60, what="staged file removal")


DS = {
    "export": ds_export,
    "cp": ds_cp,
    "mkfs": ds_mkfs,
    "clone": ds_clone,
    "rm": ds_rm,
    "stat": ds_stat,
    "monitor": ds_monitor,
    "snap_delete": ds_snap_delete,
    "snap_revert": ds_snap_revert,
    "snap_flatten": ds_snap_flatten,
}
