"""One tgtd (userspace iSCSI target) instance and its targets, for the lab and tests.

``Tgtd(workdir).start()`` runs ``tgtd -f -C N --iscsi portal=IP:PORT`` (optionally
inside a network namespace), with a control number N claimed through lock files
under ``/run/oneiscsi-tgt/`` so parallel test sessions never share a tgtd.  All
target changes go through ``tgtadm -C N``; state is read back by parsing
``tgtadm --op show --mode target``.

tgtd facts this relies on (see reference/test-infra.md section 1):
- ACL entries are OR-ed: an initiator may log in when its address matches any
  address/CIDR entry or its name matches any initiator-name entry; a target with
  no entry admits nobody.  CHAP accounts are per target (all initiators).
- A logical unit with active commands cannot be deleted, and libiscsi clients
  reconnect after a kicked connection, so deleting a busy target or LUN first
  unbinds the ACL (no reconnect possible), then kicks, then deletes.
- tgtd does not see a grown backing file: the LUN is deleted and re-created.
- tgtd ignores SIGTERM: stop() kills it with SIGKILL by PID.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import random
import re
import socket
import subprocess
import sys
import threading
import time

CTL_LOCK_DIR = "/run/oneiscsi-tgt"
CTL_RANGE = (100, 4000)
TGTD_RUN_DIR = "/var/run/tgtd"


class TgtError(RuntimeError):
    """A tgtd/tgtadm operation failed (message never contains argv)."""


def _claim_control_number(skip=()):
    """Return (n, fd) with an exclusive flock on CTL_LOCK_DIR/ctl.<n>.lock held by fd."""
    os.makedirs(CTL_LOCK_DIR, exist_ok=True)
    lo, hi = CTL_RANGE
    start = random.randrange(lo, hi)
    for i in range(hi - lo):
        n = lo + (start - lo + i) % (hi - lo)
        if n in skip or os.path.exists(os.path.join(TGTD_RUN_DIR, "socket.%d" % n)) and _socket_in_use(n):
            continue
        fd = os.open(os.path.join(CTL_LOCK_DIR, "ctl.%d.lock" % n), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue
        return n, fd
    raise TgtError("no free tgtd control number in %d-%d" % CTL_RANGE)


def _socket_in_use(n):
    """True when some process (any tgtd, ours or not) answers on control socket n."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(os.path.join(TGTD_RUN_DIR, "socket.%d" % n))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _split_portal(portal):
    host, _, port = portal.rpartition(":")
    return host.strip("[]"), int(port)


def _join_portal(host, port):
    return ("[%s]:%d" if ":" in host else "%s:%d") % (host, port)


def _free_port(host, netns):
    """A TCP port free on host (inside netns when given)."""
    code = ("import socket,sys;h=sys.argv[1];"
            "s=socket.socket(socket.AF_INET6 if ':' in h else socket.AF_INET);"
            "s.bind((h,0));print(s.getsockname()[1])")
    if netns:
        out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", code, host],
                             capture_output=True, text=True, check=True).stdout
        return int(out)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    try:
        s.bind((host, 0))
        return s.getsockname()[1]
    finally:
        s.close()


def _holds_lock(pid):
    """True when pid holds a POSIX/flock lock (tgtd's control socket lock)."""
    try:
        with open("/proc/locks") as f:
            return any(line.split()[4] == str(pid) for line in f if len(line.split()) > 4)
    except OSError:
        return False


def _is_address(entry):
    if entry == "ALL":
        return True
    try:
        ipaddress.ip_network(entry, strict=False)
        return True
    except ValueError:
        return False


def parse_show_target(text):
    """Parse `tgtadm --op show --mode target` into {iqn: {...}} (see Tgtd.targets)."""
    result = {}
    cur = section = lun = None
    for raw in text.splitlines():
        line = raw.strip()
        m = re.match(r"^Target (\d+): (\S+)$", raw)
        if m:
            cur = {"tid": int(m.group(1)), "luns": {}, "acl": [], "accounts": [],
                   "sessions": 0, "initiators": []}
            result[m.group(2)] = cur
            section = lun = None
            continue
        if cur is None or not line:
            continue
        indent = len(raw) - len(raw.lstrip())
        if indent == 4:
            section = line.rstrip(":")
            continue
        if section == "I_T nexus information":
            if line.startswith("I_T nexus:"):
                cur["sessions"] += 1
            elif line.startswith("Initiator:"):
                cur["initiators"].append(line.split()[1])
        elif section == "LUN information":
            if line.startswith("LUN:"):
                lun = int(line.split()[1])
            elif line.startswith("Backing store path:") and lun is not None:
                path = line.split(":", 1)[1].strip()
                if path and path != "None":
                    cur["luns"][lun] = path
        elif section == "Account information":
            cur["accounts"].append(line)
        elif section == "ACL information":
            cur["acl"].append(line)
    return result


