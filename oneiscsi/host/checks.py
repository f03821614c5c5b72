"""Host checks for the libvirt side, as one sh script printing `CHECK|name|status|detail|fix` lines.

Used by the iscsi driver (ln, premigrate: fail early, before QEMU does) and by
`--selftest`. QEMU's iSCSI support is probed by asking qemu-img to open an
iSCSI image on a port nothing listens on: a QEMU without libiscsi says
"Unknown driver 'iscsi'" (or cannot load block-iscsi.so), one with it fails to
connect. `qemu-img --help` is no use: it lists iscsi even when the module is absent.
"""
from __future__ import annotations

from oneiscsi.host import q
from oneiscsi.host.iscsi import READ_INITIATOR

PROBE = ("qemu-img info --image-opts "
         "driver=iscsi,transport=tcp,portal=127.0.0.1:1,target=iqn.2000-01.invalid:oneiscsi-probe,lun=0")

QEMU = r"""
if ! command -v qemu-img >/dev/null 2>&1; then
  echo "CHECK|qemu-iscsi|FAIL|qemu-img not found on $(hostname)|install qemu-utils and qemu-block-extra (Debian/Ubuntu) or a qemu-kvm with libiscsi"
else
  out=$(timeout 20 %s 2>&1)
  case "$out" in
    *"Unknown driver"*|*"failed to open module"*|*"module block-block-iscsi not found"*)
      echo "CHECK|qemu-iscsi|FAIL|QEMU on $(hostname) has no iSCSI (libiscsi) support|install qemu-block-extra (Debian/Ubuntu) or a libiscsi-enabled qemu-kvm build" ;;
    *) echo "CHECK|qemu-iscsi|PASS|QEMU can open iscsi:// disks|" ;;
  esac
fi
""" % PROBE

LIBVIRT = r"""
secrets=$(virsh -q -c qemu:///system secret-list 2>&1); vrc=$?
if [ $vrc -ne 0 ]; then
  echo "CHECK|libvirtd|FAIL|virsh -c qemu:///system failed on $(hostname): $(echo "$secrets" | tr '\n|' '  ' | cut -c1-160)|start libvirtd and let oneadmin use qemu:///system (libvirt group)"
else
  echo "CHECK|libvirtd|PASS|libvirtd answers on qemu:///system|"
fi
"""

SECRET = r"""
if [ $vrc -eq 0 ] && echo "$secrets" | awk -v u=%(usage)s '$2=="iscsi" && $3==u {f=1} END {exit !f}'; then
  echo "CHECK|secret %(usage_txt)s|PASS|libvirt secret with usage %(usage_txt)s exists|"
else
  echo "CHECK|secret %(usage_txt)s|FAIL|no libvirt iSCSI secret with usage %(usage_txt)s on $(hostname)|oneiscsi.pyz secret --usage %(usage_txt)s --user <ISCSI_USER> --hosts $(hostname) (password on stdin)"
fi
"""

PORTAL = r"""
if command -v bash >/dev/null 2>&1 && timeout 3 bash -c 'exec 3<>/dev/tcp/$0/$1' %(host)s %(port)s 2>/dev/null; then
  echo "CHECK|portal %(txt)s|PASS|TCP connect to %(txt)s works|"
else
  echo "CHECK|portal %(txt)s|FAIL|cannot open TCP %(txt)s from $(hostname)|check routing/firewall to the iSCSI portal"
fi
"""


