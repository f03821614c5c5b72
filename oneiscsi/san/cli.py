"""EqualLogic group CLI commands, built only from validated words.

Every command the client sends is a `Command` made by a function here; each word
is checked against the group's rules (names: 1-64 of letters, digits, '.', '-',
':'; snapshots up to 127) and anything that could end or split a CLI line
(newline, control character, quote, ';' ...) is refused with `Invalid` before any
session opens. Descriptions are free text from templates: they are cleaned (ASCII,
a safe character set, 127 characters at most) and single-quoted.
Command words follow equallogic-and-peers.md section 0.
"""
from __future__ import annotations

import re
import unicodedata

from oneiscsi import validate
from oneiscsi.errors import Invalid
from oneiscsi.san.parse import COLUMNS

VOLUME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,63}$")
SNAPSHOT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.:-]{0,126}$")
POOL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,62}$")
CHAP_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,62}$")
IP_PATTERN = re.compile(r"^(\*|25[0-5]|2[0-4]\d|1?\d?\d)(\.(\*|25[0-5]|2[0-4]\d|1?\d?\d)){3}$")
PERCENT = re.compile(r"^(100|[1-9]?\d)%$")
_DESC_KEEP = re.compile(r"[^A-Za-z0-9 ._:,/()@+=#-]")
DESCRIPTION_MAX = 127
MAX_SIZE_MB = 16 * 1024 * 1024 * 8  # 128 TB


class Command:
    """One CLI line. `retry_safe`: sending it twice does no harm (reads and set-to-state)."""

    __slots__ = ("text", "retry_safe")

    def __init__(self, words, retry_safe=False):
        self.text = " ".join(words)
        self.retry_safe = retry_safe
        if re.search(r"[\x00-\x1f\x7f]", self.text):  # last line of defence
            raise Invalid("refused to send a CLI command holding a control character")

    def __str__(self):
        return self.text

    def __repr__(self):
        return "Command(%r)" % self.text


# ---- word rules ---------------------------------------------------------------------
def _check(rx, value, what, rule):
    value = "" if value is None else str(value)
    if not value:
        raise Invalid("%s is empty" % what)
    validate.reject_dangerous(value, what)
    if not rx.match(value):
        raise Invalid("%s %s is refused: %s" % (what, validate.show(value), rule))
    return value


def volume(value, what="volume name") -> str:
    return _check(VOLUME, value, what, "an EqualLogic volume name is 1-64 letters, digits, "
                  "'.', '-' or ':' starting with a letter or digit")


def snapshot(value, what="snapshot name") -> str:
    return _check(SNAPSHOT, value, what, "an EqualLogic snapshot name is 1-127 letters, digits, "
                  "'.', '-' or ':' starting with a letter or digit")


def pool(value, what="EQL_POOL") -> str:
    return _check(POOL, value, what, "a pool name is 1-63 letters, digits, '.', '_', '-' or ':'")


def chap_user(value, what="CHAP user name") -> str:
    return _check(CHAP_USER, value, what, "a CHAP user name is 1-63 letters, digits, '.', '_', "
                  "':', '@' or '-'")


def initiator(value, what="initiator name") -> str:
    value = validate.iqn(value, what)
    if "," in value:
        raise Invalid("%s %s is refused: it contains ','" % (what, validate.show(value)))
    return value


def ip_pattern(value, what="ipaddress") -> str:
    return _check(IP_PATTERN, value, what, "an address pattern is four numbers or '*' "
                  "separated by '.', such as 10.1.2.* or *.*.*.*")


def percent(value, what) -> str:
    return _check(PERCENT, value, what, "a percentage is 0% to 100%")


def size_mb(value, what="size") -> int:
    if not isinstance(value, int) or not 1 <= value <= MAX_SIZE_MB:
        raise Invalid("%s %s is refused: a volume size is 1 to %d MB" % (what, validate.show(value), MAX_SIZE_MB))
    return value


def record_id(value) -> str:
    if not re.fullmatch(r"\d{1,5}", str(value)):
        raise Invalid("access record ID %s is refused: not a number" % validate.show(value))
    return str(value)


