"""Pure parsers of EqualLogic group CLI output (reference: equallogic-and-peers.md 0, 2.3-2.5, 3.2).

Input is the text a command printed (echo and prompt already removed, see client.py),
as a list of lines. Nothing here talks to a group. A line longer than the terminal
is hard-wrapped (cut every N characters; the session asks for 255 columns, so an IQN
line never is); table cells (names, initiators) wrap inside their column onto
indented lines. IQNs and names are re-joined without separators.
"""
from __future__ import annotations

import math
import re

ERROR_PREFIXES = ("% Error", "Error:")
_IP_PATTERN = re.compile(r"^[0-9*]{1,3}(\.[0-9*]{1,3}){3}$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*(MB|GB|TB|M|G|T)?$", re.IGNORECASE)
_SCALE = {"M": 1, "G": 1024, "T": 1024 * 1024}


class ParseError(ValueError):
    """The output does not have the expected shape; str() says what was missing."""


def lines(text: str) -> list:
    """Output text -> lines without line endings (CRLF, CR or LF)."""
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


COLUMNS = 255  # the terminal width every session asks for (pty request and `stty columns`)


def _continuation(out: list, i: int, width: int = COLUMNS) -> list:
    """Lines that continue line i: indented ones, or, after a line of exactly `width`
    characters, the pieces of a terminal's hard wrap (cut every `width` characters)."""
    cont = []
    for j in range(i + 1, len(out)):
        line = out[j]
        if not line.strip():
            break
        if line[:1] in (" ", "\t"):
            cont.append(line.strip())
        elif len(out[j - 1]) == width:
            cont.append(line)
        else:
            break
    return cont


def error_message(out: list, width: int = COLUMNS):
    """The group's message when the output holds an error line (`% Error - msg`, `Error: msg`), else None."""
    for i, line in enumerate(out):
        s = line.strip()
        if s.startswith(ERROR_PREFIXES):
            cont = _continuation(out, i, width)
            hard = cont and not out[i + 1][:1].isspace()
            s = (line + "".join(cont)).strip() if hard else " ".join([s] + cont)
            msg = s[len("% Error"):] if s.startswith("% Error") else s[len("Error:"):]
            msg = msg.strip().lstrip("-").strip()
            return msg or s
    return None


def _records(out: list) -> list:
    """Lines grouped with their indented continuation lines: [(first line, [continuations])]."""
    recs = []
    for line in out:
        if not line.strip():
            continue
        if line[:1] in (" ", "\t") and recs:
            recs[-1][1].append(line.strip())
        else:
            recs.append((line.rstrip(), []))
    return recs


def _iqn_after(out: list, phrase: str, width: int):
    for i, line in enumerate(out):
        if phrase in line:
            rest = line.split(phrase, 1)[1] + "".join(_continuation(out, i, width))
            token = "".join(rest.split())
            token = token[:-1] if token.endswith(".") and phrase.endswith(" is") else token
            if token.lower().startswith(("iqn.", "eui.", "naa.")):
                return token
            raise ParseError("no iSCSI name after %r" % phrase.strip())
    return None


def target_iqn(out: list, width: int = COLUMNS) -> str:
    """IQN from `iSCSI target name is <iqn>.` (create, clone), wrapped or not."""
    iqn = _iqn_after(out, "iSCSI target name is", width)
    if iqn is None:
        raise ParseError("no 'iSCSI target name is' line")
    return iqn


def field_key(name: str) -> str:
    """A field name as a person reads it: case, hyphens, underscores and blanks ignored
    (`Multihost-access`, `MultiHostAccess` and `multihost access` are one field)."""
    return re.sub(r"[\s_-]+", "", name).lower()


class Fields(dict):
    """`Key: value` pairs as the group printed them; lookups (`[]`, `get`, `in`) match
    keys by `field_key`, so either spelling of a field is found."""

    def _key(self, name):
        if dict.__contains__(self, name):
            return name
        want = field_key(name)
        return next((k for k in self if field_key(k) == want), name)

    def __getitem__(self, name):
        return dict.__getitem__(self, self._key(name))

    def __contains__(self, name):
        return dict.__contains__(self, self._key(name))

    def get(self, name, default=None):
        return dict.get(self, self._key(name), default)


def field(info, name: str, default: str = "") -> str:
    """The value of field `name` of a detail view (a dict from `fields` or any dict),
    matched by `field_key`; `default` when absent."""
    if info is None:
        return default
    want = field_key(name)
    return next((v for k, v in info.items() if field_key(k) == want), default)


def fields(out: list) -> Fields:
    """`Key: value` lines of a detail view (volume/pool/snapshot show) -> Fields {key: value}.

    Indented continuation lines are joined with one blank; use `iqn_field` for names.
    Look fields up with `field(info, "multihost access")` (or `info["Multihost-access"]`):
    the spelling of a name (case, hyphens, blanks) does not matter."""
    result = Fields()
    for first, conts in _records(out):
        key, sep, value = first.partition(":")
        if not sep or not key.strip() or len(key) > 40:
            continue
        result[key.strip()] = " ".join([value.strip()] + conts).strip()
    return result


