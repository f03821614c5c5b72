"""Logging: `INFO:`/`WARN:`/`ERROR:`/`DEBUG:` lines for oned, a log file, masking.

Where log lines go depends on what the calling oned does with stderr
(reference: opennebula-driver-interface.md section 0):

* up to 6.0.2 the failure text is only what stands between the ERROR MESSAGE
  markers, so log lines on stderr are safe and end up in the VM/image log;
* 6.0.3 to 6.10 turn the *whole* stderr of a failed action into the error
  message and drop stderr on success (CommandManager.rb `get_error_message`
  at release-6.0.3), so log lines go to the log file only and the operator
  sees exactly one line;
* 7.0+ forward `INFO:`-style lines as LOG messages and build the error from
  the other lines, so log lines go to stderr again.
  (one.version.Wire.stderr_logs; per-version model: tests/onedmodel.py)

Every line written anywhere passes through `mask()`: values registered with
`secret()` (passwords, CHAP secrets) are replaced by `****`, and every word that
is base64 of text (oned's DS_DRIVER_ACTION_DATA and VM templates travel on argv
that way, before any secret in them is known) is replaced by
`[base64, N chars, not logged]`: masking cannot see a secret inside an encoding,
so encoded data is never written at all.

The log file is created mode 0640 whatever the umask (and a looser existing file
of ours is narrowed to 0640): it holds host names, IQNs and host script output.
"""
from __future__ import annotations

import base64
import binascii
import os
import re
import sys
import time

DEFAULT_LOGFILE = "/var/log/one/oneiscsi.log"

_secrets: set = set()
_state = {"tag": "oneiscsi", "stderr": True, "debug": False, "file": None, "opened": False}


def configure(tag: str, stderr_logs: bool = True) -> None:
    _state["tag"] = tag
    _state["stderr"] = stderr_logs
    _state["debug"] = os.environ.get("ONEISCSI_DEBUG") == "1" or os.environ.get("ONE_MAD_DEBUG") == "1"


def secret(value) -> None:
    """Register a value that must never appear in any output."""
    if value and len(str(value)) >= 1:
        _secrets.add(str(value))


LOGFILE_MODE = 0o640
# a word of the base64 alphabet long enough to hide a secret (16 chars = 12 bytes)
_B64_WORD = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")


def _b64_text(word: str) -> bool:
    """True when `word` decodes as base64 to printable text (never true for paths or IQNs,
    whose '/', '.' and ':' break the word or make its decoding binary noise)."""
    if len(word) % 4:
        return False
    try:
        raw = base64.b64decode(word, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return False
    return all(c.isprintable() or c in "\t\r\n" for c in raw)


def _hide_b64(m) -> str:
    word = m.group(0)
    return "[base64, %d chars, not logged]" % len(word) if _b64_text(word) else word


def mask(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, "****")
    return _B64_WORD.sub(_hide_b64, text)


def _open_private(path: str):
    """Append to `path`, created 0640 whatever the umask; a looser file we own is narrowed."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), LOGFILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o7137 and st.st_uid == os.geteuid():
            os.fchmod(fd, st.st_mode & LOGFILE_MODE)
    except OSError:
        pass
    return os.fdopen(fd, "a", encoding="utf-8")


def _logfile():
    if not _state["opened"]:
        _state["opened"] = True
        path = os.environ.get("ONEISCSI_LOG", DEFAULT_LOGFILE)
        if path and path != "-":
            try:
                _state["file"] = _open_private(path)
            except OSError:
                _state["file"] = None
    return _state["file"]


def to_file(level: str, msg: str) -> None:
    f = _logfile()
    if f is None:
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    lines = mask(msg).splitlines() or [""]
    try:
        for line in lines:
            f.write("%sZ [%d] %s %s %s\n" % (stamp, os.getpid(), _state["tag"], level, line))
        f.flush()
    except OSError:
        pass


def _emit(level: str, msg: str) -> None:
    to_file(level, msg)
    if _state["stderr"]:
        for line in mask(str(msg)).splitlines() or [""]:
            sys.stderr.write("%s: %s: %s\n" % (level, _state["tag"], line))
        sys.stderr.flush()


def info(msg: str) -> None:
    _emit("INFO", msg)


def warn(msg: str) -> None:
    _emit("WARN", msg)


def error(msg: str) -> None:
    _emit("ERROR", msg)


def verbose() -> bool:
    """ONEISCSI_DEBUG=1 or ONE_MAD_DEBUG=1: also log bulky details (rendered host scripts)."""
    return _state["debug"]


def debug(msg: str) -> None:
    if _state["debug"]:
        _emit("DEBUG", msg)
    else:
        to_file("DEBUG", msg)


def exception(exc: BaseException) -> None:
    """The full traceback, to the log file only (never to stderr)."""
    import traceback
    to_file("ERROR", "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


def logfile_path() -> str:
    return os.environ.get("ONEISCSI_LOG", DEFAULT_LOGFILE)
