"""The libvirt side of the iscsi driver: `disk-xml` and `secret`.

disk-xml prints the <disk> element oned's KVM driver writes for a DISK of type
ISCSI (LibVirtDriverKVM: protocol='iscsi', one <host> per ISCSI_HOST entry with
port 3260 by default, <auth> only when both ISCSI_USER and ISCSI_USAGE are set).

secret defines the libvirt CHAP secret (usage type iscsi) on every host, in one
ssh round trip per host. The password is read from our stdin and travels inside
the script text on ssh's stdin; on the host it is written to a 0600 temp file
for `virsh secret-set-value --file --plain` and removed: it is on no argv.
"""
from __future__ import annotations

import argparse
import sys
from xml.sax.saxutils import quoteattr

from oneiscsi import host as hostrun, log, validate
from oneiscsi.errors import Failure, Invalid, UsageError

BUS = {"vd": "virtio", "sd": "scsi", "hd": "ide", "xv": "xen"}


def disk_xml(attrs: dict) -> str:
    from oneiscsi.drivers.iscsi import Target
    get = lambda k: (attrs.get(k) or "").strip()  # noqa: E731
    t = Target(get("SOURCE"), get("ISCSI_IQN"), get("ISCSI_HOST"), get("ISCSI_USER"), get("ISCSI_USAGE"), "disk")
    target = get("TARGET") or "sda"
    if not target.isalnum():
        raise Invalid("TARGET %s is refused: expected a device name such as vda" % validate.show(target))
    bus = BUS.get(target[:2], "virtio")
    driver = get("DRIVER") or "raw"
    if driver not in ("raw", "qcow2"):
        raise Invalid("DRIVER %s is refused: raw or qcow2" % validate.show(driver))
    lines = ["<disk type='network' device='disk'>",
             "  <source protocol='iscsi' name=%s>" % quoteattr(t.name)]
    for h, p in t.portals:
        lines.append("    <host name=%s port='%d'/>" % (quoteattr(h), p))
    lines.append("  </source>")
    if len(t.portals) > 1:
        log.warn("libvirt accepts exactly one <host> for an iSCSI disk: a VM with this disk will not start")
    if t.user and t.usage:
        lines += ["  <auth username=%s>" % quoteattr(t.user),
                  "    <secret type='iscsi' usage=%s/>" % quoteattr(t.usage),
                  "  </auth>"]
    lines.append("  <target dev=%s bus='%s'/>" % (quoteattr(target), bus))
    if get("READONLY").upper() == "YES":
        lines.append("  <readonly/>")
    lines.append("  <driver name='qemu' type='%s' cache='none'/>" % driver)
    lines.append("</disk>")
    return "\n".join(lines)


def domain_xml(disk: str, name: str = "one-disk-xml") -> str:
    """A minimal KVM domain around a disk, for `virt-xml-validate` and `virsh define`."""
    return ("<domain type='kvm'><name>%s</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>"
            "<os><type arch='x86_64'>hvm</type></os><devices>\n%s\n</devices></domain>" % (name, disk))


