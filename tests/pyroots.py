"""Minimal Debian root filesystems with their own python3, to run one built
dist/oneiscsi.pyz under the CPython each release ships (11: 3.9, 12: 3.11, 13: 3.13).

Each is `debootstrap --variant=minbase --include=python3`, made once and cached in
/var/cache/oneiscsi-pyroots/<suite>-<key>/ (ONEISCSI_PYROOTS_CACHE overrides); the .debs
are cached next to them. The mirror is the one the real-kernel guest uses
(oneiscsi.sim.realhost._mirror). `run()` executes a command chrooted into a root, in a
private mount namespace (unshare -m) where /proc, /dev and the test's own folder are
mounted, so nothing leaks into the cached tree but the files the
command writes into that folder; the network namespace is the machine's, so simulators on
loopback are reachable.

    python3 -m tests.pyroots build        # make all three (CI does this before pytest)
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shlex
import shutil
import subprocess
import sys

SUITES = {"bullseye": "3.9", "bookworm": "3.11", "trixie": "3.13"}
PACKAGES = ("python3",)
DEFAULT_CACHE = "/var/cache/oneiscsi-pyroots"


def cache_dir() -> str:
    return os.environ.get("ONEISCSI_PYROOTS_CACHE") or DEFAULT_CACHE


def key(suite: str) -> str:
    return hashlib.sha256((suite + " " + " ".join(PACKAGES)).encode()).hexdigest()[:12]


def root_of(suite: str) -> str:
    return os.path.join(cache_dir(), "%s-%s" % (suite, key(suite)))


def usable() -> str:
    """'' when roots can be built and entered here, else why not."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, unshare -m)"
    missing = [t for t in ("debootstrap", "chroot", "unshare") if not shutil.which(t)]
    return "missing %s" % ", ".join(missing) if missing else ""


def build(suite: str) -> str:
    """The cached root of suite (made now if missing); concurrent callers wait."""
    from oneiscsi.sim.realhost import _mirror
    final = root_of(suite)
    os.makedirs(cache_dir(), exist_ok=True)
    with open(os.path.join(cache_dir(), ".lock-" + suite), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, ".done")):
            return final
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        debs = os.path.join(cache_dir(), "debs", suite)  # one per suite: builds run in parallel
        os.makedirs(debs, exist_ok=True)
        res = subprocess.run(["debootstrap", "--variant=minbase", "--cache-dir=" + debs,
                              "--include=" + ",".join(PACKAGES), suite, tmp, _mirror()],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("debootstrap %s failed: %s" % (suite, res.stdout[-2000:]))
        # what the image needs no more: apt lists and downloaded .debs (~100 MB together)
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            p = os.path.join(tmp, sub)
            if os.path.isdir(p):
                for name in os.listdir(p):
                    q = os.path.join(p, name)
                    if os.path.isfile(q) or os.path.islink(q):
                        os.remove(q)
                    elif name not in ("partial",):
                        shutil.rmtree(q, ignore_errors=True)
        open(os.path.join(tmp, ".done"), "w").close()
        os.rename(tmp, final)
        return final


def run(root: str, argv: list, binds=None, env=None, stdin="", timeout=120) -> subprocess.CompletedProcess:
    """argv chrooted into root, as root; binds: {host folder: folder in the root} (keep the
    latter fixed, such as /t: its mount point stays in the cached tree)."""
    mounts = ["mount --rbind /dev %s/dev" % shlex.quote(root),
              "mount -t proc proc %s/proc" % shlex.quote(root)]
    for path, inside in dict(binds).items():
        inside = root + inside
        mounts.append("mkdir -p %s && mount --bind %s %s" % (shlex.quote(inside), shlex.quote(path),
                                                            shlex.quote(inside)))
    script = " && ".join(mounts) + ' && exec chroot "$0" "$@"'
    environ = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "HOME": "/root"}
    environ.update(env or {})
    return subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, root] + list(argv),
                          input=stdin, capture_output=True, text=True, env=environ, timeout=timeout)


if __name__ == "__main__":
    if sys.argv[1:] != ["build"]:
        raise SystemExit("usage: python3 -m tests.pyroots build")
    why = usable()
    if why:
        raise SystemExit("tests.pyroots: " + why)
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(len(SUITES)) as pool:  # downloads overlap: all three in ~90 s cold (measured here)
        for path in pool.map(build, SUITES):
            print(path)
