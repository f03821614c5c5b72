"""`oneiscsi.pyz --selftest [--json] [--driver D] [--usage U] [--portal HOST[:PORT]] [HOST...]`

Without HOST it checks the machine it runs on (a hypervisor); with HOSTs it runs
the same checks on each over ssh (one round trip per host, hosts in parallel).

libvirt side (iscsi): QEMU's iSCSI support, libvirtd, a secret for every
ISCSI_USAGE, every ISCSI_HOST portal reachable. EqualLogic side (eqliscsi):
iscsiadm, iscsid, the initiator name, node.startup = manual, the udev rules,
CHAP, the group portal reachable; and on the frontend, per eqliscsi datastore,
the group's SSH host key known, the CLI login, the pool. What to check comes from
--usage/--portal/--driver and, when oned is reachable (on the frontend), from its
datastores and images. Exit status 0 only when every check passes.
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


class Plan:
    """What to check: filled from the command line and from oned."""

    def __init__(self):
        self.usages, self.portals, self.rows = set(), set(), []
        self.drivers = set()        # "iscsi" and/or "eqliscsi"
        self.eql_datastores = []    # datastore objects (or None: eqliscsi.conf alone)
        self.eql_chap = False


def from_oned(plan: Plan) -> bool:
    """Add what oned's datastore and image pools say to `plan`; False if oned is not there."""
    on_frontend = bool(os.environ.get("ONE_XMLRPC")) or os.path.exists("/etc/one/oned.conf")
    if not on_frontend:
        return False
    from oneiscsi.one.rpc import One
    try:
        one = One()
        dss = one.pool("datastore")
        imgs = one.pool("image")
    except Failure as e:
        plan.rows.append(("frontend", "oned", "WARN", "datastores not read: %s" % e,
                          "set ONE_XMLRPC/ONE_AUTH or pass --driver/--usage/--portal"))
        return False
    plan.eql_datastores = [d for d in dss if d["DS_MAD"] == "eqliscsi"]
    if plan.eql_datastores:
        plan.drivers.add("eqliscsi")
    ours = {d.id: d for d in dss if d["DS_MAD"] in ISCSI_DRIVERS}
    if ours:
        plan.drivers.add("iscsi")
    sources = [(d.tpl, "datastore %s" % d.id) for d in ours.values()]
    sources += [(lambda k, i=i: i.tpl(k) or ours[i["DATASTORE_ID"]].tpl(k), "image %s" % i.id)
                for i in imgs if i["DATASTORE_ID"] in ours]
    for get, where in sources:
        try:
            if get("ISCSI_USAGE"):
                plan.usages.add(validate.usage(get("ISCSI_USAGE")))
            if get("ISCSI_HOST"):
                plan.portals.update(validate.portals(get("ISCSI_HOST")))
        except Failure as e:
            plan.rows.append(("frontend", where, "FAIL", str(e), "fix the attribute in the %s template" % where))
    return True


def eql_frontend(plan: Plan, remotes: str) -> None:
    """Per eqliscsi datastore: the group's host key, the CLI login, the pool; its portal for the hosts."""
    from oneiscsi import config
    from oneiscsi.san import client
    for ds in plan.eql_datastores:
        where = "datastore %s" % ds.id if ds is not None else "eqliscsi.conf"
        try:
            cfg = config.load(remotes, ds)
            group = cfg.group()
            plan.portals.add(cfg.portal())
            plan.eql_chap = plan.eql_chap or bool(cfg.chap_user)
        except Failure as e:
            plan.rows.append(("frontend", where, "FAIL", str(e), "fix the EQL_* settings of %s" % where))
            continue
        name = "group %s" % group.address
        try:
            with client.session(group) as s:
                total, free = s.pool_space(cfg.pool)
        except client.HostKeyError as e:
            plan.rows.append(("frontend", name + " host key", "FAIL", str(e), "see the message"))
            continue
        except client.AuthError as e:
            plan.rows.append(("frontend", name + " host key", "PASS", "known", ""))
            plan.rows.append(("frontend", name + " login", "FAIL", str(e), "check EQL_USER and its password/key"))
            continue
        except client.CliError as e:
            plan.rows += [("frontend", name + " host key", "PASS", "known", ""),
                          ("frontend", name + " login", "PASS", "CLI session works", ""),
                          ("frontend", "pool %s" % cfg.pool, "FAIL", str(e), "set EQL_POOL to an existing pool")]
            continue
        except Failure as e:
            plan.rows.append(("frontend", name, "FAIL", str(e), "check EQL_HOST and the network to the group"))
            continue
        plan.rows += [("frontend", name + " host key", "PASS", "known", ""),
                      ("frontend", name + " login", "PASS", "CLI session works", ""),
                      ("frontend", "pool %s" % cfg.pool, "PASS", "%d MB total, %d MB free" % (total, free), "")]


def check(host: str, plan: Plan) -> list:
    libvirt = "iscsi" in plan.drivers
    script = checks.script(usages=plan.usages if libvirt else (), portals=plan.portals, libvirt=libvirt,
                           qemu=libvirt, eql="eqliscsi" in plan.drivers, eql_chap=plan.eql_chap)
    res = hostrun.run(host, script, timeout=120, what="selftest")
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
    ap.add_argument("--driver", action="append", choices=("iscsi", "eqliscsi"), default=[],
                    help="which side to check (default: what oned's datastores use, else both)")
    ap.add_argument("--remotes", default="", help="remotes tree with etc/datastore/eqliscsi/eqliscsi.conf")
    ap.add_argument("--usage", action="append", default=[], help="an ISCSI_USAGE whose libvirt secret must exist")
    ap.add_argument("--portal", action="append", default=[], help="an ISCSI_HOST portal that must be reachable")
    ap.add_argument("hosts", nargs="*", help="hosts to check over ssh (default: this machine)")
    a = ap.parse_args(argv)
    plan = Plan()
    plan.usages = {validate.usage(u, "--usage") for u in a.usage}
    for p in a.portal:
        plan.portals.update(validate.portals(p, "--portal"))
    oned = from_oned(plan)
    if a.driver:
        plan.drivers = set(a.driver)
    elif not plan.drivers:
        plan.drivers = {"iscsi", "eqliscsi"} if not oned else {"iscsi"}
    if "eqliscsi" in plan.drivers:
        from oneiscsi import config
        from oneiscsi.one.version import remotes_dir
        remotes = a.remotes or remotes_dir("")
        if not plan.eql_datastores and os.path.exists(config.conf_path(remotes)):
            plan.eql_datastores = [None]  # the frontend's eqliscsi.conf alone
        eql_frontend(plan, remotes)
    rows = plan.rows
    hosts = [validate.hostname(h, "host") for h in a.hosts] or [""]
    with ThreadPoolExecutor(max_workers=min(8, len(hosts))) as pool:
        for result in pool.map(lambda h: check(h, plan), hosts):
            rows.extend(result)
    if a.json:
        print(json.dumps([dict(zip(("host", "check", "status", "detail", "fix"), r)) for r in rows], indent=1))
    else:
        print(table(rows))
    sys.stdout.flush()
    return 0 if all(r[2] == "PASS" for r in rows) else 1
