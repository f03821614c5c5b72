"""Host checks for the libvirt side, as one sh script printing `CHECK|name|status|detail|fix` lines.

Used by the iscsi driver (ln, premigrate: fail early, before QEMU does) and by
`--selftest`. QEMU's iSCSI support is probed by asking qemu-img to open an
iSCSI image on a port nothing listens on: a QEMU without libiscsi says
"Unknown driver 'iscsi'" (or cannot load block-iscsi.so), one with it fails to
connect. `qemu-img --help` is no use: it lists iscsi even when the module is absent.
"""
from __future__ import annotations

from oneiscsi.host import q

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


def script(usages=(), portals=(), libvirt=True) -> str:
    """usages: validated ISCSI_USAGE values; portals: validated (host, port) pairs."""
    parts = [QEMU]
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
