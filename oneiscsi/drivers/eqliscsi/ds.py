"""The eqliscsi datastore actions: images are volumes on a Dell EqualLogic PS group.

cp      validate; fetch the source (local file, http/https; MD5/SHA1 checked,
        gzip/bzip2/xz unpacked unless NO_DECOMPRESS, downloads staged in
        EQL_STAGING_DIR) and read its format (raw or qcow2) and size with qemu-img
        (backing and external data files are refused); create the
        volume (MB, pool, thin provisioning, description), multihost access and the
        access records; write it with qemu-img's own iSCSI initiator (libiscsi) from
        the frontend, or from the first reachable BRIDGE_LIST host (the file is sent
        there over ssh first); LIMIT_TRANSFER_BW caps downloads and the write; print
        `<volume> raw` (6.0+) or `<volume>`. Any failure once the volume exists
        deletes it: no volume is ever left behind.
mkfs    `save_as`: print the name only; raw: create the volume; a filesystem: made
        on a sparse local file and written like cp.
clone   SAN-side clone of the source image's volume.
rm      offline + delete; "does not exist" is success; refused while initiators are
        connected.
stat    MB of the source (virtual size for qcow2, gzip's recorded size, Content-Length
        for URLs).
monitor one `pool select <pool> show`.
snap_delete / snap_revert / snap_flatten
        group snapshots `one-snap-<id>` stand for the image's snapshot ids.

SAN access: the long data copy runs with no CLI session held, so a cp takes a
session to create the volume, and (only when it added an access record for the
writer, or to clean up) a second one after the copy. Every other action uses one
session. A per-volume lock serialises actions on one volume.

Writer access: with EQL_SECURITY_ACCESS empty volumes are created `unrestricted`
(as the seed add-on did) and the writer needs nothing more; otherwise cp adds a
record for the writer's initiator name (EQL_INITIATOR, else the frontend's
/etc/iscsi/initiatorname.iscsi, else iqn.2000-01.org.opennebula.oneiscsi:<hostname>),
with CHAP when EQL_CHAP_USER is set, and deletes it after the copy.
LUN: the first of LUN 0 (a real group) and LUN 1 (tgtd, the simulator) that
`qemu-img info` opens with a size is written.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
import zlib

from oneiscsi import config, log, validate
from oneiscsi.drivers.eqliscsi import common
from oneiscsi.errors import Failure, Invalid, NotSupported
from oneiscsi.one.version import remotes_dir
from oneiscsi.san import cli, client

MiB = 1024 * 1024
CHUNK = 4 * MiB
# raw and qcow2 only: other formats can name further files (a vmdk descriptor's extents)
FORMATS = ("raw", "qcow2")
MKFS = {"ext2": ["mkfs.ext2", "-F", "-q"], "ext3": ["mkfs.ext3", "-F", "-q"],
        "ext4": ["mkfs.ext4", "-F", "-q"], "xfs": ["mkfs.xfs", "-f", "-q"],
        "vfat": ["mkfs.vfat"], "swap": ["mkswap"]}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
HTTP_TIMEOUT = 60
QEMU_IMG = "qemu-img"


# ---- configuration and names ----------------------------------------------------------
def _setup(call, with_image=True):
    ds = call.ds()
    cfg = config.load(remotes_dir(call.argv0), ds.datastore, ds.image if with_image else None)
    return ds, cfg


def _image_id(call, image) -> str:
    return image.id or getattr(call, "obj_id", "")


def _description(image, image_id) -> str:
    text = image.tpl("DESCRIPTION") or image.name
    return cli.clean_description("OpenNebula image %s: %s" % (image_id, text))


def _bridges(datastore) -> list:
    hosts = datastore.tpl("BRIDGE_LIST").split()
    return [validate.hostname(h, "BRIDGE_LIST host") for h in hosts]


# ---- the source of cp ----------------------------------------------------------------
class Source:
    """A local file to copy from: `path`, qemu `fmt`, `size` (virtual bytes); `staged` files are ours."""

    def __init__(self, path, staged=False):
        self.path, self.staged = path, staged
        self.fmt, self.size = "raw", 0

    def cleanup(self):
        if self.staged:
            _unlink(self.path)


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def _is_url(path: str) -> bool:
    return bool(re.match(r"^https?://", path, re.IGNORECASE))


def _check_path_text(path: str) -> None:
    if not path:
        raise Invalid("the image has no PATH to copy from")
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise Invalid("PATH %s is refused: it contains a newline or control character" % validate.show(path))


def _local_path(path: str, datastore) -> str:
    """An absolute, existing regular file outside RESTRICTED_DIRS (unless under SAFE_DIRS)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise NotSupported("PATH %s: only local files and http(s) URLs can be copied to an EqualLogic "
                           "volume" % validate.show(path))
    if not path.startswith("/"):
        raise Invalid("PATH %s is refused: give an absolute path or an http(s) URL" % validate.show(path))
    real = os.path.realpath(path)
    home = os.path.expanduser("~").rstrip("/")
    restricted = ["/var/lib/one", "/etc/one"] + ([home] if home else []) + datastore.tpl("RESTRICTED_DIRS").split()
    safe = datastore.tpl("SAFE_DIRS").split()

    def under(p, dirs):  # as OpenNebula's check_restricted (libfs.sh)
        return any(p == d.rstrip("/") or p.startswith(d.rstrip("/") + "/") for d in dirs if d.rstrip("/"))
    if under(real, restricted) and not under(real, safe):
        raise Invalid("PATH %s is in a restricted directory (RESTRICTED_DIRS; allow it with SAFE_DIRS)"
                      % validate.show(path))
    if not os.path.isfile(real):
        raise Invalid("PATH %s is not a regular file on the frontend" % validate.show(path))
    if not os.access(real, os.R_OK):
        raise Invalid("PATH %s cannot be read by %s" % (validate.show(path), _user()))
    return real


