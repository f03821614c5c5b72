"""The source of an eqliscsi cp or stat: local files and http(s) URLs, checksums,
unpacking, staging, and what qemu-img says about the image (format, virtual size).

Backups (`oneimage restore`): the backup datastore's `restore` allocates one image per disk
with PATH=`rsync://<bk_ds>/<bj_id>/<chain>/<path>/disk.N.M` or `restic://...` and
FROM_BACKUP_DS (src/tm_mad/lib/backup.rb `BackupRestore#disk_images`, release-7.4.0); oned asks
the backup datastore's `stat` for the size (src/rm/api/ImageAPI.cc, FROM_BACKUP_DS, 7.4.0) and
then runs this datastore's `cp`. Such a PATH goes to OpenNebula's own
`<remotes>/datastore/downloader.sh --nodecomp URL -` (the same tool and flag the upstream drivers
use: src/datastore_mad/remotes/ceph/cp stages it the same way, src/tm_mad/ssh/restore streams it;
release-7.4.0), which prints one qcow2 image with the increments merged
(src/datastore_mad/remotes/rsync_downloader.rb, restic_downloader.rb); the stream is staged like
an http download and written as any qcow2 source. `rsync+rbd://` / `restic+rbd://` are Ceph's own
backup format (RBD export/diff archives) and are refused."""
from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import os
import re
import subprocess
import tempfile
import time
import zlib

from oneiscsi import log, validate
from oneiscsi.errors import Failure, Invalid, NotSupported


