"""`install` / `uninstall`: put oneiscsi into an OpenNebula remotes tree and take it out again.

Layout after install (REMOTES = /var/lib/one/remotes by default):

    REMOTES/oneiscsi/oneiscsi.pyz      the executable (one copy)
    REMOTES/oneiscsi/oneiscsi          a ~300-byte sh launcher
    REMOTES/oneiscsi/manifest.json     what install created, replaced and backed up
    REMOTES/oneiscsi/backup/...        anything install replaced, restored by uninstall
    REMOTES/datastore/<drv>/<action> -> ../../oneiscsi/oneiscsi
    REMOTES/tm/<drv>/<action>        -> ../../oneiscsi/oneiscsi

The action links point at the launcher, not at the executable: `onehost sync`,
one_tm and install.sh copy remotes with symlinks dereferenced (`rsync -aL`), and
each link then becomes a copy of the small launcher instead of a copy of the
21 MB zipapp. The launcher passes its own invocation path in ONEISCSI_ARGV0 so
dispatch sees the action's path, never a resolved one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from oneiscsi.dispatch import DRIVERS, actions_of
from oneiscsi.errors import Failure, UsageError

HOME = "oneiscsi"
LAUNCHER = """#!/bin/sh
# oneiscsi launcher, written by `oneiscsi.pyz install`. OpenNebula runs it under the
# name of an action (a symlink such as datastore/iscsi/cp); that path selects the action.
ONEISCSI_ARGV0=$0
export ONEISCSI_ARGV0
exec ${ONEISCSI_PYTHON:-%(python)s} -c 'import sys; sys.argv[0] = sys.argv.pop(1); sys.path[0] = sys.argv[0]; import oneiscsi_boot' "${ONEISCSI_PYZ:-%(pyz)s}" "$@"
"""
MIGRATE_WRAPPED = ("premigrate", "postmigrate")
# OpenNebula 6.6+ sends backups and in-place restores to the system datastore's TM only
# (src/vmm_mad/exec/one_vmm_exec.rb `backup`; tm/<sys>/restore from 6.10): install puts
# oneiscsi over these scripts of the qcow2-family system TMs (drivers/backup.py).
BACKUP_WRAPPED = ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore")
BACKUP_SYSTEM_TMS = ("shared", "ssh", "qcow2", "local")
BACKUP_SINCE = (6, 6)
ORIG_SUFFIX = ".oneiscsi-orig"
ISCSI_DRIVERS = ("iscsi", "iscsi_libvirt")
# OpenNebula 4.x has no DISK_TYPE="ISCSI": Image::str_to_disk_type knows FILE, BLOCK,
# CDROM, RBD, SHEEPDOG, GLUSTER at release-4.14.2 and adds ISCSI at release-5.0
# (src/image/Image.cc). The legacy migrate wrappers are for 4.x only: 5.0+ calls the image
# driver's pre/postmigrate itself (migrate_other).
ISCSI_SINCE = (5, 0)


def _manifest_path(remotes):
    return os.path.join(remotes, HOME, "manifest.json")


def _load(remotes):
    try:
        with open(_manifest_path(remotes), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        m = {}
    for key, empty in (("links", []), ("backups", {}), ("wrappers", []), ("dirs", [])):
        m.setdefault(key, empty)
    return m


def _save(remotes, manifest):
    tmp = _manifest_path(remotes) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, _manifest_path(remotes))


def _is_ours(path, target):
    return os.path.islink(path) and os.readlink(path) == target


class _Undo:
    """What this run changed, undone in reverse order if it fails half-way."""

    def __init__(self):
        self.steps = []

    def add(self, fn, *args):
        self.steps.append((fn, args))

    def run(self):
        for fn, args in reversed(self.steps):
            try:
                fn(*args)
            except OSError:
                pass


def _makedirs(remotes, rel, manifest, undo):
    """Create REMOTES/rel and its missing parents, remembering each folder it made."""
    missing = []
    d = rel
    while d and not os.path.isdir(os.path.join(remotes, d)):
        missing.append(d)
        d = os.path.dirname(d)
    for d in reversed(missing):
        os.mkdir(os.path.join(remotes, d))
        undo.add(os.rmdir, os.path.join(remotes, d))
        if d not in manifest["dirs"]:
            manifest["dirs"].append(d)


def _place_link(remotes, rel, manifest, out, undo):
    """Make REMOTES/rel a link to the launcher; back up whatever was there."""
    path = os.path.join(remotes, rel)
    target = os.path.relpath(os.path.join(remotes, HOME, HOME), os.path.dirname(path))
    if _is_ours(path, target):
        return
    _makedirs(remotes, os.path.dirname(rel), manifest, undo)
    if os.path.lexists(path):
        backup = os.path.join(HOME, "backup", rel)
        if rel in manifest["backups"]:  # replaced again after an upgrade of OpenNebula: keep the first
            os.remove(path)
        else:
            _makedirs(remotes, os.path.dirname(backup), manifest, undo)
            os.replace(path, os.path.join(remotes, backup))
            undo.add(os.replace, os.path.join(remotes, backup), path)
            manifest["backups"][rel] = backup
            out.append("backed up %s" % rel)
    os.symlink(target, path)
    undo.add(os.remove, path)
    if rel not in manifest["links"]:
        manifest["links"].append(rel)


def _self_pyz():
    path = os.path.realpath(sys.argv[0])
    if not os.path.isfile(path) or not path.endswith(".pyz"):
        raise Failure("install must run from the built executable (python3 dist/oneiscsi.pyz install ...)")
    return path


def check(remotes, drivers, wrappers, backup_wrappers=()):
    """Everything install refuses, before it changes anything."""
    from oneiscsi.one.version import detect
    if not os.path.isdir(remotes):
        raise UsageError("install: --remotes %s is not a folder: give the OpenNebula remotes tree "
                         "(/var/lib/one/remotes)" % remotes)
    version = detect(remotes)
    shown = "%d.%d" % version[:2] if os.path.exists(os.path.join(remotes, "VERSION")) else "7.x (no VERSION file)"
    iscsi = [d for d in drivers if d in ISCSI_DRIVERS]
    if iscsi and version < ISCSI_SINCE:
        raise UsageError("install: the %s driver needs OpenNebula 5.0 or newer (4.x has no DISK_TYPE=ISCSI) and "
                         "%s/VERSION says %s: install --drivers eqliscsi" % (iscsi[0], remotes, shown))
    if wrappers and version >= ISCSI_SINCE:
        raise UsageError("install: --legacy-migrate-wrappers are for OpenNebula 4.x and %s/VERSION says %s "
                         "(5.0+ calls the drivers' premigrate itself): leave the option out" % (remotes, shown))
    if backup_wrappers and version < BACKUP_SINCE:
        raise UsageError("install: --backup-wrappers are for OpenNebula 6.6 or newer (earlier releases have no "
                         "backups) and %s/VERSION says %s: leave the option out" % (remotes, shown))
    manifest = _load(remotes)
    for sys_tm in wrappers:
        for action in MIGRATE_WRAPPED:
            rel = os.path.join("tm", sys_tm, action)
            if not os.path.lexists(os.path.join(remotes, rel)) and rel not in manifest["wrappers"]:
                raise UsageError("install: --legacy-migrate-wrappers %s: %s/%s does not exist; give system "
                                 "datastore TM drivers (shared, ssh, ...)" % (sys_tm, remotes, rel))
    for d in [remotes] + [os.path.join(remotes, x) for x in ("datastore", "tm", HOME)]:
        if os.path.isdir(d) and not os.access(d, os.W_OK | os.X_OK):
            raise Failure("install: cannot write into %s: run install as the owner of the remotes tree "
                          "(oneadmin)" % d)


def install(remotes, drivers, wrappers=(), python="python3", backup_wrappers=None):
    """backup_wrappers None: the qcow2-family system TMs on 6.6+, none before."""
    remotes = os.path.abspath(remotes)
    if backup_wrappers is None:
        from oneiscsi.one.version import detect
        backup_wrappers = BACKUP_SYSTEM_TMS if detect(remotes) >= BACKUP_SINCE else ()
    check(remotes, drivers, wrappers, backup_wrappers)
    src = _self_pyz()
    out, undo = [], _Undo()
    manifest = _load(remotes)
    try:
        _install(remotes, drivers, wrappers, python, src, manifest, out, undo, backup_wrappers)
    except BaseException as e:
        undo.run()  # the manifest is written last: an undone run leaves the previous one
        if isinstance(e, OSError):
            raise Failure("install: %s%s (%s); nothing was changed" % (
                "cannot write " if e.errno in (13, 30, 1) else "failed on ", e.filename or remotes,
                e.strerror or e)) from None
        raise
    return out


def _install(remotes, drivers, wrappers, python, src, manifest, out, undo, backup_wrappers=()):
    home = os.path.join(remotes, HOME)
    _makedirs(remotes, HOME, manifest, undo)
    pyz = os.path.join(home, "oneiscsi.pyz")
    for name, write in (("oneiscsi.pyz", lambda tmp: shutil.copyfile(src, tmp)),
                        (HOME, lambda tmp: open(tmp, "w", encoding="utf-8").write(
                            LAUNCHER % {"python": python, "pyz": pyz}))):
        path = os.path.join(home, name)
        if name == "oneiscsi.pyz" and os.path.realpath(src) == os.path.realpath(path):
            continue
        undo.add(lambda p: os.path.exists(p) and os.remove(p), path + ".tmp")
        write(path + ".tmp")
        os.chmod(path + ".tmp", 0o755)
        if os.path.exists(path):
            os.replace(path, path + ".old")
            undo.add(os.replace, path + ".old", path)
        os.replace(path + ".tmp", path)
        undo.add(os.remove, path)

    for drv in drivers:
        for kind, kind_dir in (("ds", "datastore"), ("tm", "tm")):
            try:
                table = actions_of(kind, drv)
            except Failure as e:  # a build without that half of the driver
                out.append("skipped %s/%s: %s" % (kind_dir, drv, e))
                continue
            for action in sorted(table):
                _place_link(remotes, os.path.join(kind_dir, drv, action), manifest, out, undo)
            out.append("installed %s/%s" % (kind_dir, drv))

    launcher = os.path.join(home, HOME)
    for sys_tm in wrappers:
        for action in MIGRATE_WRAPPED:
            _wrap(remotes, os.path.join("tm", sys_tm, action), launcher, manifest, out, undo)
    for sys_tm in backup_wrappers:
        for action in BACKUP_WRAPPED:
            rel = _backup_script(remotes, os.path.join("tm", sys_tm, action), launcher)
            if rel:
                _wrap(remotes, rel, launcher, manifest, out, undo)
    _save(remotes, manifest)
    for name in ("oneiscsi.pyz", HOME):  # committed: the previous copies go
        old = os.path.join(home, name + ".old")
        if os.path.exists(old):
            os.remove(old)


def _wrap(remotes, rel, launcher, manifest, out, undo):
    """Put the launcher at REMOTES/rel, the script that was there kept beside it as
    `<name>.oneiscsi-orig` (a relative symlink keeps working: same directory). An upgrade of
    OpenNebula that wrote a new original there: the new one is kept."""
    path = os.path.join(remotes, rel)
    target = os.path.relpath(launcher, os.path.dirname(path))
    if _is_ours(path, target):
        return
    had = os.path.lexists(path + ORIG_SUFFIX)
    if had:
        os.replace(path + ORIG_SUFFIX, path + ORIG_SUFFIX + ".old")
        undo.add(os.replace, path + ORIG_SUFFIX + ".old", path + ORIG_SUFFIX)
    os.replace(path, path + ORIG_SUFFIX)
    undo.add(os.replace, path + ORIG_SUFFIX, path)
    os.symlink(target, path)
    undo.add(os.remove, path)
    if had:
        os.remove(path + ORIG_SUFFIX + ".old")
    if rel not in manifest["wrappers"]:
        manifest["wrappers"].append(rel)
    out.append("wrapped %s (original kept as %s%s)" % (rel, os.path.basename(rel), ORIG_SUFFIX))


def _backup_script(remotes, rel, launcher):
    """The file REMOTES/rel ends at, relative to REMOTES, when it is a system TM script of this
    tree (tm/ssh/prebackup is a link to ../qcow2/prebackup upstream: the file is wrapped once and
    the link reaches the wrapper); None when absent, or already ours."""
    path = os.path.join(remotes, rel)
    if not os.path.lexists(path):
        return None
    p = path
    for _ in range(10):  # follow links inside the tree up to the file or our launcher link
        if not os.path.islink(p):
            break
        nxt = os.path.normpath(os.path.join(os.path.dirname(p), os.readlink(p)))
        if os.path.realpath(nxt) == os.path.realpath(launcher):
            return None if p == path or os.path.lexists(p + ORIG_SUFFIX) else os.path.relpath(p, remotes)
        p = nxt
    real = os.path.relpath(p, remotes)
    if real.startswith(".." + os.sep) or not real.startswith("tm" + os.sep) or not os.path.isfile(p):
        return None
    return real


def uninstall(remotes):
    remotes = os.path.abspath(remotes)
    if not os.path.isdir(remotes):
        raise UsageError("uninstall: --remotes %s is not a folder: give the OpenNebula remotes tree "
                         "install used" % remotes)
    if not os.path.exists(_manifest_path(remotes)):
        return ["nothing to uninstall: %s has no %s (not installed there, or already uninstalled)"
                % (remotes, os.path.join(HOME, "manifest.json"))]
    manifest = _load(remotes)
    launcher = os.path.join(remotes, HOME, HOME)
    out = []
    for rel in manifest["wrappers"]:
        path = os.path.join(remotes, rel)
        if os.path.lexists(path + ORIG_SUFFIX):
            if os.path.islink(path):
                os.remove(path)
            os.replace(path + ORIG_SUFFIX, path)
            out.append("restored %s" % rel)
    for rel in manifest["links"]:
        path = os.path.join(remotes, rel)
        if _is_ours(path, os.path.relpath(launcher, os.path.dirname(path))):
            os.remove(path)
        backup = manifest["backups"].get(rel)
        if backup and os.path.lexists(os.path.join(remotes, backup)) and not os.path.lexists(path):
            os.replace(os.path.join(remotes, backup), path)
            out.append("restored %s" % rel)
    if os.path.isdir(os.path.join(remotes, HOME)):
        shutil.rmtree(os.path.join(remotes, HOME))
        out.append("removed %s" % os.path.join(remotes, HOME))
    # the folders install made, deepest first, where nothing else was put since
    for rel in sorted(manifest["dirs"], key=lambda d: d.count(os.sep), reverse=True):
        d = os.path.join(remotes, rel)
        if os.path.isdir(d) and not os.path.islink(d) and not os.listdir(d):
            os.rmdir(d)
    return out


def oned_conf(drivers) -> str:
    names = ",".join(drivers)
    lines = [
        "# 1. Append the driver names to the -d lists of TM_MAD and DATASTORE_MAD in oned.conf:",
        "#      TM_MAD        ARGUMENTS = \"-t 15 -d <existing>,%s\"" % names,
        "#      DATASTORE_MAD ARGUMENTS = \"-t 15 -d <existing>,%s -s <existing system TMs>\"" % names,
        "# 2. Add these sections (OpenNebula 5.0+), then restart oned:",
    ]
    for drv in drivers:
        if drv in ("iscsi", "iscsi_libvirt"):
            lines += [
                'TM_MAD_CONF = [ NAME = "%s", LN_TARGET = "NONE", CLONE_TARGET = "SELF", SHARED = "YES",' % drv,
                '  DRIVER = "raw", DS_MIGRATE = "NO", DS_LIVE_MIGRATE = "NO", DS_MIGRATE_SNAP = "NO" ]',
                'DS_MAD_CONF = [ NAME = "%s", REQUIRED_ATTRS = "DISK_TYPE,ISCSI_HOST", PERSISTENT_ONLY = "YES" ]' % drv,
            ]
        elif drv == "eqliscsi":
            lines += [
                'TM_MAD_CONF = [ NAME = "eqliscsi", LN_TARGET = "NONE", CLONE_TARGET = "SELF", SHARED = "YES",',
                '  DRIVER = "raw", DS_MIGRATE = "NO" ]',
                'DS_MAD_CONF = [ NAME = "eqliscsi", REQUIRED_ATTRS = "DISK_TYPE", PERSISTENT_ONLY = "NO" ]',
                "# and, for live disk snapshots, at the end of /etc/one/vmm_exec/vmm_execrc (sourced by the VMM "
                "driver, src/mad/sh/madcommon.sh), then restart oned:",
                'LIVE_DISK_SNAPSHOTS="$LIVE_DISK_SNAPSHOTS kvm-eqliscsi qemu-eqliscsi"',
            ]
    if any(d in ("iscsi", "iscsi_libvirt") for d in drivers):
        lines += [
            "# 3. So that VMs get the iSCSI attributes (keep the existing entries; these are upstream's):",
            'INHERIT_DATASTORE_ATTR = "ISCSI_HOST"',
            'INHERIT_DATASTORE_ATTR = "ISCSI_USER"',
            'INHERIT_DATASTORE_ATTR = "ISCSI_USAGE"',
            'INHERIT_IMAGE_ATTR = "ISCSI_HOST"',
            'INHERIT_IMAGE_ATTR = "ISCSI_USER"',
            'INHERIT_IMAGE_ATTR = "ISCSI_USAGE"',
            'INHERIT_IMAGE_ATTR = "ISCSI_IQN"',
        ]
    lines += ["# OpenNebula 4.x has no DS_MAD_CONF; its TM entry is lower case:",
              '#   TM_MAD_CONF = [ name = "<driver>", ln_target = "NONE", clone_target = "SELF", shared = "yes" ]']
    return "\n".join(lines)


def _parser(name):
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz " + name)
    ap.add_argument("--remotes", default="/var/lib/one/remotes", help="the OpenNebula remotes tree")
    return ap


def install_main(argv) -> int:
    ap = _parser("install")
    ap.add_argument("--drivers", default=None,
                    help="comma-separated drivers to install (default: iscsi,iscsi_libvirt,eqliscsi; "
                         "eqliscsi alone on OpenNebula 4.x)")
    ap.add_argument("--legacy-migrate-wrappers", nargs="?", const="shared,ssh", default="",
                    metavar="SYSTEM_TMS",
                    help="OpenNebula 4.x only: wrap tm/<system>/premigrate and postmigrate (default shared,ssh)")
    ap.add_argument("--backup-wrappers", default=None, metavar="SYSTEM_TMS",
                    help="OpenNebula 6.6+: system TMs whose prebackup/postbackup[_live] and restore oneiscsi wraps "
                         "(default %s where present; 'none' for none)" % ",".join(BACKUP_SYSTEM_TMS))
    ap.add_argument("--python", default="python3", help="interpreter the launcher runs (default python3)")
    a = ap.parse_args(argv)
    if a.drivers is not None:
        drivers = [d.strip() for d in a.drivers.split(",") if d.strip()]
    else:
        from oneiscsi.one.version import detect
        drivers = list(DRIVERS) if detect(os.path.abspath(a.remotes)) >= ISCSI_SINCE else ["eqliscsi"]
    if not drivers:
        raise UsageError("install: --drivers %r names no driver: give some of %s" % (a.drivers, ",".join(DRIVERS)))
    unknown = [d for d in drivers if d not in DRIVERS]
    if unknown:
        raise UsageError("install: unknown driver %r in --drivers; known: %s" % (unknown[0], ",".join(DRIVERS)))
    wrappers = [w.strip() for w in a.legacy_migrate_wrappers.split(",") if w.strip()]
    if a.legacy_migrate_wrappers and not wrappers:
        raise UsageError("install: --legacy-migrate-wrappers %r names no system TM driver: give shared,ssh "
                         "or leave the value out" % a.legacy_migrate_wrappers)
    for w in wrappers:
        if not w.replace("_", "").replace("-", "").isalnum():
            raise UsageError("install: --legacy-migrate-wrappers %r is not a TM driver name" % w)
    backup_wrappers = None
    if a.backup_wrappers is not None:
        backup_wrappers = [] if a.backup_wrappers.strip().lower() == "none" else [
            w.strip() for w in a.backup_wrappers.split(",") if w.strip()]
        for w in backup_wrappers:
            if not w.replace("_", "").replace("-", "").isalnum():
                raise UsageError("install: --backup-wrappers %r is not a TM driver name" % w)
    for line in install(a.remotes, drivers, wrappers, a.python, backup_wrappers):
        print(line)
    print(oned_conf(drivers))
    return 0


def uninstall_main(argv) -> int:
    a = _parser("uninstall").parse_args(argv)
    for line in uninstall(a.remotes):
        print(line)
    return 0
