"""Writing a volume through qemu-img's own iSCSI initiator (libiscsi): from the frontend,
or from the first reachable BRIDGE_LIST host (the file is sent there over ssh first).

A local write that makes no progress for EQL_WRITE_STALL seconds (default 120) is killed
with its whole process group, and the action fails (and undoes) as on any other failure:
a target that stopped answering must not hold the volume lock forever. Progress is a new
percentage printed by qemu-img or at least 1 MiB more moved by it (/proc/PID/io `rchar`
+ `wchar`, which count socket traffic too; measured: with 16 requests in flight qemu-img
reads a small source at once and prints 100%, then only its socket writes move). A
target that stopped answering lets nothing more through once the TCP buffers are full,
and keep-alive or login packets are far below 1 MiB. A no-progress limit, not a total
one, so a slow but moving copy of a large image never fails.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import tempfile
import threading
import time

from oneiscsi import log, validate
from oneiscsi.drivers.eqliscsi.source import MiB, QEMU_IMG, Source, _rate, _unlink, last_line
from oneiscsi.errors import Failure
from oneiscsi.san import cli

STALL = 120  # seconds without progress before a local qemu-img convert is killed


def _stall(cfg) -> int:
    """EQL_WRITE_STALL when the configuration knows the key, else STALL."""
    try:
        value = (cfg["EQL_WRITE_STALL"] or "").strip()
    except (KeyError, TypeError):
        value = ""
    return validate.number(value, "EQL_WRITE_STALL", 5, 86400) if value else STALL


def _bridges(datastore) -> list:
    hosts = datastore.tpl("BRIDGE_LIST").split()
    return [validate.hostname(h, "BRIDGE_LIST host") for h in hosts]


# ---- writing a volume through libiscsi ---------------------------------------------------
class Writer:
    """How qemu-img reaches one volume's target: portal, IQN, initiator name, CHAP."""

    def __init__(self, cfg, iqn: str, rate: int = 0):
        self.rate = rate  # LIMIT_TRANSFER_BW, bytes/s (qemu-img -r)
        host, port = cfg.portal()
        self.portal = validate.format_portal(host, port)
        self.iqn = cli.initiator(iqn, "the volume's IQN")
        self.initiator = cfg.initiator()
        self.user = cfg.chap_user
        self.password = cfg.chap_password() if self.user else ""
        self.stall = _stall(cfg)

    def opts(self, lun) -> str:
        o = "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=%s,initiator-name=%s" % (
            self.portal, self.iqn, lun, self.initiator)
        return o + (",user=%s,password-secret=sec0" % self.user if self.user else "")

    def lun(self, min_size: int = 1):
        """This target as host scripts reach it (oneiscsi/host/libiscsi.py)."""
        from oneiscsi.host.libiscsi import Lun
        return Lun(self.portal, self.iqn, self.initiator, self.user, self.password, min_size=min_size)

    def secret_args(self, path) -> list:
        return ["--object", "secret,id=sec0,file=%s" % path] if self.user else []


def convert_flags(w: Writer, fmt, zero_target=False) -> list:
    """qemu-img convert options, without -O: with --target-image-opts the target is the
    iscsi protocol driver itself (raw). -W -m 16: out-of-order writes, 16 coroutines."""
    flags = ["-n", "-f", fmt, "-W", "-m", "16"] + (["-r", str(w.rate)] if w.rate else [])
    return flags + (["--target-is-zero"] if zero_target else [])


def convert_argv(w: Writer, src_path, fmt, lun, secret_path, zero_target=False) -> list:
    return ([QEMU_IMG, "convert", "-p"] + convert_flags(w, fmt, zero_target) + w.secret_args(secret_path)
            + [src_path, "--target-image-opts", w.opts(lun)])


def info_argv(w: Writer, lun, secret_path) -> list:
    return [QEMU_IMG, "info", "--output=json"] + w.secret_args(secret_path) + ["--image-opts", w.opts(lun)]


class _SecretFile:
    """The CHAP password in a 0600 temp file for qemu-img's --object secret (path '' without CHAP)."""

    def __init__(self, w: Writer):
        self.w, self.path = w, ""

    def __enter__(self) -> str:
        if self.w.user:
            fd, self.path = tempfile.mkstemp(prefix="oneiscsi-sec-")
            with os.fdopen(fd, "w") as f:
                f.write(self.w.password)
        return self.path

    def __exit__(self, *exc):
        if self.path:
            _unlink(self.path)


