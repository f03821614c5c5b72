"""oned's side of VM disks, for the lab and the tests: the only way they make VM XML.

The driver must not be checked against the driver's own reading of oned, so the DISK
attributes come from OpenNebula's rules, read from its source (read, not copied):

- `Image::disk_attribute` (src/image/Image.cc, release-6.10.5; release-4.14.2 for 4.x):
  what oned writes into a DISK that names an image. 5.x+: CDROM images and
  PERSISTENT_TYPE=IMMUTABLE get SAVE=NO, CLONE=NO, READONLY=YES and PERSISTENT is left as
  the owner wrote it; persistent images PERSISTENT=YES, CLONE=NO, SAVE=YES (+SHAREABLE=YES
  for PERSISTENT_TYPE=SHAREABLE in raw format); every other image CLONE=YES, SAVE=NO with
  the owner's PERSISTENT untouched. 4.14: IMMUTABLE is persistent with PERSISTENT=YES,
  SAVE=NO, READONLY=YES; a non-persistent CDROM gets CLONE=NO.
- `Datastore::disk_attribute` (src/datastore/Datastore.cc, release-6.10.5): DATASTORE,
  DATASTORE_ID, TM_MAD of the image's datastore.
- `TransferManager::prolog_transfer_command` (src/tm/TransferManager.cc, release-6.10.5):
  CLONE=YES -> the TM runs `clone`, else `ln`; `epilog_transfer_command`: SAVE=YES -> `mvds`,
  else `delete`. `tm_action()` below answers which.
- An image lists the VMs that use it in `<VMS>` (one.image.info), which the lab keeps.
- A failed live migration adds a history record copying the previous one
  (`LifeCycleManager::deploy_failure_action`, src/lcm/LifeCycleStates.cc, release-6.10.5:
  `cp_previous_history`): `Cloud.failed_live_migration()`.

Image types (include/Image.h): OS 0, CDROM 1, DATABLOCK 2.
"""
from __future__ import annotations

from oneiscsi.sim import onexml

OS, CDROM, DATABLOCK = 0, 1, 2


class Img:
    """An image as oned keeps it: id, name, SOURCE, persistence, PERSISTENT_TYPE, type."""

    def __init__(self, iid, name, source, persistent=True, ptype="", itype=OS, ds_id=110, ds_name="eql",
                 tm_mad="eqliscsi", fmt="raw", disk_type="BLOCK", template=None, size_mb=0):
        self.iid, self.name, self.source = int(iid), name, source
        self.persistent, self.ptype, self.itype = bool(persistent), (ptype or "").upper(), itype
        self.ds_id, self.ds_name, self.tm_mad, self.fmt = ds_id, ds_name, tm_mad, fmt
        self.disk_type, self.template, self.size_mb = disk_type, dict(template or {}), size_mb
        self.vms = []          # ids of the VMs that use it (one.image.info VMS)
        self.data = b""        # what the test wrote into it (for read-back checks)

    @property
    def volume(self) -> str:
        return self.source

    def xml(self, version=(6, 8)) -> str:
        tpl = dict(self.template)
        if self.ptype:
            tpl["PERSISTENT_TYPE"] = self.ptype
        return onexml.image_xml(iid=self.iid, name=self.name, source=self.source, persistent=self.persistent,
                                size_mb=self.size_mb, ds_id=self.ds_id, ds_name=self.ds_name, template=tpl,
                                version=version, fmt=self.fmt, image_type=self.itype, vms=self.vms)


