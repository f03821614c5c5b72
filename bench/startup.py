#!/usr/bin/env python3
"""Warm start-up of oneiscsi actions against `python3 -c pass`, same interpreter, same run.

    python3 bench/startup.py [--runs 25] [--python /usr/bin/python3]

Measures, through an installed remotes tree (launcher + action links, as oned runs them):
  * `python3 -c pass`                       the interpreter alone (the baseline)
  * `datastore/iscsi/monitor`               target: under 3x the baseline
  * `tm/iscsi/ln`                           VM read from a fake oned over XML-RPC, host
                                            check run locally through an ssh stand-in
and checks that no iscsi action imports paramiko. Prints medians and ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(TOP))

from oneiscsi.sim import onexml  # noqa: E402


def timed(cmd, runs, env=None, stdin=""):
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        res = subprocess.run(cmd, input=stdin, capture_output=True, text=True, env=env)
        samples.append(time.perf_counter() - t)
        if res.returncode != 0:
            raise SystemExit("%s failed: %s" % (cmd, res.stderr))
    return statistics.median(samples)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--python", default="/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable)
    a = ap.parse_args()
    pyz = TOP / "dist" / "oneiscsi.pyz"
    if not pyz.exists():
        subprocess.run([sys.executable, str(TOP / "build.py")], check=True, stdout=subprocess.DEVNULL)
    from oneiscsi.sim.oned import FakeOned
    with tempfile.TemporaryDirectory() as tmp:
        remotes = Path(tmp) / "remotes"
        remotes.mkdir()
        (remotes / "VERSION").write_text("6.8.0\n")
        subprocess.run([a.python, str(pyz), "install", "--remotes", str(remotes), "--python", a.python,
                        "--drivers", "iscsi"], check=True, capture_output=True)
        fakessh = Path(tmp) / "fakessh"
        fakessh.write_text("#!/bin/sh\n# ssh stand-in: run the script on this machine\nexec sh -s\n")
        fakessh.chmod(0o755)
        auth = Path(tmp) / "one_auth"
        auth.write_text("oneadmin:secret\n")
        oned = FakeOned(session="oneadmin:secret")
        oned.start()
        try:
            disk = onexml.disk_xml(0, {"SOURCE": "iqn.2000-01.com.example:bench/1", "TM_MAD": "iscsi",
                                       "ISCSI_HOST": "127.0.0.1", "PERSISTENT": "YES", "TYPE": "ISCSI"})
            oned.vms[5] = onexml.vm_xml(vmid=5, disks=[disk])
            env = dict(os.environ, ONE_XMLRPC=oned.url, ONE_AUTH=str(auth), ONEISCSI_SSH=str(fakessh),
                       ONEISCSI_LOG="-")
            base = timed([a.python, "-c", "pass"], a.runs)
            mon_cmd = [str(remotes / "datastore" / "iscsi" / "monitor"), "101"]
            ln_cmd = [str(remotes / "tm" / "iscsi" / "ln"), "fe:iqn.2000-01.com.example:bench/1",
                      "localhost:/var/lib/one/datastores/0/5/disk.0", "5", "101"]
            timed(mon_cmd, 2, env)  # warm: extraction done, page cache hot
            mon = timed(mon_cmd, a.runs, env)
            ln = timed(ln_cmd, max(5, a.runs // 2), env)
            imports = subprocess.run(mon_cmd, capture_output=True, text=True,
                                     env=dict(env, PYTHONPROFILEIMPORTTIME="1")).stderr
            imports += subprocess.run(ln_cmd, capture_output=True, text=True,
                                      env=dict(env, PYTHONPROFILEIMPORTTIME="1")).stderr
        finally:
            oned.stop()
    print("interpreter: %s" % a.python)
    print("%-34s %8.1f ms   1.00x" % ("python3 -c pass", base * 1000))
    print("%-34s %8.1f ms  %5.2fx  (target < 3x)" % ("datastore/iscsi/monitor", mon * 1000, mon / base))
    print("%-34s %8.1f ms  %5.2fx  (XML-RPC read + local host check)" % ("tm/iscsi/ln", ln * 1000, ln / base))
    print("paramiko imported by an iscsi action: %s" % ("YES" if "paramiko" in imports else "no"))
    return 0 if mon / base < 3 and "paramiko" not in imports else 1


if __name__ == "__main__":
    sys.exit(main())