def write_local(w: Writer, src: Source, zero_target=False) -> None:
    """qemu-img on the frontend: find the LUN, convert with progress as INFO lines."""
    with _SecretFile(w) as secret_path:
        lun = _find_lun(w, src.size, secret_path)
        log.info("writing %d MB (%s) to %s LUN %s" % (math.ceil(src.size / MiB), src.fmt, w.iqn, lun))
        started = time.monotonic()
        _convert_with_progress(convert_argv(w, src.path, src.fmt, lun, secret_path, zero_target), w.stall,
                               "%s on %s" % (w.iqn, w.portal))
        took = max(time.monotonic() - started, 1e-6)
        log.info("wrote %d MB in %.2f s (%.0f MiB/s)" % (math.ceil(src.size / MiB), took, src.size / MiB / took))


def _find_lun(w: Writer, need: int, secret_path) -> int:
    """The first of LUN 0 (a group) and LUN 1 (tgtd) whose size can hold `need` bytes;
    both are asked at once."""
    probes = [(lun, subprocess.Popen(info_argv(w, lun, secret_path), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)) for lun in (0, 1)]
    errors, found = [], None
    for lun, proc in probes:
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        if found is not None:
            continue
        if proc.returncode == 0:
            try:
                size = int(json.loads(out).get("virtual-size") or 0)
            except ValueError:
                size = 0
            if size >= need:
                found = lun
            else:
                errors.append("LUN %d: %d bytes" % (lun, size))
        else:
            errors.append("LUN %d: %s" % (lun, last_line(err)))
    if found is None:
        raise Failure("no LUN of %s on %s can hold %d bytes (%s)" % (w.iqn, w.portal, need, "; ".join(errors)))
    return found


def _io_bytes(pid: int):
    """Bytes process `pid` passed to read and write calls (files and sockets), or None."""
    try:
        with open("/proc/%d/io" % pid) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields["rchar"]) + int(fields["wchar"])
    except (OSError, ValueError, KeyError):
        return None


