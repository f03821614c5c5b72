"""The legacy multi-disk migration wrapper (OpenNebula 4.x, `install --legacy-migrate-wrappers`).

Installed over `tm/<system_tm>/premigrate|postmigrate|failmigrate`: runs
oneiscsi's step for every DISK whose TM_MAD is one of our drivers (iterating
DISK elements, never parallel arrays), then chains to the original script that
install saved as `<action>.oneiscsi-orig`, with the same arguments and stdin.
A premigrate failure stops the migration: every driver's premigrate that already ran is
undone (its failmigrate step, in reverse order) and the original does not run; when the
original premigrate itself fails, all of ours are undone the same way. Post- and failmigrate
steps are best effort (the VM already runs where it runs).
"""
from __future__ import annotations

import os
import subprocess

from oneiscsi import log
from oneiscsi.dispatch import DRIVERS, run_call
from oneiscsi.errors import Failure

ORIG_SUFFIX = ".oneiscsi-orig"


def run(call, system_tm: str) -> int:
    m = call.migrate()
    call.sys_tm = call.sys_tm or system_tm
    done = []
    for drv in sorted({d.tm_mad for d in m.disks_of(DRIVERS)}):
        call.driver = drv
        try:
            run_call(call)
            done.append(drv)
        except Failure as e:
            if call.action == "premigrate":
                _undo(call, done)
                raise
            log.warn("%s of %s disks failed (continuing): %s" % (call.action, drv, e))
    orig = os.path.abspath(call.argv0) + ORIG_SUFFIX
    if not os.path.exists(orig):
        log.debug("no saved original %s; nothing to chain to" % orig)
        return 0
    res = subprocess.run([orig] + call.args, input=call.stdin_text(), text=True)
    if res.returncode != 0 and call.action == "premigrate":
        log.error("the original %s failed (exit %d): undoing oneiscsi's steps" % (orig, res.returncode))
        _undo(call, done)
    return res.returncode


def _undo(call, drivers) -> None:
    """failmigrate of each driver whose premigrate ran, newest first; never raises."""
    action = call.action
    call.action = "failmigrate"
    try:
        for drv in reversed(drivers):
            call.driver = drv
            try:
                run_call(call)
            except Exception as e:  # keep undoing the others
                log.error("undo (failmigrate) of %s disks failed: %s" % (drv, e))
    finally:
        call.action = action