MiB = 1024 * 1024
CHUNK = 4 * MiB
# raw and qcow2 only: other formats can name further files (a vmdk descriptor's extents)
FORMATS = ("raw", "qcow2")
MAGIC = ((b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"))
HTTP_TIMEOUT = 60
QEMU_IMG = "qemu-img"


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


# rsync://<ds id>/<backup job id or empty>/<inc id>:<snapshot>[,...]/<absolute path ending in disk.N.M>
# (backup.rb `BackupRestore`: base_url "<proto>://<ds_id>/<bj_id>/<chain>" + the file's path). The
# downloaders put the path and the chain into shell commands on the backup server: only these
# characters pass, and no `..` component.
BACKUP_URL = re.compile(r"^(rsync|restic)://(\d{1,10})/(\d{0,10})/(\d{1,10}:[A-Za-z0-9]{1,64}"
                        r"(?:,\d{1,10}:[A-Za-z0-9]{1,64}){0,1000})/(/(?:[A-Za-z0-9_][A-Za-z0-9._-]*/)*"
                        r"disk\.\d{1,6}(?:\.\d{1,10})?)$")
BACKUP_SCHEMES = re.compile(r"^(rsync|restic)(\+[a-z0-9]+)?://", re.IGNORECASE)


def is_backup_url(path: str) -> bool:
    return bool(BACKUP_SCHEMES.match(path or ""))


def check_backup_url(path: str, image=None) -> str:
    """The backup URL `path`, validated (see BACKUP_URL); FROM_BACKUP_DS, when the image has it,
    must name the URL's datastore."""
    m = BACKUP_SCHEMES.match(path)
    if m and m.group(2):
        raise NotSupported("PATH %s is a Ceph (%s) backup: its RBD archives cannot be restored into an "
                           "EqualLogic volume; restore it into a Ceph datastore"
                           % (validate.show(path, 200), m.group(0).rstrip(":/")))
    m = BACKUP_URL.match(path)
    if not m or any(part in (".", "..") for part in m.group(5).split("/")):
        raise Invalid("PATH %s is refused: not a backup URL as OpenNebula's backup datastores write it "
                      "(<rsync|restic>://<ds id>/<job id>/<inc>:<snapshot>,.../<path>/disk.<id>.<inc>)"
                      % validate.show(path, 200))
    want = image.tpl("FROM_BACKUP_DS").strip() if image is not None else ""
    if want and want != m.group(2):
        raise Invalid("PATH %s is refused: it names backup datastore %s, the image's FROM_BACKUP_DS is %s"
                      % (validate.show(path, 200), m.group(2), validate.show(want)))
    return path


def downloader(remotes: str) -> str:
    """OpenNebula's downloader.sh, where the upstream actions find it: next to the driver
    folders (`$(dirname $0)/../downloader.sh` in src/datastore_mad/remotes/fs/cp, release-7.4.0)."""
    path = os.path.join(remotes, "datastore", "downloader.sh")
    if not os.access(path, os.X_OK):
        raise Failure("OpenNebula's downloader.sh is not at %s (needed to restore a backup): run the action "
                      "from OpenNebula's remotes tree" % path)
    return path


def _from_backup(path, remotes, cfg, hashes, unpack, rate) -> Source:
    """Stage what `downloader.sh --nodecomp URL -` prints; its exit status decides."""
    import threading
    argv = [downloader(remotes), "--nodecomp", path, "-"]
    log.info("restoring backup %s through %s" % (path, argv[0]))
    try:  # its own process group: what it starts (ssh, qemu-img) dies with it on a failure here
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as e:
        raise Failure("cannot run %s: %s" % (argv[0], e)) from None
    err = []
    t = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    t.start()
    src = None
    try:
        src = _stage(proc.stdout.read, cfg, hashes, unpack, rate, "backup %s" % path)
        rc = proc.wait()
    except BaseException:
        _kill(proc)
        raise
    t.join(10)
    if rc != 0:
        src.cleanup()
        msg = last_line(err[0].decode("utf-8", "replace") if err else "")
        raise Failure("downloader.sh could not fetch %s: %s" % (path, log.mask(msg) or "exit code %d" % rc))
    return src


def _kill(proc) -> None:
    import signal
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass
        proc.wait()


def _check_path_text(path: str) -> None:
    if not path:
        raise Invalid("the image has no PATH to copy from")
    if re.search(r"[\x00-\x1f\x7f]", path):
        raise Invalid("PATH %s is refused: it contains a newline or control character" % validate.show(path))


def restricted_dirs(datastore) -> tuple:
    """(RESTRICTED_DIRS, SAFE_DIRS) as OpenNebula's fs driver sees them:
    src/datastore_mad/remotes/libfs.sh `set_up_datastore` (release-4.14.2 to release-7.4.0)
    puts `$VAR_LOCATION $ETC_LOCATION $HOME/` (/var/lib/one/ and /etc/one/, or under
    $ONE_LOCATION) before the datastore's RESTRICTED_DIRS. oned itself gives a new
    datastore SAFE_DIRS="/var/tmp" RESTRICTED_DIRS="/" when it has neither
    (src/datastore/Datastore.cc `Datastore::insert`, 5.x+)."""
    one = os.environ.get("ONE_LOCATION", "")
    var, etc = (one + "/var/", one + "/etc/") if one else ("/var/lib/one/", "/etc/one/")
    restricted = [var, etc, os.environ.get("HOME", "") + "/"] + datastore.tpl("RESTRICTED_DIRS").split()
    return tuple(restricted), tuple(datastore.tpl("SAFE_DIRS").split())


def check_restricted(path: str, datastore) -> None:
    """Refuse a frontend path as `check_restricted` (libfs.sh) does: the resolved path
    (`readlink -f`) is allowed when it starts with a SAFE_DIRS entry, else refused when
    it starts with a RESTRICTED_DIRS entry. Entries are plain string prefixes, `/`
    included (OpenNebula hands them to `grep -E "^$path"`; here a regex character in an
    entry stands for itself)."""
    real = os.path.realpath(path)
    restricted, safe = restricted_dirs(datastore)
    if any(real.startswith(d) for d in safe):
        return
    hit = next((d for d in restricted if real.startswith(d)), None)
    if hit is not None:
        raise Invalid("PATH %s is refused: it resolves to %s, under the restricted directory %s (RESTRICTED_DIRS "
                      "%s of the datastore, plus OpenNebula's own directories and oneadmin's home); copy the "
                      "file into a SAFE_DIRS directory (%s) or add its directory to the datastore's SAFE_DIRS"
                      % (validate.show(path, 200), validate.show(real, 200), hit,
                         validate.show(datastore.tpl("RESTRICTED_DIRS")), " ".join(safe) or "none set"))


def _local_path(path: str, datastore) -> str:
    """An absolute, existing regular file outside RESTRICTED_DIRS (unless under SAFE_DIRS)."""
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        raise NotSupported("PATH %s: only local files and http(s) URLs can be copied to an EqualLogic "
                           "volume" % validate.show(path))
    if not path.startswith("/"):
        raise Invalid("PATH %s is refused: give an absolute path or an http(s) URL" % validate.show(path))
    check_restricted(path, datastore)
    real = os.path.realpath(path)
    if not os.path.isfile(real):
        raise Invalid("PATH %s is not a regular file on the frontend: give an existing image file"
                      % validate.show(path))
    if not os.access(real, os.R_OK):
        raise Invalid("PATH %s cannot be read by %s: make it readable for that user" % (validate.show(path), _user()))
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


def prepare_source(image, datastore, cfg, remotes: str = "") -> Source:
    """The image's PATH as a local file ready for qemu-img (see the module docstring)."""
    path = image["PATH"]
    _check_path_text(path)
    hashes = _hashes(image)
    unpack = not _no_decompress(datastore)
    rate = _rate(datastore)  # downloads here; every write to a volume through qemu-img -r
    if is_backup_url(path):
        src = _from_backup(check_backup_url(path, image), remotes, cfg, hashes, unpack, rate)
    elif _is_url(path):
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
    res = run([QEMU_IMG, "info", "--output=json", path], "qemu-img info")
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


def run(argv, what, timeout=600, env=None):
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    except FileNotFoundError:
        raise Failure("%s: %s is not installed on the frontend" % (what, argv[0])) from None
    except subprocess.TimeoutExpired:
        raise Failure("%s did not finish within %d s" % (what, timeout)) from None
    if res.returncode != 0:
        raise Failure("%s failed: %s" % (what, last_line(res.stderr) or "exit code %d" % res.returncode))
    return res


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


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


def size_of(path: str, datastore) -> int:
    """Bytes of a source: virtual size for qcow2, gzip's recorded size, Content-Length for URLs."""
    _check_path_text(path)
    if is_backup_url(path):
        # with FROM_BACKUP_DS oned asks the backup datastore's stat (src/rm/api/ImageAPI.cc, 7.4.0)
        raise NotSupported("PATH %s is a backup: restore it with `oneimage restore`, which gives the image "
                           "FROM_BACKUP_DS so that the backup datastore tells its size" % validate.show(path, 200))
    if _is_url(path):
        return _url_size(path)
    real = _local_path(path, datastore)
    with open(real, "rb") as f:
        kind = None if _no_decompress(datastore) else _compression(f.read(8))
    if kind == "gzip":
        return _gzip_size(real)
    if kind:
        return os.path.getsize(real)  # bzip2/xz do not record their size (as OpenNebula's fs_size)
    return image_info(real, path)[1]
