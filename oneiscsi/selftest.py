"""`oneiscsi.pyz --selftest [--json] [--usage U] [--portal HOST[:PORT]] [HOST...]`

Without HOST it checks the machine it runs on (a hypervisor); with HOSTs it runs
the same checks on each over ssh (one round trip per host, hosts in parallel).
The ISCSI_USAGE secrets and ISCSI_HOST portals to check come from --usage and
--portal and, when oned is reachable (on the frontend), from every iscsi
datastore and image. Exit status 0 only when every check passes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

from oneiscsi import host as hostrun, validate
from oneiscsi.errors import Failure
from oneiscsi.host import checks

ISCSI_DRIVERS = ("iscsi", "iscsi_libvirt")


def from_oned():
    """(usages, portals, rows) from oned's datastore and image pools, when oned is reachable."""
    on_frontend = bool(os.environ.get("ONE_XMLRPC")) or os.path.exists("/etc/one/oned.conf")
    if not on_frontend:
        return set(), set(), []
    from oneiscsi.one.rpc import One
    try:
        one = One()
        dss = one.pool("datastore")
        imgs = one.pool("image")
    except Failure as e:
        return set(), set(), [("frontend", "oned", "WARN", "datastores not read: %s" % e,
                               "set ONE_XMLRPC/ONE_AUTH or pass --usage/--portal")]
    usages, portals, rows = set(), set(), []
    ours = {d.id: d for d in dss if d["DS_MAD"] in ISCSI_DRIVERS}
    sources = [(d.tpl, "datastore %s" % d.id) for d in ours.values()]
    sources += [(lambda k, i=i: i.tpl(k) or ours[i["DATASTORE_ID"]].tpl(k), "image %s" % i.id)
                for i in imgs if i["DATASTORE_ID"] in ours]
    for get, where in sources:
        try:
            if get("ISCSI_USAGE"):
                usages.add(validate.usage(get("ISCSI_USAGE")))
            if get("ISCSI_HOST"):
                portals.update(validate.portals(get("ISCSI_HOST")))
        except Failure as e:
            rows.append(("frontend", where, "FAIL", str(e), "fix the attribute in the %s template" % where))
    return usages, portals, rows


def check(host: str, usages, portals) -> list:
    res = hostrun.run(host, checks.script(usages=usages, portals=portals, libvirt=True),
                      timeout=120, what="selftest")
    name = host or os.uname().nodename
    if hostrun.unreachable(res):
        return [(name, "ssh", "FAIL", "cannot reach %s over ssh: %s" % (host, hostrun.last_line(res.stderr)),
                 "check oneadmin's ssh access to the host")]
    rows = [(name,) + r for r in checks.parse(res.stdout)]
    return rows or [(name, "checks", "FAIL", "the check script printed nothing: %s"
                     % hostrun.last_line(res.stderr), "run it with ONEISCSI_DEBUG=1")]


def table(rows) -> str:
    head = ("HOST", "CHECK", "STATUS", "DETAIL (-> fix)", "")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(3)]
    out = []
    for n, r in enumerate([head] + rows):
        line = "  ".join(str(r[i]).ljust(widths[i]) for i in range(3)) + "  " + r[3]
        if n and r[4] and r[2] != "PASS":
            line += "  -> fix: " + r[4]
        out.append(line.rstrip())
    return "\n".join(out)


def main(argv) -> int:
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz --selftest")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--usage", action="append", default=[], help="an ISCSI_USAGE whose libvirt secret must exist")
    ap.add_argument("--portal", action="append", default=[], help="an ISCSI_HOST portal that must be reachable")
    ap.add_argument("hosts", nargs="*", help="hosts to check over ssh (default: this machine)")
    a = ap.parse_args(argv)
    usages = {validate.usage(u, "--usage") for u in a.usage}
    portals = set()
    for p in a.portal:
        portals.update(validate.portals(p, "--portal"))
    u2, p2, rows = from_oned()
    usages |= u2
    portals |= p2
    hosts = [validate.hostname(h, "host") for h in a.hosts] or [""]
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        for result in pool.map(lambda h: check(h, usages, portals), hosts):
            rows.extend(result)
    if a.json:
        print(json.dumps([dict(zip(("host", "check", "status", "detail", "fix"), r)) for r in rows], indent=1))
    else:
        print(table(rows))
    sys.stdout.flush()
    return 0 if all(r[2] == "PASS" for r in rows) else 1
