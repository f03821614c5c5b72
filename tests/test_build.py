"""build.py: byte-identical builds of one commit from different checkout paths; other Pythons."""
import hashlib
import subprocess
import sys
import zipfile

import pytest

from tests import oneutil

pytestmark = pytest.mark.slow


def clone_and_build(dest, *args):
    subprocess.run(["git", "clone", "-q", str(oneutil.TOP), str(dest)], check=True)
    subprocess.run([sys.executable, str(dest / "build.py"), *args], check=True, capture_output=True)
    return dest / "dist" / "oneiscsi.pyz"


def test_same_commit_two_paths_same_sha256(tmp_path):
    a = clone_and_build(tmp_path / "a")
    b = clone_and_build(tmp_path / "deeper" / "checkout-b")
    assert hashlib.sha256(a.read_bytes()).hexdigest() == hashlib.sha256(b.read_bytes()).hexdigest()
    res = subprocess.run([oneutil.PYTHON, str(a), "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and "oneiscsi" in res.stdout


def test_build_for_python_39_takes_cp39_wheels(tmp_path):
    pyz = clone_and_build(tmp_path / "c", "--python", "3.9")
    names = zipfile.ZipFile(pyz).namelist()
    assert any("lxml/etree.cpython-39-x86_64-linux-gnu.so" in n for n in names)
    assert not any("cpython-311" in n for n in names)
    assert not any("/invoke/" in n for n in names)  # paramiko's optional import, left out on purpose