def clean_description(text: str) -> str:
    """Free text -> what may stand between single quotes on a CLI line (never refused)."""
    text = unicodedata.normalize("NFKD", str(text or "")).encode("ascii", "ignore").decode()
    text = _DESC_KEEP.sub("-", " ".join(text.split()))
    return text[:DESCRIPTION_MAX].strip()


def _desc(text):
    text = clean_description(text)
    return ["description", "'%s'" % text] if text else []


# ---- settings from the configuration -----------------------------------------------
ACCESS_KEYS = ("initiator", "ipaddress", "username", "authmethod", "apply-to")


def access_records(value: str, what="EQL_SECURITY_ACCESS") -> list:
    """`EQL_SECURITY_ACCESS` -> [words of one access record, ...].

    One record is `key value` pairs out of initiator, ipaddress, username,
    authmethod (chap|none), apply-to (volume|snapshot|both), as the seed add-on
    documented; several records are separated by ','. Empty -> [] (volumes
    are created `unrestricted`)."""
    records = []
    if not (value or "").strip():
        return records
    if re.search(r"[\x00-\x1f\x7f'\"`;&|$<>\\]", value):
        validate.reject_dangerous(value.replace(" ", "").replace(",", ""), what)
    for part in value.split(","):
        words = part.split()
        if not words or len(words) % 2:
            raise Invalid("%s %s is refused: expected 'key value' pairs (keys: %s), records "
                          "separated by ','" % (what, validate.show(value), ", ".join(ACCESS_KEYS)))
        out, seen = [], set()
        for key, val in zip(words[0::2], words[1::2]):
            key = key.lower()
            if key not in ACCESS_KEYS or key in seen:
                raise Invalid("%s %s is refused: unknown or repeated key %s (keys: %s)"
                              % (what, validate.show(value), validate.show(key), ", ".join(ACCESS_KEYS)))
            seen.add(key)
            if key == "initiator":
                val = initiator(val, what + " initiator")
            elif key == "ipaddress":
                val = ip_pattern(val, what + " ipaddress")
            elif key == "username":
                val = chap_user(val, what + " username")
            elif key == "authmethod":
                val = _choice(val.lower(), ("chap", "none"), what + " authmethod")
            else:
                val = _choice(val.lower(), ("volume", "snapshot", "both"), what + " apply-to")
            out += [key, val]
        if not seen & {"initiator", "ipaddress", "username"}:
            raise Invalid("%s %s is refused: a record needs an initiator, ipaddress or username"
                          % (what, validate.show(value)))
        if "authmethod" in seen and out[out.index("authmethod") + 1] == "chap" and "username" not in seen:
            raise Invalid("%s %s is refused: authmethod chap needs a username" % (what, validate.show(value)))
        records.append(tuple(out))
    return records


def thin_words(value: str, what="EQL_THINPROVISION") -> tuple:
    """`EQL_THINPROVISION` -> words for `volume create`.

    The seed add-on's form (`thin-provision thin-min-reserve 50%`), or yes/no:
    '', no, off, false, 0 -> thick; yes, on, true, 1 -> `thin-provision`."""
    v = (value or "").strip()
    if v.lower() in ("", "no", "off", "false", "0", "thick"):
        return ()
    if v.lower() in ("yes", "on", "true", "1", "thin", "thin-provision"):
        return ("thin-provision",)
    validate.reject_dangerous(v.replace(" ", ""), what)
    words, out = v.split(), []
    i = 0
    while i < len(words):
        w = words[i].lower()
        if w == "thin-provision":
            out.append(w)
        elif w in ("thin-min-reserve", "snap-reserve") and i + 1 < len(words):
            out += [w, percent(words[i + 1], what + " " + w)]
            i += 1
        else:
            raise Invalid("%s %s is refused: use 'thin-provision [thin-min-reserve N%%] "
                          "[snap-reserve N%%]' or yes/no" % (what, validate.show(value)))
        i += 1
    if "thin-provision" not in out:
        out.insert(0, "thin-provision")
    return tuple(out)


