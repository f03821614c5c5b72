"""The group CLI of the EqualLogic simulator: parse one command line, act on the
``Group``, and produce the lines a PS group prints (reference:
equallogic-and-peers.md section 0, 2.3, 3.2).

Behaviour worth knowing when writing a client against it:
- Keywords may be abbreviated to a unique prefix (``vol sel v show``).
- Words are separated by blanks; '...' or "..." quote a word (no escapes).
- Lines longer than the session width are hard-wrapped: cut every N characters,
  no indent, so joining the pieces without a separator restores the line (what
  the ONE add-on's ``sed '/iSCSI/,/./ !d' | tr -d '\\n'`` relies on).  The width
  is the pty request's (paramiko's invoke_shell: 80), 80 for a shell without a
  pty, none (never wrapped) for an exec request without a pty, until ``stty
  columns N``; ``stty hardwrap off`` stops wrapping.  So in a default shell the
  ``iSCSI target name is`` and ``iSCSI Name:`` lines wrap; at 255 they do not.
- Table columns (volume, snapshot and pool names, access-record initiators) wrap
  inside their column whatever the width, as on a group: continuation lines
  carry the rest of the name indented by two spaces within the column (access
  records: the initiator continues on lines indented by seven spaces).
- Interactive shells ask ``(y/n) [n]`` before ``logout``/``exit``, ``volume
  delete`` and ``snapshot delete`` until ``cli-settings confirmation off``.
  exec requests never ask.
- ``volume select V`` alone enters the volume context (prompt
  ``<group>(volume_V)> ``); ``exit`` leaves it.
- paging, events, formatoutput, idlelogout and reprintBadInput are accepted and
  shown by ``cli-settings show`` but change nothing; displayinMB prints every
  size in MB.
"""
from __future__ import annotations

import logging
import re
import time

from .eql_group import CliError, format_size

log = logging.getLogger("oneiscsi.sim.eql")

SETTINGS = ("paging", "confirmation", "events", "formatoutput", "displayinMB", "idlelogout",
            "reprintBadInput")


def _header(title):
    left = 29
    return "_" * left + " " + title + " " + "_" * max(1, 79 - left - len(title) - 2)


_CAMEL_WORDS = {"multihost": "MultiHost", "iscsi": "iSCSI"}


def camel_key(key):
    """`Multihost-access` -> `MultiHostAccess`, `iSCSI Name` -> `iSCSIName`: the other
    spelling of detail-view field names (Group.field_spelling = "camel")."""
    return "".join(_CAMEL_WORDS.get(p.lower(), p[:1].upper() + p[1:]) for p in re.split(r"[-\s]+", key) if p)


def tokenize(line):
    """Split a CLI line into words; quotes group blanks into one word."""
    words, cur, quote, have = [], [], None, False
    for c in line:
        if quote:
            if c == quote:
                quote = None
            else:
                cur.append(c)
        elif c in "'\"":
            quote, have = c, True
        elif c in " \t":
            if cur or have:
                words.append("".join(cur))
            cur, have = [], False
        else:
            cur.append(c)
    if quote:
        raise CliError("Unterminated quoted string.")
    if cur or have:
        words.append("".join(cur))
    return words


def wrap(line, columns):
    """Hard-wrap one output line at the session width, as the group's CLI does."""
    return [line[i:i + columns] for i in range(0, len(line), columns)] or [""]


def column_chunks(text, width, indent=2):
    """Split text for a table column of width: first chunk full width, then
    continuation chunks of width-indent."""
    chunks = [text[:width]]
    text = text[width:]
    while text:
        chunks.append(text[:width - indent])
        text = text[width - indent:]
    return chunks


class Result:
    def __init__(self, lines=(), error=False, logout=False, confirm=None, on_yes=None):
        self.lines, self.error, self.logout = list(lines), error, logout
        self.confirm, self.on_yes = confirm, on_yes


