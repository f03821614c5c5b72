#!/usr/bin/env python3
"""Backups of an eqliscsi disk against plain `qemu-img convert` of the same data, same run.

    python3 bench/backup.py [--mib 256] [--inc-mib 1024] [--changed 5] [--runs 3]   (root)

Real parts (tests/test_eqliscsi_tm.World): sshd hosts, the EqualLogic simulator on tgtd, a
fake oned; the system TM scripts are tests/test_backup.py's stand-ins with oneiscsi's wrapper
installed over them (7.4 tree). The VM's disk is a volume of random data.
1. Full backup of a --mib disk: the whole `prebackup_live` (group snapshot, online, read
   through libiscsi into qcow2 on the host, offline, delete) against the baseline: plain
   `qemu-img convert -m 4 -O qcow2` of the same volume through libiscsi on the same host.
   Target: baseline / full backup >= 0.9.
2. Increment of a --inc-mib disk with --changed % of it rewritten (scattered 64 KiB blocks)
   after a full backup: time and bytes of the increment against the full backup of that disk.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from tests.test_backup import Env, local  # noqa: E402
from tests.test_eqliscsi_tm import World  # noqa: E402

MiB = 1024 * 1024


def fill(path, mib, seed):
    rnd = random.Random(seed)
    with open(path, "r+b") as f:
        for _ in range(mib):
            f.write(rnd.randbytes(MiB) if hasattr(rnd, "randbytes") else os.urandom(MiB))


def vm_with(w, env, vmid, mib):
    from oneiscsi.sim.onemodel import Img
    name = "bkbench-%d" % vmid
    v = w.sim.group.create_volume(name, "%dMB" % mib, unrestricted=True, description="OpenNebula image %d" % vmid)
    fill(v.backing, mib, vmid)
    img = env.cloud.image(Img(vmid, name, name, persistent=True, ds_id=110))
    env.cloud.vm(vmid, [(0, img)], hosts=("host1",))
    w.deploy(vmid, "host1")
    return v


def prebackup(env, vmid, mode="FULL", last=-1):
    """-> (seconds of the whole action, seconds of its data read on the host)"""
    env.cloud.backup(vmid, live=True, mode=mode, last_increment=last)
    log = Path(env.w.env["ONEISCSI_LOG"])
    at = log.stat().st_size if log.exists() else 0
    t = time.perf_counter()
    env.call("prebackup_live", vmid, [0])
    took = time.perf_counter() - t
    with open(log) as f:
        f.seek(at)
        ms = [ln.rsplit(" read in ", 1)[1].split()[0] for ln in f if " read in " in ln]
    return took, int(ms[-1]) / 1000.0


def size_of(w, vmid, bid):
    out = w.hosts["host1"].run(["stat", "-c", "%s", "/var/lib/one/datastores/0/%d/backup/disk.0.%d" % (vmid, bid)])
    return int(out.stdout)


def plain(w, v):
    portal = "%s:3260" % w.lab.san.addr
    h = w.hosts["host1"]
    t = time.perf_counter()
    h.run(["qemu-img", "convert", "-m", "4", "-O", "qcow2", "iscsi://%s/%s/1" % (portal, v.iqn),
           "/var/lib/one/datastores/plain.qcow2"], user="oneadmin")
    took = time.perf_counter() - t
    h.run(["rm", "-f", "/var/lib/one/datastores/plain.qcow2"])
    return took


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--inc-mib", type=int, default=1024)
    ap.add_argument("--changed", type=float, default=5.0)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-backup-", dir="/var/tmp"))
    os.chmod(work, 0o755)
    w = World(work / "w", conf={"EQL_MULTIHOST": "disable"})
    try:
        env = Env(w, work, "7.4")
        v = vm_with(w, env, 900, a.mib)
        full, read, base = [], [], []
        for i in range(a.runs + 1):  # round 0 warms caches, not counted; the order alternates
            pair = [("full", lambda: (prebackup(env, 900), env.call("postbackup_live", 900, [0]))[0]),
                    ("plain", lambda: plain(w, v))]
            got = dict((n, fn()) for n, fn in (pair if i % 2 else pair[::-1]))
            if i:
                full.append(got["full"][0])
                read.append(got["full"][1])
                base.append(got["plain"])
        print("full backup of a %d MiB random disk, median of %d runs:" % (a.mib, a.runs))
        print("  plain qemu-img convert -m 4 -O qcow2 (libiscsi, same host)  %6.2f s  %6.1f MiB/s"
              % (statistics.median(base), a.mib / statistics.median(base)))
        print("  eqliscsi prebackup_live, its read of the snapshot           %6.2f s  %6.1f MiB/s"
              % (statistics.median(read), a.mib / statistics.median(read)))
        print("  eqliscsi prebackup_live, whole action                       %6.2f s  %6.1f MiB/s"
              % (statistics.median(full), a.mib / statistics.median(full)))
        # the simulator makes a snapshot by copying the volume's file (a group redirects writes
        # instead, in milliseconds): that copy is part of the action's time here, not of a group's
        copies = []
        for _ in range(3):
            t = time.perf_counter()
            snap = w.sim.group.create_snapshot(v.name, "bench")
            copies.append(time.perf_counter() - t)
            w.sim.group.delete_snapshot(v.name, snap.name)
        copy = statistics.median(copies)
        print("  of the whole action, the simulator's snapshot (a copy of the volume's file)  %6.2f s" % copy)
        print("  ratio plain / backup read: %.2f (target >= 0.9); plain / whole action: %.2f (%.2f without the "
              "simulator's copy); fixed cost %.0f ms"
              % (statistics.median(base) / statistics.median(read), statistics.median(base) / statistics.median(full),
                 statistics.median(base) / (statistics.median(full) - copy),
                 (statistics.median(full) - statistics.median(read)) * 1e3))

        vi = vm_with(w, env, 901, a.inc_mib)
        tf = prebackup(env, 901, "INCREMENT", -1)[0]
        sf = size_of(w, 901, 0)
        env.call("postbackup_live", 901, [0])
        blocks = int(a.inc_mib * MiB / 65536 * a.changed / 100)
        rnd = random.Random(7)
        with open(vi.backing, "r+b") as f:
            for off in rnd.sample(range(a.inc_mib * MiB // 65536), blocks):
                f.seek(off * 65536)
                f.write(os.urandom(65536))
        ti = prebackup(env, 901, "INCREMENT", 0)[0]
        si = size_of(w, 901, 1)
        env.call("postbackup_live", 901, [0])
        print("increment of a %d MiB disk, %.1f %% rewritten (%d scattered 64 KiB blocks):" % (a.inc_mib, a.changed, blocks))
        print("  full backup      %6.2f s  %8.1f MiB" % (tf, sf / MiB))
        print("  increment        %6.2f s  %8.1f MiB  (%.1f %% of the full's bytes, %.2fx its time; changed data %.1f MiB)"
              % (ti, si / MiB, 100.0 * si / sf, ti / tf, blocks * 65536 / MiB))
        for vmid in (900, 901):
            w.terminate(vmid, "host1")
    finally:
        w.stop()
        subprocess.run(["rm", "-rf", str(work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
