#!/usr/bin/env python3
"""Build dist/oneiscsi.pyz: one executable zipapp for CPython 3.9 to 3.13.

    python3 build.py                 # dist/oneiscsi.pyz
    python3 build.py -o FILE         # somewhere else

The pinned wheels ([tool.oneiscsi] wheels in pyproject.toml: file name + sha256) are
downloaded once into build/wheels (ONEISCSI_WHEELS overrides) with pip and checked
against their hashes; nothing is resolved or compiled. Pure-Python and abi3 wheels go
into the zipapp once (`site-packages/`), the per-interpreter ones (lxml, cffi) once per
CPython version (`abi/cp3X/`); the zipapp's __main__ picks the folder of the running
interpreter and unpacks only that one. Two builds of one commit are byte-identical,
wherever the checkout lives. Needs only Debian's python3 once the wheels are there; to
download them it uses this Python's pip, else a venv it makes in build/venv.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

TOP = Path(__file__).resolve().parent
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# Micro versions matter to pip: cryptography declares Requires-Python "!=3.9.0,!=3.9.1".
PY_FULL = {"3.9": "3.9.18", "3.10": "3.10.12", "3.11": "3.11.2", "3.12": "3.12.3", "3.13": "3.13.1"}
ZIP_TIME = (2023, 11, 14, 22, 13, 20)  # fixed timestamps (reproducible builds)
ROOT = "~/.cache/oneiscsi"  # where the zipapp unpacks (ONEISCSI_CACHE overrides)
# Parts of the wheels oneiscsi never imports (only lxml.etree is used): left out for size.
TRIM = re.compile(r"^lxml/(objectify\.|html/|isoschematron/|includes/|sax\.|builder\.|usedoctest|cssselect)"
                  r"|^lxml/.*\.(pyx|pxd|pxi|h)$|\.dist-info/RECORD$")

# The zipapp's oneiscsi_boot.py (its __main__.py imports it). Python syntax any python3 can parse, so that an unsupported
# interpreter gets the one line instead of a SyntaxError.
BOOT = """\
# oneiscsi bootstrap, written by build.py: unpacks this build once (common part + the
# compiled dependencies of the running CPython) and runs oneiscsi from there.
import os
import sys

BUILD = %(build)r
ABIS = %(abis)r


def _say(msg):
    sys.stderr.write("oneiscsi: " + msg + "\\n")
    sys.exit(1)