class CliSession:
    """One CLI session (an interactive shell or one exec request)."""

    def __init__(self, group, user="grpadmin", interactive=True, columns=80):
        """columns: terminal width (None: no terminal, lines are never wrapped)."""
        self.group, self.user, self.interactive = group, user, interactive
        self.columns = columns if columns is None or columns >= 20 else 80
        self.hardwrap = True
        self.settings = {name: name != "displayinMB" for name in SETTINGS}
        self.context = None     # volume name after a bare `volume select V`

    # ------------------------------------------------------------ framing
    def prompt(self):
        if self.context:
            return "%s(volume_%s)> " % (self.group.name, self.context)
        return "%s> " % self.group.name

    def render(self, lines):
        """Lines -> text with CRLF endings, wrapped per the session settings."""
        out = []
        for line in lines:
            out.extend(wrap(line, self.columns) if self.hardwrap and self.columns else [line])
        return "".join(line + "\r\n" for line in out)

    def size(self, mb):
        return format_size(mb, self.settings["displayinMB"])

    def _detail(self, lines):
        """A detail view (header, then `Key: value` lines) in the group's field spelling."""
        if getattr(self.group, "field_spelling", "hyphen") != "camel":
            return Result(lines)
        out = lines[:1]
        for line in lines[1:]:
            key, sep, value = line.partition(": ")
            out.append(camel_key(key) + sep + value if sep else line)
        return Result(out)

    # ----------------------------------------------------------- dispatch
    def execute(self, line) -> Result:
        try:
            words = tokenize(line)
            if not words:
                return Result()
            if self.context:
                kw = _kw(words, 0, ("exit", "logout") + VOLUME_SELECT_WORDS)
                if kw == "exit":
                    self.context = None
                    return Result()
                if kw != "logout":
                    return self._volume_select(self.context, words)
            return self._top(words)
        except CliError as e:
            return Result(["% Error - " + str(e)], error=True)
        except Exception as e:   # a simulator bug or a tgtd failure: keep the session
            log.exception("command failed: %s ...", " ".join(line.split()[:2]))
            return Result(["% Error - Internal error (" + type(e).__name__ + ")."], error=True)

    def confirmed(self, action) -> Result:
        """Run the action of a confirmation answered yes."""
        try:
            return action()
        except CliError as e:
            return Result(["% Error - " + str(e)], error=True)

    def _top(self, w):
        kw = _kw(w, 0, ("stty", "cli-settings", "grpparams", "show", "pool", "volume", "chapuser",
                        "logout", "exit", "whoami"))
        if kw in ("logout", "exit"):
            _end(w, 1)
            if self.interactive and self.settings["confirmation"]:
                return Result(confirm="Do you really want to logout? (y/n) [n]",
                              on_yes=lambda: Result(logout=True))
            return Result(logout=True)
        if kw == "whoami":
            return Result([self.user])
        return getattr(self, "_" + kw.replace("-", "_"))(w)

    # ------------------------------------------------------ session settings
    def _stty(self, w):
        if len(w) == 1:
            return Result(["columns %d rows 24 hardwrap %s"
                           % (self.columns or 0, "on" if self.hardwrap else "off")])
        kw = _kw(w, 1, ("columns", "rows", "hardwrap"))
        if kw == "hardwrap":
            self.hardwrap = _onoff(w, 2)
        else:
            n = _int(w, 2, 20, 1024)
            if kw == "columns":
                self.columns = n
        _end(w, 3)
        return Result()

    def _cli_settings(self, w):
        names = {s.lower(): s for s in SETTINGS}
        kw = _kw(w, 1, ("show",) + tuple(names))
        if kw == "show":
            _end(w, 2)
            return Result(["%s: %s" % (k, "on" if v else "off") for k, v in self.settings.items()])
        self.settings[names[kw]] = _onoff(w, 2)
        _end(w, 3)
        return Result()

    def _grpparams(self, w):
        kw = _kw(w, 1, ("show", "info-messages"))
        if kw == "info-messages":
            _kw(w, 2, ("enable", "disable"))
            _end(w, 3)
            return Result()
        _end(w, 2)
        g = self.group
        return self._detail([_header("Group Information"), "Group-Name: " + g.name,
                       "Group-Ipaddress: " + g.ip, "Def-Snap-Reserve: 100%",
                       "Def-Snap-Warn: 10%", "Def-Snap-Depletion: delete-oldest",
                       "Def-Thin-Growth-Warn: 60%", "Def-Thin-Growth-Max: 100%",
                       "Def-Iscsi-Prefix: iqn.2001-05.com.equallogic",
                       "Description: ", "Location: default"])

    # ------------------------------------------------------------------ show
    def _show(self, w):
        kw = _kw(w, 1, ("pool", "volume", "chapuser"))
        return getattr(self, "_" + kw)([kw, "show"] + w[2:])

    # ------------------------------------------------------------------ pools
    def _pool(self, w):
        kw = _kw(w, 1, ("show", "select"))
        if kw == "show":
            if len(w) > 2:
                _end(w, 3)
                return self._pool_detail(w[2])
            return self._pool_table()
        name = _arg(w, 2, "pool name")
        _kw(w, 3, ("show",))
        _end(w, 4)
        return self._pool_detail(name)

    def _pool_table(self):
        g = self.group
        lines = ["Name                 Default Members Volumes Capacity   Free",
                 "-------------------- ------- ------- ------- ---------- ----------"]
        with g.lock:
            for name in g.pools:
                u = g.pool_usage(name)
                chunks = column_chunks(name, 20)
                lines.append("%-20s %-7s %-7d %-7d %-10s %s" % (
                    chunks[0], str(name == g.default_pool()).lower(), 1, u["volumes"],
                    self.size(u["total"]), self.size(max(0, u["free"]))))
                lines.extend("  " + c for c in chunks[1:])
        return Result(lines)

    def _pool_detail(self, name):
        u = self.group.pool_usage(name)
        s = self.size
        return self._detail([_header("Pool Information"), "Name: " + name,
                       "Default: " + str(name == self.group.default_pool()).lower(),
                       "Description: ", "Members: 1", "Volumes: %d" % u["volumes"],
                       "Snapshots: %d" % u["snapshots"], "TotalCapacity: " + s(u["total"]),
                       "FreeSpace: " + s(max(0, u["free"])),
                       "VolumeReserve: " + s(u["volume_reserve"]),
                       "VolumeReportedSpace: " + s(u["reported"]),
                       "SnapshotReserve: " + s(u["snapshot_reserve"]),
                       "TotalVolumes: %d" % u["volumes"],
                       "TotalSnapshots: %d" % u["snapshots"]])

    # ---------------------------------------------------------------- volumes
    def _volume(self, w):
        kw = _kw(w, 1, ("create", "show", "select", "delete", "rename"))
        if kw == "create":
            return self._volume_create(w)
        if kw == "show":
            if len(w) > 2:
                _end(w, 3)
                return self._volume_detail(self.group.volume(w[2]))
            return self._volume_table()
        if kw == "select":
            name = _arg(w, 2, "volume name")
            return self._volume_select(name, w[3:])
        if kw == "rename":
            old, new = _arg(w, 2, "volume name"), _arg(w, 3, "new volume name")
            _end(w, 4)
            self.group.rename_volume(old, new)
            return Result()
        name = _arg(w, 2, "volume name")
        _end(w, 3)
        v = self.group.volume(name)
        if v.online:
            raise CliError("Volume is online. Take the volume offline before deleting.")

        def delete():
            self.group.delete_volume(name)
            return Result(["Volume deletion succeeded."])
        return self._confirm("Do you really want to delete the volume? (y/n) [n]", delete)

    def _confirm(self, question, action):
        if self.interactive and self.settings["confirmation"]:
            return Result(confirm=question, on_yes=action)
        return action()

    def _volume_create(self, w):
        name = _arg(w, 2, "volume name")
        size = _arg(w, 3, "volume size")
        opts = {"pool": None, "thin": False, "thin_min_reserve": 10, "description": "",
                "online": True, "unrestricted": False}
        i = 4
        while i < len(w):
            kw = _kw(w, i, ("pool", "thin-provision", "thin-min-reserve", "description", "online",
                            "offline", "unrestricted", "snap-reserve", "read-write"))
            if kw == "pool":
                opts["pool"] = _arg(w, i + 1, "pool name")
                i += 1
            elif kw == "thin-provision":
                opts["thin"] = True
            elif kw == "thin-min-reserve":
                opts["thin_min_reserve"] = _percent(w, i + 1)
                i += 1
            elif kw == "snap-reserve":
                _percent(w, i + 1)
                i += 1
            elif kw == "description":
                opts["description"] = _arg(w, i + 1, "description")
                i += 1
            elif kw in ("online", "offline"):
                opts["online"] = kw == "online"
            elif kw == "unrestricted":
                opts["unrestricted"] = True
            i += 1
        v = self.group.create_volume(name, size, **opts)
        return Result(["Volume creation succeeded.", "iSCSI target name is %s." % v.iqn])

    def _clone_opts(self, w, i):
        opts = {"description": "", "online": True, "unrestricted": False}
        while i < len(w):
            kw = _kw(w, i, ("description", "online", "offline", "unrestricted"))
            if kw == "description":
                opts["description"] = _arg(w, i + 1, "description")
                i += 1
            elif kw in ("online", "offline"):
                opts["online"] = kw == "online"
            else:
                opts["unrestricted"] = True
            i += 1
        return opts

    def _volume_table(self):
        g = self.group
        lines = ["Name            Size       SnapShots Status         Permission Connections T",
                 "--------------- ---------- --------- -------------- ---------- ----------- -"]
        with g.lock:
            conns = g.connections()
            for v in g.volumes.values():
                chunks = column_chunks(v.name, 15)
                lines.append("%-15s %-10s %-9d %-14s %-10s %-11d %s" % (
                    chunks[0], self.size(v.size_mb), len(v.snapshots),
                    "online" if v.online else "offline", "read-write", conns.get(v.iqn, 0),
                    "Y" if v.thin else "N"))
                lines.extend("  " + c for c in chunks[1:])
        return Result(lines)

    def _volume_detail(self, v):
        s = self.size
        status = "online" if v.online else "offline"
        reserve = v.space_mb()
        return self._detail([
            _header("Volume Information"), "Name: " + v.name, "Size: " + s(v.size_mb),
            "VolReserve: " + s(reserve), "VolReserveInUse: " + s(reserve),
            "ReplReserveInUse: 0MB", "iSCSI Alias: " + v.name, "iSCSI Name: " + v.iqn,
            "ActualMembers: 1", "Snap-Warn: 10%", "Snap-Depletion: delete-oldest",
            "Description: " + v.description, "Snap-Reserve: 100%",
            "Snap-Reserve-Avail: 100%% (%s)" % s(v.size_mb), "Permission: read-write",
            "DesiredStatus: " + status, "Status: " + status,
            "Connections: %d" % self.group.connections().get(v.iqn, 0),
            "Snapshots: %d" % len(v.snapshots), "Bind: ", "Type: not-replicated",
            "ReplicationReserveSpace: 0MB", "Replicas: 0", "ReplicationPartner: ",
            "Pool: " + v.pool, "Cloned-From: " + v.cloned_from,
            "Thin-Provision: " + ("enabled" if v.thin else "disabled"),
            "Thin-Min-Reserve: %d%% (%s)" % (v.thin_min_reserve if v.thin else 0,
                                             s(reserve if v.thin else 0)),
            "Multihost-access: " + ("enabled" if v.multihost else "disabled")])

    def _volume_select(self, name, w):
        """w: the words after `volume select NAME`."""
        g = self.group
        if not w:
            g.volume(name)
            if not self.interactive:
                raise CliError("Incomplete command.")
            self.context = name
            return Result()
        kw = _kw(w, 0, VOLUME_SELECT_WORDS)
        if kw == "show":
            _end(w, 1)
            return self._volume_detail(g.volume(name))
        if kw in ("offline", "online"):
            _end(w, 1)
            g.set_online(name, kw == "online")
            return Result()
        if kw == "multihost-access":
            on = _kw(w, 1, ("enable", "disable")) == "enable"
            _end(w, 2)
            g.set_multihost(name, on)
            return Result()
        if kw == "description":
            text = _arg(w, 1, "description")
            _end(w, 2)
            g.set_description(name, text)
            return Result()
        if kw == "size":
            size = _arg(w, 1, "volume size")
            snap = True
            if len(w) > 2:
                _kw(w, 2, ("no-snap",))
                snap = False
                _end(w, 3)
            g.resize_volume(name, size, snap=snap)
            return Result()
        if kw == "clone":
            new = _arg(w, 1, "new volume name")
            v = g.clone_volume(name, new, **self._clone_opts(w, 2))
            return Result(["Volume creation succeeded.", "iSCSI target name is %s." % v.iqn])
        if kw == "access":
            return self._access(name, w)
        return self._snapshot(name, w)

    # ---------------------------------------------------------- access records
    def _access(self, vol, w):
        kw = _kw(w, 1, ("create", "show", "delete"))
        if kw == "show":
            _end(w, 2)
            return self._access_table(self.group.volume(vol))
        if kw == "delete":
            rid = _arg(w, 2, "access record ID")
            _end(w, 3)
            self.group.delete_access(vol, rid)
            return Result()
        opts, i = {}, 2
        keys = ("initiator", "ipaddress", "username", "authmethod", "apply-to")
        while i < len(w):
            key = _kw(w, i, keys)
            if key == "authmethod":
                value = _kw(w, i + 1, ("chap", "none"))
            elif key == "apply-to":
                value = _kw(w, i + 1, ("volume", "snapshot", "both"))
            else:
                value = _arg(w, i + 1, key)
            opts[key.replace("-", "_")] = value
            i += 2
        rid = self.group.add_access(vol, **opts)
        return Result(["Access control record created with ID %d." % rid])

    def _access_table(self, v):
        lines = ["ID  Initiator       Ipaddress     AuthMethod UserName   Apply-To",
                 "--- --------------- ------------- ---------- ---------- --------"]
        for a in v.access:
            chunks = column_chunks(a.initiator or "", 29, indent=3)
            user = a.username if a.authmethod == "chap" else ""
            lines.append(("%-3d %-29s %-13s %-11s " % (a.id, chunks[0], a.ipaddress or "*.*.*.*",
                                                       a.authmethod)
                          + ("%-10s " % user if user else "") + a.apply_to))
            lines.extend("       " + c for c in chunks[1:])
        return Result(lines)

    # -------------------------------------------------------------- snapshots
    def _snapshot(self, vol, w):
        g = self.group
        kw = _kw(w, 1, ("create-now", "show", "select", "delete", "rename"))
        if kw == "create-now":
            desc = ""
            if len(w) > 2:
                _kw(w, 2, ("description",))
                desc = _arg(w, 3, "description")
                _end(w, 4)
            s = g.create_snapshot(vol, desc)
            return Result(["Snapshot creation succeeded.", "Snapshot name is " + s.name])
        if kw == "show":
            if len(w) > 2:
                _end(w, 3)
                return self._snapshot_detail(g.snapshot(vol, w[2]))
            return self._snapshot_table(g.volume(vol))
        if kw == "rename":
            old, new = _arg(w, 2, "snapshot name"), _arg(w, 3, "new snapshot name")
            _end(w, 4)
            g.rename_snapshot(vol, old, new)
            return Result()
        snap = _arg(w, 2, "snapshot name")
        if kw == "delete":
            _end(w, 3)
            g.snapshot(vol, snap)

            def delete():
                g.delete_snapshot(vol, snap)
                return Result(["Snapshot deletion succeeded."])
            return self._confirm("Do you really want to delete the snapshot? (y/n) [n]", delete)
        sub = _kw(w, 3, ("show", "clone", "restore", "online", "offline"))
        if sub == "show":
            _end(w, 4)
            return self._snapshot_detail(g.snapshot(vol, snap))
        if sub == "clone":
            new = _arg(w, 4, "new volume name")
            v = g.clone_snapshot(vol, snap, new, **self._clone_opts(w, 5))
            return Result(["Volume creation succeeded.", "iSCSI target name is %s." % v.iqn])
        _end(w, 4)
        if sub == "restore":
            g.restore_snapshot(vol, snap)
        else:
            g.set_snapshot_online(vol, snap, sub == "online")
        return Result()

    def _snapshot_table(self, v):
        lines = ["Name                           Permission Status         Connections",
                 "------------------------------ ---------- -------------- -----------"]
        conns = self.group.connections()
        for s in v.snapshots.values():
            chunks = column_chunks(s.name, 30)
            lines.append("%-30s %-10s %-14s %d" % (chunks[0], "read-write",
                                                   "online" if s.online else "offline",
                                                   conns.get(s.iqn, 0)))
            lines.extend("  " + c for c in chunks[1:])
        return Result(lines)

    def _snapshot_detail(self, s):
        status = "online" if s.online else "offline"
        return self._detail([
            _header("Snapshot Information"), "Name: " + s.name,
            "Timestamp: " + time.strftime("%Y-%m-%d:%H:%M:%S", time.localtime(s.created)),
            "Size: " + self.size(s.size_mb), "Status: " + status,
            "Permission: read-write", "Description: " + s.description,
            "iSCSI Name: " + s.iqn,
            "Connections: %d" % self.group.connections().get(s.iqn, 0),
            "OriginalVolumeName: " + s.volume.name])

    # -------------------------------------------------------------- CHAP users
    def _chapuser(self, w):
        kw = _kw(w, 1, ("create", "show", "delete"))
        g = self.group
        if kw == "show" and len(w) == 2:
            lines = ["Name                           Status", "-" * 30 + " " + "-" * 7]
            lines.extend("%-30s enable" % n for n in sorted(g.chapusers))
            return Result(lines)
        name = _arg(w, 2, "CHAP user name")
        if kw == "show":
            _end(w, 3)
            return Result([_header("CHAP User Information"), "Name: " + name,
                           "Password: " + g.chap_password(name), "Status: enable"])
        if kw == "delete":
            _end(w, 3)
            g.delete_chapuser(name)
            return Result(["CHAP user deletion succeeded."])
        password = None
        if len(w) > 3:
            _kw(w, 3, ("password",))
            password = _arg(w, 4, "password")
            _end(w, 5)
        pw = g.create_chapuser(name, password)
        return Result([] if password is not None else ["Password is " + pw])