def disk_attribute(img: Img, disk_id, user=None, version=(6, 8), inherit=()) -> dict:
    """The DISK oned writes for `img`; `user` holds what the VM owner wrote in the DISK;
    `inherit`: INHERIT_IMAGE_ATTR names of oned.conf, copied from the image template when the
    DISK lacks them (the end of Image::disk_attribute)."""
    d = {k: str(v) for k, v in (user or {}).items()}
    d.update({"IMAGE": img.name, "IMAGE_ID": str(img.iid), "SOURCE": img.source,
              "ORIGINAL_SIZE": str(img.size_mb)})
    d.setdefault("SIZE", str(img.size_mb))
    if img.fmt:
        d["DRIVER"] = d["FORMAT"] = img.fmt.lower()
    ro_tpl = img.template.get("READONLY", "")
    if tuple(version) >= (5, 0):
        if img.itype == CDROM or img.ptype == "IMMUTABLE":
            d.update(SAVE="NO", CLONE="NO", READONLY="YES")
        else:
            if "READONLY" not in d:
                d["READONLY"] = ro_tpl or "NO"
            if img.persistent:
                d.update(PERSISTENT="YES", CLONE="NO", SAVE="YES")
                if img.ptype == "SHAREABLE" and img.fmt == "raw":
                    d["SHAREABLE"] = "YES"
            else:
                d.update(CLONE="YES", SAVE="NO")
    else:  # release-4.14.2
        if img.itype == CDROM or img.ptype == "IMMUTABLE":
            d["READONLY"] = "YES"
        elif "READONLY" not in d:
            d["READONLY"] = ro_tpl or "NO"
        if img.persistent:
            d.update(PERSISTENT="YES", CLONE="NO", SAVE="NO" if img.ptype == "IMMUTABLE" else "YES")
        else:
            d.update(CLONE="NO" if img.itype == CDROM else "YES", SAVE="NO")
    d["TYPE"] = "CDROM" if img.itype == CDROM else img.disk_type
    d.update(DATASTORE=img.ds_name, DATASTORE_ID=str(img.ds_id), TM_MAD=img.tm_mad)
    for name in inherit:
        if not d.get(name) and img.template.get(name):
            d[name] = str(img.template[name])
    d["DISK_ID"] = str(disk_id)
    if "TARGET" not in d:
        d["TARGET"] = "vd" + "abcdefghijklmnopqrstuvwxyz"[int(disk_id) % 26]
    return d


def tm_action(disk: dict, leaving=False) -> str:
    """The TM action oned runs for a DISK: prolog `clone`/`ln`, epilog `mvds`/`delete`."""
    if leaving:
        return "mvds" if disk.get("SAVE", "").upper() == "YES" else "delete"
    return "clone" if disk.get("CLONE", "").upper() == "YES" else "ln"


