"""The EqualLogic group CLI over SSH: one interactive session per action (or SAN phase).

    with client.session(group) as s:          # group: client.Group (from config.py)
        iqn = s.create_volume("disk.7", 1024, "default", "OpenNebula image 7")
        s.set_multihost("disk.7", True)

How a session works (equallogic-and-peers.md 2.2 and 3.2, performance-baselines.md):
* a slot of the cross-process semaphore of this group is taken first (locks.py), so
  at most EQL_MAX_SESSIONS sessions of all oneiscsi processes run at once;
* the TCP socket is connected here with TCP_NODELAY and handed to paramiko
  (paramiko's own socket loses ~40 ms per exchange to Nagle + delayed ACK);
* the host key must be in EQL_KNOWN_HOSTS (RejectPolicy: never added automatically);
* one interactive shell; the prompt (`<group>> `) is learnt from the first one; the
  terminal set-up (`stty columns 255`, `cli-settings ... off`) is sent once, in one
  write, and read back prompt by prompt;
* each command is one line; its output is read up to the next prompt within the
  per-command timeout; the terminal's echo is removed; `% Error` / `Error:` lines
  raise CliError carrying the group's message (never retried);
* transport faults (connection refused or dropped, timeouts, the group refusing a
  session) are retried a bounded number of times with jitter: opening a session
  always, a command only when sending it twice is harmless (`Command.retry_safe`).
  Otherwise TransportError says the outcome is unknown and the action cleans up.

paramiko is imported here only, and only when a session opens.
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import socket
import time

from oneiscsi import locks, log
from oneiscsi.errors import Failure
from oneiscsi.san import cli, parse

PROMPT_RE = re.compile(r"(?:^|\n)([A-Za-z0-9][A-Za-z0-9._-]{0,63}(?:\([^)\r\n]{1,80}\))?> )$")
CONFIRM_RE = re.compile(r"\(y/n\) \[[yn]\]\s*$")
RECV = 65536


class SanError(Failure):
    """A SAN operation failed; the message is one line for the operator."""


class CliError(SanError):
    """The group answered `% Error - <message>`."""

    def __init__(self, message: str, command: str = ""):
        self.message, self.command = message, command
        super().__init__("EqualLogic group: %s (command: %s)" % (message, command) if command
                         else "EqualLogic group: %s" % message)

    @property
    def not_found(self) -> bool:
        return "does not exist" in self.message.lower()


class TransportError(SanError):
    """The session broke (or never opened). `unsure`: a command was sent and may have run."""

    unsure = False


class SessionRefused(TransportError):
    """The group closed a new session at once (its CLI session limit, for example)."""


class HostKeyError(SanError):
    """The group's host key is unknown or does not match EQL_KNOWN_HOSTS (never retried)."""


class AuthError(SanError):
    """The group refused the user name, password or key (never retried)."""


class Group:
    """Where and how to reach one group (built by config.py)."""

    def __init__(self, host, port=22, user="", password="", key_file="", known_hosts="",
                 max_sessions=7, session_wait=60.0, timeout=60.0, retries=3, connect_timeout=15.0,
                 nodelay=True):
        self.host, self.port, self.user = host, int(port), user
        self.password, self.key_file, self.known_hosts = password, key_file, known_hosts
        self.max_sessions, self.session_wait = int(max_sessions), float(session_wait)
        self.timeout, self.retries = float(timeout), int(retries)
        self.connect_timeout = float(connect_timeout)
        self.nodelay = nodelay  # False only to measure what TCP_NODELAY saves (bench/san.py)
        if password:
            log.secret(password)

    @property
    def address(self) -> str:
        host = "[%s]" % self.host if ":" in self.host else self.host
        return host if self.port == 22 else "%s:%d" % (host, self.port)

    @property
    def identity(self) -> str:
        """The group, whatever name or address the configuration uses for it: see group_identity."""
        return group_identity(self.host, self.port)

    @property
    def lock_name(self) -> str:
        return "eql-sessions-%s" % self.identity


_identities = {}


def group_identity(host: str, port: int = 22) -> str:
    """One key per group for the session semaphore and volume locks, so that an IP address
    and a DNS name of one group share one limit: the address `host` resolves to (the
    lowest IPv4 address, else the lowest IPv6 one, in canonical form) and the SSH port,
    e.g. `192.0.2.10:22`, `[2001:db8::1]:22`. Resolved once per process; a name that does
    not resolve keeps its lower-cased spelling (the connection will fail and say why)."""
    import ipaddress
    key = (host, int(port))
    if key not in _identities:
        name = host.strip().strip("[]")
        addrs = []
        try:
            addrs.append(ipaddress.ip_address(name.split("%")[0]))
        except ValueError:
            try:
                infos = socket.getaddrinfo(name, int(port), 0, socket.SOCK_STREAM)
            except (OSError, UnicodeError):
                infos = []
            for info in infos:
                try:
                    addrs.append(ipaddress.ip_address(info[4][0].split("%")[0]))
                except ValueError:
                    pass
        addrs = [a.ipv4_mapped if getattr(a, "ipv4_mapped", None) else a for a in addrs]
        if addrs:
            best = min(addrs, key=lambda a: (a.version, int(a)))
            text = str(best) if best.version == 4 else "[%s]" % best
        else:
            text = name.lower().rstrip(".")
        _identities[key] = "%s:%d" % (text, int(port))
    return _identities[key]


