"""A real-kernel hypervisor host for the lab: a QEMU TCG guest running Debian
bookworm's own kernel with open-iscsi, udev and sshd.

The machine that runs the tests has no SCSI/iSCSI initiator in its kernel, so
the kernel initiator, udev's by-path links and the project's udev rules can
only be exercised inside a guest.  This module builds that guest once (cached
by a hash of everything that goes into it) and boots it on a lab bridge through
a tap device, so it reaches the "SAN" address directly.

Guest facts (what tests may rely on):
- Debian bookworm, ``linux-image-amd64``; PID 1 is a small shell init (no
  systemd): it mounts proc/sys/dev/run, applies the per-boot config disk,
  loads ``iscsi_tcp``, starts ``systemd-udevd --daemon``, configures eth0 from
  the kernel command line (``ip=<addr>::<gw>:<mask>:<hostname>:eth0:off``),
  starts ``iscsid`` and ``sshd``, prints ``ONEISCSI-REALHOST-READY`` on the
  console and reaps children.
- ssh as ``root`` or ``oneadmin`` (uid/gid 9869, home ``/var/lib/one``, with
  ``/var/lib/one/datastores``) with the given key.  oneadmin has passwordless
  ``sudo`` for everything (an OpenNebula host gives it sudo for iscsiadm and
  friends; the test host does not narrow that list).
- ``/etc/iscsi/initiatorname.iscsi`` holds a per-instance name
  (``RealHost.initiator_name``), root:root mode 0600 as Debian's open-iscsi
  postinst leaves it; ``node.startup = manual`` (Debian default).
- rsyslogd runs (Debian's default rules: sudo's log lines land in
  /var/log/auth.log).
- Each instance boots from a private qcow2 overlay of the cached image, so
  nothing a test does survives ``stop()``.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import io
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time

SUITE = "bookworm"
PACKAGES = (
    "linux-image-amd64", "open-iscsi", "udev", "kmod", "iproute2", "procps",
    "openssh-server", "util-linux", "coreutils", "sudo", "rsyslog",
    "multipath-tools",   # dm-multipath (multipathd, multipath, kpartx): started only by a boot script
)
ONEADMIN_UID = 9869  # OpenNebula's packaged oneadmin uid/gid
IMAGE_SIZE = "2G"
READY_MARK = "ONEISCSI-REALHOST-READY"
DEFAULT_CACHE = "/var/cache/oneiscsi-realhost"

# Modules the initramfs needs to mount the root disk; everything else is
# loaded by the guest init or udev.  A short list keeps the initrd small,
# which matters a lot under TCG.
INITRAMFS_MODULES = ("virtio_pci", "virtio_blk", "ext4")

GUEST_INIT = r"""#!/bin/sh
# PID 1 of the oneiscsi real-kernel test host (written by oneiscsi.sim.realhost).
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620 devpts /dev/pts
mountpoint -q /run || mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mkdir -p /run/lock /run/sshd
chmod 1777 /run/lock    # as systemd-tmpfiles makes it on Debian (d /run/lock 1777)
exec </dev/null >/dev/console 2>&1
say() { read -r up _ < /proc/uptime; echo "oneiscsi-init [$up] $*"; }
say start

# Per-boot files (host key, authorized keys, initiator name, udev rules):
# the second disk is a tar archive made by RealHost.
tar -xpf /dev/vdb -C / || say "config disk: tar failed"