class Cloud:
    """Images and VMs kept in a FakeOned the way oned keeps them.

        cloud.image(Img(...))                               # register
        cloud.vm(42, [(0, img), (1, img2, {"PERSISTENT": "YES"})], hosts=("host1",))
        cloud.done(42)                                      # terminated: out of the pool and VMS
    """

    def __init__(self, oned, version=(6, 8), system_tm="shared", system_ds=0, inherit=()):
        self.oned, self.version, self.inherit = oned, tuple(version), tuple(inherit)
        self.system_tm, self.system_ds = system_tm, system_ds
        self.images = {}
        self.disks = {}        # vmid -> {disk_id: attrs}
        self.shape = {}        # vmid -> kwargs of the last vm() call

    def image(self, img: Img) -> Img:
        self.images[img.iid] = img
        self._save_image(img)
        return img

    def _save_image(self, img):
        self.oned.images[img.iid] = img.xml(self.version)

    def vm(self, vmid, disks, hosts=("host1",), lcm_state=3, state=3, system_tm=None, system_ds=None,
           others=(), features=None, backups=None, tpm=None) -> str:
        """disks: (disk_id, Img[, user attrs]); others: DISK attribute dicts of disks that are not
        images of this model (volatile, other drivers), written as given; features: the VM
        owner's FEATURES (GUEST_AGENT...), kept by oned as written."""
        attrs = {}
        for entry in disks:
            did, img = entry[0], entry[1]
            user = entry[2] if len(entry) > 2 else {}
            attrs[int(did)] = disk_attribute(img, did, user, self.version, self.inherit)
        self.disks[vmid] = attrs
        for img in self.images.values():
            uses = any(a.get("IMAGE_ID") == str(img.iid) for a in attrs.values())
            if uses and vmid not in img.vms:
                img.vms.append(vmid)
                self._save_image(img)
            elif not uses and vmid in img.vms:
                img.vms.remove(vmid)
                self._save_image(img)
        if backups is None and self.version >= (6, 6):
            # a VM's BACKUP_CONFIG defaults (src/vm/Backups.cc `parse`, release-7.4.0)
            backups = {"BACKUP_VOLATILE": "NO", "FS_FREEZE": "NONE", "KEEP_LAST": "", "MODE": "FULL"}
        self.shape[vmid] = dict(disks=disks, hosts=hosts, lcm_state=lcm_state, state=state, system_tm=system_tm,
                                system_ds=system_ds, others=others, features=features, backups=backups, tpm=tpm)
        xml_disks = [onexml.disk_xml(did, {k: v for k, v in a.items() if k != "DISK_ID"})
                     for did, a in sorted(attrs.items())]
        xml_disks += [onexml.disk_xml(o["DISK_ID"], {k: v for k, v in o.items() if k != "DISK_ID"}) for o in others]
        xml = onexml.vm_xml(vmid=vmid, disks=xml_disks, hosts=hosts, lcm_state=lcm_state, state=state,
                            system_ds=self.system_ds if system_ds is None else system_ds, version=self.version,
                            tm_system=system_tm or self.system_tm, features=features, backups=backups, tpm=tpm)
        self.oned.vms[vmid] = xml
        return xml

    def state(self, vmid, lcm_state, *hosts, state=3) -> str:
        """The same VM in another state (and history)."""
        s = dict(self.shape[vmid])
        s.update(lcm_state=lcm_state, state=state, hosts=hosts or s["hosts"])
        return self.vm(vmid, **s)

    def backup(self, vmid, live=True, mode="FULL", last_increment=-1, fs_freeze="NONE", bridge="",
               backup_ds=100) -> str:
        """The VM as oned sends it to prebackup: state BACKUP (ACTIVE, LCM 69) from RUNNING or
        BACKUP_POWEROFF (LCM 70) from POWEROFF; LAST_DATASTORE_ID, LAST_BRIDGE (the backup
        datastore's bridge) and, for MODE INCREMENT, LAST_INCREMENT_ID (-1: the first, a full)
        (src/dm/DispatchManagerActions.cc `backup`, include/Backups.h, release-7.4.0)."""
        cfg = {"BACKUP_VOLATILE": "NO", "FS_FREEZE": fs_freeze, "KEEP_LAST": "", "MODE": mode,
               "LAST_DATASTORE_ID": backup_ds}
        if mode == "INCREMENT":
            cfg.update({"LAST_INCREMENT_ID": last_increment, "INCREMENT_MODE": "CBT"})
        if bridge:
            cfg["LAST_BRIDGE"] = bridge
        s = dict(self.shape[vmid])
        s.update(lcm_state=69 if live else 70, state=3, backups=cfg)
        return self.vm(vmid, **s)

    def failed_live_migration(self, vmid) -> str:
        """oned's history after a failed live migration src -> dst: [..., src, dst, src]."""
        s = dict(self.shape[vmid])
        hosts = tuple(s["hosts"])
        return self.state(vmid, 3, *(hosts + (hosts[-2],)))

    def system_datastore(self, shared=True) -> None:
        """The system datastore in oned: SHARED as oned copies it from TM_MAD_CONF."""
        self.system_tm = "shared" if shared else "ssh"
        self.oned.datastores[self.system_ds] = onexml.datastore_xml(
            ds_id=self.system_ds, name="system", ds_mad="-", tm_mad=self.system_tm, ds_type=1,
            template={"SHARED": "YES" if shared else "NO"}, version=self.version)

    def disk(self, vmid, did) -> dict:
        return self.disks[vmid][int(did)]

    def done(self, vmid) -> None:
        self.oned.vms.pop(vmid, None)
        self.disks.pop(vmid, None)
        for img in self.images.values():
            if vmid in img.vms:
                img.vms.remove(vmid)
                self._save_image(img)
