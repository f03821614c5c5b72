#!/usr/bin/env python3
"""SAN sessions and CLI round trips per eqliscsi action, monitor with 100 volumes, session set-up.

    python3 bench/san.py [--runs 25] [--python /usr/bin/python3]

Against the EqualLogic simulator on loopback (tests' lab), measured in one run:
  * per DS action (through the installed links, as oned runs them): CLI sessions opened
    and command lines sent, against the seed add-on, which started one EqlCliExec.py
    process and SSH session per CLI command (equallogic-and-peers.md 1.3);
  * `monitor` wall time with 100 volumes in the pool, against 1 volume;
  * one session set-up (connect, login, shell, terminal set-up) plus one command, in
    process: with TCP_NODELAY (what the client does; target under 10 ms) against
    paramiko's default socket (Nagle + delayed ACK).
Prints medians and ratios.
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

from oneiscsi.san import cli, client  # noqa: E402
from oneiscsi.sim import onexml  # noqa: E402

SETUP = {c.text for c in cli.SETUP}
# The seed add-on: one EqlCliExec.py session per CLI command (scripts_eqliscsi.sh)
SEED_SESSIONS = {"cp": 3, "clone": 3, "mkfs": 3, "rm": 2, "monitor": 1}


def data(version=(6, 8), **kw):
    ds = onexml.datastore_xml(ds_id=110, ds_mad="eqliscsi", tm_mad="eqliscsi", version=version)
    if kw.pop("image", True) is False:
        return onexml.ds_action_data("", ds)
    img = onexml.image_xml(ds_id=110, version=version, **kw)
    return onexml.ds_action_data(img, ds)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    a = ap.parse_args()
    with eql_bench("bench-san-", a.python) as b:
        tmp, sim, links, env = b.tmp, b.sim, b.remotes / "datastore" / "eqliscsi", b.env
        src = tmp / "src.raw"
        src.write_bytes(os.urandom(1024 * 1024))

        def run(action, b64, oid):
            t = time.perf_counter()
            res = subprocess.run([str(links / action), str(oid)], input=b64, capture_output=True, text=True,
                                 env=env)
            took = time.perf_counter() - t
            if res.returncode != 0:
                raise SystemExit("%s failed: %s" % (action, res.stderr or res.stdout))
            return took

        print("== SAN sessions and CLI round trips per action (each session adds one pipelined set-up;"
              " the seed add-on opened one session per CLI command)")
        print("%-8s %8s %9s %14s %14s" % ("action", "sessions", "commands", "seed sessions", "seed/oneiscsi"))
        cases = [("cp", data(iid=1, name="img", path=str(src)), 1),
                 ("clone", data(iid=2, name="copy", path="img.1", size_mb=1), 2),
                 ("mkfs", data(iid=3, name="blank", size_mb=4), 3),
                 ("monitor", data(image=False), 110),
                 ("rm", data(iid=2, source="copy.2"), 2)]
        for action, b64, oid in cases:
            s0, c0 = sim.sessions_total, len(sim.commands)
            run(action, b64, oid)
            sessions = sim.sessions_total - s0
            commands = [c for c in sim.commands[c0:] if c not in SETUP]
            print("%-8s %8d %9d %14d %13.1fx" % (action, sessions, len(commands), SEED_SESSIONS[action],
                                                 SEED_SESSIONS[action] / sessions))

        print("\n== monitor wall time (median of %d), one `pool select show` whatever the volume count"
              % a.runs)
        mon = data(image=False)
        run("monitor", mon, 110)
        few = statistics.median(run("monitor", mon, 110) for _ in range(a.runs))
        for i in range(100):
            sim.group.create_volume("bench-%d" % i, 10, thin=True)
        many = statistics.median(run("monitor", mon, 110) for _ in range(a.runs))
        print("1 volume: %.1f ms   100 volumes: %.1f ms   ratio %.2f" % (few * 1e3, many * 1e3, many / few))

        print("\n== one session set-up + one command, in process (median of %d)" % a.runs)
        os.environ["ONEISCSI_LOCK_DIR"] = str(tmp / "locks")
        res = {}
        for nodelay in (True, False):
            g = client.Group("127.0.0.1", sim.port, "grpadmin", "secret", "", str(tmp / "known_hosts"),
                             nodelay=nodelay)
            samples = []
            for _ in range(a.runs + 2):
                t = time.perf_counter()
                with client.session(g) as s:
                    s.pool_space("default")
                samples.append(time.perf_counter() - t)
            res[nodelay] = statistics.median(samples[2:])
        print("TCP_NODELAY socket: %.1f ms (target < 10 ms)   paramiko default socket: %.1f ms   "
              "ratio %.1fx" % (res[True] * 1e3, res[False] * 1e3, res[False] / res[True]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
