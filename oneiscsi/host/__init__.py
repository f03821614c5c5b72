"""Running rendered POSIX sh scripts on hypervisor hosts: one `ssh` round trip each.

The system ssh client is used, so oneadmin's ~/.ssh/config (ControlMaster,
ports, keys) applies. The script travels on ssh's stdin, never on argv; values
that are secret are embedded in the script text (quoted heredocs), so they show
in no process list on either side. Every value in a script goes through `q()`.
"""
from __future__ import annotations

import os
import shlex
import subprocess

from oneiscsi import log, validate
from oneiscsi.errors import Failure

SSH_TIMEOUT = 15
PREAMBLE = "export LANG=C LC_ALL=C\nPATH=$PATH:/usr/sbin:/sbin  # the host's own order first\n"


def q(value) -> str:
    return shlex.quote(str(value))


def heredoc_value(var: str, value: str) -> str:
    """`var=$(cat <<'TAG' ...)`: a value (a password) that must not appear on any argv."""
    if "\n" in value or "\r" in value:
        raise Failure("a secret value contains a newline")
    tag = "ONEISCSI_EOF"
    while tag in value:
        tag += "_"
    return "%s=$(cat <<'%s'\n%s\n%s\n)\n" % (var, tag, value, tag)


def ssh_command(host: str) -> list:
    base = shlex.split(os.environ.get("ONEISCSI_SSH", "ssh"))
    timeout = os.environ.get("ONEISCSI_SSH_TIMEOUT", str(SSH_TIMEOUT))
    return base + ["-o", "BatchMode=yes", "-o", "ConnectTimeout=" + timeout, host, "sh -s"]


def run(host: str, script: str, timeout: float = 300, what: str = "host script"):
    """Run `script` on `host` (or locally for host '' / 'localhost'): CompletedProcess.

    Exit 255 with ssh's own message means the host could not be reached."""
    if host in ("", "localhost"):
        cmd = ["sh", "-s"]
    else:
        validate.hostname(host, "host")
        cmd = ssh_command(host)
    if log.verbose():
        log.debug("%s on %s:\n%s" % (what, host or "localhost", script))
    try:
        res = subprocess.run(cmd, input=PREAMBLE + script, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise Failure("%s on %s did not finish within %d s" % (what, host or "localhost", timeout)) from None
    except OSError as e:
        raise Failure("cannot run %s: %s" % (cmd[0], e)) from None
    log.debug("%s on %s: rc=%d stdout=%r stderr=%r" % (what, host, res.returncode, res.stdout, res.stderr))
    return res


def unreachable(res) -> bool:
    return res.returncode == 255


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
