"""EqualLogic PS group simulator: a paramiko SSH server speaking the group CLI.

    sim = EqlSim(workdir, tgtd=tgtd)        # tgtd: a started oneiscsi.sim.tgt.Tgtd, or None
    sim.start()
    ... ssh grpadmin@127.0.0.1 -p sim.port  (password "secret"), or paramiko ...
    sim.group        # shared state (oneiscsi.sim.eql_group.Group), inspectable by tests
    sim.faults       # fault injection knobs (Faults)
    sim.stop()

Password and public-key auth; ``shell`` (with or without pty) and ``exec``
requests; many channels per connection, each served by its own thread.  Every
shell or exec channel is one CLI session; past ``max_sessions`` concurrent
sessions (or while ``faults.refuse_sessions()``) a new one gets
``% Error - Maximum number of CLI sessions reached.`` and is closed with exit
status 1.  Output lines end with CRLF.  An exec request runs each line of its
command and exits 0, or 1 when any line printed an error.  The command language
and output formats are in eql_cli.py, the state and space model in eql_group.py.

``python -m oneiscsi.sim.eql --workdir D [--port P] [--user U:P|U:@FILE] ...`` runs
it in the foreground (``main(argv)``), with its own tgtd unless ``--no-tgtd``.
"""
from __future__ import annotations

import argparse
import base64
import ctypes
import hmac
import logging
import os
import re
import signal
import socket
import sys
import threading
import time

import paramiko

from .eql_cli import CliSession, Result
from .eql_group import Group

log = logging.getLogger("oneiscsi.sim.eql")
# clients that hang up mid-session make paramiko log "Socket exception": not worth a stderr line
logging.getLogger("paramiko").addHandler(logging.NullHandler())

BANNER = "\r\nWelcome to Group Manager (oneiscsi simulator)\r\n\r\nCopyright 2001-2024 Dell Inc.\r\n\r\n"
SESSION_LIMIT_LINE = "% Error - Maximum number of CLI sessions reached."
CLONE_NEWNET = 0x40000000


class _Discard(list):
    """An echo buffer that keeps nothing (shell without a pty)."""

    def append(self, item):
        pass


class _Dropped(Exception):
    """The connection was dropped on purpose (fault injection)."""


class Faults:
    """Fault injection shared by all sessions of one simulator."""

    def __init__(self):
        self._lock = threading.Lock()
        self.clear()

    def clear(self):
        with self._lock:
            self._drop_after = None
            self._drop_mid = None
            self._latency = 0.0
            self._slow = []         # [regex, seconds, times left or None]
            self._fail = []
            self._refuse = False
            self._refuse_limit = None

    def drop_after(self, n: int):
        """Answer the next n commands, then drop the SSH connection that sends the
        one after (that command is not executed).  One-shot."""
        with self._lock:
            self._drop_after = int(n)

    def drop_mid_output(self, pattern: str):
        """Run the next command matching regex pattern, send half of its output and
        drop the connection.  One-shot."""
        with self._lock:
            self._drop_mid = re.compile(pattern)

    def latency(self, sec: float, pattern: str | None = None, times: int | None = None):
        """Sleep sec seconds before running a command: every command, or (pattern) only
        the next `times` commands matching that regex (all of them when times is None).
        The command still runs after the sleep, even when the client has gone: a late
        group.  Latencies of several patterns add up with the one for every command."""
        with self._lock:
            if pattern is None:
                self._latency = float(sec)
            else:
                self._slow.append([re.compile(pattern), float(sec), None if times is None else int(times)])

    def fail_next(self, pattern: str, message: str, times: int = 1):
        """The next `times` commands matching regex pattern are not run; they print
        ``% Error - <message>`` instead."""
        if not message.startswith("% Error"):
            message = "% Error - " + message
        with self._lock:
            self._fail.append([re.compile(pattern), message, int(times)])

    def refuse_sessions(self, on: bool = True, limit: int | None = None):
        """on: refuse every new CLI session.  limit: refuse past `limit` concurrent
        sessions (instead of the simulator's max_sessions)."""
        with self._lock:
            self._refuse = bool(on)
            self._refuse_limit = limit

    def _session_limit(self, default):
        with self._lock:
            if self._refuse:
                return 0
            return self._refuse_limit if self._refuse_limit is not None else default

    def _check(self, line):
        """-> (action, message, delay): action None, 'drop', 'fail' or 'drop_mid'."""
        with self._lock:
            delay = self._latency
            for entry in list(self._slow):
                if entry[0].search(line):
                    delay += entry[1]
                    if entry[2] is not None:
                        entry[2] -= 1
                        if entry[2] <= 0:
                            self._slow.remove(entry)
            if self._drop_after is not None:
                if self._drop_after <= 0:
                    self._drop_after = None
                    return "drop", None, delay
                self._drop_after -= 1
            for entry in self._fail:
                if entry[0].search(line):
                    entry[2] -= 1
                    if entry[2] <= 0:
                        self._fail.remove(entry)
                    return "fail", entry[1], delay
            if self._drop_mid is not None and self._drop_mid.search(line):
                self._drop_mid = None
                return "drop_mid", None, delay
            return None, None, delay


