"""build.py: byte-identical builds of one commit from different checkout paths; one shiv-built
file for CPython 3.9-3.13; the unpacked cache pruned."""
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import pytest

from tests import oneutil

pytestmark = pytest.mark.slow
WHEELS = str(oneutil.TOP / "build" / "wheels")  # the pinned wheels, downloaded once per checkout


def clone_and_build(dest, *args):
    subprocess.run(["git", "clone", "-q", str(oneutil.TOP), str(dest)], check=True)
    subprocess.run([sys.executable, str(dest / "build.py"), *args], check=True, capture_output=True,
                   env=dict(os.environ, ONEISCSI_WHEELS=WHEELS))
    return dest / "dist" / "oneiscsi.pyz"


def test_same_commit_two_paths_same_sha256(tmp_path):
    a = clone_and_build(tmp_path / "a")
    b = clone_and_build(tmp_path / "deeper" / "checkout-b")
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()
    res = subprocess.run([oneutil.PYTHON, str(a), "--version"], capture_output=True, text=True,
                         env=dict(os.environ, ONEISCSI_CACHE=str(tmp_path / "cache")))
    assert res.returncode == 0 and "oneiscsi" in res.stdout


def test_one_file_carries_each_pythons_compiled_parts_once():
    z = zipfile.ZipFile(oneutil.build_if_stale())
    names = z.namelist()
    for v in ("39", "310", "311", "312", "313"):
        assert "site-packages/oneiscsi_abi/cp%s/lxml/etree.cpython-%s-x86_64-linux-gnu.so" % (v, v) in names
        assert "site-packages/oneiscsi_abi/cp%s/_cffi_backend.cpython-%s-x86_64-linux-gnu.so" % (v, v) in names
    # abi3 wheels (one build serves every Python) once, in the common part
    for so in ("cryptography/hazmat/bindings/_rust.abi3.so", "bcrypt/_bcrypt.abi3.so", "nacl/_sodium.abi3.so"):
        assert ["site-packages/" + so] == [n for n in names if n.endswith(so)]
    assert not any("/invoke/" in n for n in names)  # paramiko's optional import, left out on purpose
    assert not any("objectify" in n or n.endswith(".pyx") for n in names)  # lxml: etree only
    assert "site-packages/oneiscsi/_data/udev/61-oneiscsi-eql.rules" in names
    # built by the pinned shiv, whose __main__.py gave way to the bootstrap
    import build
    env = json.loads(z.read("environment.json"))
    assert "shiv==" + env["shiv_version"] in build.pinned("build") and env["entry_point"] == build.ENTRY
    assert "_bootstrap/__init__.py" in names
    assert z.read("__main__.py") == b"import oneiscsi_boot  # noqa\n" and names[:2] == ["__main__.py", "oneiscsi_boot.py"]


def test_cache_keeps_the_running_and_the_previous_build(tmp_path):
    """Unpacked builds other than the running one and the newest other one go, once they are
    an hour old (an action may still run from them); so do the shiv-era folders."""
    cache = tmp_path / "cache"
    cache.mkdir()
    old = time.time() - 7200
    made = {}
    for n, name in enumerate(["pyz-%016x" % 1, "pyz-%016x" % 2, "oneiscsi.pyz_" + "a" * 64,
                              "pyz-%016x" % 3, "attachments"]):
        (cache / name).mkdir()
        made[name] = old - 100 * n if name != "pyz-%016x" % 3 else time.time()
        os.utime(cache / name, (made[name], made[name]))
    res = subprocess.run([oneutil.PYTHON, str(oneutil.build_if_stale()), "--version"], capture_output=True,
                         text=True, env=dict(os.environ, ONEISCSI_CACHE=str(cache)))
    assert res.returncode == 0, res
    left = sorted(os.listdir(cache))
    running = [n for n in left if n not in made]
    assert len(running) == 1 and running[0].startswith("pyz-")
    # kept: the running one, the newest other (3, recent), attachments (not a build);
    # pyz-1 is over an hour old but not the newest other: gone, like pyz-2 and the shiv one
    assert left == sorted(running + ["pyz-%016x" % 3, "attachments"])


def test_build_without_pip_says_what_to_run(tmp_path):
    """Debian's python3 alone (no pip, no venv module) and no downloaded wheels: one line."""
    from tests import pyroots
    if pyroots.usable():
        pytest.skip(pyroots.usable())
    root = pyroots.build("bookworm")
    subprocess.run(["git", "clone", "-q", str(oneutil.TOP), str(tmp_path / "src")], check=True)
    res = pyroots.run(root, ["python3", "/t/src/build.py"], binds={str(tmp_path): "/t"},
                      env={"ONEISCSI_WHEELS": "/t/wheels"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res
    assert res.stderr.strip().splitlines()[-1] == (
        "build.py: downloading the pinned wheels needs pip, and /usr/bin/python3 has neither pip nor venv: "
        "run `apt-get install python3-venv` (or python3-pip), then `python3 build.py` again")
    # with the wheels at hand the same python3 builds a working file without pip
    res = pyroots.run(root, ["sh", "-c", "cp -r /w/*.whl /t/wheels/ && python3 /t/src/build.py && "
                             "ONEISCSI_CACHE=/t/cache python3 /t/src/dist/oneiscsi.pyz --version"],
                      binds={str(tmp_path): "/t", WHEELS: "/w"}, env={"ONEISCSI_WHEELS": "/t/wheels"})
    assert res.returncode == 0 and "python 3.11" in res.stdout, res


def test_parallel_first_starts_unpack_once(tmp_path):
    """oned starts many actions at once after an upgrade: all succeed, one unpacked copy."""
    cache = tmp_path / "cache"
    env = dict(os.environ, ONEISCSI_CACHE=str(cache))
    procs = [subprocess.Popen([oneutil.PYTHON, str(oneutil.build_if_stale()), "--version"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(6)]
    results = [p.communicate(timeout=120) + (p.returncode,) for p in procs]
    assert all(rc == 0 and out.startswith("oneiscsi ") and err == "" for out, err, rc in results), results
    (build,) = os.listdir(cache)
    tag = subprocess.run([oneutil.PYTHON, "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"],
                         capture_output=True, text=True).stdout.strip()
    assert sorted(os.listdir(cache / build)) == [".lock", tag, "site-packages"]
    assert "oneiscsi_abi" not in os.listdir(cache / build / "site-packages")  # no other Python's parts
