"""Driving the built executable the way oned does: through installed action links."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
PYZ = TOP / "dist" / "oneiscsi.pyz"
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

# OpenNebula versions whose argument shapes the tests use
VERSIONS = {"4.14": (4, 14), "5.12": (5, 12), "6.0": (6, 0), "6.8": (6, 8), "7.0": (7, 0)}


def build_if_stale() -> Path:
    """Build dist/oneiscsi.pyz unless it is newer than every source file."""
    newest = max(p.stat().st_mtime for p in (TOP / "oneiscsi").rglob("*.py"))
    newest = max(newest, (TOP / "build.py").stat().st_mtime, (TOP / "pyproject.toml").stat().st_mtime)
    if not PYZ.exists() or PYZ.stat().st_mtime < newest:
        subprocess.run([sys.executable, str(TOP / "build.py")], check=True, stdout=subprocess.DEVNULL)
    return PYZ


def install(remotes: Path, version: str = "6.8", extra=()) -> None:
    remotes.mkdir(parents=True, exist_ok=True)
    (remotes / "VERSION").write_text(version + ".0\n")
    subprocess.run([PYTHON, str(PYZ), "install", "--remotes", str(remotes), "--python", PYTHON, *extra],
                   check=True, capture_output=True, text=True)


class Result:
    def __init__(self, proc):
        self.rc = proc.returncode
        self.out = proc.stdout
        self.err = proc.stderr

    def __repr__(self):
        return "Result(rc=%r, out=%r, err=%r)" % (self.rc, self.out, self.err)


def run(path, args=(), stdin="", env=None, timeout=120) -> Result:
    """Run an action link (or any argv[0]) with oned's argument shape."""
    e = dict(os.environ)
    e.pop("ONEISCSI_ONE_VERSION", None)
    e.update(env or {})
    proc = subprocess.run([str(path), *[str(a) for a in args]], input=stdin, capture_output=True,
                          text=True, env=e, timeout=timeout)
    return Result(proc)


def ds_call(remotes: Path, driver: str, action: str, b64: str, obj_id, version, env=None) -> Result:
    """A DS action shaped per version: `<b64> <id>` up to 6.6, `<id>` + b64 on stdin from 6.8."""
    path = remotes / "datastore" / driver / action
    if tuple(version) >= (6, 8):
        return run(path, [obj_id], stdin=b64, env=env)
    return run(path, [b64, obj_id], env=env)


def error_text(res: Result, version) -> str:
    """The failure text oned would show for this stderr (see the interface spec, section 0)."""
    err = res.err
    if tuple(version) < (6, 0, 3):  # get_error_message: the whole stderr from 6.0.3 (tests/onedmodel.py)
        start, end = "ERROR MESSAGE --8<------", "ERROR MESSAGE ------>8--"
        assert start in err and end in err, err
        return err.split(start, 1)[1].split(end, 1)[0].strip()
    lines = [ln for ln in err.splitlines()
             if not (tuple(version) >= (7, 0) and ln.split(":", 1)[0] in ("ERROR", "INFO", "WARN", "DEBUG"))]
    return " ".join(ln.strip() for ln in lines).strip()


def wait_for(pred, timeout=5.0):
    """Poll `pred` until it is true or `timeout` passes; its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()