def _locked(fn):
    def wrapper(self, *a, **kw):
        with self._lock:
            return fn(self, *a, **kw)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class Tgtd:
    """A tgtd instance: start/stop it and manage its targets by IQN (thread-safe)."""

    def __init__(self, workdir: str, portal: str = "127.0.0.1:0", netns: str | None = None):
        self.workdir = workdir
        self.portal = portal
        self.netns = netns
        self.control = None
        self.pid = None
        self.log_path = None
        self._proc = None
        self._lock_fd = None
        self._next_tid = 1
        self._lun_meta = {}     # iqn -> (lun, params) to re-create a LUN on resize
        self._passwords = {}    # CHAP user -> password tgtd has for it
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ daemon
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self) -> None:
        if self._proc is not None:
            return
        os.makedirs(self.workdir, exist_ok=True)
        host, port = _split_portal(self.portal)
        auto_port = port == 0
        tried = set()
        for _attempt in range(8):
            if auto_port:
                port = _free_port(host, self.netns)
            n, fd = _claim_control_number(skip=tried)
            tried.add(n)
            outcome = self._try_start(n, host, port)
            if outcome == "ok":
                self._lock_fd, self.control = fd, n
                self.portal = _join_portal(host, port)
                return
            os.close(fd)
            if outcome == "portal" and not auto_port:
                raise TgtError("tgtd could not bind portal %s (see %s)"
                               % (_join_portal(host, port), self.log_path))
        raise TgtError("tgtd did not start (see %s)" % self.log_path)

    def _try_start(self, n, host, port):
        """Start tgtd on control n; return 'ok', 'control' (n taken) or 'portal' (bind failed)."""
        self.log_path = os.path.join(self.workdir, "tgtd.%d.log" % n)
        cmd = ["tgtd", "-f", "-C", str(n), "--iscsi", "portal=" + _join_portal(host, port)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        with open(self.log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return "control" if "another tgtd" in self._log() else "failed"
            # Our tgtd holds its control-socket lock once past ipc_init; only then is
            # a tgtadm answer ours (a stale tgtd could own a leftover socket).
            if _holds_lock(proc.pid) and subprocess.run(
                    ["tgtadm", "-C", str(n), "--op", "show", "--mode", "sys"],
                    capture_output=True).returncode == 0:
                if "failed to create/bind to portal" in self._log():
                    self._kill(proc, n)
                    return "portal"
                self._proc, self.pid = proc, proc.pid
                return "ok"
            time.sleep(0.01)
        self._kill(proc, n)
        return "failed"

    def _log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    @staticmethod
    def _kill(proc, n):
        try:
            proc.kill()
        except OSError:
            pass
        proc.wait()
        for name in ("socket.%d" % n, "socket.%d.lock" % n):
            try:
                os.unlink(os.path.join(TGTD_RUN_DIR, name))
            except OSError:
                pass

    def stop(self) -> None:
        if self._proc is not None:
            self._kill(self._proc, self.control)
            self._proc = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self._lun_meta.clear()
        self._passwords.clear()

    # ----------------------------------------------------------------- tgtadm
    def _adm(self, *args, ok_errors=()):
        """Run tgtadm; return stdout.  Errors whose text contains one of ok_errors are ignored."""
        if self._proc is None:
            raise TgtError("tgtd is not running")
        r = subprocess.run(["tgtadm", "-C", str(self.control), "--lld", "iscsi"] + list(args),
                           capture_output=True, text=True)
        if r.returncode != 0:
            msg = r.stderr.strip().replace("tgtadm: ", "")
            if any(e in msg for e in ok_errors):
                return ""
            # argv is not in the message: it may carry a CHAP password.
            raise TgtError("tgtadm %s %s failed: %s" % (args[1], args[3], msg))
        return r.stdout

    def targets(self) -> dict:
        """iqn -> {"tid", "luns": {lun: path}, "acl", "accounts", "sessions", "initiators"}."""
        return parse_show_target(self._adm("--op", "show", "--mode", "target"))

    def _tid(self, iqn, targets=None):
        t = (targets if targets is not None else self.targets()).get(iqn)
        return None if t is None else t["tid"]

    def _need_tid(self, iqn):
        tid = self._tid(iqn)
        if tid is None:
            raise TgtError("no target %s" % iqn)
        return str(tid)

    @_locked
    def add_target(self, iqn: str, backing: str, size_bytes: int | None = None, lun: int = 1,
                   params: dict | None = None) -> int:
        """Create target iqn with one file-backed LUN; returns the tid.

        size_bytes given: (re)size backing as a sparse file first.  params: LUN
        parameters applied with ``--op update`` (vendor_id, product_id, scsi_sn, ...).
        """
        if size_bytes is not None:
            with open(backing, "ab"):
                pass
            os.truncate(backing, size_bytes)
        while True:
            tid = self._next_tid
            self._next_tid += 1     # never reuse a tid: LUN identities stay unique
            try:
                self._adm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
                break
            except TgtError as e:
                if "already exists" not in str(e):
                    raise
                if self._tid(iqn) is not None:
                    raise TgtError("target %s already exists" % iqn)
        try:
            self._new_lun(tid, lun, backing, params)
        except TgtError:
            self._adm("--op", "delete", "--force", "--mode", "target", "--tid", str(tid),
                      ok_errors=("can't find",))
            raise
        self._lun_meta[iqn] = (lun, dict(params or {}))
        return tid

    def _new_lun(self, tid, lun, backing, params):
        self._adm("--op", "new", "--mode", "logicalunit", "--tid", str(tid), "--lun", str(lun),
                  "-b", os.path.abspath(backing))
        if params:
            self._adm("--op", "update", "--mode", "logicalunit", "--tid", str(tid), "--lun",
                      str(lun), "--params", ",".join("%s=%s" % kv for kv in params.items()))

    @_locked
    def delete_target(self, iqn: str) -> None:
        """Remove the target even with initiators logged in; no-op when absent."""
        t = self.targets().get(iqn)
        if t is None:
            return
        tid = str(t["tid"])
        for entry in t["acl"]:      # so kicked initiators cannot log in again
            self._unbind_entry(tid, entry)
        deadline = time.monotonic() + 5
        while True:
            self.kick(iqn)
            try:
                self._adm("--op", "delete", "--force", "--mode", "target", "--tid", tid,
                          ok_errors=("can't find",))
                break
            except TgtError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self._lun_meta.pop(iqn, None)
        for user in t["accounts"]:
            self._drop_account_if_unused(user)

    @_locked
    def resize_lun(self, iqn: str, size_bytes: int) -> None:
        """Set the backing file to size_bytes and re-create the LUN so tgtd sees it."""
        t = self.targets().get(iqn)
        if t is None:
            raise TgtError("no target %s" % iqn)
        lun, params = self._lun_meta.get(iqn, (min(t["luns"]) if t["luns"] else 1, {}))
        path = t["luns"].get(lun)
        if path is None:
            raise TgtError("target %s has no LUN %d" % (iqn, lun))
        os.truncate(path, size_bytes)
        tid = str(t["tid"])
        if not self._delete_lun(tid, lun, tries=20):
            # Busy: keep initiators out while the LUN is swapped, then let them back.
            for entry in t["acl"]:
                self._unbind_entry(tid, entry)
            try:
                deadline = time.monotonic() + 5
                while True:
                    self.kick(iqn)
                    if self._delete_lun(tid, lun, tries=1):
                        break
                    if time.monotonic() > deadline:
                        raise TgtError("LUN %d of %s stays busy" % (lun, iqn))
                    time.sleep(0.05)
            finally:
                for entry in t["acl"]:
                    self._bind_entry(tid, entry)
        self._new_lun(t["tid"], lun, path, params)

    def _delete_lun(self, tid, lun, tries):
        for i in range(tries):
            try:
                self._adm("--op", "delete", "--mode", "logicalunit", "--tid", tid, "--lun", str(lun))
                return True
            except TgtError as e:
                if "still active" not in str(e):
                    raise
                if i + 1 < tries:
                    time.sleep(0.01)
        return False

    # ------------------------------------------------------------------- ACLs
    def _acl_args(self, entry):
        return ["-I", entry] if _is_address(entry) else ["--initiator-name", entry]

    def _bind_entry(self, tid, entry):
        self._adm("--op", "bind", "--mode", "target", "--tid", tid, *self._acl_args(entry),
                  ok_errors=("already exists",))

    def _unbind_entry(self, tid, entry):
        self._adm("--op", "unbind", "--mode", "target", "--tid", tid, *self._acl_args(entry),
                  ok_errors=("does not exist",))

    @staticmethod
    def _entry(initiator, address):
        if initiator and address:
            raise ValueError("give initiator or address, not both")
        return initiator or address or "ALL"

    @_locked
    def bind(self, iqn: str, initiator: str | None = None, address: str | None = None) -> None:
        """Admit an initiator name or an address/CIDR ("ALL" when neither); idempotent."""
        self._bind_entry(self._need_tid(iqn), self._entry(initiator, address))

    @_locked
    def unbind(self, iqn: str, initiator: str | None = None, address: str | None = None) -> None:
        self._unbind_entry(self._need_tid(iqn), self._entry(initiator, address))

    # ------------------------------------------------------------------- CHAP
    @_locked
    def set_chap(self, iqn: str, user: str, password: str) -> None:
        """Require CHAP user/password on the target (creates or updates the account).

        tgtadm only takes the password on its command line.  That is acceptable
        ONLY here, in the lab simulator on a test machine; product code never
        puts a secret on argv.
        """
        targets = self.targets()
        tid = self._tid(iqn, targets)
        if tid is None:
            raise TgtError("no target %s" % iqn)
        if self._passwords.get(user) != password:
            bound = [t["tid"] for t in targets.values() if user in t["accounts"]]
            self._adm("--op", "delete", "--mode", "account", "--user", user,
                      ok_errors=("can't find",))
            self._adm("--op", "new", "--mode", "account", "--user", user, "--password", password)
            self._passwords[user] = password
            for other in bound:
                self._adm("--op", "bind", "--mode", "account", "--tid", str(other), "--user", user,
                          ok_errors=("already exists",))
        self._adm("--op", "bind", "--mode", "account", "--tid", str(tid), "--user", user,
                  ok_errors=("already exists",))

    @_locked
    def clear_chap(self, iqn: str, user: str) -> None:
        """Stop requiring user on the target; drops the account when no target uses it."""
        tid = self._tid(iqn)
        if tid is not None:
            self._adm("--op", "unbind", "--mode", "account", "--tid", str(tid), "--user", user,
                      ok_errors=("can't find", "does not exist", "not found"))
        self._drop_account_if_unused(user)

    def _drop_account_if_unused(self, user):
        if not any(user in t["accounts"] for t in self.targets().values()):
            self._adm("--op", "delete", "--mode", "account", "--user", user,
                      ok_errors=("can't find",))
            self._passwords.pop(user, None)

    # --------------------------------------------------------------- sessions
    def sessions(self, iqn: str) -> int:
        """Number of I_T nexus (logged-in sessions) of the target; 0 when absent."""
        t = self.targets().get(iqn)
        return 0 if t is None else t["sessions"]

    @_locked
    def kick(self, iqn: str) -> None:
        """Drop every connection of the target (initiators may log in again if the ACL lets them)."""
        tid = self._tid(iqn)
        if tid is None:
            return
        out = self._adm("--op", "show", "--mode", "conn", "--tid", str(tid), ok_errors=("",))
        sid = None
        for line in out.splitlines():
            words = line.split()
            if words[:1] == ["Session:"]:
                sid = words[1]
            elif words[:1] == ["Connection:"] and sid is not None:
                self._adm("--op", "delete", "--mode", "conn", "--tid", str(tid), "--sid", sid,
                          "--cid", words[1], ok_errors=("",))


__all__ = ["Tgtd", "TgtError", "parse_show_target"]
