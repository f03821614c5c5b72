#!/usr/bin/env python3
"""Multipath against single path on the real-kernel guest, same run, same volume size:

- attach and detach time (oneiscsi.host.iscsi over ssh, as the TM actions run them) with
  EQL_IFACE=eql0 (one session, by-path disk) and EQL_IFACE=eql0,eql1 (two sessions, a
  dm-multipath map), median of --rounds each;
- throughput of a direct (O_DIRECT) sequential read of 256 MiB through the map against
  through one path (dd bs=1M iflag=direct inside the guest).

    python3 bench/multipath.py [--rounds 5] [--mib 256]     (root: bridges, netns, the QEMU guest)

Rig: tests/test_multipath_realhost.py's (the guest with two NICs on one subnet, tgtd in netns
mpsan with EQLOGIC/100E-00 LUNs). Under TCG the guest CPU is emulated: absolute figures are far
below a real host, and with both paths ending on one tgtd over one emulated CPU, two paths
cannot add bandwidth; the ratios say what multipath costs, not what it gains on a real SAN.
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
os.chdir(str(TOP))

from oneiscsi.host import iscsi  # noqa: E402
from oneiscsi.host.iscsi import Volume  # noqa: E402
from oneiscsi.sim import realhost  # noqa: E402
from oneiscsi.sim.tgt import Tgtd  # noqa: E402
from tests import test_multipath_realhost as mp  # noqa: E402


def read_mbps(rh, dev, mib):
    r = rh.ssh("sync; echo 3 > /proc/sys/vm/drop_caches; s=$(date +%%s.%%N); "
               "dd if=%s of=/dev/null bs=1M count=%d iflag=direct 2>/dev/null; e=$(date +%%s.%%N); "
               "echo \"$s $e\"" % (dev, mib), check=True, timeout=900)
    s, e = map(float, r.stdout.split())
    return mib / (e - s)


def main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    a = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="mpbench-")
    mp.net_up()
    tgtd = Tgtd(work + "/tgtd", portal=mp.PORTAL, netns=mp.NETNS)
    rh = None
    try:
        tgtd.start()
        rh = realhost.RealHost(work + "/mpkvm", mp.BR0, mp.NET + ".50/24", name="mpkvm", udev_rules=mp.RULES,
                               extra_nics=[mp.BR1], boot_script=mp.BOOT,
                               files=[("/etc/multipath.conf", mp.MULTIPATH_CONF, 0o644)])
        rh.start(timeout=240)
        cfg = work + "/ssh_config"
        with open(cfg, "w") as f:
            f.write("\n".join(["Host mpkvm", "  HostName " + rh.addr, "  User oneadmin",
                               "  IdentityFile " + rh.identity, "  IdentitiesOnly yes",
                               "  UserKnownHostsFile " + rh.known_hosts, "  GlobalKnownHostsFile /dev/null",
                               "  StrictHostKeyChecking yes", "  BatchMode yes", "  LogLevel ERROR",
                               "  ControlMaster auto", "  ControlPath " + work + "/cm-%r", "  ControlPersist 600", ""]))
        os.environ["ONEISCSI_SSH"] = "ssh -F " + cfg
        os.environ.setdefault("ONEISCSI_LOG", work + "/oneiscsi.log")
        size = (a.mib + 16) << 20
        vol = "mpbench"
        iqn = "iqn.2001-05.com.equallogic:0-8a0906-0a1b2c3d4-0123456789abcdef-" + vol
        backing = work + "/bench.img"
        with open(backing, "wb") as f:     # real data, not a sparse hole tgtd answers from nothing
            block = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(block)
        tgtd.add_target(iqn, backing, params=dict(mp.EQL, scsi_id="EQLbench01"))
        tgtd.bind(iqn)
        v = Volume(mp.PORTAL, iqn, vol, "/var/lib/one/datastores/0/1/disk.0", size)
        res = {}
        for label, iface in (("1 path", "eql0"), ("2 paths", "eql0,eql1")):
            att, det = [], []
            for _ in range(a.rounds):
                t0 = time.monotonic()
                dev = iscsi.attach("mpkvm", [v], iface=iface)[vol]
                att.append(time.monotonic() - t0)
                t0 = time.monotonic()
                iscsi.detach("mpkvm", [v], iface=iface)
                det.append(time.monotonic() - t0)
            dev = iscsi.attach("mpkvm", [v], iface=iface)[vol]
            mbps = [read_mbps(rh, dev, a.mib) for _ in range(2)]
            iscsi.detach("mpkvm", [v], iface=iface)
            res[label] = (statistics.median(att), statistics.median(det), max(mbps))
        one, two = res["1 path"], res["2 paths"]
        print("%-8s %10s %10s %16s" % ("", "attach s", "detach s", "read MiB/s"))
        for label, (at, de, mb) in res.items():
            print("%-8s %10.2f %10.2f %16.1f" % (label, at, de, mb))
        print("ratio 2/1: attach %.2fx, detach %.2fx, read %.2fx (%d rounds, %d MiB O_DIRECT, TCG guest)"
              % (two[0] / one[0], two[1] / one[1], two[2] / one[2], a.rounds, a.mib))
    finally:
        if rh is not None:
            rh.stop()
        tgtd.stop()
        mp.net_down()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