def _jitter(attempt: int) -> float:
    return min(5.0, random.uniform(0.1, 0.4) * (2 ** attempt))


@contextlib.contextmanager
def session(group: Group):
    """One CLI session to `group` (see the module docstring); closed on exit."""
    hint = (" (EQL_MAX_SESSIONS=%d, EQL_SESSION_WAIT=%d s); other oneiscsi actions are using "
            "the group: raise these or look for stuck processes" % (group.max_sessions, group.session_wait))
    with locks.semaphore(group.lock_name, group.max_sessions, group.session_wait,
                         "CLI sessions to EqualLogic group %s" % group.address, hint=hint):
        s = Session(group)
        try:
            s.open()
            yield s
        finally:
            s.close()


class Session:
    def __init__(self, group: Group):
        self.group = group
        self.prompt = ""
        self.sessions_opened = 0
        self.commands_sent = 0
        self._client = None
        self._chan = None
        self._buf = ""

    # ---- connection ---------------------------------------------------------------
    def open(self) -> None:
        g = self.group
        for attempt in range(g.retries + 1):
            try:
                self._connect()
                return
            except TransportError as e:
                self._drop()
                if attempt >= g.retries:
                    raise TransportError("cannot open a CLI session to EqualLogic group %s after %d "
                                         "attempts: %s" % (g.address, attempt + 1, _reason(e))) from None
                log.debug("SAN session to %s failed (%s); retrying" % (g.address, e))
                time.sleep(_jitter(attempt))

    def _connect(self) -> None:
        import logging
        import paramiko  # lazily: only actions that talk to the group pay for it
        logging.getLogger("paramiko").addHandler(logging.NullHandler())  # never on stderr
        g = self.group
        try:
            sock = socket.create_connection((g.host, g.port), timeout=g.connect_timeout)
        except OSError as e:
            raise TransportError("cannot connect to %s: %s" % (g.address, e.strerror or e)) from None
        if g.nodelay:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = paramiko.SSHClient()
        self._client = client
        known = os.path.expanduser(g.known_hosts or "~/.ssh/known_hosts")
        keyscan = "ssh-keyscan%s %s >> %s" % ("" if g.port == 22 else " -p %d" % g.port, g.host, known)
        try:
            client.load_host_keys(known)
        except OSError:
            sock.close()
            raise HostKeyError("cannot read EQL_KNOWN_HOSTS %s: the host key of EqualLogic group %s "
                               "cannot be checked; after checking the key's fingerprint with the group "
                               "administrator run: %s" % (known, g.address, keyscan)) from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        try:
            client.connect(g.host, port=g.port, username=g.user, password=g.password or None,
                           key_filename=g.key_file or None, sock=sock, timeout=g.connect_timeout,
                           banner_timeout=g.connect_timeout, auth_timeout=g.connect_timeout,
                           look_for_keys=False, allow_agent=False)
        except paramiko.BadHostKeyException:
            raise HostKeyError("the host key of EqualLogic group %s does NOT match the one in %s: "
                               "refusing to connect (if the group's key really changed, remove the "
                               "old line and run: %s)" % (g.address, known, keyscan)) from None
        except paramiko.AuthenticationException:
            raise AuthError("EqualLogic group %s refused the login of user %r (check EQL_USER and "
                            "EQL_PASS, EQL_PASS_FILE or EQL_KEY)" % (g.address, g.user)) from None
        except paramiko.SSHException as e:
            if "not found in known_hosts" in str(e):
                raise HostKeyError("the host key of EqualLogic group %s is unknown: it is not in "
                                   "EQL_KNOWN_HOSTS %s; after checking its fingerprint with the group "
                                   "administrator run: %s" % (g.address, known, keyscan)) from None
            raise TransportError("SSH to %s failed: %s" % (g.address, e)) from None
        except (OSError, EOFError) as e:
            raise TransportError("SSH to %s failed: %s" % (g.address, e)) from None
        try:
            self._chan = client.invoke_shell(term="vt100", width=parse.COLUMNS, height=24)
        except (paramiko.SSHException, OSError, EOFError) as e:
            raise TransportError("the group did not open a CLI shell: %s" % e) from None
        self.sessions_opened += 1
        first = self._read_prompts(1, "login", learn=True)
        log.debug("SAN session to %s open, prompt %r, banner %d lines" % (g.address, self.prompt,
                                                                          len(parse.lines(first[0]))))
        setup = cli.SETUP
        self._send("".join(c.text + "\r" for c in setup), "terminal set-up")
        for c, text in zip(setup, self._read_prompts(len(setup), "terminal set-up")):
            msg = parse.error_message(parse.lines(parse.strip_echo(text, c.text)))
            if msg:
                log.debug("SAN set-up command %r answered: %s" % (c.text, msg))

    def close(self) -> None:
        if self.sessions_opened:
            log.debug("SAN %s: %d session(s), %d command(s)" % (self.group.address, self.sessions_opened,
                                                                self.commands_sent))
        self._drop()

    def _drop(self) -> None:
        for obj in (self._chan, self._client):
            if obj is not None:
                try:
                    obj.close()
                except Exception:  # closing a broken transport may raise anything
                    pass
        self._chan = self._client = None
        self._buf = ""

    # ---- wire -----------------------------------------------------------------------
    def _send(self, data: str, what: str) -> None:
        try:
            self._chan.sendall(data.encode("utf-8"))
        except Exception as e:  # socket.error, paramiko.SSHException, EOFError
            raise TransportError("lost the connection to group %s while sending %s: %s"
                                 % (self.group.address, what, _reason(e))) from None

    def _read_prompts(self, count: int, what: str, learn: bool = False) -> list:
        """Read until `count` prompts arrived -> the text before each (learns the prompt first)."""
        deadline = time.monotonic() + self.group.timeout
        out = []
        while True:
            while self.prompt and len(out) < count:
                cut = self._prompt_at()
                if cut is None:
                    break
                out.append(self._buf[:cut])
                self._buf = self._buf[cut + len(self.prompt):]
            if len(out) >= count:
                return out
            if learn and not self.prompt:
                m = PROMPT_RE.search(self._buf)
                if m:
                    self.prompt = m.group(1)
                    continue
            if CONFIRM_RE.search(self._buf):
                raise TransportError("the group asked for a confirmation during %s" % what)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TransportError("no answer from group %s within %d s to %s"
                                     % (self.group.address, self.group.timeout, what))
            try:
                self._chan.settimeout(remaining)
                data = self._chan.recv(RECV)
            except socket.timeout:
                continue
            except Exception as e:
                raise TransportError("lost the connection to group %s during %s: %s"
                                     % (self.group.address, what, _reason(e))) from None
            if not data:
                msg = parse.error_message(parse.lines(self._buf))
                if learn and msg:
                    raise SessionRefused("group %s refused the session: %s" % (self.group.address, msg))
                raise TransportError("group %s closed the connection during %s"
                                     % (self.group.address, what))
            self._buf += data.decode("utf-8", "replace")

    def _prompt_at(self):
        """Index of the first prompt that starts a line in the buffer, else None."""
        start = 0
        while True:
            i = self._buf.find(self.prompt, start)
            if i < 0:
                return None
            if i == 0 or self._buf[i - 1] in "\r\n":
                return i
            start = i + 1

    def run(self, cmd: cli.Command) -> list:
        """Send one command, return its output lines; CliError on `% Error` lines.

        A broken session is re-opened; the command is sent again only if it is retry-safe
        (or was never sent). Otherwise TransportError with `unsure` set."""
        if not isinstance(cmd, cli.Command):
            raise TypeError("only cli.Command objects are sent to a group")
        attempts = 1 + self.group.retries
        for attempt in range(attempts):
            sent = False
            try:
                if self._chan is None:
                    self._connect()
                sent = True
                return self._exchange(cmd)
            except TransportError as e:
                self._drop()
                unsure = sent and not cmd.retry_safe
                if unsure or attempt + 1 >= attempts:
                    err = TransportError("%s; the group may or may not have done %r" % (_reason(e), cmd.text)
                                         if unsure else _reason(e))
                    err.unsure = unsure
                    raise err from None
                log.debug("SAN command %r: %s; retrying" % (cmd.text, e))
                time.sleep(_jitter(attempt))
        raise AssertionError("unreachable")

    def _exchange(self, cmd: cli.Command) -> list:
        log.debug("SAN> %s" % cmd.text)
        self._send(cmd.text + "\r", repr(cmd.text))
        self.commands_sent += 1
        text = self._read_prompts(1, repr(cmd.text))[0]
        out = parse.lines(parse.strip_echo(text, cmd.text))
        while out and not out[-1].strip():
            out.pop()
        msg = parse.error_message(out)
        if msg:
            log.debug("SAN< %% Error: %s" % msg)
            raise CliError(msg, cmd.text)
        return out

    # ---- operations -------------------------------------------------------------
    def pool_space(self, pool: str):
        """-> (total_mb, free_mb) of a pool."""
        return _parsed(parse.pool_space, self.run(cli.pool_show(pool)), "pool select show")

    def create_volume(self, name, size_mb, pool, description="", thin=(), unrestricted=False) -> str:
        out = self.run(cli.volume_create(name, size_mb, pool, description, thin, unrestricted))
        return _parsed(parse.target_iqn, out, "volume create")

    def clone_volume(self, src, new, description="", unrestricted=False) -> str:
        return _parsed(parse.target_iqn, self.run(cli.volume_clone(src, new, description, unrestricted)),
                       "volume clone")

    def clone_snapshot(self, vol, snap, new, description="", unrestricted=False) -> str:
        return _parsed(parse.target_iqn,
                       self.run(cli.snapshot_clone(vol, snap, new, description, unrestricted)),
                       "snapshot clone")

    def volume_info(self, name):
        """Fields of `volume select V show` plus 'iqn', or None when the volume does not exist."""
        try:
            out = self.run(cli.volume_show(name))
        except CliError as e:
            if e.not_found:
                return None
            raise
        info = parse.fields(out)
        info["iqn"] = _parsed(parse.iqn_field, out, "volume show")
        return info

    def await_volume(self, name, wait: float):
        """volume_info(name), asked again until the volume exists or `wait` seconds passed.

        For the check after a create or clone whose answer never came (TransportError
        `unsure`): the session that sent it is closed, so its reply can no longer reach
        us, but nothing documents that a group stops a command when its CLI session goes
        (equallogic-and-peers.md 2.2 and 5: cinder's with_timeout abandons the channel and
        checks nothing), so the group may still finish it for a while."""
        deadline = time.monotonic() + wait
        pause = 0.25
        while True:
            info = self.volume_info(name)
            left = deadline - time.monotonic()
            if info is not None or left <= 0:
                return info
            time.sleep(min(pause, left))
            pause = min(pause * 2, 5.0)

    def volumes(self) -> list:
        return _parsed(parse.volume_table, self.run(cli.volume_list()), "volume show")

    def set_multihost(self, name, enable=True) -> None:
        self.run(cli.multihost(name, enable))

    def add_access(self, name, record) -> int:
        return _parsed(parse.access_created_id, self.run(cli.access_create(name, record)), "access create")

    def access_records(self, name) -> list:
        return _parsed(parse.access_table, self.run(cli.access_show(name)), "access show")

    def _unless_gone(self, *cmds) -> bool:
        """Run `cmds`; False (not an error) when the group says the object does not exist."""
        try:
            for c in cmds:
                self.run(c)
            return True
        except CliError as e:
            if e.not_found:
                return False
            raise

    def delete_access(self, name, rid) -> bool:
        """False when the record (or the volume) no longer exists."""
        return self._unless_gone(cli.access_delete(name, rid))

    def set_online(self, name, online=True) -> None:
        self.run(cli.volume_online(name, online))

    def delete_volume(self, name) -> bool:
        """Offline, then delete. False when it did not exist."""
        return self._unless_gone(cli.volume_online(name, False), cli.volume_delete(name))

    def snapshots(self, vol) -> list:
        return _parsed(parse.snapshot_table, self.run(cli.snapshot_list(vol)), "snapshot show")

    def create_snapshot(self, vol, description="") -> str:
        return _parsed(parse.snapshot_created, self.run(cli.snapshot_create(vol, description)),
                       "snapshot create-now")

    def rename_snapshot(self, vol, old, new) -> None:
        self.run(cli.snapshot_rename(vol, old, new))

    def delete_snapshot(self, vol, snap) -> bool:
        """False when it did not exist."""
        return self._unless_gone(cli.snapshot_delete(vol, snap))

    def set_snapshot_online(self, vol, snap, online=True) -> bool:
        """False when the snapshot does not exist."""
        return self._unless_gone(cli.snapshot_online(vol, snap, online))

    def snapshot_iqn(self, vol, snap) -> str:
        """The snapshot's own iSCSI name (`iSCSI Name:` of `snapshot select S show`)."""
        return _parsed(parse.iqn_field, self.run(cli.snapshot_show(vol, snap)), "snapshot show")

    def restore_snapshot(self, vol, snap) -> None:
        self.run(cli.snapshot_restore(vol, snap))

    def grow_volume(self, name, size_mb, snap=False) -> None:
        self.run(cli.volume_grow(name, size_mb, snap))


def _parsed(fn, out, what):
    try:
        return fn(out)
    except parse.ParseError as e:
        raise SanError("unexpected answer of the EqualLogic group to %s: %s" % (what, e)) from None


def _reason(e) -> str:
    return str(e) or type(e).__name__