VOLUME_SELECT_WORDS = ("show", "offline", "online", "multihost-access", "description", "size",
                       "clone", "access", "snapshot")


def _kw(words, i, choices):
    """The keyword among choices that words[i] names (exactly or as a unique prefix)."""
    if i >= len(words):
        raise CliError("Incomplete command.")
    w = words[i].lower()
    if w in choices:
        return w
    matches = [c for c in choices if c.startswith(w)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise CliError("Ambiguous command '%s'." % words[i])
    raise CliError("Invalid command or argument '%s'." % words[i])


def _arg(words, i, what):
    if i >= len(words) or words[i] == "":
        raise CliError("Incomplete command: missing %s." % what)
    return words[i]


def _end(words, n):
    if len(words) > n:
        raise CliError("Invalid command or argument '%s'." % words[n])


def _onoff(words, i):
    return _kw(words, i, ("on", "off")) == "on"


def _int(words, i, lo, hi):
    v = _arg(words, i, "number")
    if not v.isdigit() or not lo <= int(v) <= hi:
        raise CliError("Invalid value '%s'." % v)
    return int(v)


def _percent(words, i):
    v = _arg(words, i, "percentage").rstrip("%")
    if not v.isdigit() or int(v) > 100:
        raise CliError("Invalid percentage '%s'." % words[i])
    return int(v)
