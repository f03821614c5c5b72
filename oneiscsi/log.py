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
`secret()` (passwords, CHAP secrets) are replaced by `****`.
"""
from __future__ import annotations

import os
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


def mask(text: str) -> str:
    for s in sorted(_secrets, key=len, reverse=True):
        text = text.replace(s, "****")
    return text


def _logfile():
    if not _state["opened"]:
        _state["opened"] = True
        path = os.environ.get("ONEISCSI_LOG", DEFAULT_LOGFILE)
        if path and path != "-":
            try:
                _state["file"] = open(path, "a", encoding="utf-8")
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