def _user():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "uid %d" % os.getuid()


def _hashes(image) -> dict:
    wanted = {}
    for key, algo, length in (("MD5", "md5", 32), ("SHA1", "sha1", 40)):
        value = image.tpl(key).strip().lower()
        if value:
            if not re.fullmatch(r"[0-9a-f]{%d}" % length, value):
                raise Invalid("%s %s is refused: expected %d hex digits" % (key, validate.show(value), length))
            wanted[algo] = value
    return wanted


def _rate(datastore) -> int:
    """LIMIT_TRANSFER_BW (bytes/s, suffix K/M/G) -> bytes per second, 0 = no limit."""
    value = datastore.tpl("LIMIT_TRANSFER_BW").strip()
    if not value:
        return 0
    m = re.fullmatch(r"(\d+)([KMGkmg]?)", value)
    if not m:
        raise Invalid("LIMIT_TRANSFER_BW %s is refused: bytes per second, optionally with K, M or G"
                      % validate.show(value))
    return int(m.group(1)) * {"": 1, "k": 1024, "m": MiB, "g": 1024 * MiB}[m.group(2).lower()]


def _no_decompress(datastore) -> bool:
    return datastore.tpl("NO_DECOMPRESS").strip().lower() in ("yes", "true", "1", "on")


def _compression(head: bytes):
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return None


class _Unpacker:
    """Streaming gzip / bzip2 / xz decompression, multi-member aware."""

    def __init__(self, kind):
        self.kind = kind
        self.d = self._new()

    def _new(self):
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        return bz2.BZ2Decompressor() if self.kind == "bzip2" else lzma.LZMADecompressor()

    def feed(self, data: bytes) -> bytes:
        out = []
        while data:
            out.append(self.d.decompress(data))
            if not self.d.eof:
                break
            data = self.d.unused_data
            self.d = self._new() if data else self.d
        return b"".join(out)


def _stage(reader, cfg, hashes, unpack: bool, rate: int, what: str) -> Source:
    """Copy a byte stream to a sparse 0600 file in EQL_STAGING_DIR: hashing the bytes as
    given, unpacking gzip/bzip2/xz (unless told not to), at most `rate` bytes/s."""
    try:
        fd, path = tempfile.mkstemp(prefix="oneiscsi-cp-", suffix=".img", dir=cfg.staging_dir)
    except OSError as e:
        raise Failure("cannot create a staging file in EQL_STAGING_DIR %s: %s" % (cfg.staging_dir, e.strerror)) from None
    src = Source(path, staged=True)
    digests = {algo: hashlib.new(algo) for algo in hashes}
    unpacker, first, total, started = None, True, 0, time.monotonic()
    try:
        with os.fdopen(fd, "wb") as out:
            while True:
                data = reader(CHUNK)
                if not data:
                    break
                for d in digests.values():
                    d.update(data)
                total += len(data)
                if first:
                    kind = _compression(data[:8]) if unpack else None
                    unpacker = _Unpacker(kind) if kind else None
                    if kind:
                        log.info("unpacking %s data from %s" % (kind, what))
                    first = False
                _write_sparse(out, unpacker.feed(data) if unpacker else data)
                if rate:
                    ahead = total / rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
            if unpacker and not unpacker.d.eof:
                raise Failure("%s ends before its compressed data does (truncated?)" % what)
            out.truncate(out.tell())
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        src.cleanup()
        raise Failure("cannot read %s: %s" % (what, e)) from None
    except BaseException:
        src.cleanup()
        raise
    _verify(digests, hashes, what, src)
    return src


