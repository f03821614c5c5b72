#!/usr/bin/env python3
"""Build dist/oneiscsi.pyz: one executable shiv zipapp for CPython 3.9 to 3.13.

    python3 build.py                 # dist/oneiscsi.pyz
    python3 build.py -o FILE         # somewhere else

The pinned wheels ([tool.oneiscsi] wheels in pyproject.toml: file name + sha256) are
downloaded once into build/wheels (ONEISCSI_WHEELS overrides) with pip and checked
against their hashes; nothing is resolved or compiled. So are shiv and click
([tool.oneiscsi] build_wheels), which build.py runs straight from their wheel files: the
same hash-checked shiv whatever Python runs this script, with no pip or venv needed.

1. Staging: a site-packages folder holds oneiscsi, the pure-Python and abi3 wheels once,
   and the per-interpreter ones (lxml, cffi) once per CPython under oneiscsi_abi/cp3X/
   (not importable: no Python puts that folder on sys.path).
2. shiv (`python -m shiv --site-packages STAGE --reproducible --uncompressed -e ...`) makes
   the zipapp: the shebang, site-packages/ in the archive, its content hash (build id) and
   environment.json, its runtime _bootstrap/ and a __main__.py calling it.
3. build.py then rewrites that archive once: shiv's __main__.py becomes
   `import oneiscsi_boot`, oneiscsi_boot.py (BOOT below) is added uncompressed at the top,
   modes are normalised and the entries compressed. Of shiv's runtime nothing runs:
   _bootstrap would unpack every CPython's lxml/cffi and put none of them on sys.path, and
   its imports (json, hashlib, pathlib, ...) double a warm start (by hand, python3.11
   `--version`: 62 ms median against 29 ms). It stays in the archive as shiv wrote it,
   with environment.json (build id, entry point, shiv version). oneiscsi_boot picks
   the running interpreter's oneiscsi_abi/cp3X, unpacks only the common part and that one
   into ~/.cache/oneiscsi/pyz-<id> (id: sha256 of shiv's build id and of BOOT), refuses an
   unsupported Python in one line, prunes old unpacked builds, and is what install's
   launcher imports straight from the archive.

Two builds of one commit are byte-identical, wherever the checkout lives (fixed
SOURCE_DATE_EPOCH for shiv, fixed modes and order in the rewrite). Needs only a python3
(3.7+) once the wheels are there; to download them it uses this Python's pip, else a venv
it makes in build/venv.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

TOP = Path(__file__).resolve().parent
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# Micro versions matter to pip: cryptography declares Requires-Python "!=3.9.0,!=3.9.1".
PY_FULL = {"3.9": "3.9.18", "3.10": "3.10.12", "3.11": "3.11.2", "3.12": "3.12.3", "3.13": "3.13.1"}
EPOCH = "1700000000"  # shiv's SOURCE_DATE_EPOCH: fixed zip timestamps (reproducible builds)
ENTRY = "oneiscsi.__main__:main"  # shiv -e; the bootstrap runs it
ABI_DIR = "site-packages/oneiscsi_abi/"  # per-CPython parts, as data: cp3X/ below it
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
ABI_DIR = %(abi_dir)r  # each CPython's compiled dependencies: ABI_DIR + "cp3X/"


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
                    if (not name.startswith(prefix) or name.endswith("/")
                            or name.startswith(ABI_DIR) != prefix.startswith(ABI_DIR)):
                        continue  # the common part leaves out every ABI_DIR
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
                 ((site, "site-packages/"), (abi, ABI_DIR + tag + "/")))
    sys.path[:1] = [site, abi]  # in place of the archive itself (or -c's '')
    from %(module)s import %(function)s as run  # shiv's entry point (environment.json)
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


def wheel_table(key: str = "wheels") -> dict:
    """file name -> sha256 of every wheel that goes into the zipapp (build_wheels: shiv's)."""
    return dict(entry.split() for entry in pyproject_list(key))


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
    table = dict(wheel_table(), **wheel_table("build_wheels"))
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
        res = subprocess.run(cmd + pinned() + pinned("build"), capture_output=True, text=True)
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
        prefix = ABI_DIR + slot(f) + "/" if slot(f) else "site-packages/"
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


def stage(files: dict, site: Path) -> None:
    """files as the site-packages folder shiv takes (names without 'site-packages/')."""
    for name, (body, exe) in files.items():
        path = site / name[len("site-packages/"):]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(body)
        path.chmod(0o755 if exe else 0o644)


def run_shiv(site: Path, out: Path, wheels: Path) -> None:
    """shiv, as pinned in build_wheels, run from its wheel files (pure Python, zip-importable)."""
    path = [str(wheels / f) for f in sorted(wheel_table("build_wheels"))]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path), SOURCE_DATE_EPOCH=EPOCH, PYTHONNOUSERSITE="1")
    res = subprocess.run([sys.executable, "-m", "shiv", "--site-packages", str(site), "--reproducible",
                          "--uncompressed", "-e", ENTRY, "-p", "/usr/bin/env python3", "--root", ROOT,
                          "-o", str(out)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        fail("shiv failed: %s" % (res.stderr.strip().splitlines() or ["?"])[-1])


def finish(shiv_out: Path, path: Path, abis: list) -> str:
    """shiv's archive with oneiscsi_boot in front of it and as its __main__; returns the build id."""
    with zipfile.ZipFile(shiv_out) as z:
        env = json.loads(z.read("environment.json"))
        if env["entry_point"] != ENTRY or not z.read("__main__.py").endswith(b"\n_bootstrap.bootstrap()\n"):
            fail("shiv %s wrote an archive this build does not know how to finish" % env.get("shiv_version"))
        body = [(info, z.read(info)) for info in z.infolist() if info.filename != "__main__.py"]
    # shiv's content hash (names + bytes of site-packages) and the bootstrap, which may unpack differently
    build_id = hashlib.sha256(BOOT.encode() + env["build_id"].encode()).hexdigest()
    module, function = ENTRY.split(":")
    boot = BOOT % {"build": build_id, "abis": tuple(abis), "abi_dir": ABI_DIR, "root": ROOT,
                   "module": module, "function": function}
    date = body[0][0].date_time  # shiv's, from SOURCE_DATE_EPOCH
    # `python3 oneiscsi.pyz` runs __main__.py through runpy (on 3.9 that imports typing:
    # ~10 ms); install's launcher imports oneiscsi_boot from the archive instead.
    head = [("__main__.py", b"import oneiscsi_boot  # noqa\n", 0o644), ("oneiscsi_boot.py", boot.encode(), 0o644)]
    buf = io.BytesIO()
    buf.write(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(buf, "w") as z:
        for name, data, mode in head + [(i.filename, d, 0o755 if (i.external_attr >> 16) & 0o100 else 0o644)
                                        for i, d in body]:
            info = zipfile.ZipInfo(name, date)
            # the bootstrap stored: reading it then needs no zlib import
            info.compress_type = zipfile.ZIP_STORED if name in dict(h[:2] for h in head) else zipfile.ZIP_DEFLATED
            info.create_system = 3
            info.external_attr = (0o100000 | mode) << 16
            z.writestr(info, data, compresslevel=9 if name.endswith(".py") else 6)
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
    ap.add_argument("--python", metavar="X.Y",
                    help="accepted for older scripts (DESIGN.md section 1): every build serves CPython 3.9-3.13")
    args = ap.parse_args(argv)
    if args.python and args.python not in PY_FULL:
        fail("--python %s: the executable runs on CPython %s; no other build exists" % (args.python, ", ".join(PY_FULL)))
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
    with tempfile.TemporaryDirectory(prefix="oneiscsi-build-") as work:
        stage(files, Path(work) / "site-packages")
        run_shiv(Path(work) / "site-packages", Path(work) / "shiv.pyz", wheels)
        build_id = finish(Path(work) / "shiv.pyz", tmp_out, abis)
    os.replace(tmp_out, out)  # a running test never sees a half-written executable
    print("built %s (CPython %s) %d bytes sha256 %s build %s" % (
        out, ", ".join("%s.%s" % (a[2], a[3:]) for a in abis), out.stat().st_size, sha256(out), build_id[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
