#!/usr/bin/env python3
"""premigrate of a VM with 1, 8 and 32 eqliscsi disks: wall time, SAN sessions, ssh round trips.

    python3 bench/premigrate.py [--runs 3]          (root: lab hosts in network namespaces)

Real parts (tests/test_eqliscsi_tm.World): two sshd hosts with the iscsiadm stand-in, the
EqualLogic simulator on tgtd, a fake oned. The volumes are made directly in the simulator;
the VM's disks are first attached on host1, then `premigrate host1 host2` (migrate_other
shape, template on stdin) is timed, then undone with failmigrate.
Target: 32 disks under 3x the time of 1 (ratios from the same run).
Note: the driver's part is flat (1 SAN session, 1 ssh round trip whatever the disk count;
the disks are attached in parallel on the host). What grows is the host's CPU work: the
stand-in iscsiadm is a Python program started 3 times per new disk (node probe, record,
login; the session list is read once per batch), CPU that 2 cores cannot hide; open-iscsi's
C iscsiadm costs a few ms.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from oneiscsi.sim import onexml  # noqa: E402
from tests import oneutil  # noqa: E402
from tests.test_eqliscsi_tm import World  # noqa: E402


def run(w, n, runs, vmid):
    vols = ["bench%d-%d.%d" % (n, i, 9000 + i) for i in range(n)]
    imgs = [w.image_on_group(9000 + i, v) for i, v in enumerate(vols)]
    b64 = onexml.b64(w.vm(vmid, list(enumerate(imgs)), hosts=("host2", "host1"), lcm_state=4))
    w.tm("premigrate", *["host2", "host1", "/var/lib/one/datastores/0/%d" % vmid, vmid, 0, "ssh"], stdin=b64)
    b64 = onexml.b64(w.vm(vmid, list(enumerate(imgs)), hosts=("host1", "host2"), lcm_state=4))
    here = ["host2", "host1", "/var/lib/one/datastores/0/%d" % vmid, vmid, 0, "ssh"]
    move = ["host1", "host2", "/var/lib/one/datastores/0/%d" % vmid, vmid, 0, "ssh"]
    times, sessions, ssh = [], [], []
    for _ in range(runs):
        w.reset_ssh()
        s0 = w.sim.sessions_total
        t0 = time.monotonic()
        w.tm("premigrate", *move, stdin=b64)
        times.append(time.monotonic() - t0)
        sessions.append(w.sim.sessions_total - s0)
        ssh.append(len(w.ssh_calls()))
        assert sum(1 for v in w.logged_in("host2") if v in vols) == n
        w.tm("failmigrate", *move, stdin=b64)
    w.tm("failmigrate", *here, stdin=b64)                # off host1 again
    w.cloud.done(vmid)
    return statistics.median(times), max(sessions), max(ssh)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench/premigrate.py: run as root (network namespaces)")
    oneutil.build_if_stale()
    with tempfile.TemporaryDirectory(prefix="bench-premigrate-") as tmp:
        w = World(Path(tmp) / "w", conf={"EQL_MULTIHOST": "disable"})
        try:
            w.remotes = Path(tmp) / "remotes"
            oneutil.install(w.remotes, "6.8")
            rows = {n: run(w, n, a.runs, 7000 + n) for n in (1, 8, 32)}
            print("premigrate, median of %d runs" % a.runs)
            print("%6s %9s %13s %15s" % ("disks", "wall s", "SAN sessions", "ssh round trips"))
            for n, (t, s, r) in rows.items():
                print("%6d %9.2f %13d %15d" % (n, t, s, r))
            ratio = rows[32][0] / rows[1][0]
            print("32 disks / 1 disk = %.2fx (target < 3x): %s" % (ratio, "OK" if ratio < 3 else "over"))
        finally:
            w.stop()


if __name__ == "__main__":
    main()
