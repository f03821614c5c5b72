"""Real-shaped OpenNebula XML for the lab and the tests (image, datastore, VM, DS_DRIVER_ACTION_DATA).

Shapes follow opennebula-driver-interface.md sections 1.2 and 6: 4.14-5.12 images
carry FSTYPE, 6.0+ FORMAT and FS; STATE/TYPE are numbers; non-persistent disks
have no PERSISTENT element at all.
"""
from __future__ import annotations

import base64
from xml.sax.saxutils import escape


def _el(name: str, value) -> str:
    return "<%s>%s</%s>" % (name, escape(str(value)), name)


def _template(attrs: dict) -> str:
    return "<TEMPLATE>%s</TEMPLATE>" % "".join(
        "<%s><![CDATA[%s]]></%s>" % (k, v, k) for k, v in attrs.items())


def image_xml(iid=0, name="img", path="", source="", persistent=True, size_mb=0, ds_id=100,
              ds_name="iscsi", template=None, version=(6, 8), fmt="raw", image_type=0,
              target_snapshot=None, snapshots="", vms=()) -> str:
    parts = [_el("ID", iid), _el("UID", 0), _el("GID", 0), _el("UNAME", "oneadmin"), _el("GNAME", "oneadmin"),
             _el("NAME", name),
             "<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A></PERMISSIONS>",
             _el("TYPE", image_type), _el("DISK_TYPE", 0), _el("PERSISTENT", 1 if persistent else 0),
             _el("REGTIME", 1700000000), _el("SOURCE", source), _el("PATH", path)]
    if tuple(version) >= (6, 0):
        parts += [_el("FORMAT", fmt), _el("FS", "")]
    else:
        parts += [_el("FSTYPE", "")]
    parts += [_el("SIZE", size_mb), _el("STATE", 2 if vms else 1), _el("RUNNING_VMS", len(vms)),
              _el("CLONING_OPS", 0), _el("CLONING_ID", -1)]
    if target_snapshot is not None:
        parts.append(_el("TARGET_SNAPSHOT", target_snapshot))
    parts += [_el("DATASTORE_ID", ds_id), _el("DATASTORE", ds_name),
              "<VMS>%s</VMS>" % "".join(_el("ID", v) for v in vms), "<CLONES/>", "<APP_CLONES/>",
              _template(template or {}), "<SNAPSHOTS>%s</SNAPSHOTS>" % snapshots]
    return "<IMAGE>%s</IMAGE>" % "".join(parts)


def datastore_xml(ds_id=100, name="iscsi", ds_mad="iscsi", tm_mad="iscsi", template=None,
                  version=(6, 8), ds_type=0) -> str:
    parts = [_el("ID", ds_id), _el("UID", 0), _el("GID", 0), _el("UNAME", "oneadmin"), _el("GNAME", "oneadmin"),
             _el("NAME", name),
             "<PERMISSIONS><OWNER_U>1</OWNER_U><OWNER_M>1</OWNER_M><OWNER_A>0</OWNER_A></PERMISSIONS>",
             _el("DS_MAD", ds_mad), _el("TM_MAD", tm_mad),
             _el("BASE_PATH", "/var/lib/one//datastores/%s" % ds_id), _el("TYPE", ds_type),
             _el("DISK_TYPE", 0), _el("STATE", 0)]
    if tuple(version) >= (5, 0):
        parts.append("<CLUSTERS><ID>0</ID></CLUSTERS>")
    else:
        parts += [_el("CLUSTER_ID", -1), _el("CLUSTER", "")]
    parts += [_el("TOTAL_MB", 1), _el("FREE_MB", 1), _el("USED_MB", 0), "<IMAGES/>", _template(template or {})]
    return "<DATASTORE>%s</DATASTORE>" % "".join(parts)


def ds_action_data(image: str, datastore: str, extra: str = "") -> str:
    """base64 DS_DRIVER_ACTION_DATA, single line, as oned sends it."""
    xml = "<DS_DRIVER_ACTION_DATA>%s%s%s</DS_DRIVER_ACTION_DATA>" % (image, datastore, extra)
    return base64.b64encode(xml.encode()).decode()