def iqn_field(out: list, width: int = COLUMNS) -> str:
    """`iSCSI Name: <iqn>` (any spelling of the field name) of `volume select V show`,
    re-joined when wrapped or cut."""
    for i, line in enumerate(out):
        key, sep, rest = line.partition(":")
        if sep and field_key(key) == "iscsiname":
            token = "".join((rest + "".join(_continuation(out, i, width))).split())
            if token.lower().startswith(("iqn.", "eui.", "naa.")):
                return token
            raise ParseError("no iSCSI name after %r" % key.strip())
    raise ParseError("no 'iSCSI Name:' line")


def size_mb(text: str) -> int:
    """'111GB' / '1.50GB' / '1536.0MB' / '2TB' / '100' (MB) -> MB, rounded up."""
    m = _SIZE.match((text or "").strip())
    if not m:
        raise ParseError("not a size: %r" % text)
    unit = (m.group(2) or "M")[0].upper()
    return int(math.ceil(float(m.group(1)) * _SCALE[unit]))


def pool_space(out: list):
    """`pool select P show` -> (total_mb, free_mb) from TotalCapacity and FreeSpace."""
    f = fields(out)
    try:
        return size_mb(f["TotalCapacity"]), size_mb(f["FreeSpace"])
    except KeyError as e:
        raise ParseError("no %s line in the pool information" % e) from None


def _table_rows(out: list):
    """Rows of a table (after the `---` line) with their continuation lines."""
    body, seen = [], False
    for line in out:
        if not seen:
            seen = line.strip().startswith("---")
            continue
        body.append(line)
    if not seen:
        return []
    return _records(body)


def volume_table(out: list) -> list:
    """`volume show` -> [{name, size, snapshots, status, permission, connections, thin}]."""
    rows = []
    for first, conts in _table_rows(out):
        w = first.split()
        if len(w) < 7:
            raise ParseError("unexpected volume table row %r" % first)
        rows.append({"name": w[0] + "".join(conts), "size": w[1], "snapshots": int(w[2]),
                     "status": w[3], "permission": w[4], "connections": int(w[5]), "thin": w[6] == "Y"})
    return rows


def snapshot_table(out: list) -> list:
    """`volume select V snapshot show` -> [{name, permission, status, connections}]."""
    rows = []
    for first, conts in _table_rows(out):
        w = first.split()
        if len(w) < 4:
            raise ParseError("unexpected snapshot table row %r" % first)
        rows.append({"name": w[0] + "".join(conts), "permission": w[1], "status": w[2],
                     "connections": int(w[3]) if w[3].isdigit() else 0})
    return rows


def access_table(out: list) -> list:
    """`volume select V access show` -> [{id, initiator, ipaddress, authmethod, username, apply_to}].

    Columns: ID, Initiator (may be empty; wraps inside its column), Ipaddress,
    AuthMethod, UserName (only with chap), Apply-To."""
    rows = []
    for first, conts in _table_rows(out):
        w = first.split()
        if not w or not w[0].isdigit():
            raise ParseError("unexpected access table row %r" % first)
        ip = next((i for i in (1, 2) if i < len(w) and _IP_PATTERN.match(w[i])), None)
        if ip is None or len(w) < ip + 3:
            raise ParseError("unexpected access table row %r" % first)
        rows.append({"id": int(w[0]), "initiator": (w[1] if ip == 2 else "") + "".join(conts),
                     "ipaddress": w[ip], "authmethod": w[ip + 1],
                     "username": w[ip + 2] if len(w) > ip + 3 else "", "apply_to": w[-1]})
    return rows


def access_created_id(out: list) -> int:
    """`Access control record created with ID <n>.` -> n."""
    m = re.search(r"created with ID (\d+)", " ".join(out))
    if not m:
        raise ParseError("no 'created with ID' line")
    return int(m.group(1))


def snapshot_created(out: list) -> str:
    """`Snapshot name is <name>` (with or without a final period) -> name."""
    for first, conts in _records(out):
        if "Snapshot name is" in first:
            name = "".join((first.split("Snapshot name is", 1)[1] + "".join(conts)).split())
            return name[:-1] if name.endswith(".") else name
    raise ParseError("no 'Snapshot name is' line")


def strip_echo(text: str, command: str) -> str:
    """Output of one command with the terminal's echo of `command` removed.

    The echo may be wrapped by the terminal (line breaks, indentation); if the
    text does not start with the echo it is returned unchanged."""
    i, j, n = 0, 0, len(text)
    while j < len(command):
        if i >= n:
            return ""
        if text[i] == command[j]:
            i, j = i + 1, j + 1
        elif text[i] in "\r\n" or (text[i] == " " and i > 0 and text[i - 1] in "\n "):
            i += 1
        else:
            return text
    while i < n and text[i] in "\r\n":
        i += 1
    return text[i:]
