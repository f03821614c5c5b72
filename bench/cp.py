#!/usr/bin/env python3
"""eqliscsi `cp` throughput against plain `qemu-img convert -n` into the same target, same run.

    python3 bench/cp.py [--mib 256] [--runs 3] [--python /usr/bin/python3]

A random image (zeros would be skipped) is copied into a simulator volume (a tgtd target
on loopback) by the `cp` action, as oned runs it, and by plain
`qemu-img convert -n -f raw -O raw SRC iscsi://portal/iqn/1` into a fresh volume of the
same size, runs interleaved. Prints MiB/s and ratios against plain convert (target >= 0.9):
  * cp's data path: the copy as cp runs it (its log line "wrote N MB in T s");
  * the whole action: the copy plus starting Python, the SAN session, volume creation,
    LUN discovery and clean-up (a fixed ~0.1-0.2 s, which weighs on small images).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from eqlbench import eql_bench  # noqa: E402

from oneiscsi.sim import onexml  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    a = ap.parse_args()
    with eql_bench("bench-cp-", a.python, tmp_dir="/var/tmp") as b:
        tmp, sim, tgtd, env = b.tmp, b.sim, b.tgtd, b.env
        link = b.remotes / "datastore" / "eqliscsi" / "cp"
        src = tmp / "src.raw"
        with open(src, "wb") as f:
            for _ in range(a.mib):
                f.write(os.urandom(1024 * 1024))
        ds = onexml.datastore_xml(ds_id=110, ds_mad="eqliscsi", tm_mad="eqliscsi")
        cp_t, copy_t, plain_t, fast_t = [], [], [], []
        logfile = tmp / "log"
        def action(i):
            b64 = onexml.ds_action_data(onexml.image_xml(iid=i, name="bench", path=str(src), ds_id=110), ds)
            t = time.perf_counter()
            res = subprocess.run([str(link), str(i)], input=b64, capture_output=True, text=True, env=env)
            took = time.perf_counter() - t
            if res.returncode != 0:
                raise SystemExit("cp failed: %s" % res.stderr)
            wrote = [ln for ln in logfile.read_text().splitlines() if " wrote %d MB in " % a.mib in ln]
            sim.group.set_online("bench.%d" % i, False)
            sim.group.delete_volume("bench.%d" % i)
            return took, float(wrote[-1].split(" in ")[1].split()[0])

        def plain(i, extra):
            v = sim.group.create_volume("plain-%d" % i, a.mib, unrestricted=True)
            t = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-n"] + extra + ["-f", "raw", "-O", "raw", str(src),
                            "iscsi://%s/%s/1" % (tgtd.portal, v.iqn)], check=True)
            took = time.perf_counter() - t
            sim.group.set_online(v.name, False)
            sim.group.delete_volume(v.name)
            return took

        for i in range(a.runs + 1):  # round 0 warms caches and is not counted; the order alternates
            steps = [("cp", lambda: action(i)), ("plain", lambda: plain(2 * i, [])),
                     ("fast", lambda: plain(2 * i + 1, ["-W", "-m", "16"]))]
            got = dict((name, fn()) for name, fn in (steps if i % 2 else steps[::-1]))
            if i:
                cp_t.append(got["cp"][0])
                copy_t.append(got["cp"][1])
                plain_t.append(got["plain"])
                fast_t.append(got["fast"])
        mib = a.mib

        def rate(ts):
            return mib / statistics.median(ts)
        print("%d MiB random image into a tgtd target on loopback, median of %d runs:" % (mib, a.runs))
        print("  plain qemu-img convert -n          %7.1f MiB/s" % rate(plain_t))
        print("  plain qemu-img convert -n -W -m 16 %7.1f MiB/s" % rate(fast_t))
        print("  eqliscsi cp, its copy              %7.1f MiB/s" % rate(copy_t))
        print("  eqliscsi cp, whole action          %7.1f MiB/s" % rate(cp_t))
        print("ratio cp copy / plain convert -n: %.2f (target >= 0.9); whole cp action / plain: %.2f; "
              "fixed cost of the action: %.0f ms"
              % (rate(copy_t) / rate(plain_t), rate(cp_t) / rate(plain_t),
                 (statistics.median(cp_t) - statistics.median(copy_t)) * 1e3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
