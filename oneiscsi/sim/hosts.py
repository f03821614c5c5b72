"""Lab hypervisor hosts: network namespaces on a bridge, each running sshd.

Test infrastructure (root only). Topology of one lab, N from a lock-file allocator:

    bridge ``olbrN`` 10.213.N.1/24 in the root ns  = the frontend (``frontend_addr``)
    netns ``olN-san``  10.213.N.5                  = the SAN (caller runs tgtd/simulator there)
    netns ``olN-<h>``  10.213.N.11, .12, ...       = hosts, each with sshd on :22

Each host runs an init script under ``ip netns exec`` (own mount ns) + ``unshare --uts``
(own hostname) that bind-mounts the host's private directories and execs sshd:

    <root>/datastores -> /var/lib/one/datastores     (oneadmin)
    <root>/etc-iscsi  -> /etc/iscsi                  (oneadmin; initiatorname.iscsi, iscsid.conf)
    <root>/run        -> /run                        (sshd privsep, lock/, iscsi-standin/, libvirt/)
    <root>/fuse.conf  -> /etc/fuse.conf              (user_allow_other, for the stand-in's FUSE exports)
    tmpfs             -> /dev                        (private: null, zero, tty, urandom, fuse 0666, pts,
                                                      shm, disk/by-path; group oneadmin may add sdX files)
    tmpfs             -> /sys/block                  (fake sysfs of the iscsiadm stand-in)
    libvirtd=True:    <root>/libvirt/{etc,lib,cache,log} -> /etc/libvirt, /var/lib/libvirt, ...

PATH for oneadmin (and root) sessions: sshd ``SetEnv PATH=<workdir>/standin:...`` when
``standin=True``. SetEnv overrides sshd's default PATH for every session, including
``ssh host sh -s`` scripts and non-interactive commands; /bin/sh reads no profile then.
``Host.run`` sets the same PATH. ``authorized_keys`` lives in the host's /run (readable by
oneadmin whatever the workdir's permissions are).

``stop()`` kills every process in each lab netns by PID (sshd, libvirtd, virtlogd, the
stand-in's qemu-storage-daemons, anything ``run`` started), deletes the namespaces and the
bridge; mounts vanish with the mount namespaces. It is idempotent.
"""
from __future__ import annotations

import fcntl
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time

# The iscsiadm stand-in (and a fake onevm): lab material, shipped in the package so that
# `oneiscsi.pyz lab` has it too; copied into each lab's workdir with its exec bits (a zipapp
# extraction does not keep file modes).
STANDIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin")
# The virsh stand-in (domfsfreeze/domfsthaw/suspend/resume only): on PATH only for labs made
# with virsh_standin=True, so labs running a real libvirtd keep the real virsh.
VIRSH_STANDIN_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "virsh_standin")
STANDIN_ROOT = "/var/lib/oneiscsi-lab"  # world-traversable: oneadmin runs the copies


