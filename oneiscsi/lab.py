"""`oneiscsi.pyz lab`: the end-to-end demo on this machine (root, Debian 12; see README).

It starts real parts: two hypervisor hosts (network namespaces with sshd, libvirtd and the
iscsiadm stand-in), a "SAN" namespace with tgtd serving a CHAP-protected LUN and the
EqualLogic group simulator (its volumes are tgtd targets), and a fake oned answering XML-RPC.
It installs this executable into a scratch remotes tree and then plays what oned would send
through VMs' lives with both drivers: register, deploy, live-migrate, terminate (and for
eqliscsi a non-persistent clone). Every step shows what oned sends, what the driver printed,
and what changed on the hosts and the SAN. Everything is torn down at the end (also on
failure or Ctrl-C).

`oneiscsi.pyz lab sim [ARGS]` runs only the EqualLogic group simulator in the foreground.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile

IQN = "iqn.2024-01.org.example.lab:disk1"
USAGE = "lab-chap"
CHAP_USER = "labuser"


def say(text=""):
    print(text, flush=True)


def step(n, title):
    say("\n== %s. %s ==" % (n, title))


class Demo:
    def __init__(self, workdir: str, version: str = "7.4"):
        self.work = workdir
        self.version = version
        self.chap_pass = "lab-" + os.urandom(6).hex()
        self.parts = []

    # ---- set-up ---------------------------------------------------------------
    def __enter__(self):
        from oneiscsi import install
        from oneiscsi.sim.hosts import Lab
        from oneiscsi.sim.oned import FakeOned
        from oneiscsi.sim.tgt import Tgtd
        say("starting the lab in %s" % self.work)
        # the hosts share the system datastore's folder, as with OpenNebula's `shared` TM over NFS
        # virsh_standin: a guest agent cannot run here; the stand-in answers domfsfreeze/domfsthaw
        # (logging them) and hands every other verb to the real virsh (CHAP secrets)
        self.lab = Lab(os.path.join(self.work, "lab"), hosts=("host1", "host2"), san=True, libvirtd=True,
                       shared_datastores=True, virsh_standin=True)
        self.parts.append(self.lab)
        self.lab.start()
        self.tgtd = Tgtd(os.path.join(self.work, "tgt"), portal="%s:3260" % self.lab.san.addr,
                         netns=self.lab.san.netns)
        self.parts.append(self.tgtd)
        self.tgtd.start()
        self.tgtd.add_target(IQN, os.path.join(self.work, "disk1.img"), size_bytes=32 * 1024 * 1024)
        self.tgtd.bind(IQN)
        self.tgtd.set_chap(IQN, CHAP_USER, self.chap_pass)
        self.oned_pass = "one-" + os.urandom(6).hex()
        self.oned = FakeOned(session="oneadmin:" + self.oned_pass)
        self.parts.append(self.oned)
        self.oned.start()
        self.oned.hosts = ["host1", "host2"]
        from oneiscsi.sim.onemodel import Cloud
        # VM DISKs as oned writes them (Image::disk_attribute), ISCSI_* inherited from images
        self.cloud = Cloud(self.oned, version=tuple(int(x) for x in self.version.split(".")), system_tm="shared",
                           inherit=("ISCSI_HOST", "ISCSI_USER", "ISCSI_USAGE"))
        self.cloud.system_datastore(shared=True)
        auth = os.path.join(self.work, "one_auth")
        with open(auth, "w") as f:
            f.write("oneadmin:%s\n" % self.oned_pass)
        self.remotes = os.path.join(self.work, "remotes")
        os.makedirs(self.remotes)
        with open(os.path.join(self.remotes, "VERSION"), "w") as f:
            f.write(self.version + ".0\n")
        self.system_tm_standins()
        install.install(self.remotes, ["iscsi", "iscsi_libvirt", "eqliscsi"], python=sys.executable)
        # this process and every driver it runs talk to the lab's oned and hosts
        os.environ.update(ONE_XMLRPC=self.oned.url, ONE_AUTH=auth,
                          ONEISCSI_SSH="ssh -F %s" % shlex.quote(self.lab.ssh_config),
                          ONEISCSI_LOG=os.path.join(self.work, "oneiscsi.log"))
        self.env = dict(os.environ)
        say("hosts: %s; target %s on %s:3260 (CHAP user %s); fake oned %s; OpenNebula %s"
            % (", ".join("%s=%s" % (h.name, h.addr) for h in self.lab.hosts.values()), IQN,
               self.lab.san.addr, CHAP_USER, self.oned.url, self.version))
        return self

    def __exit__(self, *exc):
        for part in reversed(self.parts):
            try:
                part.stop()
            except Exception as e:  # keep tearing down
                say("teardown: %s: %s" % (type(part).__name__, e))
        say("\nlab stopped and removed")
        return False

    def system_tm_standins(self):
        """The shared system TM's backup scripts, which install wraps (6.6+). Stand-ins: OpenNebula's
        own (tm/qcow2/*, Ruby) cannot run here; the lab's VMs have only oneiscsi disks, and oneiscsi
        passes the original only other drivers' disks, so these must never run: they fail loudly."""
        d = os.path.join(self.remotes, "tm", "shared")
        os.makedirs(d, exist_ok=True)
        for action in ("prebackup", "prebackup_live", "postbackup", "postbackup_live", "restore"):
            path = os.path.join(d, action)
            with open(path, "w") as f:
                f.write("#!/bin/sh\n# lab stand-in for OpenNebula's tm/shared/%s\n"
                        "echo \"the lab's stand-in for tm/shared/%s was called: $*\" >&2\nexit 1\n" % (action, action))
            os.chmod(path, 0o755)

    # ---- helpers ----------------------------------------------------------------
    def action(self, kind, driver, action, args, stdin="", expect_rc=0, note=""):
        path = os.path.join(self.remotes, "datastore" if kind == "ds" else "tm", driver, action)
        shown = " ".join(str(a) if len(str(a)) < 60 else str(a)[:24] + "...(base64)" for a in args)
        say("oned -> %s %s%s" % (os.path.relpath(path, self.remotes), shown,
                                  "   [stdin: %s]" % note if note else ""))
        res = subprocess.run([path] + [str(a) for a in args], input=stdin, capture_output=True,
                             text=True, env=self.env, timeout=300)
        for line in res.stdout.splitlines():
            say("   stdout: %s" % line)
        for line in res.stderr.splitlines():
            say("   stderr: %s" % line)
        say("   exit %d" % res.returncode)
        if res.returncode != expect_rc:
            raise SystemExit("lab: %s exited %d, expected %d" % (action, res.returncode, expect_rc))
        return res

    def qemu_io(self, host, what, data=None):
        """What QEMU does on the host: open the LUN with libiscsi and CHAP (secret from a 0600 file)."""
        portal = "%s:3260" % self.lab.san.addr
        opts = ("driver=iscsi,transport=tcp,portal=%s,target=%s,lun=1,user=%s,password-secret=s0"
                % (portal, IQN, CHAP_USER))
        script = ("set -e; umask 077; d=$(mktemp -d); trap 'rm -rf $d' EXIT; "
                  "printf %%s %s > $d/pw; " % shlex.quote(self.chap_pass))
        if data is not None:
            script += ("printf %%s %s > $d/data; truncate -s 512 $d/data; "
                       "qemu-img convert -n -f raw --object secret,id=s0,file=$d/pw $d/data "
                       "--target-image-opts %s; echo wrote %s" % (shlex.quote(data), opts, shlex.quote(repr(data))))
        else:
            script += ("qemu-img convert --object secret,id=s0,file=$d/pw --image-opts %s -O raw $d/out; "
                       "echo read \\'$(head -c 64 $d/out | tr -d '\\000')\\'" % opts)
        # the script (with the password) goes on stdin, never on an argv
        res = self.lab.hosts[host].run(["sh", "-s"], user="oneadmin", input=script, check=False)
        if res.returncode != 0:
            raise SystemExit("lab: QEMU on %s could not open the LUN: %s" % (host, res.stderr.strip()[-300:]))
        say("   %s (QEMU on %s, libiscsi + CHAP): %s" % (what, host, res.stdout.strip()))
        return res.stdout.strip()

    # ---- the iscsi lifecycle -------------------------------------------------------
    def iscsi(self):
        from oneiscsi.sim import onexml
        v = tuple(int(x) for x in self.version.split("."))
        ds_tpl = {"DISK_TYPE": "ISCSI", "ISCSI_HOST": self.lab.san.addr, "ISCSI_USER": CHAP_USER,
                  "ISCSI_USAGE": USAGE}
        ds = onexml.datastore_xml(ds_id=101, name="iscsi", ds_mad="iscsi", tm_mad="iscsi", template=ds_tpl,
                                  version=v)
        step(1, "CHAP secret on every host: oneiscsi.pyz secret (password on stdin only)")
        from oneiscsi import libvirt
        for h in ("host1", "host2"):
            say("   " + libvirt.define_secret(h, USAGE, CHAP_USER, self.chap_pass))

        step(2, "register the LUN: oneimage create (PATH=%s/1, PERSISTENT=YES)" % IQN)
        stat_b64 = onexml.ds_action_data("<IMAGE><PATH>%s/1</PATH></IMAGE>" % IQN, ds)
        self.action("ds", "iscsi", "stat", [0] if v >= (6, 8) else [stat_b64, 0], stdin=stat_b64 if v >= (6, 8) else "",
                    note="DS_DRIVER_ACTION_DATA" if v >= (6, 8) else "")
        img = onexml.image_xml(iid=5, name="lab disk", path=IQN + "/1", persistent=True, ds_id=101, version=v)
        cp_b64 = onexml.ds_action_data(img, ds)
        res = self.action("ds", "iscsi", "cp", [5] if v >= (6, 8) else [cp_b64, 5],
                          stdin=cp_b64 if v >= (6, 8) else "", note="DS_DRIVER_ACTION_DATA" if v >= (6, 8) else "")
        source = res.stdout.split()[0]
        say("   image 5 SOURCE=%s" % source)
        say("   a non-persistent copy is refused, with the reason:")
        bad = onexml.ds_action_data(onexml.image_xml(iid=6, path=IQN + "/1", persistent=False, version=v), ds)
        self.action("ds", "iscsi", "cp", [6] if v >= (6, 8) else [bad, 6], stdin=bad if v >= (6, 8) else "",
                    expect_rc=1)

        from oneiscsi.sim.onemodel import Img
        image = self.cloud.image(Img(5, "lab disk", source, persistent=True, ds_id=101, ds_name="iscsi",
                                     tm_mad="iscsi", disk_type="ISCSI", fmt="",
                                     template={"ISCSI_HOST": self.lab.san.addr, "ISCSI_USER": CHAP_USER,
                                               "ISCSI_USAGE": USAGE}))
        step(3, "deploy VM 42 on host1 (prolog: LN)")
        self.cloud.vm(42, [(0, image)], hosts=("host1",))
        self.action("tm", "iscsi", "ln", ["fe:" + source, "host1:/var/lib/one/datastores/0/42/disk.0", 42, 101])
        xml = subprocess.run([sys.executable, sys.argv[0], "disk-xml", "--vm", "42"], capture_output=True,
                             text=True, env=self.env)
        say("   the disk oned's KVM driver writes for it (oneiscsi.pyz disk-xml --vm 42):")
        for line in xml.stdout.splitlines():
            say("      " + line)
        self.qemu_io("host1", "the VM writes", data="written on host1 by VM 42")

        step(4, "live-migrate VM 42 host1 -> host2 (system TM premigrate calls migrate_other)")
        vm = self.oned.vms[42]
        self.action("tm", "iscsi", "premigrate", ["host1", "host2", "/var/lib/one/datastores/0/42", 42, 0, "shared"],
                    stdin=onexml.b64(vm), note="VM template")
        self.cloud.state(42, 3, "host1", "host2")
        self.qemu_io("host2", "after the move the VM reads")
        self.action("tm", "iscsi", "postmigrate", ["host1", "host2", "/var/lib/one/datastores/0/42", 42, 0, "shared"],
                    stdin=onexml.b64(vm), note="VM template")
        say("   a destination whose QEMU lacks libiscsi is refused before the migration starts:")
        self.lab.hosts["host1"].hide("/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so")
        try:
            self.action("tm", "iscsi", "premigrate", ["host2", "host1", "/var/lib/one/datastores/0/42", 42, 0,
                                                      "shared"], stdin=onexml.b64(vm), note="VM template",
                        expect_rc=1)
        finally:
            self.lab.hosts["host1"].run(["umount", "/usr/lib/x86_64-linux-gnu/qemu"])  # undo hide()

        step(5, "terminate VM 42 (epilog: MVDS for the persistent disk, DELETE of the VM directory)")
        self.action("tm", "iscsi", "mvds", ["host2:/var/lib/one/datastores/0/42/disk.0", source, 42, 101])
        self.action("tm", "iscsi", "delete", ["host2:/var/lib/one/datastores/0/42", 42, 0])
        step(6, "delete the image (RM): the LUN and its data stay on the target")
        self.action("ds", "iscsi", "rm", [5] if v >= (6, 8) else [cp_b64, 5], stdin=cp_b64 if v >= (6, 8) else "")
        say("   target %s still has LUN 1: %s" % (IQN, bool(self.tgtd.targets()[IQN]["luns"])))

    # ---- the eqliscsi lifecycle --------------------------------------------------------
    def start_group(self):
        """The EqualLogic group simulator in the SAN namespace, its volumes served by the same tgtd."""
        from oneiscsi.sim.eql import EqlSim
        self.group_pass = "grp-" + os.urandom(6).hex()
        self.sim = EqlSim(os.path.join(self.work, "eql"), group_name="lab-group", listen=self.lab.san.addr,
                          users={"grpadmin": self.group_pass}, tgtd=self.tgtd, netns=self.lab.san.netns,
                          group_ip=self.lab.san.addr)
        self.parts.append(self.sim)
        self.sim.start()
        known = os.path.join(self.work, "eql_known_hosts")
        with open(known, "w") as f:
            f.write(self.sim.host_key_line() + "\n")
        passfile = os.path.join(self.work, "eql_pass")
        with open(os.open(passfile, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(self.group_pass + "\n")
        conf = os.path.join(self.work, "eqliscsi.conf")
        with open(os.open(conf, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write('EQL_HOST="%s:%d"\nEQL_USER="grpadmin"\nEQL_PASS_FILE="%s"\nEQL_KNOWN_HOSTS="%s"\n'
                    'EQL_POOL="default"\nEQL_PORTAL="%s:3260"\nEQL_INITIATOR="iqn.2024-01.org.example.lab:frontend"\n'
                    % (self.lab.san.addr, self.sim.port, passfile, known, self.lab.san.addr))
        os.environ.update(ONEISCSI_EQL_CONF=conf, ONEISCSI_LOCK_DIR=os.path.join(self.work, "locks"),
                          ONEISCSI_STATE_DIR=os.path.join(self.work, "state"))
        self.env = dict(os.environ)
        say("   group lab-group: CLI on %s:%d (SSH, host key pinned), iSCSI portal %s:3260"
            % (self.lab.san.addr, self.sim.port, self.lab.san.addr))

    def san(self, what=""):
        g = self.sim.group
        with g.lock:
            vols = ", ".join("%s (%d MB, %s%s)" % (v.name, v.size_mb, "online" if v.online else "offline",
                                                    ", multihost" if v.multihost else "")
                             for v in sorted(g.volumes.values(), key=lambda v: v.name)) or "none"
        sessions = {iqn.split(":")[-1]: t["sessions"]
                    for iqn, t in self.tgtd.targets().items() if t["sessions"]}
        say("   SAN%s: volumes: %s; iSCSI sessions: %s" % (" " + what if what else "", vols, sessions or "none"))

    def host_io(self, host, link, data=None):
        """What the VM does: read or write the start of its disk through the disk link."""
        if data is not None:
            script = "printf %%s %s | dd of=%s bs=512 count=1 conv=notrunc,fsync 2>/dev/null && echo wrote %s" % (
                shlex.quote(data), shlex.quote(link), shlex.quote(repr(data)))
        else:
            script = "echo read \\'$(head -c 64 %s | tr -d '\\000')\\'" % shlex.quote(link)
        res = self.lab.hosts[host].run(["sh", "-s"], user="oneadmin", input=script, check=False)
        if res.returncode != 0:
            raise SystemExit("lab: %s could not use %s: %s" % (host, link, res.stderr.strip()[-300:]))
        say("   the VM on %s through %s: %s" % (host, link, res.stdout.strip()))

    def eqliscsi(self):
        from oneiscsi.sim import onexml
        v = tuple(int(x) for x in self.version.split("."))
        step(7, "EqualLogic: the group simulator (SSH CLI) with each volume a real tgtd target")
        self.start_group()
        ds = onexml.datastore_xml(ds_id=102, name="eql", ds_mad="eqliscsi", tm_mad="eqliscsi",
                                  template={"DISK_TYPE": "BLOCK"}, version=v)
        self.oned.datastores[102] = ds
        stdin_style = v >= (6, 8)

        def ds_action(action, b64, oid, expect_rc=0):
            return self.action("ds", "eqliscsi", action, [oid] if stdin_style else [b64, oid],
                               stdin=b64 if stdin_style else "",
                               note="DS_DRIVER_ACTION_DATA" if stdin_style else "", expect_rc=expect_rc)
        ds_action("monitor", onexml.ds_action_data("", ds), 102)

        step(8, "register an image: oneimage create --path lab.raw (CP creates a volume and writes it)")
        src = os.path.join(self.work, "lab.raw")
        with open(src, "wb") as f:
            f.write(b"eqliscsi image bytes".ljust(512, b"\0"))
            f.truncate(8 * 1024 * 1024)
        img = onexml.image_xml(iid=7, name="Lab Image", path=src, persistent=True, ds_id=102, ds_name="eql",
                               size_mb=8, version=v)
        res = ds_action("cp", onexml.ds_action_data(img, ds), 7)
        source = res.stdout.split()[0]
        from oneiscsi.sim.onemodel import Img
        image = self.cloud.image(Img(7, "Lab Image", source, persistent=True, ds_id=102, ds_name="eql", size_mb=8))
        self.san()

        link = "/var/lib/one/datastores/0/43/disk.0"
        step(9, "deploy VM 43 on host1 with the image as a persistent disk (LN logs host1 in)")
        self.cloud.vm(43, [(0, image)], hosts=("host1",))
        self.action("tm", "eqliscsi", "ln", ["fe:" + source, "host1:" + link, 43, 102])
        self.san()
        self.host_io("host1", link)
        self.host_io("host1", link, data="written on host1 by VM 43")

        step(10, "live-migrate VM 43 host1 -> host2 (premigrate logs host2 in, postmigrate logs host1 out; "
                 "both hosts see one VM folder)")
        vm = self.cloud.state(43, 4, "host1", "host2")
        self.action("tm", "eqliscsi", "premigrate", ["host1", "host2", "/var/lib/one/datastores/0/43", 43, 0,
                                                     "shared"], stdin=onexml.b64(vm), note="VM template")
        self.san("(both hosts logged in during the move)")
        self.action("tm", "eqliscsi", "postmigrate", ["host1", "host2", "/var/lib/one/datastores/0/43", 43, 0,
                                                      "shared"], stdin=onexml.b64(vm), note="VM template")
        self.cloud.state(43, 3, "host1", "host2")
        self.san()
        self.host_io("host2", link)

        if v >= (6, 6):
            self.data_protection(link, v)

        step(11, "terminate VM 43 (MVDS of the persistent disk: host2 logs out, the volume stays)")
        self.cloud.state(43, 11, "host1", "host2")
        self.action("tm", "eqliscsi", "mvds", ["host2:" + link, source, 43, 102])
        self.action("tm", "eqliscsi", "delete", ["host2:/var/lib/one/datastores/0/43", 43, 0])
        self.cloud.done(43)
        self.san()

        step(12, "oneimage nonpersistent 7; VM 44 uses it (oned sets CLONE=YES: CLONE makes <volume>-44, "
                 "DELETE removes only that)")
        image.persistent = False
        self.cloud.image(image)
        link44 = "/var/lib/one/datastores/0/44/disk.0"
        self.cloud.vm(44, [(0, image)], hosts=("host2",))
        self.action("tm", "eqliscsi", "clone", ["fe:" + source, "host2:" + link44, 44, 102])
        self.san()
        self.host_io("host2", link44)
        self.cloud.state(44, 11)
        self.action("tm", "eqliscsi", "delete", ["host2:" + link44, 44, 102])
        self.cloud.done(44)
        self.san()

        step(13, "delete the image (RM: offline + delete the volume)")
        ds_action("rm", onexml.ds_action_data(image.xml(v), ds), 7)
        self.san()


    # ---- backups, restores, live snapshots (6.6+) ---------------------------------------
    def digest(self, host, link) -> str:
        res = self.lab.hosts[host].run(["sh", "-c", "sha256sum < %s | cut -c1-16" % shlex.quote(link)],
                                       user="oneadmin", check=False)
        if res.returncode != 0:
            raise SystemExit("lab: cannot read %s on %s: %s" % (link, host, res.stderr.strip()[-300:]))
        return res.stdout.strip()

    def virsh_log(self, host):
        path = os.path.join(self.lab.hosts[host].virsh_dir, "calls.log")
        try:
            with open(path) as f:
                calls = [ln.split()[1:] for ln in f if ln.strip()]
        except FileNotFoundError:
            calls = []
        say("   virsh on %s (stand-in log): %s" % (host, ", ".join(" ".join(c) for c in calls) or "nothing"))
        if os.path.exists(path):
            os.unlink(path)

    def data_protection(self, link, v):
        """VM 43 runs on host2: a live disk snapshot (7.x), two backups (full, then an increment),
        then `onevm restore` (6.10+) of the first one, checked byte for byte."""
        import shutil
        vmdir = os.path.dirname(link)
        self.cloud.state(43, 3, "host1", "host2")
        shape = dict(self.cloud.shape[43])
        shape.update(features={"GUEST_AGENT": "yes"})
        self.cloud.vm(43, **shape)
        if v >= (7, 0):
            step("10a", "live disk snapshot of running VM 43 (SNAP_CREATE_LIVE: the guest frozen around the group "
                        "snapshot, thawed on every path)")
            self.action("tm", "eqliscsi", "snap_create_live", ["host2:" + link, 0, 43, 102])
            self.virsh_log("host2")
            snaps = sorted(self.sim.group.volumes[self.cloud.images[7].volume].snapshots)
            say("   SAN: snapshots of %s: %s" % (self.cloud.images[7].volume, ", ".join(snaps)))
        step("10b", "back up running VM 43 (onevm backup, FS_FREEZE=AGENT, MODE=INCREMENT): oned runs the *system* "
                    "TM's prebackup_live; install put oneiscsi over it")
        server = os.path.join(self.work, "backup-server")   # stands in for the rsync backup datastore's host
        before = self.digest("host2", link)
        args = ["host2:" + vmdir, "0", "one-43"] + (["-"] if v >= (6, 8) else []) + [43, 0]
        bdir = os.path.join(vmdir, "backup")
        for n in (0, 1):
            vm = self.cloud.backup(43, live=True, mode="INCREMENT", last_increment=n - 1, fs_freeze="AGENT")
            self.action("tm", "shared", "prebackup_live", args, stdin=vm, note="VM XML")
            self.virsh_log("host2")
            res = self.lab.hosts["host2"].run(["sh", "-c", "cd %s && ls -l disk.* | awk '{print $9, $5, \"bytes\"}'"
                                              % shlex.quote(bdir)], user="oneadmin")
            say("   backup folder on host2: %s" % "; ".join(res.stdout.split("\n")).strip("; "))
            keep = os.path.join(server, "bk", "43", "s%d" % n)   # what the backup datastore's `backup` copies
            os.makedirs(keep, exist_ok=True)
            data = self.lab.hosts["host2"].run(["cat", os.path.join(bdir, "disk.0.%d" % n)], user="oneadmin",
                                              input=b"").stdout
            with open(os.path.join(keep, "disk.0.%d" % n), "wb") as f:
                f.write(data)
            self.action("tm", "shared", "postbackup_live", args, stdin=vm, note="VM XML")
            snaps = sorted(x for x in self.sim.group.volumes[self.cloud.images[7].volume].snapshots
                           if x.startswith("oneiscsi-bk"))
            say("   SAN: backup reference snapshot(s) kept for the next increment: %s" % ", ".join(snaps))
            if n == 0:
                self.host_io("host2", link, data="written on host2 after backup 0")
        if v < (6, 10):
            say("   (in-place restore needs OpenNebula 6.10+: skipped for %s)" % self.version)
            return
        step("10c", "onevm restore of backup 0 into powered-off VM 43 (the system TM's restore; the disk keeps "
                    "its device link, the data goes onto the volume)")
        self.host_io("host2", link, data="garbage written before the restore")
        self.cloud.state(43, 0, "host1", "host2", state=8)       # POWEROFF: the disks stay attached
        answer = os.path.join(self.work, "ls.json")
        with open(answer, "w") as f:
            f.write('{"0": "rsync://100/0/0:s0/bk/43/s0/disk.0.0"}')
        for rel, text in (("datastore/rsync/ls", "#!/bin/sh\n# lab stand-in for the rsync backup datastore's ls: "
                                                 "{disk id: url} of the increment asked for\ncat > /dev/null\n"
                                                 "cat %s\n" % shlex.quote(answer)),):
            path = os.path.join(self.remotes, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
            os.chmod(path, 0o755)
        shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sim", "downloader.sh"),
                    os.path.join(self.remotes, "datastore", "downloader.sh"))
        os.chmod(os.path.join(self.remotes, "datastore", "downloader.sh"), 0o755)
        from oneiscsi.sim import onexml
        self.oned.images[77] = onexml.image_xml(iid=77, name="backup of VM 43", path="", source="s0", ds_id=100,
                                                ds_name="backups", version=v)
        self.oned.datastores[100] = onexml.datastore_xml(ds_id=100, name="backups", ds_mad="rsync", tm_mad="-",
                                                         ds_type=2, version=v)
        self.env["ONEISCSI_SIM_BACKUP_ROOT"] = server
        self.action("tm", "shared", "restore", ["host2:" + vmdir, 43, 77, 0, -1])
        self.host_io("host2", link)
        after = self.digest("host2", link)
        say("   the whole disk: sha256 %s at backup 0, %s after the restore: %s"
            % (before, after, "identical" if before == after else "DIFFERENT"))
        if before != after:
            raise SystemExit("lab: the restored disk differs from backup 0")
        self.cloud.state(43, 3, "host1", "host2")


def main(argv) -> int:
    if argv[:1] == ["sim"]:
        from oneiscsi.sim import eql
        return int(eql.main(argv[1:]) or 0)
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz lab", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one-version", default="7.4", help="OpenNebula version to play, 5.0 to 7.x (default 7.4; "
                    "backups need 6.6+, in-place restores 6.10+, live disk snapshots 7.x)")
    ap.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    a = ap.parse_args(argv)
    import re
    m = re.match(r"(\d+)\.(\d+)$", a.one_version)
    if not m or not (5, 0) <= (int(m.group(1)), int(m.group(2))) < (8, 0):
        ap.error("--one-version %r: give MAJOR.MINOR from 5.0 to 7.x (the lab plays the iscsi driver too, "
                 "which needs 5.0+)" % a.one_version)
    if os.geteuid() != 0:
        say("lab: run as root (it creates network namespaces and starts tgtd, sshd and libvirtd)")
        return 1
    with tempfile.TemporaryDirectory(prefix="oneiscsi-lab-") as tmp:
        with Demo(a.workdir or tmp, a.one_version) as demo:
            demo.iscsi()
            demo.eqliscsi()
    say("\nlab: all steps done")
    return 0
