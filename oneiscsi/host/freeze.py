"""Quiescing a running VM's guest around a SAN snapshot: one ssh round trip to freeze,
one to thaw, and a host-side guard that thaws by itself if the thaw never comes.

Modes are OpenNebula's BACKUP_CONFIG/FS_FREEZE values (src/tm_mad/lib/backup_kvm.rb
`fsfreeze`/`fsthaw` at release-7.4.0): NONE (nothing), AGENT (`virsh domfsfreeze` /
`domfsthaw`, needs the QEMU guest agent), SUSPEND (`virsh suspend` / `resume`). Ceph's
snap_create_live freezes with the agent and thaws from a shell trap (src/tm_mad/ceph/
snap_create_live, release-7.4.0); here the SAN step runs on the frontend, so the thaw is
a second round trip in a `finally`, and the freeze script leaves a watchdog on the host
that thaws after LIMIT seconds should the frontend die between the two (a frozen guest
must never outlive the action that froze it).
"""
from __future__ import annotations

import contextlib
import re

from oneiscsi import host as hostrun
from oneiscsi import log
from oneiscsi.errors import Failure, Invalid

MODES = ("NONE", "AGENT", "SUSPEND")
LIMIT = 120  # seconds a guest may stay frozen/suspended before the host-side watchdog undoes it
VIRSH = "virsh -q -c qemu:///system"
_DOMAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # oned's deploy ids: one-<vmid>, or a UUID
_VERBS = {"AGENT": ("domfsfreeze", "domfsthaw"), "SUSPEND": ("suspend", "resume")}


def mode_of(value) -> str:
    mode = (value or "NONE").strip().upper() or "NONE"
    if mode not in MODES:
        raise Invalid("FS_FREEZE %r is refused: use NONE, AGENT or SUSPEND" % value)
    return mode


def _domain(deploy_id: str) -> str:
    if not _DOMAIN.match(deploy_id or ""):
        raise Invalid("deploy id %r is refused: not a libvirt domain name" % deploy_id)
    return deploy_id


def freeze_script(deploy_id: str, mode: str, limit: int = LIMIT) -> str:
    on, off = _VERBS[mode]
    dom = hostrun.q(_domain(deploy_id))
    return "\n".join([
        "umask 077; d=/run/lock/oneiscsi-$(id -u); mkdir -p \"$d\"",
        # one guard file per freeze: a later freeze of the same VM has its own
        "g=$(mktemp \"$d/thaw.XXXXXXXX\") || exit 3",
        "out=$(%s %s %s 2>&1) || { rm -f \"$g\"; echo \"$out\" >&2; exit 3; }" % (VIRSH, on, dom),
        # the watchdog: thaws after `limit` s unless the guard file is gone (the thaw removed it)
        "echo \"GUARD=$g\"",
        "( sleep %d; [ -e \"$g\" ] && rm -f \"$g\" && %s %s %s >/dev/null 2>&1 ) </dev/null >/dev/null 2>&1 &"
        % (int(limit), VIRSH, off, dom),
        "exit 0", ""])


def thaw_script(deploy_id: str, mode: str, guard: str = "") -> str:
    _, off = _VERBS[mode]
    dom = hostrun.q(_domain(deploy_id))
    return "\n".join([
        "rm -f %s" % hostrun.q(guard) if guard else ":",
        "out=$(%s %s %s 2>&1) || { echo \"$out\" >&2; exit 3; }" % (VIRSH, off, dom),
        "exit 0", ""])


@contextlib.contextmanager
def frozen(host: str, deploy_id: str, mode: str, limit: int = LIMIT):
    """Freeze (or suspend) the guest for the body; thaw on every path. NONE does nothing."""
    mode = mode_of(mode)
    if mode == "NONE":
        yield
        return
    verb_on, verb_off = _VERBS[mode]
    try:
        res = hostrun.run(host, freeze_script(deploy_id, mode, limit), timeout=limit, what="virsh " + verb_on)
    except Failure:
        # a freeze that hangs (a guest agent that stopped answering) may still freeze later: thaw
        hostrun.run(host, thaw_script(deploy_id, mode), timeout=60, what="virsh " + verb_off)
        raise
    if res.returncode != 0:
        if verb_on == "domfsfreeze":  # a failed freeze may have frozen some filesystems: thaw
            hostrun.run(host, thaw_script(deploy_id, mode), timeout=60, what="virsh " + verb_off)
        raise Failure("cannot %s VM %s on %s (FS_FREEZE=%s): %s" % (
            verb_on, deploy_id, host, mode, hostrun.last_line(res.stderr) or "exit %d" % res.returncode))
    m = re.search(r"^GUARD=(/run/lock/oneiscsi-[0-9]+/thaw\.[A-Za-z0-9]+)$", res.stdout, re.M)
    guard = m.group(1) if m else ""
    log.info("%s %s on %s" % (verb_on, deploy_id, host))
    try:
        yield
    finally:
        res = hostrun.run(host, thaw_script(deploy_id, mode, guard), timeout=60, what="virsh " + verb_off)
        if res.returncode != 0:
            # the host-side watchdog thaws within `limit` s; say so, do not hide the first error
            log.error("%s of %s on %s failed (%s); the host thaws it within %d s"
                      % (verb_off, deploy_id, host, hostrun.last_line(res.stderr) or res.returncode, limit))
        else:
            log.info("%s %s on %s" % (verb_off, deploy_id, host))