def disk_xml_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz disk-xml",
                                 description="Print the libvirt disk XML oned generates for an iSCSI DISK.")
    ap.add_argument("--vm", help="VM id: read the VM from oned")
    ap.add_argument("--xml", help="file with the VM XML (onevm show -x)")
    ap.add_argument("--disk", help="DISK_ID (default: the first iscsi disk)")
    ap.add_argument("--domain", action="store_true", help="wrap it in a minimal <domain> (for validation)")
    ap.add_argument("attrs", nargs="*", metavar="KEY=VALUE", help="DISK attributes (SOURCE=..., ISCSI_HOST=...)")
    a = ap.parse_args(argv)
    if a.vm is not None and not a.vm.isdigit():
        raise UsageError("disk-xml: --vm %s is not a VM id: give the number `onevm list` shows"
                         % validate.show(a.vm))
    if a.vm and a.xml:
        raise UsageError("disk-xml: give --vm or --xml, not both")
    if a.vm or a.xml:
        from oneiscsi.one import xml
        if a.vm:
            from oneiscsi.one.rpc import One
            vm = One().vm(a.vm)
        else:
            try:
                with open(a.xml, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as e:
                raise UsageError("disk-xml: cannot read --xml %s (%s): give a file written by `onevm show -x ID`"
                                 % (validate.show(a.xml), getattr(e, "strerror", None) or e)) from None
            vm = xml.vm(text)
        disks = [d for d in vm.disks if (a.disk is None and d["TYPE"].upper() == "ISCSI") or d.disk_id == a.disk]
        if not disks:
            raise Failure("no iSCSI DISK%s in the VM" % ((" with DISK_ID " + a.disk) if a.disk else ""))
        attrs = {el.tag: (el.text or "") for el in disks[0].el}
    else:
        attrs = {}
        for kv in a.attrs:
            k, sep, v = kv.partition("=")
            if not sep:
                raise Invalid("expected KEY=VALUE, got %s" % validate.show(kv))
            attrs[k.upper()] = v
    out = disk_xml(attrs)
    print(domain_xml(out) if a.domain else out)
    return 0


SECRET_SCRIPT = r"""
umask 077
tmp=$(mktemp -d) || exit 1
trap 'rm -rf "$tmp"' EXIT
%(password)s
cat > "$tmp/secret.xml" <<'ONEISCSI_XML'
<secret ephemeral='no' private='yes'>
  <description>%(description)s</description>
  <usage type='iscsi'><target>%(usage)s</target></usage>
</secret>
ONEISCSI_XML
V="virsh -q -c qemu:///system"
one() { tr '\n' ' ' | cut -c1-300; }
command -v virsh >/dev/null 2>&1 || { echo "FAIL virsh not found: install libvirt-clients (libvirt-client)"; exit 1; }
list=$($V secret-list 2>&1) || {
  echo "FAIL libvirtd cannot be reached on qemu:///system ($(echo "$list" | one)): start libvirtd and let this user use qemu:///system (libvirt group)"; exit 1; }
find_uuid() { $V secret-list 2>&1 | awk -v u=%(usage_q)s '$2=="iscsi" && $3==u {print $1; exit}'; }
uuid=$(find_uuid)
state=updated
if [ -z "$uuid" ]; then
  out=$($V secret-define "$tmp/secret.xml" 2>&1) || { echo "FAIL secret-define: $(echo "$out" | one)"; exit 1; }
  uuid=$(find_uuid)
  state=defined
fi
[ -n "$uuid" ] || { echo "FAIL no secret uuid"; exit 1; }
printf '%%s' "$pw" > "$tmp/pw"
out=$($V secret-set-value --secret "$uuid" --file "$tmp/pw" --plain 2>&1) || { echo "FAIL secret-set-value: $(echo "$out" | one)"; exit 1; }
echo "OK $uuid $state"
"""


def define_secret(host: str, usage: str, user: str, password: str) -> str:
    script = SECRET_SCRIPT % {
        "password": hostrun.heredoc_value("pw", password),
        "description": "iSCSI CHAP secret for user %s (oneiscsi)" % user,
        "usage": usage, "usage_q": hostrun.q(usage)}
    res = hostrun.run(host, script, timeout=60, what="libvirt secret")
    line = hostrun.last_line(res.stdout)
    if hostrun.unreachable(res):
        raise Failure("host %s: cannot reach it over ssh (%s): check this user's ssh access to the host"
                      % (host, hostrun.last_line(res.stderr) or "ssh exit 255"))
    if res.returncode != 0 or not line.startswith("OK "):
        detail = line[5:] if line.startswith("FAIL ") else (
            hostrun.last_line(res.stderr) or "the host script ended with rc %d and said nothing" % res.returncode)
        raise Failure("host %s: cannot define the libvirt secret %s: %s" % (host, usage, detail))
    _, uuid, state = line.split()
    return "%s: secret %s (usage %s) %s" % (host, uuid, usage, state)


def secret_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="oneiscsi.pyz secret",
                                 description="Define the libvirt CHAP secret on hosts; password on stdin.")
    ap.add_argument("--usage", required=True, help="ISCSI_USAGE (the secret's usage target)")
    ap.add_argument("--user", required=True, help="ISCSI_USER (the CHAP user name)")
    ap.add_argument("--hosts", required=True, help="comma-separated hypervisor hosts")
    a = ap.parse_args(argv)
    usage = validate.usage(a.usage)
    user = validate.chap_user(a.user)
    hosts = [validate.hostname(h, "host") for h in a.hosts.split(",") if h.strip()]
    if not hosts:
        raise UsageError("secret: --hosts %s names no host: give the hypervisors, comma-separated "
                         "(--hosts host1,host2)" % validate.show(a.hosts))
    if sys.stdin.isatty():
        import getpass
        password = getpass.getpass("CHAP password for %s: " % user)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        raise Invalid("no password on stdin")
    log.secret(password)
    failed = 0
    for h in hosts:
        try:
            print(define_secret(h, usage, user, password))
        except Failure as e:
            print("%s: FAILED: %s" % (h, log.mask(str(e))), file=sys.stderr)
            failed += 1
    if failed:
        raise Failure("the secret could not be defined on %d of %d hosts" % (failed, len(hosts)))
    return 0
