"""One iSCSI initiator probe, run unchanged on the real-kernel host and on a
stand-in host, so the two can be compared (by-path names, exit codes).

``PROBE_SH`` is a POSIX sh script that must run as root on the host with the
``iscsiadm`` to probe first in PATH.  It reads three lines on stdin:

    <portal ip:port> <target iqn> <chap user> <write token> <seeded offset>
    <good chap password>
    <wrong chap password>

and prints ``key=value`` lines (``rc_<step>=N`` for every iscsiadm step,
``by_path=<name>``, ``link=<path>`` for every /dev symlink to the logged-in
device, ``read_seeded=<text>``) and ``out_<step>: <line>`` lines with the
command output.  The CHAP password reaches iscsiadm on the *host's* argv
(``-o update -v``), which is how open-iscsi takes it; never the caller's.

The guest writes ``<write token>`` padded to 4 KiB at byte offset 1 MiB of
LUN 1 with O_DIRECT and reads back 32 bytes at ``<seeded offset>``.
"""
from __future__ import annotations

import json
import os
import shlex

SUMMARY_NAME = "realhost-summary.json"
WRITE_OFFSET = 1 << 20

PROBE_SH = r"""
read -r PORTAL IQN CUSER TOKEN SEEDOFF || exit 90
read -r PASS || exit 91
read -r BADPASS || exit 92
PROBEDIR=$(mktemp -d) || exit 93
step() {
    key=$1; shift
    "$@" > "$PROBEDIR/out" 2>&1
    rc=$?
    echo "rc_$key=$rc"
    sed "s/^/out_$key: /" "$PROBEDIR/out"
    return $rc
}
links() {  # by-path names of LUNs of our target
    ls /dev/disk/by-path/ 2>/dev/null | grep -F -e "ip-$PORTAL-iscsi-$IQN-lun-" || true
}
wait_links() {  # $1 = want (yes|no); up to 30 s
    i=0
    while [ $i -lt 150 ]; do
        if [ -n "$(links)" ]; then [ "$1" = yes ] && return 0; else [ "$1" = no ] && return 0; fi
        sleep 0.2; i=$((i + 1))
    done
    return 1
}
N="-m node -T $IQN -p $PORTAL"
echo "initiator=$(sed -n 's/^InitiatorName=//p' /etc/iscsi/initiatorname.iscsi)"
step discovery iscsiadm -m discovery -t sendtargets -p "$PORTAL"
step node_new iscsiadm $N -o new
# discovery made <ip>,<port>,1/<iface>, -o new the old-style file <ip>,<port>: the first
# update converts and exits 6 when the directory lists the tpgt entry first (idbm.c)
entries() { ls -U "/etc/iscsi/nodes/$IQN" 2>/dev/null | grep -F -e "$(echo "$PORTAL" | sed 's/:\([0-9]*\)$/,\1/')" | tr '\n' ' '; }
echo "order_before=$(entries)"
step chap_method iscsiadm $N -o update -n node.session.auth.authmethod -v CHAP
echo "order_after=$(entries)"
step chap_user iscsiadm $N -o update -n node.session.auth.username -v "$CUSER"
step chap_badpass iscsiadm $N -o update -n node.session.auth.password -v "$BADPASS"
step login_badchap iscsiadm $N --login
step session_after_badchap iscsiadm -m session
step chap_pass iscsiadm $N -o update -n node.session.auth.password -v "$PASS"
step login iscsiadm $N --login
if wait_links yes; then echo "links_after_login=yes"; else echo "links_after_login=no"; fi
for l in $(links); do echo "by_path=$l"; done
DEV=$(readlink -f "/dev/disk/by-path/ip-$PORTAL-iscsi-$IQN-lun-1")
echo "device=$DEV"
if [ -b "$DEV" ]; then
    for l in $(find /dev -type l 2>/dev/null); do
        [ "$(readlink -f "$l")" = "$DEV" ] && echo "link=$l"
    done
    echo "size=$(blockdev --getsize64 "$DEV")"
fi
step login_again iscsiadm $N --login
step session iscsiadm -m session
{ printf '%s' "$TOKEN"; head -c $((4096 - ${#TOKEN})) /dev/zero; } > "$PROBEDIR/block"
step write dd if="$PROBEDIR/block" of="$DEV" bs=4096 seek=256 count=1 oflag=direct conv=notrunc
echo "read_seeded=$(dd if="$DEV" bs=512 skip=$((SEEDOFF / 512)) count=1 iflag=direct 2>/dev/null | head -c 32 | tr -cd 'A-Za-z0-9._-')"
step flush blockdev --flushbufs "$DEV"
step logout iscsiadm $N --logout
if wait_links no; then echo "links_after_logout=no"; else echo "links_after_logout=yes"; fi
echo "device_after_logout=$([ -b "$DEV" ] && echo present || echo absent)"
step logout_again iscsiadm $N --logout
step session_none iscsiadm -m session
step node_show_unknown iscsiadm -m node -T iqn.2000-01.invalid.oneiscsi:nosuch -p "$PORTAL" -o show
step node_delete iscsiadm $N -o delete
step node_show_deleted iscsiadm $N -o show
rm -rf "$PROBEDIR"
echo "done=1"
"""


def probe_command() -> str:
    """The shell command that runs the probe (pass the input on stdin)."""
    return "sh -c %s oneiscsi-probe" % shlex.quote(PROBE_SH)


def probe_input(portal, iqn, user, password, bad_password, token, seeded_offset) -> str:
    for v in (portal, iqn, user, token, password, bad_password):
        if not v or any(c.isspace() for c in v):
            raise ValueError("probe values must be non-empty words")
    return "%s %s %s %s %d\n%s\n%s\n" % (portal, iqn, user, token, seeded_offset,
                                         password, bad_password)


def parse(stdout: str) -> dict:
    """-> {"rc": {step: int}, "out": {step: [lines]}, "by_path": [...],
    "link": [...], other keys: last value}."""
    res = {"rc": {}, "out": {}, "by_path": [], "link": []}
    for line in stdout.splitlines():
        if line.startswith("out_") and ": " in line:
            k, v = line[4:].split(": ", 1)
            res["out"].setdefault(k, []).append(v)
        elif "=" in line:
            k, v = line.split("=", 1)
            if k.startswith("rc_"):
                res["rc"][k[3:]] = int(v)
            elif k in ("by_path", "link"):
                res[k].append(v)
            else:
                res[k] = v
    return res


def tpgt_entry_first(result: dict) -> bool:
    """Did the node DB directory list the discovered (tpgt) record before the old-style file?"""
    words = result.get("order_before", "").split()
    if len(words) != 2:
        raise AssertionError("expected two node records of the portal, got %r" % words)
    return words[0].count(",") == 2


def summary(result: dict, portal: str, iqn: str, kind: str) -> dict:
    """The machine-readable part to compare between initiators; names have
    the portal and IQN replaced by ``{portal}`` and ``{iqn}``."""
    def generic(s):
        return s.replace(iqn, "{iqn}").replace(portal, "{portal}")
    return {
        "initiator_kind": kind,
        "exit_codes": dict(sorted(result["rc"].items())),
        "by_path": [generic(n) for n in result["by_path"]],
        "discovery": [generic(x) for x in result["out"].get("discovery", [])],
        "session": [generic(x) for x in result["out"].get("session", [])],
        "links_after_login": result.get("links_after_login"),
        "links_after_logout": result.get("links_after_logout"),
        "device_after_logout": result.get("device_after_logout"),
    }


def write_summary(path, data: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