def _extract(archive, root, base, parts):
    import shutil
    import zipfile
    try:
        os.makedirs(base, exist_ok=True)
        import fcntl
        lock = open(os.path.join(base, ".lock"), "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel first starts: one unpacks, the others wait
        with zipfile.ZipFile(archive) as z:
            for dest, prefix in parts:
                if os.path.isdir(dest):
                    continue
                tmp = "%%s.tmp-%%d" %% (dest, os.getpid())
                for info in z.infolist():
                    name = info.filename
                    if not name.startswith(prefix) or name.endswith("/"):
                        continue
                    path = os.path.join(tmp, name[len(prefix):])
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    with z.open(info) as src, open(path, "wb") as out:
                        shutil.copyfileobj(src, out)
                if dest != parts[0][0]:  # last: this interpreter's bytecode of both parts
                    _compile(parts[0][0], parts[0][0])
                    _compile(tmp, dest)
                try:
                    os.rename(tmp, dest)
                except OSError:  # another process unpacked it first
                    shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        _say("cannot unpack %%s into %%s (%%s); set ONEISCSI_CACHE to a folder this user can write"
             %% (archive, base, e.strerror or e))
    try:
        _prune(root, base)
    except OSError:
        pass  # pruning is housekeeping: never the reason an action fails
    lock.close()


def _compile(path, final):
    # Once per build and interpreter, as PYTHONDONTWRITEBYTECODE may forbid it later.
    import compileall
    compileall.compile_dir(path, ddir=final, quiet=2)


def _prune(root, keep):
    # Keep the running build, the newest other one (an upgrade in progress) and any unpacked
    # in the last hour (an action may still run from it); older unpacked builds, and those
    # of the shiv-based builds before them, go.
    import re
    import shutil
    import time
    old = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if path != keep and (re.match(r"pyz-[0-9a-f]{16}$", name) or re.search(r"\\.pyz_[0-9a-f]{64}$", name)):
            try:
                old.append((os.stat(path).st_mtime, path))
            except OSError:
                pass
    for mtime, path in sorted(old, reverse=True)[1:]:
        if mtime < time.time() - 3600:
            shutil.rmtree(path, ignore_errors=True)


def main():
    tag = "cp%%d%%d" %% sys.version_info[:2]
    if sys.implementation.name != "cpython" or tag not in ABIS:
        _say("%%s %%d.%%d cannot run this build; it runs on CPython %%s (install --python PATH "
             "chooses the interpreter of the installed actions)" %% (
                 sys.implementation.name, sys.version_info[0], sys.version_info[1],
                 ", ".join("%%s.%%s" %% (a[2], a[3:]) for a in ABIS)))
    root = os.environ.get("ONEISCSI_CACHE") or os.path.expanduser(%(root)r)
    base = os.path.join(root, "pyz-" + BUILD[:16])
    site = os.path.join(base, "site-packages")
    abi = os.path.join(base, tag)
    if not (os.path.isdir(site) and os.path.isdir(abi)):
        _extract(os.path.dirname(os.path.abspath(__file__)), root, base,
                 ((site, "site-packages/"), (abi, "abi/" + tag + "/")))
    sys.path[:1] = [site, abi]  # in place of the archive itself (or -c's '')
    from oneiscsi.__main__ import main as run
    run()


main()
"""


def pyproject_list(key: str) -> list:
    """A list of strings from [tool.oneiscsi] in pyproject.toml."""
    text = (TOP / "pyproject.toml").read_text()
    section = re.split(r"^\[tool\.oneiscsi\]\s*$", text, flags=re.M)[1]
    block = re.search(r"^%s = \[(.*?)^\]" % key, section, re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))


def pinned(key: str = "runtime") -> list:
    return pyproject_list(key)


def wheel_table() -> dict:
    """file name -> sha256 of every wheel that goes into the zipapp."""
    return dict(entry.split() for entry in pyproject_list("wheels"))


def slot(filename: str) -> str:
    """'' for a wheel any CPython 3.9+ can import (pure or abi3), else its tag (cp311)."""
    py, abi, _plat = filename[:-4].split("-")[-3:]
    return "" if abi in ("none", "abi3") else abi


def fail(msg: str) -> None:
    raise SystemExit("build.py: " + msg)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_command() -> list:
    """A pip that can download: this Python's, else build/venv's (made here when missing)."""
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode == 0:
        return [sys.executable, "-m", "pip"]
    venv = TOP / "build" / "venv"
    py = venv / "bin" / "python"
    if not py.exists():
        res = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if res.returncode != 0:
            shutil.rmtree(venv, ignore_errors=True)
            fail("downloading the pinned wheels needs pip, and %s has neither pip nor venv: "
                 "run `apt-get install python3-venv` (or python3-pip), then `python3 build.py` again"
                 % sys.executable)
    return [str(py), "-m", "pip"]


def fetch_wheels(dest: Path) -> None:
    """Every wheel of the table into dest, hash-checked; pip runs only for missing ones."""
    table = wheel_table()
    dest.mkdir(parents=True, exist_ok=True)

    def missing():
        return [f for f, h in table.items() if not (dest / f).exists() or sha256(dest / f) != h]

    pip = None
    for pyver, full in PY_FULL.items():
        if not missing():
            break
        tag = "cp" + pyver.replace(".", "")
        if not any(slot(f) in ("", tag) for f in missing()):
            continue
        pip = pip or pip_command()
        tmp = dest / ("tmp-%d" % os.getpid())
        cmd = pip + ["download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:", "--no-deps",
                     "--implementation", "cp", "--python-version", full, "-d", str(tmp)]
        for plat in PLATFORMS:
            cmd += ["--platform", plat]
        print("+ pip download (Python %s)" % pyver, flush=True)
        res = subprocess.run(cmd + pinned(), capture_output=True, text=True)
        if res.returncode != 0:
            fail("pip download for Python %s failed: %s" % (pyver, (res.stderr.strip().splitlines() or ["?"])[-1]))
        for f in tmp.iterdir():
            if f.name in table:
                os.replace(f, dest / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
    for f in missing():
        if (dest / f).exists():
            fail("%s has sha256 %s, pyproject.toml pins %s: delete it and build again, or fix the pin"
                 % (dest / f, sha256(dest / f), table[f]))
        fail("PyPI gave no %s (pinned in pyproject.toml [tool.oneiscsi] wheels)" % f)


def entries(wheels: Path) -> dict:
    """archive name -> (bytes, executable?) of everything below the bootstrap."""
    out = {}
    table = wheel_table()
    abis = sorted({slot(f) for f in table} - {""}, key=lambda t: int(t[3:]))
    per_abi = {t: sorted(f.split("-")[0] for f in table if slot(f) == t) for t in abis}
    if len({tuple(v) for v in per_abi.values()}) > 1:
        fail("the per-interpreter wheels differ between Pythons: %s" % per_abi)
    for f in sorted(table):
        prefix = "abi/%s/" % slot(f) if slot(f) else "site-packages/"
        with zipfile.ZipFile(wheels / f) as z:
            for info in z.infolist():
                name = info.filename
                if name.endswith("/") or TRIM.search(name):
                    continue
                if name.split("/")[0].endswith(".data"):
                    fail("%s has a .data folder, which this build does not place" % f)
                if name.endswith(".pth"):
                    fail("%s ships a .pth file, which the bootstrap does not process" % f)
                out[prefix + name] = (z.read(info), bool((info.external_attr >> 16) & 0o111))
    for path in sorted((TOP / "oneiscsi").rglob("*")):
        rel = path.relative_to(TOP).as_posix()
        if path.is_file() and "__pycache__" not in rel and not rel.endswith(".pyc"):
            out["site-packages/" + rel] = (path.read_bytes(), os.access(path, os.X_OK))
    for path in sorted((TOP / "udev").iterdir()):  # shipped for `--selftest --fix`
        out["site-packages/oneiscsi/_data/udev/" + path.name] = (path.read_bytes(), False)
    build_py = "# written by build.py\nVERSION = %r\nCOMMIT = %r\n" % (version(), commit())
    out["site-packages/oneiscsi/_build.py"] = (build_py.encode(), False)
    return out, abis


def write_zip(path: Path, files: dict, abis: list) -> str:
    h = hashlib.sha256(BOOT.encode())  # a new bootstrap may unpack differently
    for name in sorted(files):
        h.update(name.encode() + b"\0" + hashlib.sha256(files[name][0]).digest())
    build_id = h.hexdigest()
    boot = BOOT % {"build": build_id, "abis": tuple(abis), "root": ROOT}
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    # `python3 oneiscsi.pyz` runs __main__.py through runpy (on 3.9 that imports typing:
    # ~10 ms); install's launcher imports oneiscsi_boot from the archive instead.
    head = [("__main__.py", (b"import oneiscsi_boot  # noqa\n", False)), ("oneiscsi_boot.py", (boot.encode(), False))]
    with zipfile.ZipFile(buf, "w") as z:
        for name, (body, exe) in head + sorted(files.items()):
            info = zipfile.ZipInfo(name, ZIP_TIME)
            # the bootstrap stored: reading it then needs no zlib import
            info.compress_type = zipfile.ZIP_STORED if name in dict(head) else zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = (0o100755 if exe else 0o100644) << 16
            z.writestr(info, body, compresslevel=9 if name.endswith(".py") else 6)
    path.write_bytes(buf.getvalue())
    path.chmod(0o755)
    return build_id


def version() -> str:
    for line in (TOP / "pyproject.toml").read_text().splitlines():
        if line.startswith("version"):
            return line.split("=", 1)[1].strip().strip('"')
    return "0"


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(TOP), "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(TOP), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", default=str(TOP / "dist" / "oneiscsi.pyz"))
    ap.add_argument("--print-pins", metavar="KEY", help=argparse.SUPPRESS)  # tests/setup.sh
    args = ap.parse_args(argv)
    if args.print_pins:
        print("\n".join(pinned(args.print_pins)))
        return 0
    if sys.version_info < (3, 7):
        fail("needs Python 3.7 or newer to run (the executable it builds runs on 3.9 to 3.13)")
    wheels = Path(os.environ.get("ONEISCSI_WHEELS") or TOP / "build" / "wheels")
    wheels.mkdir(parents=True, exist_ok=True)
    import fcntl
    with open(wheels / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builds (parallel test sessions) take turns
        fetch_wheels(wheels)
    files, abis = entries(wheels)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name("%s.build-%d" % (out.name, os.getpid()))
    build_id = write_zip(tmp_out, files, abis)
    os.replace(tmp_out, out)  # a running test never sees a half-written executable
    print("built %s (CPython %s) %d bytes sha256 %s build %s" % (
        out, ", ".join("%s.%s" % (a[2], a[3:]) for a in abis), out.stat().st_size, sha256(out), build_id[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