# The EqualLogic side of a hypervisor: open-iscsi logs in, the driver's udev rules name the devices.
OPEN_ISCSI = READ_INITIATOR + r"""
if command -v iscsiadm >/dev/null 2>&1 || [ -x /usr/sbin/iscsiadm ] || [ -x /sbin/iscsiadm ]; then
  echo "CHECK|iscsiadm|PASS|open-iscsi's iscsiadm is installed|"
else
  echo "CHECK|iscsiadm|FAIL|iscsiadm not found on $(hostname)|install open-iscsi"
fi
running=""
for p in /proc/[0-9]*; do [ "$(cat "$p/comm" 2>/dev/null)" = iscsid ] && running=yes && break; done
if [ -n "$running" ]; then
  echo "CHECK|iscsid|PASS|iscsid is running|"
elif command -v systemctl >/dev/null 2>&1 && systemctl is-active -q iscsid.socket 2>/dev/null; then
  echo "CHECK|iscsid|PASS|iscsid is socket-activated (iscsid.socket)|"
else
  echo "CHECK|iscsid|FAIL|iscsid is not running on $(hostname)|systemctl enable --now iscsid (or iscsid.socket)"
fi
if name=$(read_initiator 2>/dev/null); then
  echo "CHECK|initiator name|PASS|$name|"
else
  why=$(read_initiator 2>&1 >/dev/null)
  case "$why" in
    *"not allowed"*) echo "CHECK|initiator name|FAIL|$why|add /usr/bin/cat /etc/iscsi/initiatorname.iscsi to oneadmin's sudoers line (README)" ;;
    *) echo "CHECK|initiator name|FAIL|${why:-no InitiatorName in /etc/iscsi/initiatorname.iscsi}|echo InitiatorName=\$(iscsi-iname) > /etc/iscsi/initiatorname.iscsi" ;;
  esac
fi
if grep -Eq '^[[:space:]]*node\.startup[[:space:]]*=[[:space:]]*manual' /etc/iscsi/iscsid.conf 2>/dev/null; then
  echo "CHECK|node.startup|PASS|node.startup = manual|"
else
  echo "CHECK|node.startup|FAIL|node.startup is not manual in /etc/iscsi/iscsid.conf: the host would log in to every volume at boot|set node.startup = manual in /etc/iscsi/iscsid.conf"
fi
if [ -f /etc/udev/rules.d/61-oneiscsi-eql.rules ] && [ -x /etc/udev/scripts/oneiscsi-eql-volume ]; then
  echo "CHECK|udev rules|PASS|61-oneiscsi-eql.rules and oneiscsi-eql-volume installed|"
else
  echo "CHECK|udev rules|FAIL|the oneiscsi udev rules are not installed on $(hostname)|copy udev/61-oneiscsi-eql.rules to /etc/udev/rules.d/ and udev/oneiscsi-eql-volume to /etc/udev/scripts/ (mode 755), then udevadm control --reload"
fi
"""

CHAP_DEFAULTS = r"""
if grep -Eq '^[[:space:]]*node\.session\.auth\.authmethod[[:space:]]*=[[:space:]]*CHAP' /etc/iscsi/iscsid.conf 2>/dev/null \
   && grep -Eq '^[[:space:]]*node\.session\.auth\.username[[:space:]]*=[[:space:]]*[^[:space:]]' /etc/iscsi/iscsid.conf 2>/dev/null; then
  echo "CHECK|chap|PASS|CHAP defaults in /etc/iscsi/iscsid.conf|"
else
  echo "CHECK|chap|WARN|no CHAP defaults in iscsid.conf and no EQL_CHAP_USER: logins rely on IP/initiator access records|set node.session.auth.* in iscsid.conf or EQL_CHAP_USER/EQL_CHAP_PASS_FILE on the datastore"
fi
"""


def script(usages=(), portals=(), libvirt=True, eql=False, eql_chap=False, qemu=True) -> str:
    """usages: validated ISCSI_USAGE values; portals: validated (host, port) pairs; eql: the
    EqualLogic host checks (eql_chap: the datastore gives CHAP itself, iscsid.conf needs none)."""
    parts = [QEMU] if qemu else []
    if eql:
        parts.append(OPEN_ISCSI)
        parts.append('echo "CHECK|chap|PASS|CHAP comes from the datastore (EQL_CHAP_USER)|"' if eql_chap
                     else CHAP_DEFAULTS)
    if libvirt or usages:
        parts.append(LIBVIRT)
    for u in sorted(set(usages)):
        parts.append(SECRET % {"usage": q(u), "usage_txt": u})
    for host, port in sorted(set(portals)):
        txt = "[%s]:%d" % (host, port) if ":" in host else "%s:%d" % (host, port)
        parts.append(PORTAL % {"host": q(host), "port": q(port), "txt": txt})
    return "\n".join(parts)


def parse(stdout: str) -> list:
    """-> [(name, status, detail, fix)]"""
    rows = []
    for line in stdout.splitlines():
        if line.startswith("CHECK|"):
            parts = (line.split("|", 4) + ["", "", "", ""])[1:5]
            rows.append(tuple(p.strip() for p in parts))
    return rows
