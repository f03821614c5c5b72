"""qemu-img's own iSCSI initiator (libiscsi) in host scripts: how a script reaches targets.

One place for what every host-side qemu-img over iSCSI needs (image writes and exports through a
BRIDGE_LIST host, backup reads, in-place restores): the --image-opts / json: names of a target,
CHAP secrets as qemu-img `--object secret,file=` files in a private work folder (a password
travels in the script text as a quoted heredoc, a libvirt secret goes from virsh into the file:
never on an argv), and the LUN: the first of LUN 0 (EqualLogic, most targets) and LUN 1 (tgtd
keeps LUN 0 for its controller) that answers with enough bytes.
"""
from __future__ import annotations

import json

from oneiscsi import host as hostrun
from oneiscsi.host import q

QEMU_IMG = "qemu-img"


class Lun:
    """How qemu-img reaches one iSCSI target: portal, IQN, initiator name, optional CHAP.
    `lun` None: the first of LUN 0 (EqualLogic, most targets) and LUN 1 (tgtd keeps LUN 0
    for its controller) that answers with at least `min_size` bytes."""

    def __init__(self, portal: str, iqn: str, initiator: str, user: str = "", password: str = "",
                 lun=None, min_size: int = 1, usage: str = ""):
        self.portal, self.iqn, self.initiator = portal, iqn, initiator
        self.user, self.password, self.lun, self.min_size = user, password, lun, int(min_size or 1)
        self.usage = usage   # CHAP password from the host's libvirt secret of this usage (iscsi driver)
        self.secret = ""

    def spec(self, lun_var: str, secret: str) -> dict:
        d = {"driver": "iscsi", "transport": "tcp", "portal": self.portal, "target": self.iqn,
             "lun": lun_var, "initiator-name": self.initiator}
        if self.user:
            d.update({"user": self.user, "password-secret": secret})
        return d


def opts(spec: dict) -> str:
    """--image-opts text (key=value,...) with the LUN left as a shell expansion."""
    return ",".join("%s=%s" % (k, v) for k, v in spec.items())


def json_name(spec: dict) -> str:
    """A json: backing name (the LUN a number, from the shell variable)."""
    return "json:" + json.dumps({"driver": "raw", "file": spec}, separators=(",", ":")).replace('"@LUN@"', "@LUN@")


def shell(text: str, lun_var: str) -> str:
    """Quote `text` for sh, with the placeholder @LUN@ becoming "$<lun_var>"."""
    return ('"$%s"' % lun_var).join(q(part) for part in text.split("@LUN@"))


def prelude(cleanup: str = "") -> str:
    """The script's start: `set -u`, umask 077, a private work folder removed on exit (with
    `cleanup`, more sh run at exit, set before anything can fail), fail(), lun_of() and $objs."""
    return r"""set -u
umask 077
work=''
trap 'rm -rf ${work:+"$work"}; %(cleanup)s' EXIT
work=$(mktemp -d "${TMPDIR:-/var/tmp}/oneiscsi-q.XXXXXX") || exit 1
fail() { echo "$*" >&2; exit 3; }
lun_of() {  # lun_of VAR MIN_BYTES OPTS_WITH_@@ : the first of LUN 0 and 1 of at least MIN bytes
  for l in 0 1; do
    s=$(%(qemu)s info --output=json $objs --image-opts "$(printf '%%s' "$3" | sed "s/@@/$l/")" 2>/dev/null \
        | sed -n 's/.*"virtual-size": *\([0-9]*\).*/\1/p' | head -n 1)
    if [ -n "$s" ] && [ "$s" -ge "$2" ]; then eval "$1=$l"; return 0; fi
  done
  return 1
}
objs=''
""" % {"qemu": QEMU_IMG, "cleanup": cleanup or ":"}


def secrets(luns: list) -> str:
    """One secret object per distinct CHAP password (or libvirt secret usage); `objs` holds
    their --object options. A libvirt secret's value goes from virsh into the file unseen."""
    out, seen = [], {}
    for lun in luns:
        if not lun.user:
            continue
        key = ("usage", lun.usage) if lun.usage else ("pw", lun.password)
        if key not in seen:
            n = seen[key] = "sec%d" % len(seen)
            if lun.usage:
                out.append("u=$(virsh -q -c qemu:///system secret-list 2>/dev/null | awk -v u=%s "
                           "'$2==\"iscsi\" && $3==u {print $1; exit}')" % q(lun.usage))
                out.append("[ -n \"$u\" ] || fail %s" % q("no libvirt secret with usage %s on this host: define "
                                                              "it with `oneiscsi.pyz secret`" % lun.usage))
                out.append("virsh -q -c qemu:///system secret-get-value \"$u\" | base64 -d > \"$work/%s\" "
                           "|| fail 'cannot read the libvirt secret'" % n)
            else:
                out.append(hostrun.heredoc_value("pw", lun.password).rstrip("\n"))
                out.append("printf '%%s' \"$pw\" > \"$work/%s\"; pw=''" % n)
            out.append("objs=\"$objs --object secret,id=%s,file=$work/%s\"" % (n, n))
        lun.secret = seen[key]
    return "\n".join(out)


def find(lun: Lun, var: str, min_expr: str = "") -> str:
    """The LUN into shell variable `var`; min_expr: a shell expression for the least size."""
    if lun.lun is not None:
        return "%s=%d" % (var, int(lun.lun))
    probe = opts(lun.spec("@@", lun.secret))
    return "lun_of %s %s %s || fail %s" % (var, min_expr or str(lun.min_size), q(probe), q(
        "no LUN of %s on %s answers (access record, CHAP, or the target is down)" % (lun.iqn, lun.portal)))


