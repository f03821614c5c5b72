"""Validation of every value that comes from a template, argv or a config file.

Values are checked before any command runs; a refusal names the attribute,
shows the value safely (escaped, shortened) and says what is allowed.
"""
from __future__ import annotations

import ipaddress
import re

from oneiscsi.errors import Invalid

# Characters that could end, split or escape a shell word or a SAN CLI line.
_DANGEROUS = [
    (re.compile(r"[\r\n]"), "a newline"),
    (re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"), "a control character"),
    (re.compile(r"\s"), "whitespace"),
    (re.compile(r"['\"]"), "a quote"),
    (re.compile(r"`"), "a backtick"),
    (re.compile(r"[;&|]"), "';', '&' or '|'"),
    (re.compile(r"\$"), "'$'"),
    (re.compile(r"[<>]"), "'<' or '>'"),
    (re.compile(r"\\"), "a backslash"),
]


def show(value: str, limit: int = 60) -> str:
    """A value made safe to print in one line."""
    text = repr(str(value))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def reject_dangerous(value: str, what: str) -> None:
    for rx, name in _DANGEROUS:
        if rx.search(value):
            raise Invalid("%s %s is refused: it contains %s" % (what, show(value), name))


_LABEL = re.compile(r"^[A-Za-z0-9-]+$")
_UNIQUE = re.compile(r"^[A-Za-z0-9._-]+$")


def iqn(value: str, what: str = "iSCSI name") -> str:
    """An iSCSI target name: `iqn.` (RFC 3720, also the non-date forms targets accept, such as
    `iqn.2014.01.192.168.50.61:test:x`), `eui.` + 16 hex digits, or `naa.` + 16/32 hex digits."""
    if not value:
        raise Invalid("%s is empty" % what)
    reject_dangerous(value, what)
    if len(value) > 223:
        raise Invalid("%s %s is refused: longer than 223 characters (RFC 3720)" % (what, show(value)))
    if value.startswith("eui."):
        if re.fullmatch(r"eui\.[0-9A-Fa-f]{16}", value):
            return value
        raise Invalid("%s %s is refused: an eui. name is 'eui.' and 16 hex digits" % (what, show(value)))
    if value.startswith("naa."):
        if re.fullmatch(r"naa\.([0-9A-Fa-f]{16}|[0-9A-Fa-f]{32})", value):
            return value
        raise Invalid("%s %s is refused: a naa. name is 'naa.' and 16 or 32 hex digits" % (what, show(value)))
    if not value.startswith("iqn."):
        raise Invalid("%s %s is refused: it must start with 'iqn.', 'eui.' or 'naa.'" % (what, show(value)))
    authority, sep, unique = value[4:].partition(":")
    labels = authority.split(".")
    if len(labels) < 2 or not all(_LABEL.match(x) for x in labels) or not re.match(r"\d{4}", labels[0]):
        raise Invalid("%s %s is refused: expected iqn.<yyyy-mm>.<reversed domain>[:<name>] with "
                      "no empty parts" % (what, show(value)))
    if sep and not all(_UNIQUE.match(p) for p in unique.split(":")):
        raise Invalid("%s %s is refused: the part after ':' has an empty part or a character "
                      "outside letters, digits, '.', '-', '_' and ':'" % (what, show(value)))
    return value


def lun(value: str, what: str = "LUN") -> int:
    if not re.fullmatch(r"\d{1,5}", value or "") or int(value) > 16383:
        raise Invalid("%s %s is refused: a LUN is a number from 0 to 16383" % (what, show(value)))
    return int(value)


def iqn_lun(value: str, what: str = "PATH"):
    """`IQN[/LUN]` -> (iqn, lun or None)."""
    if not value:
        raise Invalid("%s is empty: give the target as IQN or IQN/LUN" % what)
    reject_dangerous(value, what)
    name, sep, l = value.partition("/")
    if not name:
        raise Invalid("%s %s is refused: it must start with 'iqn.', 'eui.' or 'naa.' (IQN[/LUN])"
                      % (what, show(value)))
    if sep:
        return iqn(name, what), lun(l, what + " LUN")
    return iqn(name, what), None


# '_' is not RFC 1123, but /etc/hosts names such as the seed's "the_iscsi_host" use it
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                       r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")


def hostname(value: str, what: str = "host") -> str:
    """A DNS name or an IPv4/IPv6 address (IPv6 bare, without brackets)."""
    if not value:
        raise Invalid("%s is empty" % what)
    reject_dangerous(value, what)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if value.startswith("-") or not _HOSTNAME.match(value):
        raise Invalid("%s %s is refused: not a host name or IP address" % (what, show(value)))
    return value


def port(value: str, what: str = "port") -> int:
    if not re.fullmatch(r"\d{1,5}", value or "") or not 0 < int(value) < 65536:
        raise Invalid("%s %s is refused: a port is a number from 1 to 65535" % (what, show(value)))
    return int(value)


def portal(value: str, what: str = "portal", default_port: int = 3260):
    """`host`, `host:port`, `[v6]`, `[v6]:port` -> (host, port)."""
    reject_dangerous(value, what)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(.*))?", value)
    if m:
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            raise Invalid("%s %s is refused: not an IPv6 address in brackets" % (what, show(value))) from None
        return m.group(1), port(m.group(2), what + " port") if m.group(2) is not None else default_port
    if value.count(":") > 1:
        raise Invalid("%s %s is refused: write IPv6 addresses in brackets, as [addr]:port" % (what, show(value)))
    host, sep, p = value.partition(":")
    return hostname(host, what), port(p, what + " port") if sep else default_port


def portals(value: str, what: str = "ISCSI_HOST") -> list:
    """Space-separated portals (ISCSI_HOST may list several)."""
    if not value or not value.strip():
        raise Invalid("%s is empty" % what)
    if re.search(r"[\r\n\x00-\x08\x0b\x0c\x0e-\x1f\x7f]", value):
        raise Invalid("%s %s is refused: it contains a newline or control character" % (what, show(value)))
    return [portal(p, what) for p in value.split()]


def format_portal(host: str, p: int) -> str:
    return "[%s]:%d" % (host, p) if ":" in host else "%s:%d" % (host, p)


_CHAP_USER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+-]{0,254}$")
_USAGE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:+/-]{0,254}$")


def chap_user(value: str, what: str = "ISCSI_USER") -> str:
    reject_dangerous(value, what)
    if not _CHAP_USER.match(value):
        raise Invalid("%s %s is refused: use letters, digits and . _ @ : + - (at most 255)" % (what, show(value)))
    return value


def usage(value: str, what: str = "ISCSI_USAGE") -> str:
    reject_dangerous(value, what)
    if not _USAGE.match(value):
        raise Invalid("%s %s is refused: use letters, digits and . _ @ : + - / (at most 255)" % (what, show(value)))
    return value


def safe_path(value: str, what: str) -> str:
    """An absolute path without shell-significant characters or '..' parts."""
    reject_dangerous(value, what)
    if not value.startswith("/") or "/../" in value + "/" or not re.fullmatch(r"[A-Za-z0-9._/+@:,=-]+", value):
        raise Invalid("%s %s is refused: not a plain absolute path" % (what, show(value)))
    return value


def number(value: str, what: str, lo: int = 0, hi: int = 2 ** 53) -> int:
    if not re.fullmatch(r"-?\d{1,16}", value or "") or not lo <= int(value) <= hi:
        raise Invalid("%s %s is refused: expected a whole number from %d to %d" % (what, show(value), lo, hi))
    return int(value)