def disk_xml(disk_id, attrs: dict) -> str:
    """One /VM/TEMPLATE/DISK; attrs in oned's names (SOURCE, TM_MAD, PERSISTENT, ISCSI_HOST, ...)."""
    body = {"DISK_ID": disk_id}
    body.update(attrs)
    return "<DISK>%s</DISK>" % "".join("<%s><![CDATA[%s]]></%s>" % (k, v, k) for k, v in body.items())


def backups_xml(config: dict) -> str:
    """/VM/BACKUPS as oned writes it (src/vm/Backups.cc `to_xml`, release-7.4.0): BACKUP_CONFIG,
    then BACKUP_IDS."""
    return "<BACKUPS><BACKUP_CONFIG>%s</BACKUP_CONFIG><BACKUP_IDS/></BACKUPS>" % "".join(
        _el(k, v) for k, v in config.items())


def vm_xml(vmid=0, disks=(), hosts=("host1",), lcm_state=3, state=3, system_ds=0, name="vm",
           version=(6, 8), tm_system="shared", features=None, backups=None, tpm=None) -> str:
    """disks: list of DISK XML strings (disk_xml); hosts: history, last = current host;
    features: /VM/TEMPLATE/FEATURES attributes (GUEST_AGENT...), as the VM owner wrote them;
    backups: BACKUP_CONFIG attributes (6.6+); tpm: /VM/TEMPLATE/TPM (MODEL...), as the owner wrote it."""
    history = []
    for seq, h in enumerate(hosts):
        if tuple(version) >= (5, 0):
            history.append("<HISTORY>%s</HISTORY>" % "".join([
                _el("OID", vmid), _el("SEQ", seq), _el("HOSTNAME", h), _el("HID", seq), _el("CID", 0),
                _el("STIME", 1700000000 + seq), _el("ETIME", 0), _el("VM_MAD", "kvm"),
                _el("TM_MAD", tm_system), _el("DS_ID", system_ds), _el("ACTION", 0)]))
        else:
            history.append("<HISTORY>%s</HISTORY>" % "".join([
                _el("OID", vmid), _el("SEQ", seq), _el("HOSTNAME", h), _el("HID", seq), _el("CID", -1),
                _el("STIME", 1700000000 + seq), _el("ETIME", 0), _el("VMMMAD", "kvm"), _el("VNMMAD", "dummy"),
                _el("TMMAD", tm_system), _el("DS_LOCATION", "/var/lib/one/datastores"), _el("DS_ID", system_ds),
                _el("REASON", 0), _el("ACTION", 0)]))
    return ("<VM>%s<TEMPLATE>%s%s</TEMPLATE><USER_TEMPLATE/><HISTORY_RECORDS>%s</HISTORY_RECORDS>%s</VM>" % (
        "".join([_el("ID", vmid), _el("UID", 0), _el("GID", 0), _el("UNAME", "oneadmin"), _el("GNAME", "oneadmin"),
                 _el("NAME", name), _el("LAST_POLL", 0), _el("STATE", state), _el("LCM_STATE", lcm_state),
                 _el("PREV_STATE", state), _el("PREV_LCM_STATE", lcm_state), _el("RESCHED", 0),
                 _el("STIME", 1700000000), _el("ETIME", 0), _el("DEPLOY_ID", "one-%s" % vmid)]),
        "".join(disks) + ("<FEATURES>%s</FEATURES>" % "".join(_el(k, v) for k, v in features.items())
                          if features else "")
        + ("<TPM>%s</TPM>" % "".join(_el(k, v) for k, v in tpm.items()) if tpm else ""),
        _el("TM_MAD_SYSTEM", tm_system) if tuple(version) >= (5, 0) else "",
        "".join(history), backups_xml(backups) if backups is not None and tuple(version) >= (6, 6) else ""))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