def standin_dir(src: str = STANDIN_SRC, prefix: str = "standin-") -> str:
    """A world-readable copy of the stand-in scripts, mode 755, named by their content."""
    import hashlib
    names = sorted(os.listdir(src))
    digest = hashlib.sha256()
    for name in names:
        with open(os.path.join(src, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    target = os.path.join(STANDIN_ROOT, prefix + digest.hexdigest()[:16])
    if not os.path.isdir(target):
        os.makedirs(STANDIN_ROOT, mode=0o755, exist_ok=True)
        os.chmod(STANDIN_ROOT, 0o755)
        tmp = "%s.tmp%d" % (target, os.getpid())
        os.makedirs(tmp, mode=0o755)
        for name in names:
            shutil.copyfile(os.path.join(src, name), os.path.join(tmp, name))
            os.chmod(os.path.join(tmp, name), 0o755)
        try:
            os.rename(tmp, target)
        except OSError:  # another lab made it first
            shutil.rmtree(tmp, ignore_errors=True)
    return target
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ALLOC_DIR = "/tmp/oneiscsi-alloc"
SUBNET_PREFIX = "10.213"


class LabError(RuntimeError):
    pass


def _sh(*cmd, check=True, input=None):
    p = subprocess.run(cmd, input=input, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       universal_newlines=True)
    if check and p.returncode != 0:
        raise LabError("%s failed (%d): %s" % (" ".join(cmd), p.returncode, p.stderr.strip()))
    return p


def allocate(kind: str, numbers):
    """Take the first free number of `numbers` for `kind`; returns (n, fd) and holds a flock on fd
    until it is closed (or the process dies), so parallel labs/tests never share a number."""
    os.makedirs(ALLOC_DIR, exist_ok=True)
    try:
        os.chmod(ALLOC_DIR, 0o1777)
    except OSError:
        pass
    for n in numbers:
        fd = os.open("%s/%s-%s.lock" % (ALLOC_DIR, kind, n), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return n, fd
        except OSError:
            os.close(fd)
    raise LabError("no free %s number" % kind)


def ensure_user(name="oneadmin", home="/var/lib/one"):
    """Create the system-wide oneadmin account once (usable by sshd with UsePAM no)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    p = _sh("useradd", "-m", "-d", home, "-s", "/bin/sh", name, check=False)
    if p.returncode not in (0, 9):      # 9: created meanwhile by a parallel lab
        raise LabError("useradd %s: %s" % (name, p.stderr.strip()))
    _sh("usermod", "-p", "*", name)
    return pwd.getpwnam(name)


def ensure_libvirt_user():
    """libvirtd's qemu driver refuses to start without the libvirt-qemu user (test-infra section 8)."""
    try:
        pwd.getpwnam("libvirt-qemu")
        return
    except KeyError:
        pass
    _sh("groupadd", "-r", "libvirt-qemu", check=False)
    _sh("useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-s", "/usr/sbin/nologin",
        "libvirt-qemu", check=False)
    pwd.getpwnam("libvirt-qemu")


INIT_SCRIPT = r"""#!/bin/sh
# host init: runs in the host's netns and a fresh mount + UTS namespace, then becomes sshd
set -e
R="$1"; NAME="$2"; OA_GID="$3"; LIBVIRT="$4"; STANDIN="$5"
hostname "$NAME"
mount --make-rslave /
mount --bind "$R/datastores" /var/lib/one/datastores
mount --bind "$R/etc-iscsi" /etc/iscsi
mount --bind "$R/run" /run
[ -e /etc/fuse.conf ] && mount --bind "$R/fuse.conf" /etc/fuse.conf
# private /dev
mount -t tmpfs -o mode=0775,gid="$OA_GID",size=65536k hostdev /dev
mknod -m 0666 /dev/null c 1 3; mknod -m 0666 /dev/zero c 1 5; mknod -m 0666 /dev/full c 1 7
mknod -m 0666 /dev/random c 1 8; mknod -m 0666 /dev/urandom c 1 9; mknod -m 0666 /dev/tty c 5 0
mknod -m 0666 /dev/fuse c 10 229; mknod -m 0666 /dev/kvm c 10 232
mkdir -p /dev/net /dev/pts /dev/shm /dev/disk/by-path
mknod -m 0666 /dev/net/tun c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777 shm /dev/shm
ln -s /proc/self/fd /dev/fd; ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout; ln -s /proc/self/fd/2 /dev/stderr
chgrp -R "$OA_GID" /dev/disk; chmod -R 0775 /dev/disk
if [ "$STANDIN" = 1 ]; then
  mount -t tmpfs -o mode=0775,gid="$OA_GID",size=1024k sysblock /sys/block
fi
if [ "$LIBVIRT" = 1 ]; then
  mount --bind "$R/libvirt/etc" /etc/libvirt
  mount --bind "$R/libvirt/lib" /var/lib/libvirt
  mount --bind "$R/libvirt/cache" /var/cache/libvirt
  mount --bind "$R/libvirt/log" /var/log/libvirt
  virtlogd > "$R/virtlogd.log" 2>&1 &
  echo $! > "$R/virtlogd.pid"
  libvirtd > "$R/libvirtd.log" 2>&1 &
  echo $! > "$R/libvirtd.pid"
fi
exec /usr/sbin/sshd -D -e -f "$R/ssh/sshd_config"
"""

HIDE_SCRIPT = r"""set -e
P=$(dirname "$1"); N=$(basename "$1"); S="$2"
mkdir -p "$S/orig" "$S/shadow"
mount --bind "$P" "$S/orig"
for e in "$S/orig"/* "$S/orig"/.[!.]* "$S/orig"/..?*; do
  [ -e "$e" ] || [ -L "$e" ] || continue
  b=$(basename "$e"); [ "$b" = "$N" ] || ln -s "$e" "$S/shadow/$b"
done
mount --bind "$S/shadow" "$P"
"""

SSHD_CONFIG = """\
ListenAddress {addr}:22
HostKey {root}/ssh/host_ed25519_key
PidFile none
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
UsePAM no
StrictModes no
AuthorizedKeysFile /run/oneiscsi-lab/authorized_keys
AllowUsers oneadmin root
PermitRootLogin prohibit-password
MaxStartups 200
MaxSessions 200
LoginGraceTime 30
UseDNS no
SetEnv {setenv}
Subsystem sftp /usr/lib/openssh/sftp-server
"""


class Host:
    """One lab host (a netns with its own mount/UTS namespace and sshd), or the SAN netns."""

    def __init__(self, lab: "Lab", name: str, addr: str, netns: str, veth: str):
        self.lab, self.name, self.addr, self.netns, self.veth = lab, name, addr, netns, veth
        self.root = os.path.join(lab.workdir, "hosts", name)
        self.datastores = os.path.join(self.root, "datastores")
        self.iscsi_etc = os.path.join(self.root, "etc-iscsi")
        self.initiator = None
        self.sshd_pid = None
        self.libvirtd_pid = None
        self._proc = None
        self._down = False
        self._hidden = 0
        self.virsh_dir = os.path.join(self.root, "run", "lock", "virsh-standin")   # the virsh stand-in's log

    def __repr__(self):
        return "<Host %s %s>" % (self.name, self.addr)

    # -- running commands
    def _enter(self, user):
        if self.sshd_pid:
            base = ["nsenter", "-t", str(self.sshd_pid), "-m", "-n", "-u", "--"]
        else:
            base = ["ip", "netns", "exec", self.netns]
        home = pwd.getpwnam(user).pw_dir
        if user != "root":
            base += ["setpriv", "--reuid", user, "--regid", user, "--init-groups", "--"]
        return base + ["env", "-i", "HOME=" + home, "USER=" + user, "LOGNAME=" + user,
                       "SHELL=/bin/sh", "LANG=C.UTF-8", "PATH=" + self.lab.path]

    def run(self, cmd, user="root", input=None, check=True, timeout=120):
        """Run cmd (argv list, or a string for sh -c) inside this host, as root or oneadmin."""
        if isinstance(cmd, str):
            cmd = ["sh", "-c", cmd]
        text = not isinstance(input, bytes)
        p = subprocess.run(self._enter(user) + list(cmd), input=input, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, universal_newlines=text, timeout=timeout, cwd="/")
        if check and p.returncode != 0:
            raise subprocess.CalledProcessError(p.returncode, cmd, p.stdout, p.stderr)
        return p

    def ssh(self, cmd: str, input=None, timeout=60):
        """Run cmd through the real OpenSSH client with the lab's ssh_config, as oneadmin."""
        text = not isinstance(input, bytes)
        return subprocess.run(["ssh", "-F", self.lab.ssh_config, self.name, cmd], input=input,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=text, timeout=timeout)

    # -- faults
    def down(self):
        """Make the host unreachable: its link goes down and the frontend gets 'No route to host'."""
        if not self._down:
            _sh("ip", "link", "set", self.veth, "down")
            _sh("ip", "route", "add", "unreachable", self.addr + "/32", check=False)
            self._down = True

    def up(self):
        if self._down:
            _sh("ip", "route", "del", "unreachable", self.addr + "/32", check=False)
            _sh("ip", "link", "set", self.veth, "up")
            self._down = False

    def hide(self, path: str):
        """Make `path` disappear on this host only (ENOENT). Its parent directory is replaced, in
        this host's mount namespace, by a directory of symlinks to every other entry."""
        self._hidden += 1
        stash = os.path.join(self.root, "hidden", str(self._hidden))
        self.run(["sh", "-c", HIDE_SCRIPT, "hide", os.path.abspath(path), stash])


class Lab:
    """A bridge, an optional SAN netns and N sshd hosts. Use as a context manager."""

    def __init__(self, workdir: str, hosts=("host1", "host2"), san=True, libvirtd=False, standin=True,
                 shared_datastores=False, virsh_standin=False):
        """shared_datastores: every host sees ONE /var/lib/one/datastores folder, as the hosts of
        a `shared` system datastore do over NFS (opennebula-semantics.md section 2); else each
        host has its own, as with `ssh`. virsh_standin: the virsh stand-in (virsh_standin/virsh,
        guest freeze/thaw only) first on the hosts' PATH; it logs to the host's
        /run/lock/virsh-standin (Host.virsh_dir)."""
        self.shared_datastores = shared_datastores
        self.workdir = os.path.abspath(workdir)
        self.host_names = list(hosts)
        self.want_san, self.libvirtd, self.standin = san, libvirtd, standin
        self.standin_dir = standin_dir() if standin else ""
        self.path = (self.standin_dir + ":" if standin else "") + SYSTEM_PATH
        if virsh_standin:
            self.path = standin_dir(VIRSH_STANDIN_SRC, "virsh-") + ":" + self.path
        self.hosts: dict = {}
        self.san = None
        self.n = None
        self._lock_fd = None
        self.bridge = self.subnet = self.frontend_addr = None
        self.ssh_config = os.path.join(self.workdir, "ssh_config")
        self.ssh_key = os.path.join(self.workdir, "id_lab")
        self.known_hosts = os.path.join(self.workdir, "known_hosts")
        self.start_seconds = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    # -- start
    def start(self):
        t0 = time.monotonic()
        self.oneadmin = ensure_user()
        if self.libvirtd:
            ensure_libvirt_user()
        for d in ("/var/lib/one/datastores", "/etc/iscsi") + (
                ("/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt") if self.libvirtd else ()):
            os.makedirs(d, exist_ok=True)
        self.n, self._lock_fd = allocate("subnet", range(1, 255))
        self.bridge = "olbr%d" % self.n
        self.subnet = "%s.%d.0/24" % (SUBNET_PREFIX, self.n)
        self.frontend_addr = "%s.%d.1" % (SUBNET_PREFIX, self.n)
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _start(self):
        self._remove_network()          # leftovers of a crashed lab that held the same number
        os.makedirs(self.workdir, exist_ok=True)
        if os.path.exists(self.ssh_key):
            os.unlink(self.ssh_key)
            os.unlink(self.ssh_key + ".pub")
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "oneiscsi-lab", "-f", self.ssh_key)
        _sh("ip", "link", "add", self.bridge, "type", "bridge")
        _sh("ip", "addr", "add", self.frontend_addr + "/24", "dev", self.bridge)
        _sh("ip", "link", "set", self.bridge, "up")
        if self.want_san:
            self.san = self._add_netns("san", "%s.%d.5" % (SUBNET_PREFIX, self.n), "s")
        for i, name in enumerate(self.host_names):
            host = self._add_netns(name, "%s.%d.%d" % (SUBNET_PREFIX, self.n, 11 + i), str(i))
            self.hosts[name] = host
        for host in self.hosts.values():
            self._prepare_host(host)
        for host in self.hosts.values():
            self._launch(host)
        self._wait_ready()
        self._write_client_config()

    def _add_netns(self, name, addr, tag):
        host = Host(self, name, addr, "ol%d-%s" % (self.n, name)[:15], "ol%dv%s" % (self.n, tag))
        _sh("ip", "netns", "add", host.netns)
        _sh("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        _sh("ip", "link", "set", host.veth, "master", self.bridge, "up")
        _sh("ip", "-n", host.netns, "addr", "add", addr + "/24", "dev", "eth0")
        _sh("ip", "-n", host.netns, "link", "set", "eth0", "up")
        _sh("ip", "-n", host.netns, "link", "set", "lo", "up")
        return host

    def _prepare_host(self, host: Host):
        uid, gid = self.oneadmin.pw_uid, self.oneadmin.pw_gid
        if os.path.exists(host.root):
            shutil.rmtree(host.root)
        for d in ("etc-iscsi", "run/sshd", "run/lock", "run/iscsi-standin", "run/oneiscsi-lab", "ssh"):
            os.makedirs(os.path.join(host.root, d))
        if self.shared_datastores:      # the init script's bind mount follows the link: one folder
            shared = os.path.join(self.workdir, "shared-datastores")
            os.makedirs(shared, exist_ok=True)
            os.chown(shared, uid, gid)
            os.symlink(shared, os.path.join(host.root, "datastores"))
        else:
            os.makedirs(os.path.join(host.root, "datastores"))
        os.chmod(host.root, 0o755)
        os.chmod(os.path.join(host.root, "run"), 0o755)
        os.chmod(os.path.join(host.root, "run/lock"), 0o1777)
        for d in ("datastores", "etc-iscsi", "run/iscsi-standin"):
            os.chown(os.path.join(host.root, d), uid, gid)
        host.initiator = "iqn.1993-08.org.debian:01:%s-%s" % (host.name, os.urandom(4).hex())
        # 0600 as on Debian; owned by oneadmin, who stands for root in a lab host's /etc/iscsi
        self._write(host, "etc-iscsi/initiatorname.iscsi", "InitiatorName=%s\n" % host.initiator, uid, gid)
        os.chmod(os.path.join(host.root, "etc-iscsi/initiatorname.iscsi"), 0o600)
        self._write(host, "etc-iscsi/iscsid.conf", ISCSID_CONF, uid, gid)
        self._write(host, "fuse.conf", "user_allow_other\n")
        with open(self.ssh_key + ".pub") as f:
            self._write(host, "run/oneiscsi-lab/authorized_keys", f.read())
        _sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", host.name,
            "-f", os.path.join(host.root, "ssh/host_ed25519_key"))
        setenv = "PATH=%s ONEISCSI_LAB_HOST=%s" % (self.path, host.name)
        self._write(host, "ssh/sshd_config", SSHD_CONFIG.format(addr=host.addr, root=host.root, setenv=setenv))
        self._write(host, "init.sh", INIT_SCRIPT)
        if self.libvirtd:
            for d in ("etc", "lib", "cache", "log"):
                os.makedirs(os.path.join(host.root, "libvirt", d))
            self._write(host, "libvirt/etc/libvirtd.conf",
                        'unix_sock_rw_perms = "0777"\nauth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                        'unix_sock_ro_perms = "0777"\n')
            os.makedirs(os.path.join(host.root, "libvirt/etc/secrets"), mode=0o700)

    @staticmethod
    def _write(host, rel, text, uid=None, gid=None):
        path = os.path.join(host.root, rel)
        with open(path, "w") as f:
            f.write(text)
        if uid is not None:
            os.chown(path, uid, gid)

    def _launch(self, host: Host):
        log = open(os.path.join(host.root, "init.log"), "w")
        host._proc = subprocess.Popen(
            ["ip", "netns", "exec", host.netns, "unshare", "--uts", "sh", os.path.join(host.root, "init.sh"),
             host.root, host.name, str(self.oneadmin.pw_gid), "1" if self.libvirtd else "0",
             "1" if self.standin else "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        host.sshd_pid = host._proc.pid      # ip netns exec, unshare and sh all exec: this is sshd

    def _wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        pending = dict(self.hosts)
        while pending:
            for name, host in list(pending.items()):
                if host._proc.poll() is not None:
                    raise LabError("host %s did not start: %s" % (name, self._log(host, "init.log")))
                if _listening(host.addr, 22) and (not self.libvirtd or os.path.exists(
                        os.path.join(host.root, "run/libvirt/libvirt-sock"))):
                    if self.libvirtd:
                        with open(os.path.join(host.root, "libvirtd.pid")) as f:
                            host.libvirtd_pid = int(f.read())
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise LabError("hosts not ready: %s" % ", ".join(
                    "%s: %s" % (n, self._log(h, "libvirtd.log" if self.libvirtd else "init.log"))
                    for n, h in pending.items()))
            if pending:
                time.sleep(0.01)

    @staticmethod
    def _log(host, name):
        try:
            with open(os.path.join(host.root, name)) as f:
                return f.read()[-2000:]
        except OSError:
            return "(no %s)" % name

    def _write_client_config(self):
        lines, known = [], []
        for host in self.hosts.values():
            with open(os.path.join(host.root, "ssh/host_ed25519_key.pub")) as f:
                key = " ".join(f.read().split()[:2])
            known.append("%s,%s %s" % (host.name, host.addr, key))
            lines += ["Host %s" % host.name, "  HostName %s" % host.addr, "  User oneadmin",
                      "  IdentityFile %s" % self.ssh_key, "  IdentitiesOnly yes",
                      "  UserKnownHostsFile %s" % self.known_hosts, "  GlobalKnownHostsFile /dev/null",
                      "  StrictHostKeyChecking yes", "  BatchMode yes", "  ConnectTimeout 5",
                      "  LogLevel ERROR", ""]
        with open(self.known_hosts, "w") as f:
            f.write("\n".join(known) + "\n")
        with open(self.ssh_config, "w") as f:
            f.write("\n".join(lines))

    # -- stop
    def stop(self):
        """Kill every process of the lab by PID, delete namespaces, veths and bridge. Idempotent."""
        if self.n is None:
            return
        nodes = list(self.hosts.values()) + ([self.san] if self.san else [])
        for host in nodes:
            host.up()
        pids = []
        for host in nodes:
            p = _sh("ip", "netns", "pids", host.netns, check=False)
            pids += [int(x) for x in p.stdout.split()]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for host in nodes:
            if host._proc is not None:
                host._proc.wait()
                host._proc = None
            host.sshd_pid = host.libvirtd_pid = None
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        self._remove_network()
        self.hosts, self.san = {}, None
        os.close(self._lock_fd)
        self.n = self._lock_fd = None

    def _remove_network(self):
        # delete the root-side veths first: a netns deletion frees them only asynchronously
        for link in os.listdir("/sys/class/net"):
            if link.startswith("ol%dv" % self.n):
                _sh("ip", "link", "del", link, check=False)
        prefix = "ol%d-" % self.n
        for ns in _sh("ip", "netns", "list", check=False).stdout.splitlines():
            name = ns.split()[0] if ns.split() else ""
            if name.startswith(prefix):
                _sh("ip", "netns", "del", name, check=False)
        if os.path.exists("/sys/class/net/" + self.bridge):
            _sh("ip", "link", "del", self.bridge, check=False)
        for line in _sh("ip", "route", "show", "type", "unreachable", check=False).stdout.splitlines():
            dest = line.split()[1] if len(line.split()) > 1 else ""
            if dest.startswith("%s.%d." % (SUBNET_PREFIX, self.n)):
                _sh("ip", "route", "del", "unreachable", dest, check=False)


ISCSID_CONF = """\
# oneiscsi lab host: defaults for new node records (the stand-in reads these like iscsid)
node.startup = manual
node.session.auth.authmethod = None
node.session.scan = auto
node.conn[0].timeo.login_timeout = 15
"""


def _listening(addr, port):
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect((addr, port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def _alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False