def _kill_group(proc) -> None:
    """SIGKILL to the process group of `proc` (its own session), while it is not reaped."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:  # already gone
        pass


class _Watchdog:
    """Kills the process group of `proc` when it makes no progress for `stall` seconds."""

    def __init__(self, proc, stall: float):
        self.proc, self.stall, self.fired = proc, float(stall), False
        self.last = time.monotonic()
        self._read = _io_bytes(proc.pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.stall / 10)):
            read = _io_bytes(self.proc.pid)
            if read is not None and (self._read is None or read >= self._read + MiB):
                self._read = read
                self.progress()
            if time.monotonic() - self.last >= self.stall:
                self.fired = True
                _kill_group(self.proc)
                return

    def stop(self) -> None:
        self._done.set()
        self._thread.join()


def _convert_with_progress(argv, stall: float = STALL, target: str = "the volume") -> None:
    try:  # its own process group: everything it starts dies with it
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except FileNotFoundError:
        raise Failure("%s is not installed on the frontend" % argv[0]) from None
    err = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    t.start()
    dog = _Watchdog(proc, stall)
    step, pending, pct = 10, b"", -1.0
    try:
        while True:
            data = proc.stdout.read1(4096)
            if not data:
                break
            pending = (pending + data)[-256:]
            for m in re.finditer(rb"\((\d+(?:\.\d+)?)/100%\)", pending):
                now = float(m.group(1))
                if now > pct:
                    pct = now
                    dog.progress()
                while pct >= step and step < 100:
                    log.info("copied %d%%" % step)
                    step += 10
            pending = pending[-32:]
        rc = proc.wait()
    except BaseException:  # interrupted (oned's timeout, ^C): the copy must not outlive us
        _kill_group(proc)
        proc.wait()
        raise
    finally:
        dog.stop()
    t.join(5)
    if dog.fired:
        raise Failure("qemu-img convert made no progress for %d s (at %s%%): the iSCSI target %s stopped "
                      "answering; killed it (check the group and the network; EQL_WRITE_STALL sets the "
                      "limit)" % (stall, "%.0f" % max(pct, 0), target))
    if rc != 0:
        msg = last_line(err[0].decode("utf-8", "replace") if err else "")
        raise Failure("qemu-img convert failed: %s" % (log.mask(msg) or "exit code %d" % rc))
    log.info("copied 100%")


def write_bridge(hosts: list, w: Writer, src: Source, zero_target=False) -> None:
    """The same qemu-img on the first reachable BRIDGE_LIST host (the file is sent over ssh first)."""
    from oneiscsi import host as hostrun
    tried = []
    for h in hosts:
        remote = _send_file(h, src.path)
        if remote is None:
            tried.append(h)
            continue
        log.info("writing %d MB (%s) to %s from bridge host %s" % (math.ceil(src.size / MiB), src.fmt, w.iqn, h))
        res = hostrun.run(h, bridge_script(w, remote, src.fmt, src.size, zero_target), timeout=86400,
                          what="image write")
        if res.returncode != 0:
            raise Failure("writing the image on bridge host %s failed: %s"
                          % (h, log.mask(last_line(res.stderr)) or "exit code %d" % res.returncode))
        return
    raise Failure("no BRIDGE_LIST host is reachable over ssh (tried %s)" % ", ".join(tried))


def _send_file(h: str, path: str):
    """Copy a file to a 0600 temp file on host h in one ssh call -> its path, None if unreachable."""
    from oneiscsi import host as hostrun
    cmd = hostrun.ssh_command(h)[:-1] + [
        "umask 077 && t=$(mktemp /var/tmp/oneiscsi-cp.XXXXXX) && cat > \"$t\" && echo \"$t\""]
    with open(path, "rb") as f:
        res = subprocess.run(cmd, stdin=f, capture_output=True, timeout=86400)
    if res.returncode == 255:
        log.warn("bridge host %s is not reachable: %s" % (h, last_line(res.stderr.decode("utf-8", "replace"))))
        return None
    out = res.stdout.decode("utf-8", "replace").strip()
    if res.returncode != 0 or not re.fullmatch(r"/var/tmp/oneiscsi-cp\.[A-Za-z0-9]+", out):
        raise Failure("cannot send the image to bridge host %s: %s"
                      % (h, last_line(res.stderr.decode("utf-8", "replace")) or "exit code %d" % res.returncode))
    return out


def bridge_script(w: Writer, remote: str, fmt: str, size: int, zero_target=False) -> str:
    """The sent file `remote` onto the first LUN that holds `size` bytes; the file goes on exit."""
    from oneiscsi.host import libiscsi, q
    lun = w.lun(size)
    lines = ["img=%s" % q(remote), libiscsi.prelude('rm -f "$img"'), libiscsi.secrets([lun]),
             libiscsi.find(lun, "lun"),
             "%s convert %s $objs \"$img\" --target-image-opts %s || fail %s"
             % (q(QEMU_IMG), " ".join(q(f) for f in convert_flags(w, fmt, zero_target)),
                libiscsi.shell(libiscsi.opts(lun.spec("@LUN@", lun.secret)), "lun"),
                q("qemu-img convert onto %s failed" % w.iqn))]
    return "\n".join(lines) + "\n"


# ---- reading a volume through libiscsi (DS export) -----------------------------------------------
EXPORT_PREFIX = "oneiscsi-export-"
SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]+$")   # a path that survives word splitting (DISPOSE_CMD)


def read_argv(w: Writer, lun, secret_path, dst: str, fmt: str) -> list:
    """qemu-img convert of the whole LUN (the iscsi protocol driver: raw data) into a `fmt` file."""
    return ([QEMU_IMG, "convert", "-p", "-m", "16"] + (["-r", str(w.rate)] if w.rate else [])
            + ["-O", fmt] + w.secret_args(secret_path) + ["--image-opts", w.opts(lun), dst])


def _md5(path: str) -> str:
    import hashlib
    d = hashlib.md5()
    with open(path, "rb") as f:
        for data in iter(lambda: f.read(4 * MiB), b""):
            d.update(data)
    return d.hexdigest()


def read_local(w: Writer, size: int, fmt: str, staging_dir: str):
    """The volume into a new 0600 `fmt` file in staging_dir -> (path, md5). Nothing stays on failure."""
    try:
        fd, path = tempfile.mkstemp(prefix=EXPORT_PREFIX, suffix="." + fmt, dir=staging_dir)
    except OSError as e:
        raise Failure("cannot create a file in EQL_STAGING_DIR %s: %s" % (staging_dir, e.strerror)) from None
    os.close(fd)
    try:
        if not SAFE_PATH.match(path):
            raise Failure("EQL_STAGING_DIR %s is refused for an export: the marketplace runs DISPOSE_CMD word by "
                          "word, so the path may hold only letters, digits and ._/+-" % validate.show(staging_dir))
        with _SecretFile(w) as secret_path:
            lun = _find_lun(w, size, secret_path)
            log.info("reading %d MB of %s LUN %s into %s" % (math.ceil(size / MiB), w.iqn, lun, path))
            _convert_with_progress(read_argv(w, lun, secret_path, path, fmt), w.stall, "%s on %s" % (w.iqn, w.portal))
        return path, _md5(path)
    except BaseException:
        _unlink(path)
        raise


def read_bridge(hosts: list, w: Writer, size: int, fmt: str):
    """The same on the first reachable BRIDGE_LIST host -> (host, path, md5); nothing stays on failure."""
    from oneiscsi import host as hostrun
    tried = []
    for h in hosts:
        res = hostrun.run(h, export_script(w, size, fmt), timeout=86400, what="volume read")
        if hostrun.unreachable(res):
            log.warn("bridge host %s is not reachable: %s" % (h, last_line(res.stderr)))
            tried.append(h)
            continue
        m = re.search(r"^EXPORTED (/var/tmp/%s[A-Za-z0-9]+\.%s) ([0-9a-f]{32})$" % (EXPORT_PREFIX, fmt),
                      res.stdout, re.M)
        if res.returncode != 0 or not m:
            raise Failure("reading the volume on bridge host %s failed: %s"
                          % (h, log.mask(last_line(res.stderr)) or "exit code %d" % res.returncode))
        log.info("read %d MB of %s into %s:%s" % (math.ceil(size / MiB), w.iqn, h, m.group(1)))
        return h, m.group(1), m.group(2)
    raise Failure("no BRIDGE_LIST host is reachable over ssh (tried %s)" % ", ".join(tried))


def export_script(w: Writer, size: int, fmt: str) -> str:
    from oneiscsi.host import libiscsi, q
    lun = w.lun(size)
    lines = ["ok=''", "out=''", libiscsi.prelude('[ -n "$ok" ] || rm -f ${out:+"$out"}'),
             "out=$(mktemp --suffix=.%s /var/tmp/%sXXXXXXXX) || exit 3" % (fmt, EXPORT_PREFIX),
             libiscsi.secrets([lun]), libiscsi.find(lun, "lun"),
             "%s convert -m 16%s -O %s $objs --image-opts %s \"$out\" || exit 3"
             % (q(QEMU_IMG), " -r %d" % w.rate if w.rate else "", q(fmt),
                libiscsi.shell(libiscsi.opts(lun.spec("@LUN@", lun.secret)), "lun")),
             "sum=$(md5sum \"$out\" | cut -d' ' -f1) || exit 3",
             "ok=1",
             "echo \"EXPORTED $out $sum\""]
    return "\n".join(lines) + "\n"


def read(cfg, datastore, iqn: str, size: int, fmt: str = "qcow2"):
    """Read a whole volume into a `fmt` file on the frontend (EQL_STAGING_DIR) or the first
    reachable BRIDGE_LIST host -> (host or '', path, md5)."""
    w = Writer(cfg, iqn, _rate(datastore))
    bridges = _bridges(datastore)
    if bridges:
        return read_bridge(bridges, w, size, fmt)
    path, md5 = read_local(w, size, fmt, cfg.staging_dir)
    return "", path, md5


def check_write_settings(cfg, datastore) -> None:
    """Everything a write needs, validated before any volume or data exists."""
    cfg.group()
    cfg.portal()
    cfg.initiator()
    cfg.chap_password()
    _bridges(datastore)
    _rate(datastore)


def write(cfg, datastore, iqn: str, src: Source, zero_target=False) -> None:
    w = Writer(cfg, iqn, _rate(datastore))
    bridges = _bridges(datastore)
    if bridges:
        write_bridge(bridges, w, src, zero_target)
    else:
        write_local(w, src, zero_target)

