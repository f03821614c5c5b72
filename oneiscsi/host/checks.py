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


# Multipath (EQL_IFACE lists several ifaces): multipath.md section B. Debian 12's multipath-tools
# 0.9.4 has no EQLOGIC entry (upstream added one in 0.13.0, commit 33a959e3) and defaults to
# no_path_retry fail; `multipathd show config` shows what is in effect (built-ins + multipath.conf).
MULTIPATH = r"""
MPSUDO=; [ "$(id -u)" = 0 ] || MPSUDO="sudo -n"
if ! $MPSUDO multipathd show status >/dev/null 2>&1; then
  echo "CHECK|multipathd|FAIL|multipathd is not running on $(hostname) (or sudo -n multipathd is not allowed)|apt-get install multipath-tools; systemctl enable --now multipathd; sudoers line (README)"
else
  echo "CHECK|multipathd|PASS|multipathd answers|"
  conf=$($MPSUDO multipathd show config 2>/dev/null)
  eq=$(printf '%s\n' "$conf" | awk '
    $1 == "defaults" { sec = "d" } $1 == "device" && $2 == "{" { sec = "dev"; v = p = n = g = "" }
    sec == "d" && $1 == "no_path_retry" { dn = $2 }
    sec == "dev" && $1 == "vendor" { v = $2 } sec == "dev" && $1 == "product" { p = $2 }
    sec == "dev" && $1 == "no_path_retry" { n = $2 } sec == "dev" && $1 == "path_grouping_policy" { g = $2 }
    sec == "dev" && $1 == "}" { if (v ~ /EQLOGIC/ && p ~ /100E/) { fv = 1; fn = n; fg = g }; sec = "" }
    END { if (fv) print "yes", (fn != "" ? fn : (dn != "" ? dn : "fail")), fg; else print "no", (dn != "" ? dn : "fail") }')
  set -- $eq
  if [ "$1" = yes ]; then
    echo "CHECK|multipath EQLOGIC|PASS|EQLOGIC/100E-00 device section in effect (path_grouping_policy $3)|"
    npr=$2
  else
    echo "CHECK|multipath EQLOGIC|FAIL|no EQLOGIC/100E-00 device section in multipathd's configuration|add the device section of the README to /etc/multipath.conf, then multipathd reconfigure"
    npr=$2
  fi
  case $npr in
    *[!0-9]*|'')
      case $npr in
        queue) echo "CHECK|no_path_retry|FAIL|no_path_retry queue: I/O waits forever when every path is gone (hangs detach and shutdown)|set a bounded no_path_retry (e.g. 30) in the EQLOGIC device section" ;;
        *) echo "CHECK|no_path_retry|WARN|no_path_retry $npr: I/O fails as soon as the last path drops (a short flap reaches the VM)|set a bounded no_path_retry (e.g. 30) in the EQLOGIC device section" ;;
      esac ;;
    *) echo "CHECK|no_path_retry|PASS|no_path_retry $npr (bounded)|" ;;
  esac
fi
nics=
for k in @IFACES@; do
  nic=$($MPSUDO iscsiadm -m iface -I "$k" 2>/dev/null | sed -n 's/^iface.net_ifacename = //p')
  case $nic in
    ''|'<empty>') echo "CHECK|iface $k|FAIL|open-iscsi iface $k is missing or bound to no NIC|iscsiadm -m iface -I $k -o new; iscsiadm -m iface -I $k -o update -n iface.net_ifacename -v <NIC>" ;;
    *) if [ "$(cat /sys/class/net/$nic/operstate 2>/dev/null)" = up ]; then
         echo "CHECK|iface $k|PASS|bound to $nic (up)|"
       else
         echo "CHECK|iface $k|FAIL|bound to $nic, which is missing or down|bring $nic up or bind $k to the right NIC"
       fi
       nics="$nics $nic" ;;
  esac
done
same=$(for n in $nics; do ip -o -4 addr show dev "$n" 2>/dev/null | awk '{ print $4 }'; done | awk -F/ '
  { split($1, a, "."); m = $2; v = ((a[1] * 256 + a[2]) * 256 + a[3]) * 256 + a[4]; b = 2 ^ (32 - m); k = int(v / b) "/" m; c[k]++ }
  END { for (k in c) if (c[k] > 1) print k }')
if [ -z "$nics" ]; then
  echo "CHECK|arp/rp_filter|SKIP|no iface is bound to a NIC (see the iface rows)|"
elif [ -z "$same" ]; then
  echo "CHECK|arp/rp_filter|PASS|the iSCSI NICs are on separate subnets|"
else
  bad=
  for n in $nics; do
    for k in arp_ignore:1 arp_announce:2; do
      v=$(cat /proc/sys/net/ipv4/conf/$n/${k%%:*} 2>/dev/null); a=$(cat /proc/sys/net/ipv4/conf/all/${k%%:*} 2>/dev/null)
      [ "${v:-0}" -ge "${k##*:}" ] || [ "${a:-0}" -ge "${k##*:}" ] || bad="$bad $n.${k%%:*}=${v:-?}"
    done
    v=$(cat /proc/sys/net/ipv4/conf/$n/rp_filter 2>/dev/null); a=$(cat /proc/sys/net/ipv4/conf/all/rp_filter 2>/dev/null)
    { [ "${v:-0}" = 1 ] && [ "${a:-0}" != 2 ]; } || { [ "${a:-0}" = 1 ] && [ "${v:-0}" != 2 ]; } && bad="$bad $n.rp_filter=strict"
  done
  if [ -z "$bad" ]; then
    echo "CHECK|arp/rp_filter|PASS|NICs share a subnet; arp_ignore, arp_announce and rp_filter fit|"
  else
    echo "CHECK|arp/rp_filter|FAIL|NICs share a subnet but$bad|sysctl net.ipv4.conf.<NIC>.arp_ignore=1, arp_announce=2, rp_filter=2 for each iSCSI NIC (README)"
  fi
fi
"""

MULTIPATH_OFF = ('echo "CHECK|multipath|SKIP|not configured: EQL_IFACE names at most one iface (single path)|'
                 'list one iface per NIC in EQL_IFACE to use multipath (README)"')


def script(usages=(), portals=(), libvirt=True, eql=False, eql_chap=False, qemu=True, mp_ifaces=()) -> str:
    """usages: validated ISCSI_USAGE values; portals: validated (host, port) pairs; eql: the
    EqualLogic host checks (eql_chap: the datastore gives CHAP itself, iscsid.conf needs none);
    mp_ifaces: the ifaces of a multipath datastore (validated), or none."""
    parts = [QEMU] if qemu else []
    if eql:
        parts.append(OPEN_ISCSI)
        parts.append(MULTIPATH.replace("@IFACES@", " ".join(q(i) for i in mp_ifaces)) if mp_ifaces else MULTIPATH_OFF)
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