def _load_pubkey(item):
    """PKey, 'type base64 [comment]' line -> PKey."""
    if isinstance(item, paramiko.PKey):
        return item
    parts = str(item).split()
    return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))


def _host_key(path):
    if not os.path.exists(path):
        tmp = "%s.%d.tmp" % (path, os.getpid())
        paramiko.RSAKey.generate(2048).write_private_key_file(tmp)
        os.replace(tmp, path)
    return paramiko.RSAKey.from_private_key_file(path)


def _socket_in_netns(netns, family):
    """A TCP socket created inside network namespace netns (via a throwaway thread)."""
    result = {}

    def run():
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open("/run/netns/" + netns, os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns(%s)" % netns)
            result["sock"] = socket.socket(family, socket.SOCK_STREAM)
        except BaseException as e:     # re-raised in the caller's thread
            result["err"] = e
        finally:
            os.close(fd)
    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "err" in result:
        raise result["err"]
    return result["sock"]


class _Server(paramiko.ServerInterface):
    """Per-connection auth and channel requests."""

    def __init__(self, sim):
        self.sim = sim
        self.user = None
        self._cond = threading.Condition()
        self._requests = {}     # chanid -> (kind, command)
        self._width = {}        # chanid -> pty width

    def get_allowed_auths(self, username):
        return "password,publickey"

    def check_auth_password(self, username, password):
        expected = self.sim.users.get(username)
        if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
            self.user = username
            return paramiko.AUTH_SUCCESSFUL
        self.sim._count("auth_failures")
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username, key):
        for user, allowed in self.sim.pubkeys:
            if ((user == username or (user is None and username in self.sim.users))
                    and allowed.get_name() == key.get_name()
                    and allowed.asbytes() == key.asbytes()):
                self.user = username
                return paramiko.AUTH_SUCCESSFUL
        return paramiko.AUTH_FAILED

    def check_channel_request(self, kind, chanid):
        if kind == "session":
            return paramiko.OPEN_SUCCEEDED
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_channel_pty_request(self, channel, term, width, height, pixelwidth, pixelheight,
                                  modes):
        self._width[channel.get_id()] = width
        return True

    def check_channel_window_change_request(self, channel, width, height, pixelwidth,
                                            pixelheight):
        return True

    def _record(self, channel, kind, command):
        with self._cond:
            self._requests[channel.get_id()] = (kind, command)
            self._cond.notify_all()
        return True

    def check_channel_shell_request(self, channel):
        return self._record(channel, "shell", None)

    def check_channel_exec_request(self, channel, command):
        return self._record(channel, "exec", command)

    def wait_request(self, chanid, timeout):
        with self._cond:
            self._cond.wait_for(lambda: chanid in self._requests, timeout)
            req = self._requests.pop(chanid, None)
        return req, self._width.pop(chanid, None)


