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
12 MB zipapp. The launcher passes its own invocation path in ONEISCSI_ARGV0 so
dispatch sees the action's path, never a resolved one.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

from oneiscsi.dispatch import DRIVERS, actions_of
from oneiscsi.errors import Failure

HOME = "oneiscsi"
LAUNCHER = """#!/bin/sh
# oneiscsi launcher, written by `oneiscsi.pyz install`. OpenNebula runs it under the
# name of an action (a symlink such as datastore/iscsi/cp); that path selects the action.
ONEISCSI_ARGV0=$0
export ONEISCSI_ARGV0
exec ${ONEISCSI_PYTHON:-%(python)s} "${ONEISCSI_PYZ:-%(pyz)s}" "$@"
"""
MIGRATE_WRAPPED = ("premigrate", "postmigrate")
ORIG_SUFFIX = ".oneiscsi-orig"


def _manifest_path(remotes):
    return os.path.join(remotes, HOME, "manifest.json")


def _load(remotes):
    try:
        with open(_manifest_path(remotes), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return {"links": [], "backups": {}, "wrappers": []}


def _save(remotes, manifest):
    tmp = _manifest_path(remotes) + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, _manifest_path(remotes))


def _is_ours(path, target):
    return os.path.islink(path) and os.readlink(path) == target


def _place_link(remotes, rel, manifest, out):
    """Make REMOTES/rel a link to the launcher; back up whatever was there."""
    path = os.path.join(remotes, rel)
    target = os.path.relpath(os.path.join(remotes, HOME, HOME), os.path.dirname(path))
    if _is_ours(path, target):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.lexists(path):
        backup = os.path.join(remotes, HOME, "backup", rel)
        if rel in manifest["backups"]:  # replaced again after an upgrade of OpenNebula: keep the first
            os.remove(path)
        else:
            os.makedirs(os.path.dirname(backup), exist_ok=True)
            os.replace(path, backup)
            manifest["backups"][rel] = os.path.relpath(backup, remotes)
            out.append("backed up %s" % rel)
    os.symlink(target, path)
    if rel not in manifest["links"]:
        manifest["links"].append(rel)


def _self_pyz():
    path = os.path.realpath(sys.argv[0])
    if not os.path.isfile(path) or not path.endswith(".pyz"):
        raise Failure("install must run from the built executable (python3 dist/oneiscsi.pyz install ...)")
    return path


def install(remotes, drivers, wrappers=(), python="python3"):
    out = []
    remotes = os.path.abspath(remotes)
    if not os.path.isdir(remotes):
        raise Failure("%s is not a directory (give the OpenNebula remotes tree with --remotes)" % remotes)
    home = os.path.join(remotes, HOME)
    os.makedirs(home, exist_ok=True)
    manifest = _load(remotes)
    for sys_tm in wrappers:  # check before changing anything
        for action in MIGRATE_WRAPPED:
            rel = os.path.join("tm", sys_tm, action)
            if not os.path.lexists(os.path.join(remotes, rel)) and rel not in manifest["wrappers"]:
                raise Failure("%s does not exist: is %s a system datastore TM driver?" % (rel, sys_tm))
    src = _self_pyz()
    pyz = os.path.join(home, "oneiscsi.pyz")
    if os.path.realpath(src) != os.path.realpath(pyz):
        tmp = pyz + ".tmp"
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, pyz)
    launcher = os.path.join(home, HOME)
    with open(launcher + ".tmp", "w", encoding="utf-8") as f:
        f.write(LAUNCHER % {"python": python, "pyz": pyz})
    os.chmod(launcher + ".tmp", 0o755)
    os.replace(launcher + ".tmp", launcher)

    for drv in drivers:
        for kind, kind_dir in (("ds", "datastore"), ("tm", "tm")):
            try:
                table = actions_of(kind, drv)
            except Failure as e:  # a build without that half of the driver
                out.append("skipped %s/%s: %s" % (kind_dir, drv, e))
                continue
            for action in sorted(table):
                _place_link(remotes, os.path.join(kind_dir, drv, action), manifest, out)
            out.append("installed %s/%s" % (kind_dir, drv))

    for sys_tm in wrappers:
        for action in MIGRATE_WRAPPED:
            rel = os.path.join("tm", sys_tm, action)
            path = os.path.join(remotes, rel)
            target = os.path.relpath(launcher, os.path.dirname(path))
            if _is_ours(path, target):
                continue
            os.replace(path, path + ORIG_SUFFIX)  # a relative symlink keeps working: same directory
            os.symlink(target, path)
            if rel not in manifest["wrappers"]:
                manifest["wrappers"].append(rel)
            out.append("wrapped %s (original kept as %s%s)" % (rel, action, ORIG_SUFFIX))
    _save(remotes, manifest)
    return out


def uninstall(remotes):
    remotes = os.path.abspath(remotes)
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
    for kind_dir in ("datastore", "tm"):
        for drv in DRIVERS:
            d = os.path.join(remotes, kind_dir, drv)
            if os.path.isdir(d) and not os.listdir(d):
                os.rmdir(d)
    if os.path.isdir(os.path.join(remotes, HOME)):
        shutil.rmtree(os.path.join(remotes, HOME))
        out.append("removed %s" % os.path.join(remotes, HOME))
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
    ap.add_argument("--drivers", default="iscsi,iscsi_libvirt,eqliscsi",
                    help="comma-separated drivers to install (default: all)")
    ap.add_argument("--legacy-migrate-wrappers", nargs="?", const="shared,ssh", default="",
                    metavar="SYSTEM_TMS",
                    help="OpenNebula 4.x: wrap tm/<system>/premigrate and postmigrate (default shared,ssh)")
    ap.add_argument("--python", default="python3", help="interpreter the launcher runs (default python3)")
    a = ap.parse_args(argv)
    drivers = [d for d in a.drivers.split(",") if d]
    unknown = [d for d in drivers if d not in DRIVERS]
    if unknown:
        raise Failure("unknown driver(s) %s; known: %s" % (", ".join(unknown), ", ".join(DRIVERS)))
    wrappers = [w for w in a.legacy_migrate_wrappers.split(",") if w]
    for line in install(a.remotes, drivers, wrappers, a.python):
        print(line)
    print(oned_conf(drivers))
    return 0


def uninstall_main(argv) -> int:
    a = _parser("uninstall").parse_args(argv)
    for line in uninstall(a.remotes):
        print(line)
    return 0