def _choice(value, choices, what):
    if value not in choices:
        raise Invalid("%s %s is refused: use %s" % (what, validate.show(value), " or ".join(choices)))
    return value


# ---- commands ------------------------------------------------------------------------
SETUP = (Command(["stty", "columns", str(COLUMNS)], True),
         Command(["cli-settings", "paging", "off"], True),
         Command(["cli-settings", "confirmation", "off"], True),
         Command(["cli-settings", "events", "off"], True),
         Command(["cli-settings", "formatoutput", "off"], True),
         # sizes in MB: pool capacity exact (GB/TB are printed with two decimals); as openQRM, Proxmox
         Command(["cli-settings", "displayinMB", "on"], True))


def pool_show(name) -> Command:
    return Command(["pool", "select", pool(name), "show"], True)


def volume_show(name) -> Command:
    return Command(["volume", "select", volume(name), "show"], True)


def volume_list() -> Command:
    return Command(["volume", "show"], True)


def volume_create(name, size, pool_name, description="", thin=(), unrestricted=False) -> Command:
    words = ["volume", "create", volume(name), "%dMB" % size_mb(size)] + _desc(description)
    words += ["online", "pool", pool(pool_name)] + list(thin_words(" ".join(thin)) if thin else ())
    return Command(words + (["unrestricted"] if unrestricted else []))


def volume_clone(src, new, description="", unrestricted=False) -> Command:
    words = ["volume", "select", volume(src), "clone", volume(new)] + _desc(description) + ["online"]
    return Command(words + (["unrestricted"] if unrestricted else []))


def snapshot_clone(vol, snap, new, description="", unrestricted=False) -> Command:
    words = ["volume", "select", volume(vol), "snapshot", "select", snapshot(snap), "clone",
             volume(new)] + _desc(description) + ["online"]
    return Command(words + (["unrestricted"] if unrestricted else []))


def multihost(name, enable: bool) -> Command:
    return Command(["volume", "select", volume(name), "multihost-access",
                    "enable" if enable else "disable"], True)


def access_create(name, record) -> Command:
    """record: words from access_records() or initiator_record() (validated again here)."""
    checked = access_records(" ".join(record), "access record")
    if len(checked) != 1:
        raise Invalid("one access record expected")
    return Command(["volume", "select", volume(name), "access", "create"] + list(checked[0]))


def initiator_record(iqn, chap=""):
    return ("initiator", initiator(iqn)) + (("authmethod", "chap", "username", chap_user(chap)) if chap else ())


def access_show(name) -> Command:
    return Command(["volume", "select", volume(name), "access", "show"], True)


def access_delete(name, rid) -> Command:
    # retry-safe: a repeat answers "does not exist", and volume locks keep IDs from being reused meanwhile
    return Command(["volume", "select", volume(name), "access", "delete", record_id(rid)], True)


def volume_online(name, online: bool) -> Command:
    return Command(["volume", "select", volume(name), "online" if online else "offline"], True)


def volume_delete(name) -> Command:
    return Command(["volume", "delete", volume(name)], True)  # a repeat answers "does not exist"


def volume_grow(name, size, snap=False) -> Command:
    return Command(["volume", "select", volume(name), "size", "%dMB" % size_mb(size)]
                   + ([] if snap else ["no-snap"]))


def snapshot_create(vol, description="") -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "create-now"] + _desc(description))


def snapshot_rename(vol, old, new) -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "rename", snapshot(old), snapshot(new)])


def snapshot_list(vol) -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "show"], True)


def snapshot_delete(vol, snap) -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "delete", snapshot(snap)], True)


def snapshot_restore(vol, snap) -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "select", snapshot(snap), "restore"])


def snapshot_online(vol, snap, online: bool) -> Command:
    """`volume select V snapshot select S online|offline` (equallogic-and-peers.md: Proxmox,
    Eucalyptus); a snapshot is an iSCSI target of its own only while online."""
    return Command(["volume", "select", volume(vol), "snapshot", "select", snapshot(snap),
                    "online" if online else "offline"], True)


def snapshot_show(vol, snap) -> Command:
    return Command(["volume", "select", volume(vol), "snapshot", "select", snapshot(snap), "show"], True)