def _write_sparse(out, data: bytes) -> None:
    for i in range(0, len(data), MiB):
        block = data[i:i + MiB]
        if block.count(0) == len(block):
            out.seek(len(block), os.SEEK_CUR)
        else:
            out.write(block)


def _verify(digests, wanted, what, src=None):
    for algo, d in digests.items():
        if d.hexdigest() != wanted[algo]:
            if src is not None:
                src.cleanup()
            raise Failure("%s does not match the image's %s (%s expected, %s read)"
                          % (what, algo.upper(), wanted[algo], d.hexdigest()))


def _open_url(url: str, method="GET"):
    import urllib.error  # only http(s) sources pay for urllib (~12 ms)
    import urllib.parse
    import urllib.request
    parts = urllib.parse.urlsplit(url)
    if parts.password:
        log.secret(parts.password)
    req = urllib.request.Request(url, method=method, headers={"User-Agent": "oneiscsi"})
    try:
        return urllib.request.urlopen(req, timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise Failure("cannot download %s: HTTP %d %s" % (log.mask(url), e.code, e.reason)) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise Failure("cannot download %s: %s" % (log.mask(url), getattr(e, "reason", e))) from None


def prepare_source(image, datastore, cfg) -> Source:
    """The image's PATH as a local file ready for qemu-img (see the module docstring)."""
    path = image["PATH"]
    _check_path_text(path)
    hashes = _hashes(image)
    unpack = not _no_decompress(datastore)
    rate = _rate(datastore)  # downloads here; every write to a volume through qemu-img -r
    if _is_url(path):
        log.info("downloading %s" % log.mask(path))
        with _open_url(path) as resp:
            src = _stage(resp.read, cfg, hashes, unpack, rate, log.mask(path))  # rate: the download
    else:
        real = _local_path(path, datastore)
        with open(real, "rb") as f:
            kind = _compression(f.read(8)) if unpack else None
            f.seek(0)
            if kind:
                src = _stage(f.read, cfg, hashes, True, 0, path)
            else:
                if hashes:
                    digests = {algo: hashlib.new(algo) for algo in hashes}
                    for data in iter(lambda: f.read(CHUNK), b""):
                        for d in digests.values():
                            d.update(data)
                    _verify(digests, hashes, path)
                src = Source(real)
    try:
        src.fmt, src.size = image_info(src.path, path)
    except BaseException:
        src.cleanup()
        raise
    return src


def image_info(path: str, shown: str):
    """(format, virtual size in bytes) of a local image; refuses backing and external data files."""
    res = _run([QEMU_IMG, "info", "--output=json", path], "qemu-img info")
    try:
        info = json.loads(res.stdout)
    except ValueError:
        raise Failure("qemu-img info printed no JSON for %s" % validate.show(shown)) from None
    fmt = info.get("format", "")
    if fmt not in FORMATS:
        raise Invalid("PATH %s is a %s image; supported: %s" % (validate.show(shown), fmt or "unknown", ", ".join(FORMATS)))
    if info.get("backing-filename") or info.get("full-backing-filename"):
        raise Invalid("PATH %s is refused: it has a backing file; convert it to a standalone image first"
                      % validate.show(shown))
    if (info.get("format-specific") or {}).get("data", {}).get("data-file"):
        raise Invalid("PATH %s is refused: it has an external data file" % validate.show(shown))
    size = int(info.get("virtual-size") or 0)
    if size <= 0:
        raise Invalid("PATH %s is an empty image" % validate.show(shown))
    return fmt, size


def _run(argv, what, timeout=600, env=None):
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise Failure("%s: %s is not installed on the frontend" % (what, argv[0])) from None
    except subprocess.TimeoutExpired:
        raise Failure("%s did not finish within %d s" % (what, timeout)) from None
    if res.returncode != 0:
        raise Failure("%s failed: %s" % (what, _last(res.stderr) or "exit code %d" % res.returncode))
    return res


def _last(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


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

    def opts(self, lun) -> str:
        o = "driver=iscsi,transport=tcp,portal=%s,target=%s,lun=%s,initiator-name=%s" % (
            self.portal, self.iqn, lun, self.initiator)
        return o + (",user=%s,password-secret=sec0" % self.user if self.user else "")

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


def write_local(w: Writer, src: Source, zero_target=False) -> None:
    """qemu-img on the frontend: find the LUN, convert with progress as INFO lines."""
    secret_path = ""
    try:
        if w.user:
            fd, secret_path = tempfile.mkstemp(prefix="oneiscsi-sec-")
            with os.fdopen(fd, "w") as f:
                f.write(w.password)
        lun = _find_lun(w, src.size, secret_path)
        log.info("writing %d MB (%s) to %s LUN %s" % (math.ceil(src.size / MiB), src.fmt, w.iqn, lun))
        started = time.monotonic()
        _convert_with_progress(convert_argv(w, src.path, src.fmt, lun, secret_path, zero_target))
        took = max(time.monotonic() - started, 1e-6)
        log.info("wrote %d MB in %.2f s (%.0f MiB/s)" % (math.ceil(src.size / MiB), took, src.size / MiB / took))
    finally:
        if secret_path:
            _unlink(secret_path)


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
            errors.append("LUN %d: %s" % (lun, _last(err)))
    if found is None:
        raise Failure("no LUN of %s on %s can hold %d bytes (%s)" % (w.iqn, w.portal, need, "; ".join(errors)))
    return found


def _convert_with_progress(argv) -> None:
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise Failure("%s is not installed on the frontend" % argv[0]) from None
    import threading
    err = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    t.start()
    step, pending = 10, b""
    try:
        while True:
            data = proc.stdout.read1(4096)
            if not data:
                break
            pending = (pending + data)[-256:]
            for m in re.finditer(rb"\((\d+(?:\.\d+)?)/100%\)", pending):
                pct = float(m.group(1))
                while pct >= step and step < 100:
                    log.info("copied %d%%" % step)
                    step += 10
            pending = pending[-32:]
        rc = proc.wait()
    except BaseException:  # interrupted (oned's timeout, ^C): the copy must not outlive us
        proc.kill()
        proc.wait()
        raise
    t.join(5)
    if rc != 0:
        msg = _last(err[0].decode("utf-8", "replace") if err else "")
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
                          % (h, log.mask(_last(res.stderr)) or "exit code %d" % res.returncode))
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
        log.warn("bridge host %s is not reachable: %s" % (h, _last(res.stderr.decode("utf-8", "replace"))))
        return None
    out = res.stdout.decode("utf-8", "replace").strip()
    if res.returncode != 0 or not re.fullmatch(r"/var/tmp/oneiscsi-cp\.[A-Za-z0-9]+", out):
        raise Failure("cannot send the image to bridge host %s: %s"
                      % (h, _last(res.stderr.decode("utf-8", "replace")) or "exit code %d" % res.returncode))
    return out


def bridge_script(w: Writer, remote: str, fmt: str, size: int, zero_target=False) -> str:
    from oneiscsi.host import heredoc_value, q
    lines = ["umask 077", "img=%s" % q(remote), "sec=''",
             "trap 'rm -f \"$img\" ${sec:+\"$sec\"}' EXIT"]
    if w.user:
        lines += ["sec=$(mktemp)", heredoc_value("pw", w.password).rstrip("\n"), "printf '%s' \"$pw\" > \"$sec\""]
    sec_args = " ".join(q(a) for a in w.secret_args("SECRET")).replace(q("secret,id=sec0,file=SECRET"),
                                                                        "\"secret,id=sec0,file=$sec\"")

    def opts(lun_expr):
        pre, post = w.opts("@LUN@").split("@LUN@")
        return q(pre) + lun_expr + q(post)
    lines += [
        "lun=''",
        "for l in 0 1; do",
        "  s=$(%s info --output=json %s --image-opts %s 2>/dev/null | sed -n 's/.*\"virtual-size\": *\\([0-9]*\\).*/\\1/p' | head -n 1)"
        % (q(QEMU_IMG), sec_args, opts("\"$l\"")),
        "  if [ -n \"$s\" ] && [ \"$s\" -ge %d ]; then lun=$l; break; fi" % size,
        "done",
        "[ -n \"$lun\" ] || { echo 'no LUN of %s can hold the image' >&2; exit 3; }" % w.iqn,
        "%s convert %s %s \"$img\" --target-image-opts %s"
        % (q(QEMU_IMG), " ".join(q(f) for f in convert_flags(w, fmt, zero_target)), sec_args, opts("\"$lun\"")),
    ]
    return "\n".join(lines) + "\n"


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


# ---- creating a volume that never outlives a failure -------------------------------------
class NewVolume:
    """Create a volume (and its access settings) so that a failure at any step deletes it.

    `make(session) -> iqn` creates it; `fill(iqn)` (optional) writes it with no CLI
    session held. A command whose outcome is unknown (the connection broke while it
    ran) is checked afterwards: the volume is ours if its description is ours."""

    def __init__(self, cfg, name: str, description: str, writer_access: bool):
        self.cfg, self.name, self.description = cfg, name, description
        self.group = cfg.group()
        self.writer_access = writer_access and bool(cfg.access)
        self.created = self.unsure = False
        self.record = None

    def run(self, make, fill=None) -> str:
        with common.volume_lock(self.group.address, self.name, self.cfg.lock_wait):
            try:
                with client.session(self.group) as s:
                    try:
                        iqn = make(s)
                    except client.TransportError as e:
                        self.unsure = e.unsure
                        raise
                    self.created = True
                    log.info("created volume %s (%s)" % (self.name, iqn))
                    self._access(s)
                if fill is not None:
                    fill(iqn)
                    if self.record is not None:
                        with client.session(self.group) as s:
                            s.delete_access(self.name, self.record)
                        self.record = None
                return iqn
            except BaseException as e:
                suffix = self._undo()
                if isinstance(e, Failure):
                    err = Failure(str(e) + suffix)
                    err.exit_code = e.exit_code
                    raise err from None
                if suffix:
                    log.error(suffix.lstrip("; "))
                raise

    def _access(self, s) -> None:
        s.set_multihost(self.name, self.cfg.multihost)
        for rec in self.cfg.access:
            s.add_access(self.name, rec)
        if self.writer_access:
            self.record = s.add_access(self.name, cli.initiator_record(self.cfg.initiator(), self.cfg.chap_user))

    def _undo(self) -> str:
        """Delete the volume this action made (the caller holds the volume lock)."""
        if not (self.created or self.unsure):
            return ""
        try:
            with client.session(self.group) as s:
                if not self.created:
                    info = s.volume_info(self.name)
                    if info is None:
                        return ""
                    if info.get("Description", "") != self.description:
                        return "; a volume %s exists that this action did not create: left alone" % self.name
                s.delete_volume(self.name)
            log.info("deleted volume %s after the failure" % self.name)
            return "; volume %s deleted" % self.name
        except Failure as e2:
            return "; and volume %s could NOT be deleted (%s): delete it on the group" % (self.name, e2)


# ---- actions -----------------------------------------------------------------------------
def ds_cp(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    name = common.volume_name(image.name, iid)
    check_write_settings(cfg, ds.datastore)  # before any data moves
    src = prepare_source(image, ds.datastore, cfg)
    try:
        size_mb = max(image.size_mb, math.ceil(src.size / MiB), 1)
        vol = NewVolume(cfg, name, _description(image, iid), writer_access=True)
        vol.run(lambda s: s.create_volume(name, size_mb, cfg.pool, vol.description, cfg.thin,
                                          unrestricted=not cfg.access),
                lambda iqn: write(cfg, ds.datastore, iqn, src))
    finally:
        src.cleanup()
    call.cp_result(name, "raw")


def ds_mkfs(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    name = common.volume_name(image.name, iid)
    fs = (image.fs or "").strip().lower()
    if fs == "save_as":
        call.result(name)
        return
    fmt = (image.format or "raw").strip().lower()
    if fmt != "raw" or fs in ("qcow2",):
        raise Invalid("EqualLogic volumes are raw block devices: create the datablock with FORMAT=raw "
                      "(got %s)" % validate.show(fs if fs == "qcow2" else fmt))
    size_mb = image.size_mb
    if size_mb < 1:
        raise Invalid("the datablock needs a SIZE in MB (got %s)" % validate.show(image["SIZE"]))
    filesystem = fs not in ("", "raw", "none")
    if filesystem:
        if fs not in MKFS:
            raise Invalid("FS %s is refused: supported filesystems are %s" % (validate.show(fs), ", ".join(MKFS)))
        if not shutil.which(MKFS[fs][0]):
            raise Failure("%s is not installed on the frontend (needed for FS=%s)" % (MKFS[fs][0], fs))
        check_write_settings(cfg, ds.datastore)

    def fill(iqn):
        src = _make_fs(cfg, fs, size_mb)
        try:
            write(cfg, ds.datastore, iqn, src, zero_target=True)
        finally:
            src.cleanup()
    vol = NewVolume(cfg, name, _description(image, iid), writer_access=filesystem)
    vol.run(lambda s: s.create_volume(name, size_mb, cfg.pool, vol.description, cfg.thin,
                                      unrestricted=not cfg.access), fill if filesystem else None)
    call.result(name)


def _make_fs(cfg, fs: str, size_mb: int) -> Source:
    try:
        fd, path = tempfile.mkstemp(prefix="oneiscsi-mkfs-", suffix=".img", dir=cfg.staging_dir)
    except OSError as e:
        raise Failure("cannot create a file in EQL_STAGING_DIR %s: %s" % (cfg.staging_dir, e.strerror)) from None
    src = Source(path, staged=True)
    try:
        os.ftruncate(fd, size_mb * MiB)
        os.close(fd)
        _run(MKFS[fs] + [path], "mkfs (%s)" % fs)
        src.size = size_mb * MiB
    except BaseException:
        src.cleanup()
        raise
    return src


def ds_clone(call):
    ds, cfg = _setup(call)
    image = ds.image
    iid = _image_id(call, image)
    source = common.parse_source(image["PATH"] or image["SOURCE"], "PATH (the source image's SOURCE)")
    name = common.volume_name(image.name, iid)
    if name == source:
        raise Invalid("the clone would have the source's volume name %s" % name)
    vol = NewVolume(cfg, name, _description(image, iid), writer_access=False)
    vol.run(lambda s: s.clone_volume(source, name, vol.description, unrestricted=not cfg.access))
    call.cp_result(name, "raw")


def ds_rm(call):
    ds, cfg = _setup(call)
    name = common.parse_source(ds.image["SOURCE"])
    group = cfg.group()
    with common.volume_lock(group.address, name, cfg.lock_wait):
        with client.session(group) as s:
            info = s.volume_info(name)
            if info is None:
                log.info("volume %s does not exist: nothing to delete" % name)
                return
            _refuse_connected(s, name, info, "delete the image")
            try:
                s.delete_volume(name)
            except BaseException:
                _back_online(s, name)
                raise
    log.info("deleted volume %s" % name)


def _connections(info) -> int:
    m = re.match(r"\d+", info.get("Connections", "0") or "0")
    return int(m.group(0)) if m else 0


def _refuse_connected(s, name, info, doing):
    n = _connections(info)
    if n:
        allowed = sorted({r["initiator"] or r["ipaddress"] for r in s.access_records(name)})
        raise Failure("cannot %s: volume %s has %d iSCSI connection(s) (initiators allowed by its access "
                      "records: %s); log them out first (stop or undeploy the VMs using it)"
                      % (doing, name, n, ", ".join(allowed) or "none"))


def _back_online(s, name):
    try:
        s.set_online(name, True)
    except Failure as e:
        log.error("volume %s could not be put back online: %s" % (name, e))


def ds_stat(call):
    ds = call.ds()
    image, datastore = ds.image, ds.datastore
    path = image["PATH"]
    _check_path_text(path)
    if _is_url(path):
        size = _url_size(path)
    else:
        real = _local_path(path, datastore)
        with open(real, "rb") as f:
            kind = None if _no_decompress(datastore) else _compression(f.read(8))
        if kind == "gzip":
            size = _gzip_size(real)
        elif kind:
            size = os.path.getsize(real)  # bzip2/xz do not record their size (as OpenNebula's fs_size)
        else:
            size = image_info(real, path)[1]
    call.result(str(max(1, math.ceil(size / MiB))))


def _url_size(url: str) -> int:
    for method in ("HEAD", "GET"):
        with _open_url(url, method) as resp:
            for header in ("Content-Length", "OpenNebula-AppMarket-Size"):
                value = resp.headers.get(header, "")
                if value.isdigit() and int(value) > 0:
                    return int(value) * (MiB if header.startswith("OpenNebula") else 1)
    raise Failure("cannot tell the size of %s: the server sends no Content-Length" % log.mask(url))


def _gzip_size(path: str) -> int:
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little") or os.path.getsize(path)


def ds_monitor(call):
    ds, cfg = _setup(call, with_image=False)
    with client.session(cfg.group()) as s:
        total, free = s.pool_space(cfg.pool)
    call.result("USED_MB=%d\nTOTAL_MB=%d\nFREE_MB=%d" % (max(0, total - free), total, free))


# ---- snapshots ---------------------------------------------------------------------------
def _snap_target(call):
    ds, cfg = _setup(call)
    name = common.parse_source(ds.image["SOURCE"])
    sid = ds.image["TARGET_SNAPSHOT"]
    if not re.fullmatch(r"\d{1,9}", sid or ""):
        raise Invalid("TARGET_SNAPSHOT %s is refused: not a snapshot id" % validate.show(sid))
    return cfg, name, common.snapshot_name(sid)


def ds_snap_delete(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group.address, name, cfg.lock_wait):
        with client.session(group) as s:
            if not s.delete_snapshot(name, snap):
                log.warn("snapshot %s of volume %s does not exist: nothing to delete" % (snap, name))


def _revert(s, name, snap) -> None:
    """Volume offline, restore the snapshot, online. Up to the restore a failure leaves the
    volume as it was (back online); the restore is the point of no return. The snapshot a
    group makes of the current data on a restore is deleted, so the snapshot set stays
    what OpenNebula knows."""
    info = s.volume_info(name)
    if info is None:
        raise Failure("volume %s does not exist" % name)
    _refuse_connected(s, name, info, "revert to a snapshot")
    before = {r["name"] for r in s.snapshots(name)}
    if snap not in before:
        raise Failure("volume %s has no snapshot %s" % (name, snap))
    s.set_online(name, False)
    try:
        s.restore_snapshot(name, snap)
    except client.TransportError as e:
        if not e.unsure or not _new_snapshots(s, name, before):
            _back_online(s, name)
            raise
        log.info("the connection broke during the restore, which the group did")
    except BaseException:
        _back_online(s, name)
        raise
    try:
        s.set_online(name, True)
    except Failure as e:
        raise Failure("volume %s was reverted to %s but could not be put back online: %s" % (name, snap, e)) from None
    try:
        for extra in _new_snapshots(s, name, before):
            s.delete_snapshot(name, extra)
    except Failure as e:
        log.warn("volume %s was reverted to %s; the snapshot the group took before the restore could not "
                 "be deleted: %s" % (name, snap, e))


def _new_snapshots(s, name, before) -> list:
    try:
        return sorted({r["name"] for r in s.snapshots(name)} - before)
    except Failure:
        return []


def ds_snap_revert(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group.address, name, cfg.lock_wait):
        with client.session(group) as s:
            _revert(s, name, snap)
    log.info("volume %s reverted to %s" % (name, snap))


def ds_snap_flatten(call):
    cfg, name, snap = _snap_target(call)
    group = cfg.group()
    with common.volume_lock(group.address, name, cfg.lock_wait):
        with client.session(group) as s:
            _revert(s, name, snap)
            try:
                for r in s.snapshots(name):
                    if common.snapshot_id(r["name"]) is not None:
                        s.delete_snapshot(name, r["name"])
            except Failure as e:
                raise Failure("volume %s was reverted to %s but its snapshots could not all be deleted: %s"
                              % (name, snap, e)) from None
    log.info("volume %s flattened to %s; its snapshots are deleted" % (name, snap))


DS = {
    "cp": ds_cp,
    "mkfs": ds_mkfs,
    "clone": ds_clone,
    "rm": ds_rm,
    "stat": ds_stat,
    "monitor": ds_monitor,
    "snap_delete": ds_snap_delete,
    "snap_revert": ds_snap_revert,
    "snap_flatten": ds_snap_flatten,
}