IPCONF=
for arg in $(cat /proc/cmdline); do
    case $arg in ip=*) IPCONF=${arg#ip=} ;; esac
done
IFS=: read -r ADDR _ GW MASK HOST DEV _ <<EOF
$IPCONF
EOF
[ -n "$HOST" ] && hostname "$HOST" && echo "$HOST" > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "${HOST:-localhost}" > /etc/hosts

modprobe -a virtio_net iscsi_tcp sd_mod sg || say "modprobe failed"
say modules loaded
# No coldplug: nothing present at boot needs udev; the iSCSI disks that
# appear later get their events (by-path links, project rules) live.
/lib/systemd/systemd-udevd --daemon
say udevd started

ip link set lo up
DEV=${DEV:-eth0}
if [ -n "$ADDR" ]; then
    ip addr add "$ADDR/$MASK" dev "$DEV" || say "ip addr failed"
fi
ip link set "$DEV" up
[ -n "$GW" ] && { ip route add default via "$GW" || say "default route failed"; }

say network up
# syslog: sudo writes its log lines (authpriv) to /var/log/auth.log as on a Debian host
rsyslogd || say "rsyslogd failed"
iscsid || say "iscsid failed"
# a per-boot script from the config disk (RealHost(boot_script=...)): extra NICs, multipathd
if [ -x /etc/oneiscsi-boot.sh ]; then /etc/oneiscsi-boot.sh || say "boot script failed"; fi
/usr/sbin/sshd || say "sshd failed"
say "$(uname -r) up"
echo "READY_MARK"

# Reap everything re-parented to PID 1; never exit (that would panic).
while :; do
    sleep 3600 &
    wait
done
""".replace("READY_MARK", READY_MARK)

SSHD_CONFIG = """\
# oneiscsi real-kernel test host
HostKey /etc/ssh/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
"""

INITRAMFS_CONF = """\
MODULES=list
COMPRESS=gzip
NO_ISCSI_IN_INITRAMFS=yes
"""

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")


class RealHostError(RuntimeError):
    pass


def _run(argv, **kw):
    kw.setdefault("check", True)
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    try:
        return subprocess.run(argv, **kw)
    except subprocess.CalledProcessError as e:
        out = (e.stdout or b"")
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise RealHostError("%s failed (rc %s): %s" % (argv[0], e.returncode, out[-2000:])) from None


# --------------------------------------------------------------------------
# build

def _cache_dir(cache_dir=None):
    return os.path.abspath(cache_dir or os.environ.get("ONEISCSI_REALHOST_CACHE") or DEFAULT_CACHE)


def build_key():
    """Hash of every input of the image build (not the mirror: same packages)."""
    h = hashlib.sha256()
    for part in (SUITE, " ".join(PACKAGES), str(ONEADMIN_UID), IMAGE_SIZE, GUEST_INIT,
                 SSHD_CONFIG, INITRAMFS_CONF, " ".join(INITRAMFS_MODULES), _configure_script()):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:16]


def _mirror():
    env = os.environ.get("ONEISCSI_REALHOST_MIRROR")
    if env:
        return env
    try:
        with open("/etc/apt/sources.list.d/debian.sources") as f:
            for line in f:
                if line.startswith("URIs:") and "security" not in line:
                    return line.split()[1]
    except OSError:
        pass
    try:
        with open("/etc/apt/sources.list") as f:
            for line in f:
                w = line.split()
                if len(w) >= 3 and w[0] == "deb" and "security" not in w[1] and not w[1].startswith("["):
                    return w[1]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def _configure_script():
    # Runs inside the chroot after debootstrap.
    return """\
set -e
export DEBIAN_FRONTEND=noninteractive
groupadd -g {uid} oneadmin
useradd -u {uid} -g {uid} -m -d /var/lib/one -s /bin/bash oneadmin
usermod -p '*' oneadmin
mkdir -p /var/lib/one/datastores /var/lib/one/.ssh /root/.ssh
chown -R oneadmin:oneadmin /var/lib/one
chmod 700 /var/lib/one/.ssh /root/.ssh
echo 'oneadmin ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/oneadmin
chmod 440 /etc/sudoers.d/oneadmin
rm -f /etc/ssh/ssh_host_* /etc/iscsi/initiatorname.iscsi
: > /etc/fstab
update-initramfs -u -k all
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/*.log
""".format(uid=ONEADMIN_UID)


def _write(path, text, mode=0o644):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def _image_paths(d):
    return {"kernel": os.path.join(d, "vmlinuz"), "initrd": os.path.join(d, "initrd.img"),
            "rootfs": os.path.join(d, "root.img"), "dir": d}


def build_image(cache_dir=None, log=None) -> dict:
    """Build (or find in the cache) the guest image.

    Returns {"kernel", "initrd", "rootfs" (raw ext4 image), "dir", "key",
    "built" (False when it came from the cache), "seconds"}.  Safe to call from
    parallel processes: one builds, the others wait on a lock.
    """
    base = _cache_dir(cache_dir)
    key = build_key()
    final = os.path.join(base, key)
    paths = _image_paths(final)
    paths["key"] = key
    os.makedirs(base, exist_ok=True)
    t0 = time.monotonic()
    with open(os.path.join(base, ".lock-" + key), "w") as lockf:
        fcntl.flock(lockf, fcntl.LOCK_EX)
        if os.path.exists(os.path.join(final, "done")):
            paths.update(built=False, seconds=round(time.monotonic() - t0, 1))
            return paths
        tmp = os.path.join(base, "%s.tmp-%d" % (key, os.getpid()))
        shutil.rmtree(tmp, ignore_errors=True)
        root = os.path.join(tmp, "rootfs")
        debs = os.path.join(base, "debs")
        os.makedirs(debs, exist_ok=True)
        os.makedirs(tmp)
        out = log or open(os.path.join(tmp, "build.log"), "wb")
        try:
            subprocess.run(
                ["debootstrap", "--variant=minbase", "--cache-dir=" + debs,
                 "--include=" + ",".join(PACKAGES), SUITE, root, _mirror()],
                stdout=out, stderr=subprocess.STDOUT, check=True)
            os.makedirs(os.path.join(root, "etc/initramfs-tools/conf.d"), exist_ok=True)
            _write(os.path.join(root, "etc/initramfs-tools/conf.d/oneiscsi-realhost"), INITRAMFS_CONF)
            _write(os.path.join(root, "etc/initramfs-tools/modules"), "\n".join(INITRAMFS_MODULES) + "\n")
            _write(os.path.join(root, "etc/ssh/sshd_config.d/oneiscsi-realhost.conf"), SSHD_CONFIG)
            _write(os.path.join(root, "sbin/oneiscsi-init"), GUEST_INIT, 0o755)
            subprocess.run(["chroot", root, "/bin/sh", "-c", _configure_script()],
                           stdout=out, stderr=subprocess.STDOUT, check=True,
                           env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
            boot = os.path.join(root, "boot")
            kernels = sorted(f for f in os.listdir(boot) if f.startswith("vmlinuz-"))
            if len(kernels) != 1:
                raise RealHostError("expected one kernel in the image, found %s" % kernels)
            ver = kernels[0][len("vmlinuz-"):]
            tpaths = _image_paths(tmp)
            shutil.copy(os.path.join(boot, kernels[0]), tpaths["kernel"])
            shutil.copy(os.path.join(boot, "initrd.img-" + ver), tpaths["initrd"])
            subprocess.run(["mkfs.ext4", "-q", "-F", "-L", "oneroot", "-d", root,
                            tpaths["rootfs"], IMAGE_SIZE],
                           stdout=out, stderr=subprocess.STDOUT, check=True)
            shutil.rmtree(root)
            _write(os.path.join(tmp, "done"), json.dumps(
                {"key": key, "kernel_version": ver, "packages": PACKAGES,
                 "seconds": round(time.monotonic() - t0, 1)}) + "\n")
            os.rename(tmp, final)
            _prune(base, keep=2)
        except subprocess.CalledProcessError as e:
            raise RealHostError("image build failed at %s (rc %s); log: %s" % (
                e.cmd[0], e.returncode, os.path.join(tmp, "build.log"))) from None
        finally:
            if log is None:
                out.close()
            if os.path.isdir(root):
                shutil.rmtree(root, ignore_errors=True)
    paths.update(built=True, seconds=round(time.monotonic() - t0, 1))
    return paths


def _prune(base, keep):
    """Drop all but the ``keep`` newest images and the leftovers of dead builds."""
    done = []
    for e in os.listdir(base):
        d = os.path.join(base, e)
        m = re.match(r"^[0-9a-f]{16}\.tmp-(\d+)$", e)
        if m and not os.path.exists("/proc/" + m.group(1)):
            shutil.rmtree(d, ignore_errors=True)
        elif re.match(r"^[0-9a-f]{16}$", e) and os.path.exists(os.path.join(d, "done")):
            done.append((os.path.getmtime(os.path.join(d, "done")), e))
    for _, e in sorted(done)[:-keep]:
        with open(os.path.join(base, ".use-" + e), "w") as lockf:
            try:
                fcntl.flock(lockf, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a guest runs on it
            shutil.rmtree(os.path.join(base, e), ignore_errors=True)


def _use_lock(cache_dir):
    """Shared lock held while a guest runs on an image, so _prune skips it."""
    base = _cache_dir(cache_dir)
    os.makedirs(base, exist_ok=True)
    f = open(os.path.join(base, ".use-" + build_key()), "w")
    fcntl.flock(f, fcntl.LOCK_SH)
    return f


def available(cache_dir=None) -> tuple:
    """(True, "") when this machine can build and boot the guest, else (False, why)."""
    if os.geteuid() != 0:
        return False, "needs root (debootstrap, tap devices)"
    need = ["qemu-system-x86_64", "qemu-img", "ip", "ssh", "ssh-keygen"]
    cached = os.path.exists(os.path.join(_cache_dir(cache_dir), build_key(), "done"))
    if not cached:
        need += ["debootstrap", "mkfs.ext4", "chroot"]
    missing = [c for c in need if not shutil.which(c)]
    if missing:
        return False, "missing commands: " + ", ".join(missing)
    if not os.path.exists("/dev/net/tun"):
        return False, "no /dev/net/tun"
    return True, ""


# --------------------------------------------------------------------------
# a running host

class RealHost:
    """A booted real-kernel host on ``bridge`` with address ``addr``.

    ``addr`` is "A.B.C.D/len" (or bare, meaning /24).  ``authorized_key`` is a
    public key file whose private half (same path without ".pub") is used by
    ``ssh()``; by default a key pair is made in ``workdir``.  ``udev_rules`` is
    a list of files copied into the guest before udevd starts: ``*.rules`` go
    to /etc/udev/rules.d/, anything else (helpers) to /usr/lib/udev/ mode 0755;
    an item may also be a (source, absolute guest path) pair.  ``ssh_netns``
    runs the ssh client inside that network namespace (when the root ns has no
    address on the bridge).  ``extra_nics`` is a list of bridge names: NIC K+1
    (eth1, eth2, ...) of the guest sits on its tap on that bridge (its address
    is for ``boot_script`` to set).  ``boot_script`` (sh text) runs as root at
    boot after iscsid, before sshd; ``files`` is a list of (absolute guest path,
    bytes, mode) placed before it runs.
    """

    def __init__(self, workdir, bridge: str, addr: str, gateway: str = None, name="kvm1",
                 authorized_key: str = None, udev_rules=(), initiator_name: str = None,
                 memory_mb: int = 512, ssh_netns: str = None, cache_dir=None,
                 extra_nics=(), boot_script: str = None, files=()):
        if not _NAME_RE.match(name):
            raise ValueError("bad host name %r" % (name,))
        for what, v in [("bridge", bridge), ("netns", ssh_netns or "x")] + [("bridge", b) for b in extra_nics]:
            if not _IFNAME_RE.match(v):
                raise ValueError("bad %s name %r" % (what, v))
        iface = ipaddress.ip_interface(addr if "/" in addr else addr + "/24")
        if iface.version != 4:
            raise ValueError("IPv4 only: %r" % (addr,))
        self.iface = iface
        self.addr = str(iface.ip)
        self.gateway = str(ipaddress.IPv4Address(gateway)) if gateway else None
        self.name = name
        self.bridge = bridge
        self.workdir = os.path.abspath(str(workdir))
        self.memory_mb = int(memory_mb)
        self.ssh_netns = ssh_netns
        self.cache_dir = cache_dir
        self.udev_rules = list(udev_rules)
        self.initiator_name = initiator_name or "iqn.1993-08.org.debian:01:" + secrets.token_hex(6)
        self.tap = "rht%s" % secrets.token_hex(4)
        self.mac = "52:54:00:%02x:%02x:%02x" % tuple(secrets.token_bytes(3))
        # (tap, mac, bridge) of eth1, eth2, ...
        self.extra_nics = [("rht%s" % secrets.token_hex(4),
                            "52:54:00:%02x:%02x:%02x" % tuple(secrets.token_bytes(3)), b) for b in extra_nics]
        self.boot_script = boot_script
        self.files = list(files)
        self.console_log = os.path.join(self.workdir, "console.log")
        self.known_hosts = os.path.join(self.workdir, "known_hosts")
        cm = os.path.join(self.workdir, "cm-")
        if len(cm) > 80:  # unix socket paths are short
            cm = "/tmp/oneiscsi-rh-%s-" % hashlib.sha1(self.workdir.encode()).hexdigest()[:12]
        self._cm_prefix = cm
        self.proc = None
        self.boot_seconds = None
        self._tap_made = False
        self._taps = []
        self._use = None
        os.makedirs(self.workdir, exist_ok=True)
        if authorized_key is None:
            self.identity = os.path.join(self.workdir, "id_ed25519")
            if not os.path.exists(self.identity):
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "oneiscsi-realhost",
                      "-f", self.identity])
            authorized_key = self.identity + ".pub"
        else:
            priv = authorized_key[:-4] if authorized_key.endswith(".pub") else ""
            self.identity = priv if os.path.exists(priv) else None  # else: ssh's defaults
        with open(authorized_key) as f:
            self.authorized_key = f.read().strip() + "\n"
        hostkey = os.path.join(self.workdir, "ssh_host_ed25519_key")
        if not os.path.exists(hostkey):
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "root@" + name, "-f", hostkey])
        self._hostkey = hostkey
        with open(hostkey + ".pub") as f:
            kt, kb = f.read().split()[:2]
        self.known_hosts_line = "%s %s %s" % (self.addr, kt, kb)
        with open(self.known_hosts, "w") as f:
            f.write(self.known_hosts_line + "\n")

    # -- context manager
    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- boot
    def _config_tar(self, path):
        def add(tf, name, data, mode, uid=0, isdir=False):
            ti = tarfile.TarInfo(name.lstrip("/"))
            ti.mode, ti.uid, ti.gid, ti.mtime = mode, uid, uid, int(time.time())
            if isdir:
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))

        with open(self._hostkey, "rb") as f:
            hk = f.read()
        with open(self._hostkey + ".pub", "rb") as f:
            hkp = f.read()
        key = self.authorized_key.encode()
        with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tf:
            add(tf, "etc/ssh/ssh_host_ed25519_key", hk, 0o600)
            add(tf, "etc/ssh/ssh_host_ed25519_key.pub", hkp, 0o644)
            add(tf, "root/.ssh", b"", 0o700, isdir=True)
            add(tf, "root/.ssh/authorized_keys", key, 0o600)
            add(tf, "var/lib/one/.ssh", b"", 0o700, ONEADMIN_UID, isdir=True)
            add(tf, "var/lib/one/.ssh/authorized_keys", key, 0o600, ONEADMIN_UID)
            # root-only as Debian's open-iscsi postinst leaves it (chmod 600)
            add(tf, "etc/iscsi/initiatorname.iscsi",
                ("InitiatorName=%s\n" % self.initiator_name).encode(), 0o600)
            for item in self.udev_rules:
                src, dest = item if isinstance(item, (tuple, list)) else (item, None)
                src = str(src)
                base = os.path.basename(src)
                if dest is None:
                    dest = ("/etc/udev/rules.d/" if base.endswith(".rules") else "/usr/lib/udev/") + base
                if not dest.startswith("/") or ".." in dest.split("/"):
                    raise ValueError("bad guest path %r" % (dest,))
                with open(src, "rb") as f:
                    data = f.read()
                add(tf, dest, data, 0o644 if dest.endswith(".rules") else 0o755)
            for dest, data, mode in self.files:
                if not dest.startswith("/") or ".." in dest.split("/"):
                    raise ValueError("bad guest path %r" % (dest,))
                add(tf, dest, bytes(data), mode)
            if self.boot_script:
                add(tf, "etc/oneiscsi-boot.sh", ("#!/bin/sh\n" + self.boot_script).encode(), 0o755)
        size = os.path.getsize(path)
        with open(path, "ab") as f:  # whole 512-byte sectors
            f.truncate(size + (-size % 512) + 512 * 16)

    def qemu_argv(self, image):
        cmdline = ("root=/dev/vda rw rootfstype=ext4 console=ttyS0 init=/sbin/oneiscsi-init "
                   "panic=-1 quiet net.ifnames=0 ip=%s::%s:%s:%s:eth0:off"
                   % (self.addr, self.gateway or "", self.iface.netmask, self.name))
        return [
            "qemu-system-x86_64", "-name", "oneiscsi-" + self.name,
            "-machine", "pc", "-accel", "tcg", "-cpu", "max",
            "-smp", "1", "-m", str(self.memory_mb),
            "-nodefaults", "-display", "none", "-no-reboot",
            "-serial", "file:" + self.console_log,
            "-kernel", image["kernel"], "-initrd", image["initrd"], "-append", cmdline,
            "-drive", "file=%s,if=virtio,format=qcow2,cache=unsafe" % os.path.join(self.workdir, "root.qcow2"),
            "-drive", "file=%s,if=virtio,format=raw,readonly=on" % os.path.join(self.workdir, "config.tar"),
            "-netdev", "tap,id=n0,ifname=%s,script=no,downscript=no" % self.tap,
            "-device", "virtio-net-pci,netdev=n0,mac=" + self.mac,
        ] + sum([["-netdev", "tap,id=n%d,ifname=%s,script=no,downscript=no" % (i, tap),
                  "-device", "virtio-net-pci,netdev=n%d,mac=%s" % (i, mac)]
                 for i, (tap, mac, _) in enumerate(self.extra_nics, 1)], []) + [
            "-device", "virtio-rng-pci",
        ]

    def start(self, timeout=120):
        """Build the image if needed (not counted in ``timeout``), boot, and
        wait until sshd answers.  Raises RealHostError (with the console tail)
        on failure, after cleaning up."""
        if self.proc is not None:
            return
        ok, why = available(self.cache_dir)
        if not ok:
            raise RealHostError("real host unavailable: " + why)
        self._use = _use_lock(self.cache_dir)
        try:
            image = build_image(self.cache_dir)
            t0 = time.monotonic()
            overlay = os.path.join(self.workdir, "root.qcow2")
            if os.path.exists(overlay):
                os.unlink(overlay)
            _run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", image["rootfs"], overlay])
            self._config_tar(os.path.join(self.workdir, "config.tar"))
            open(self.console_log, "w").close()
            with open(os.path.join(self.workdir, "qemu.log"), "wb") as qlog:
                # qemu dies with the process that started it (e.g. a killed pytest): setpriv sets
                # PR_SET_PDEATHSIG and execs qemu. No preexec_fn: Python code between fork and exec
                # can deadlock in a process with threads (the simulators' servers).
                self.proc = subprocess.Popen(
                    ["setpriv", "--pdeathsig", "KILL", "--"] + self.qemu_argv(image), stdin=subprocess.DEVNULL,
                    stdout=qlog, stderr=subprocess.STDOUT)
            # qemu creates the tap itself (not persistent), so it vanishes
            # with qemu even when nobody calls stop().
            for tap, bridge in [(self.tap, self.bridge)] + [(t, b) for t, _, b in self.extra_nics]:
                while not os.path.exists("/sys/class/net/" + tap):
                    if self.proc.poll() is not None or time.monotonic() > t0 + 20:
                        self._fail("qemu made no tap %s (qemu.log: %s)" % (tap, self._qemu_log()))
                    time.sleep(0.02)
                self._tap_made = True
                self._taps.append(tap)
                _run(["ip", "link", "set", tap, "master", bridge, "up"])
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = round(time.monotonic() - t0, 1)

    def console(self) -> str:
        try:
            with open(self.console_log, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _qemu_log(self):
        with contextlib.suppress(OSError), open(os.path.join(self.workdir, "qemu.log"), errors="replace") as f:
            return f.read()[-1000:]
        return ""

    def _fail(self, why):
        raise RealHostError("%s: %s; console tail:\n%s" % (self.name, why, self.console()[-3000:]))

    def _wait_ready(self, deadline):
        while READY_MARK not in self.console():
            if self.proc.poll() is not None:
                self._fail("qemu exited with %s: %s" % (self.proc.returncode, self._qemu_log()))
            if time.monotonic() > deadline:
                self._fail("no ready mark before timeout")
            time.sleep(0.25)
        while True:
            r = self.ssh("true", timeout=15, connect_timeout=5, multiplex=False)
            if r.returncode == 0:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self._fail("sshd not reachable: " + (r.stderr or "").strip())
            time.sleep(0.5)

    def stop(self):
        """Kill qemu by PID (the overlay makes a clean shutdown pointless) and
        remove the tap.  Idempotent."""
        with contextlib.suppress(Exception):
            self._close_masters()
        if self.proc is not None:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self._tap_made:  # normally gone with qemu already
            for tap in self._taps:
                if os.path.exists("/sys/class/net/" + tap):
                    subprocess.run(["ip", "link", "del", tap], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
            self._taps = []
            self._tap_made = False
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(self.workdir, "root.qcow2"))
        if self._use is not None:
            self._use.close()
            self._use = None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    # -- remote commands
    def ssh_argv(self, user="root", connect_timeout=10, multiplex=True):
        """argv prefix of the system ssh client for this host (append the
        command).  ``multiplex`` shares one connection per user through a
        ControlMaster in ``workdir`` (a plain ssh round trip to the guest
        costs about 0.6 s under TCG, a multiplexed one about 0.07 s)."""
        argv = ["ip", "netns", "exec", self.ssh_netns] if self.ssh_netns else []
        argv += ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                 "-o", "UserKnownHostsFile=" + self.known_hosts, "-o", "GlobalKnownHostsFile=/dev/null",
                 "-o", "ConnectTimeout=%d" % connect_timeout, "-o", "LogLevel=ERROR"]
        if multiplex:
            argv += ["-o", "ControlMaster=auto", "-o", "ControlPersist=300",
                     "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                     "-o", "ControlPath=" + self._cm_prefix + "%r"]
        if self.identity:
            argv += ["-o", "IdentitiesOnly=yes", "-i", self.identity]
        return argv + ["%s@%s" % (user, self.addr)]

    def _close_masters(self):
        for cm in glob.glob(glob.escape(self._cm_prefix) + "*"):
            user = cm[len(self._cm_prefix):]
            argv = self.ssh_argv(user)
            subprocess.run(argv[:-1] + ["-O", "exit", argv[-1]], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, timeout=10)
            with contextlib.suppress(OSError):
                os.unlink(cm)

    def ssh(self, cmd: str, input=None, user="root", timeout=120, check=False,
            connect_timeout=10, multiplex=True) -> subprocess.CompletedProcess:
        """Run ``cmd`` with the guest user's shell.  Text in and out unless
        ``input`` is bytes."""
        binary = isinstance(input, (bytes, bytearray))
        r = subprocess.run(self.ssh_argv(user, connect_timeout, multiplex) + ["--", cmd], input=input,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=not binary, timeout=timeout)
        if check and r.returncode != 0:
            raise RealHostError("%s: %r failed (rc %s): %s" % (self.name, cmd, r.returncode, r.stderr))
        return r

    def put(self, path: str, data: bytes, mode: int = 0o644, user="root"):
        """Write ``data`` to ``path`` on the guest."""
        from shlex import quote
        self.ssh("cat > %s && chmod %o %s" % (quote(path), mode, quote(path)),
                 input=bytes(data), user=user, check=True)


def _main(argv):
    import argparse
    p = argparse.ArgumentParser(prog="python -m oneiscsi.sim.realhost")
    p.add_argument("command", choices=["build", "key", "available"])
    p.add_argument("--cache-dir")
    a = p.parse_args(argv)
    if a.command == "key":
        print(build_key())
        return 0
    if a.command == "available":
        ok, why = available(a.cache_dir)
        print("yes" if ok else "no: " + why)
        return 0 if ok else 1
    print(json.dumps(build_image(a.cache_dir, log=sys.stderr.buffer), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