class EqlSim:
    """The simulator; see the module docstring."""

    def __init__(self, workdir, group_name="group-0", listen="127.0.0.1", port=0, users=None,
                 pubkeys=(), pools=None, max_sessions=7, tgtd=None, group_ip=None,
                 host_key_file=None, netns=None):
        """users: {name: password} (default {"grpadmin": "secret"}).  pubkeys: keys
        (PKey or 'type base64' lines) accepted for any user in users, or (user, key)
        pairs.  pools: {name: capacity} in MB or with a unit ("2TB"); default one 2 TB
        pool "default".  group_ip: the Group-Ipaddress shown (default: the tgtd
        portal address, else listen).  host_key_file: RSA host key, generated once
        (default <workdir>/ssh_host_rsa_key).  netns: listen inside that network
        namespace."""
        self.workdir = workdir
        os.makedirs(workdir, exist_ok=True)
        self.listen, self._port, self.netns = listen, port, netns
        self.users = dict(users) if users is not None else {"grpadmin": "secret"}
        self.pubkeys = [(k[0], _load_pubkey(k[1])) if isinstance(k, tuple) else (None, _load_pubkey(k))
                        for k in pubkeys]
        self.max_sessions = max_sessions
        self.tgtd = tgtd
        if group_ip is None:
            group_ip = tgtd.portal.rpartition(":")[0].strip("[]") if tgtd is not None else listen
        self.group = Group(group_name, group_ip, pools, workdir, tgtd)
        self.faults = Faults()
        self.host_key_file = host_key_file or os.path.join(workdir, "ssh_host_rsa_key")
        self.commands = []          # every CLI line received, in order
        self.sessions_now = 0
        self.sessions_max_seen = 0
        self.sessions_total = 0
        self.sessions_refused = 0
        self.connections_total = 0
        self.auth_failures = 0
        self._lock = threading.Lock()
        self._sock = None
        self._host_key = None
        self._thread = None
        self._stopping = False
        self._transports = set()

    # ------------------------------------------------------------- lifecycle
    @property
    def port(self) -> int:
        return self._port

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self._host_key = _host_key(self.host_key_file)
        family = socket.AF_INET6 if ":" in self.listen else socket.AF_INET
        sock = _socket_in_netns(self.netns, family) if self.netns else socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listen, self._port))
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock, self._port = sock, sock.getsockname()[1]
        self._stopping = False
        self._thread = threading.Thread(target=self._accept_loop, name="eqlsim-accept", daemon=True)
        self._thread.start()

    def stop(self):
        """Stop serving, close every connection, remove the group's tgtd targets."""
        if self._sock is None:
            return
        self._stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)   # wakes the accept() at once
        except OSError:
            pass
        self._thread.join(5)
        self._sock.close()
        self._sock = None
        with self._lock:
            transports = list(self._transports)
        for t in transports:
            t.close()
        self.group.teardown()

    def host_key_line(self) -> str:
        """The known_hosts line for this simulator's host key."""
        host = self.listen if self.listen not in ("0.0.0.0", "::") else "127.0.0.1"
        name = host if self._port == 22 else "[%s]:%d" % (host, self._port)
        return "%s %s %s" % (name, self._host_key.get_name(), self._host_key.get_base64())

    def _count(self, attr, delta=1):
        with self._lock:
            setattr(self, attr, getattr(self, attr) + delta)

    # ----------------------------------------------------------- connections
    def _accept_loop(self):
        while not self._stopping:
            try:
                conn, _addr = self._sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve_connection, args=(conn,), daemon=True).start()

    def _serve_connection(self, conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t = paramiko.Transport(conn)
        t.add_server_key(self._host_key)
        server = _Server(self)
        with self._lock:
            self._transports.add(t)
            self.connections_total += 1
        try:
            t.start_server(server=server)
            while t.is_active() and not self._stopping:
                ch = t.accept(0.5)
                if ch is not None:
                    threading.Thread(target=self._serve_channel, args=(t, server, ch),
                                     daemon=True).start()
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            with self._lock:
                self._transports.discard(t)
            t.close()

    def _open_session(self):
        limit = self.faults._session_limit(self.max_sessions)
        with self._lock:
            if limit is not None and self.sessions_now >= limit:
                self.sessions_refused += 1
                return False
            self.sessions_now += 1
            self.sessions_total += 1
            self.sessions_max_seen = max(self.sessions_max_seen, self.sessions_now)
            return True

    def _serve_channel(self, t, server, ch):
        req, width = server.wait_request(ch.get_id(), 10)
        if req is None:
            ch.close()
            return
        kind, command = req
        if not self._open_session():
            try:
                ch.sendall((SESSION_LIMIT_LINE + "\r\n").encode())
                ch.send_exit_status(1)
            except (OSError, EOFError, paramiko.SSHException):
                pass
            ch.close()
            return
        rc = None
        try:
            pty = width is not None
            if not width:       # no pty: a shell still has the CLI's 80 columns
                width = 80 if kind == "shell" else None
            session = CliSession(self.group, server.user, interactive=kind == "shell",
                                 columns=width)
            if kind == "shell":
                rc = self._run_shell(t, ch, session, echo_on=pty)
            else:
                rc = self._run_exec(t, ch, session, command)
        except _Dropped:
            rc = None
        except (OSError, EOFError, paramiko.SSHException):
            rc = None
        except Exception:
            log.exception("CLI session failed")
            rc = None
        finally:
            self._count("sessions_now", -1)
        try:
            if rc is not None:
                ch.send_exit_status(rc)
            ch.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    # ------------------------------------------------------------ commands
    def _command(self, t, ch, session, line) -> Result:
        with self._lock:
            self.commands.append(line)
        action, message, delay = self.faults._check(line)
        if delay:
            time.sleep(delay)
        if action == "drop":
            t.close()
            raise _Dropped()
        if action == "fail":
            return Result([message], error=True)
        res = session.execute(line)
        if action == "drop_mid":
            data = session.render(res.lines).encode()
            ch.sendall(data[:len(data) // 2])
            time.sleep(0.05)
            t.close()
            raise _Dropped()
        return res

    def _run_exec(self, t, ch, session, command):
        rc = 0
        for line in command.decode("utf-8", "replace").replace("\r", "\n").split("\n"):
            if not line.strip():
                continue
            res = self._command(t, ch, session, line)
            ch.sendall(session.render(res.lines).encode())
            rc = 1 if res.error else rc
            if res.logout:
                break
        return rc

    def _run_shell(self, t, ch, session, echo_on=True):
        """Line editing and echo as a pty would do them (no echo without a pty)."""
        ch.sendall((BANNER + session.prompt()).encode())
        buf, skip_lf, confirm = "", False, None
        while True:
            data = ch.recv(4096)
            if not data:
                return 0
            echo = [] if echo_on else _Discard()
            for c in data.decode("utf-8", "replace"):
                if skip_lf and c == "\n":
                    skip_lf = False
                    continue
                skip_lf = False
                if c in "\r\n":
                    skip_lf = c == "\r"
                    echo.append("\r\n")
                    ch.sendall("".join(echo).encode())
                    echo.clear()
                    line, buf = buf, ""
                    if confirm is not None:
                        with self._lock:
                            self.commands.append(line)
                        action = confirm
                        confirm = None
                        res = session.confirmed(action) if line.strip().lower() in ("y", "yes") \
                            else Result()
                    elif line.strip():
                        res = self._command(t, ch, session, line)
                    else:
                        res = Result()
                    out = session.render(res.lines)
                    if res.confirm:
                        confirm = res.on_yes
                        ch.sendall((out + res.confirm).encode())
                    elif res.logout:
                        ch.sendall(out.encode())
                        return 0
                    else:
                        ch.sendall((out + session.prompt()).encode())
                elif c in "\x7f\x08":
                    if buf:
                        buf = buf[:-1]
                        echo.append("\b \b")
                elif c == "\x03":
                    buf, confirm = "", None
                    echo.append("^C\r\n" + session.prompt())
                elif c == "\x04" and not buf:
                    ch.sendall("".join(echo).encode())
                    return 0
                elif c >= " " or c == "\t":
                    buf += c
                    echo.append(c)
            if echo:
                ch.sendall("".join(echo).encode())


# ---------------------------------------------------------------- command line
def _user_arg(text):
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise argparse.ArgumentTypeError("expected USER:PASSWORD or USER:@FILE")
    if password.startswith("@"):
        with open(password[1:]) as f:
            password = f.read().strip()
    return user, password


def _pool_arg(text):
    name, sep, size = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError("expected NAME:SIZE (e.g. default:2TB)")
    return name, size


def main(argv=None) -> int:
    from .tgt import Tgtd
    p = argparse.ArgumentParser(prog="eqlsim", description="EqualLogic PS group simulator "
                                "(SSH group CLI; volumes are real tgtd targets).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--listen", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--netns", help="run inside this network namespace (SSH and tgtd)")
    p.add_argument("--group-name", default="group-0")
    p.add_argument("--group-ip")
    p.add_argument("--user", action="append", type=_user_arg, default=[],
                   help="USER:PASSWORD or USER:@FILE (password read from FILE); "
                        "default grpadmin:secret")
    p.add_argument("--authorized-keys", action="append", default=[],
                   help="file of public key lines accepted for every --user")
    p.add_argument("--pool", action="append", type=_pool_arg, default=[],
                   help="NAME:SIZE (MB or with MB/GB/TB); default default:2TB")
    p.add_argument("--max-sessions", type=int, default=7)
    p.add_argument("--portal", default=None,
                   help="iSCSI portal IP:PORT of the tgtd started for the volumes "
                        "(default <listen>:0 = a free port)")
    p.add_argument("--no-tgtd", action="store_true", help="volumes without data")
    p.add_argument("--drop-after", type=int, metavar="N")
    p.add_argument("--drop-mid-output", metavar="REGEX")
    p.add_argument("--latency", type=float, metavar="SEC")
    p.add_argument("--slow", nargs=2, action="append", default=[], metavar=("REGEX", "SEC"),
                   help="sleep SEC before every command matching REGEX")
    p.add_argument("--field-spelling", choices=("hyphen", "camel"), default="hyphen",
                   help="field names of detail views: Multihost-access (hyphen) or MultiHostAccess")
    p.add_argument("--fail", nargs=2, action="append", default=[], metavar=("REGEX", "MESSAGE"))
    p.add_argument("--fail-times", type=int, default=1)
    p.add_argument("--refuse-sessions", action="store_true")
    a = p.parse_args(argv)

    keys = []
    for path in a.authorized_keys:
        with open(path) as f:
            keys.extend(line for line in f.read().splitlines() if line.strip() and
                        not line.startswith("#"))
    tgtd = None
    if not a.no_tgtd:
        tgtd = Tgtd(os.path.join(a.workdir, "tgtd"), a.portal or a.listen + ":0", netns=a.netns)
        tgtd.start()
    sim = EqlSim(a.workdir, a.group_name, a.listen, a.port, dict(a.user) or None, keys,
                 dict(a.pool) or None, a.max_sessions, tgtd, a.group_ip, netns=a.netns)
    f = sim.faults
    if a.drop_after is not None:
        f.drop_after(a.drop_after)
    if a.drop_mid_output:
        f.drop_mid_output(a.drop_mid_output)
    if a.latency:
        f.latency(a.latency)
    for regex, sec in a.slow:
        f.latency(float(sec), regex)
    sim.group.field_spelling = a.field_spelling
    for regex, message in a.fail:
        f.fail_next(regex, message, a.fail_times)
    if a.refuse_sessions:
        f.refuse_sessions(True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    try:
        sim.start()
        print("EqualLogic group %s listening on %s:%d" % (sim.group.name, a.listen, sim.port))
        print("known_hosts: " + sim.host_key_line())
        if tgtd is not None:
            print("iSCSI portal: %s (tgtd -C %d, pid %d)" % (tgtd.portal, tgtd.control, tgtd.pid))
        print("users: " + ", ".join(sim.users))
        sys.stdout.flush()
        done.wait()
    finally:
        sim.stop()
        if tgtd is not None:
            tgtd.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
