"""The legacy multi-disk migration wrapper (OpenNebula 4.x, `install --legacy-migrate-wrappers`).

Installed over `tm/<system_tm>/premigrate|postmigrate|failmigrate`: runs
oneiscsi's step for every DISK whose TM_MAD is one of our drivers (iterating
DISK elements, never parallel arrays), then chains to the original script that
install saved as `<action>.oneiscsi-orig`, with the same arguments and stdin.
A premigrate failure stops the migration before the original runs; post- and
failmigrate steps are best effort (the VM already runs where it runs).
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
    for drv in sorted({d.tm_mad for d in m.disks_of(DRIVERS)}):
        call.driver = drv
        try:
            run_call(call)
        except Failure as e:
            if call.action == "premigrate":
                raise
            log.warn("%s of %s disks failed (continuing): %s" % (call.action, drv, e))
    orig = os.path.abspath(call.argv0) + ORIG_SUFFIX
    if not os.path.exists(orig):
        log.debug("no saved original %s; nothing to chain to" % orig)
        return 0
    res = subprocess.run([orig] + call.args, input=call.stdin_text(), text=True)
    return res.returncode
