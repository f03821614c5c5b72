#!/usr/bin/env python3
"""15 and 50 concurrent `ln` on one host: wall time, ssh round trips and SAN sessions per action;
then 15 concurrent `ln` whose host steps take 5 s each (slow logins, a slow portal).

    python3 bench/ln.py [--host-delay 5]              (root: lab hosts in network namespaces)

Real parts (tests/test_eqliscsi_tm.World): sshd hosts with the iscsiadm stand-in, the EqualLogic
simulator on tgtd, a fake oned; every VM has its own persistent volume (made directly in the
simulator). All `ln` start at once through the installed link; then all `delete` at once.
Targets: exactly 1 ssh round trip per action (one host touched), 1 SAN session per action,
no duplicate session on the host. A single `ln` is timed first for the ratio.

Slow hosts: the ssh command sleeps --host-delay seconds before each host step, EQL_MAX_SESSIONS
is 7 and EQL_SESSION_WAIT 3 s (shorter than one host step): an action that kept its CLI slot over
the host step would make the others time out. Targets: 0 failures, at most 7 sessions at once on
the group, wall time close to one host step (the steps overlap), 15x one host step if serialised.
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from tests import oneutil  # noqa: E402
from tests.test_eqliscsi_tm import DSID, World, disk_path  # noqa: E402


def at_once(w, action, vmids, vols) -> tuple:
    """Run `action` (ln or delete) for every VM at once -> (wall s, {vmid: result})."""
    res = {}

    def go(vmid, vol):
        if action == "ln":
            res[vmid] = w.tm("ln", "fe:" + vol, disk_path(vmid, 0, "host1"), vmid, DSID, ok=False)
        else:
            res[vmid] = w.tm("delete", disk_path(vmid, 0, "host1"), vmid, DSID, ok=False)
    threads = [threading.Thread(target=go, args=(v, vol)) for v, vol in zip(vmids, vols)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.monotonic() - t0, res


def burst(w, action, vmids, vols):
    w.reset_ssh()
    s0 = w.sim.sessions_total
    took, res = at_once(w, action, vmids, vols)
    bad = [r for r in res.values() if r.rc != 0]
    assert not bad, bad[:2]
    return took, len(w.ssh_calls()), w.sim.sessions_total - s0


def slow_hosts(w, delay, base):
    """15 concurrent ln with every host step `delay` s longer; -> (wall, failures, peak sessions)."""
    wrapper = w.env["ONEISCSI_SSH"]
    slow = wrapper + "-slow"
    with open(slow, "w") as f:
        f.write("#!/bin/sh\nsleep %s\nexec %s \"$@\"\n" % (delay, wrapper))
    os.chmod(slow, 0o755)
    w.conf(EQL_MAX_SESSIONS="7", EQL_SESSION_WAIT="3")
    env = dict(w.env)
    w.env = dict(env, ONEISCSI_SSH=slow)
    vmids = list(range(base, base + 15))
    vols = ["slow-%d.%d" % (i, base + i) for i in range(15)]
    for vmid, v in zip(vmids, vols):
        w.vm(vmid, [(0, w.image_on_group(base + 100 + vmid - base, v))], hosts=("host1",))
    w.sim.sessions_max_seen = w.sim.sessions_now
    took, res = at_once(w, "ln", vmids, vols)
    failed = [r for r in res.values() if r.rc != 0]
    peak = w.sim.sessions_max_seen
    w.env = env
    for vmid in vmids:
        w.cloud.state(vmid, 11)
    at_once(w, "delete", vmids, vols)
    return took, failed, peak


def main():
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host-delay", type=float, default=5.0)
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/ln.py: run as root (network namespaces)")
    oneutil.build_if_stale()
    with tempfile.TemporaryDirectory(prefix="bench-ln-") as tmp:
        w = World(Path(tmp) / "w")
        try:
            w.remotes = Path(tmp) / "remotes"
            oneutil.install(w.remotes, "6.8")
            rows = []
            for n in (1, 15, 50):
                vmids = list(range(8000 + 100 * n, 8000 + 100 * n + n))
                vols = ["ln%d-%d.%d" % (n, i, 9000 + i) for i in range(n)]
                for i, (vmid, v) in enumerate(zip(vmids, vols)):
                    w.vm(vmid, [(0, w.image_on_group(9000 + i, v))], hosts=("host1",))
                took, ssh, san = burst(w, "ln", vmids, vols)
                on = w.logged_in("host1")
                dup = [v for v in vols if on.count(v) != 1]
                for vmid in vmids:
                    w.cloud.state(vmid, 11)
                dtook, dssh, dsan = burst(w, "delete", vmids, vols)
                rows.append((n, took, ssh, san, len(dup), dtook, dssh, dsan))
            print("%5s %9s %10s %12s %10s %11s %11s %13s" % ("ln", "wall s", "ssh/action", "SAN/action",
                                                              "dup sess", "delete s", "ssh/action", "SAN/action"))
            for n, took, ssh, san, dup, dtook, dssh, dsan in rows:
                print("%5d %9.2f %10.2f %12.2f %10d %11.2f %11.2f %13.2f"
                      % (n, took, ssh / n, san / n, dup, dtook, dssh / n, dsan / n))
            one = rows[0][1]
            for n, took, *_ in rows[1:]:
                print("%d concurrent ln: %.2fx the time of one (%.2f s per action)" % (n, took / one, took / n))
            took, failed, peak = slow_hosts(w, a.host_delay, 8600)
            print("15 concurrent ln, host steps %.1f s longer, EQL_MAX_SESSIONS=7, EQL_SESSION_WAIT=3: "
                  "%.2f s wall = %.2fx one host step (15.00x if serialised), %d failed, peak %d CLI sessions "
                  "at once (limit 7)%s" % (a.host_delay, took, took / a.host_delay, len(failed), peak,
                                           ": " + failed[0].err.strip() if failed else ""))
        finally:
            w.stop()


if __name__ == "__main__":
    main()
