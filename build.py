#!/usr/bin/env python3
"""Build dist/oneiscsi.pyz: one self-contained shiv zipapp.

    python3 build.py                  # for the Python running this script
    python3 build.py --python 3.9     # for a frontend with Python 3.9 (fetches cp39 wheels)

Dependencies come only as the binary wheels pinned in requirements.lock (no
resolver, no sdist builds), so two builds of one commit are byte-identical,
wherever the checkout lives. Needs `pip` and `shiv` importable by this Python
(the README's set-up installs them in .venv).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
# Micro versions matter: cryptography declares Requires-Python "!=3.9.0,!=3.9.1".
PY_FULL = {"3.9": "3.9.18", "3.10": "3.10.12", "3.11": "3.11.2", "3.12": "3.12.3", "3.13": "3.13.1"}
EPOCH = "1700000000"  # fixed zip timestamps (reproducible builds)
ROOT = "~/.cache/oneiscsi"  # default SHIV_ROOT: in the home of the user running it (oneadmin)

# Replaces shiv's __main__.py. When this build is already extracted it puts the
# extracted site-packages on sys.path and runs the entry point directly; shiv's
# bootstrap (which imports compileall, json, hashlib, pathlib, ...: ~20 ms) then
# only runs on the first start of a build, to extract it. The directory name is
# the one shiv's bootstrap uses: <root>/<real file name>_<build id>.
FAST_MAIN = """\
# -*- coding: utf-8 -*-
# oneiscsi fast start (written by build.py); falls back to shiv's bootstrap.
import os
import sys


def _fast():
    if os.environ.get("SHIV_FORCE_EXTRACT"):
        return False
    root = os.environ.get("SHIV_ROOT") or os.path.expanduser(%(root)r)
    name = os.path.basename(os.path.realpath(sys.argv[0]))
    site = os.path.join(root, name + "_" + %(build_id)r, "site-packages")
    if not os.path.isdir(site):
        return False
    sys.path.insert(0, site)  # the build checks there are no .pth files to process
    from oneiscsi.__main__ import main
    main()
    return True


if not _fast():
    import _bootstrap
    _bootstrap.bootstrap()
"""


def add_fast_main(pyz: Path) -> None:
    import json
    import zipfile
    data = pyz.read_bytes()
    shebang = data[: data.index(b"\n") + 1] if data.startswith(b"#!") else b""
    with zipfile.ZipFile(pyz) as src:
        env = json.loads(src.read("environment.json"))
        entries = [(info, src.read(info)) for info in src.infolist()]
    tmp = pyz.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(shebang)
        with zipfile.ZipFile(f, "w") as dst:
            for info, body in entries:
                if info.filename == "__main__.py":
                    body = (FAST_MAIN % {"root": env["root"], "build_id": env["build_id"]}).encode()
                dst.writestr(info, body)
    os.chmod(tmp, 0o755)
    os.replace(tmp, pyz)


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def pinned(key: str = "runtime") -> list:
    """The exact pins of [tool.oneiscsi] in pyproject.toml."""
    text = (TOP / "pyproject.toml").read_text()
    section = re.split(r"^\[tool\.oneiscsi\]\s*$", text, flags=re.M)[1]
    block = re.search(r"^%s = \[(.*?)^\]" % key, section, re.M | re.S)
    return re.findall(r'"([^"]+)"', block.group(1))


def fetch_wheels(pyver: str, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
           "--only-binary=:all:", "--no-deps", "--implementation", "cp",
           "--python-version", PY_FULL.get(pyver, pyver + ".99"), "-d", dest]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    run(cmd + pinned())


def stage(pyver: str, wheels: Path, site: Path) -> None:
    if site.exists():
        shutil.rmtree(site)
    site.mkdir(parents=True)
    # pip install --target with --python-version requires --only-binary/--no-deps: all given.
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-index", "--find-links", wheels, "--no-deps", "--no-compile", "--only-binary=:all:",
           "--implementation", "cp", "--python-version", PY_FULL.get(pyver, pyver + ".99"),
           "--target", site]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    run(cmd + pinned())
    # pip records the install location in nothing else; drop caches it may leave.
    for junk in site.rglob("__pycache__"):
        shutil.rmtree(junk, ignore_errors=True)
    if list(site.glob("*.pth")):
        raise SystemExit("a dependency ships a .pth file: the fast start in FAST_MAIN must process it")
    shutil.copytree(TOP / "oneiscsi", site / "oneiscsi",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (site / "oneiscsi" / "_build.py").write_text(
        "# written by build.py\nVERSION = %r\nCOMMIT = %r\n" % (version(), commit()))


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
    ap.add_argument("--python", default="%d.%d" % sys.version_info[:2],
                    help="target Python major.minor (default: this interpreter's)")
    ap.add_argument("-o", "--output", default=str(TOP / "dist" / "oneiscsi.pyz"))
    args = ap.parse_args(argv)
    if args.python not in PY_FULL:
        ap.error("unsupported --python %s (choose from %s)" % (args.python, ", ".join(PY_FULL)))

    work = TOP / "build" / ("py" + args.python)
    work.mkdir(parents=True, exist_ok=True)
    import fcntl
    lock = open(work / ".lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent builds (parallel test sessions) take turns
    wheels = work / "wheels"
    fetch_wheels(args.python, wheels)
    site = work / "site-packages"
    stage(args.python, wheels, site)

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_name(out.name + ".build")
    env = dict(os.environ, SOURCE_DATE_EPOCH=EPOCH)
    # shiv's build id is a hash of the content: it names the extraction directory, so a
    # new build never runs with a stale extraction.
    run([sys.executable, "-m", "shiv", "--site-packages", site, "-e", "oneiscsi.__main__:main",
         "-o", tmp_out, "-p", "/usr/bin/env python3", "--reproducible", "--compressed",
         "--compile-pyc", "--root", ROOT], env=env, cwd=str(work))
    add_fast_main(tmp_out)
    os.replace(tmp_out, out)  # a running test never sees a half-written executable
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    print("built %s (Python %s) %d bytes sha256 %s" % (out, args.python, out.stat().st_size, digest))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--print-pins"]:  # used by tests/setup.sh
        print("\n".join(pinned(sys.argv[2] if len(sys.argv) > 2 else "runtime")))
        sys.exit(0)
    sys.exit(main())
