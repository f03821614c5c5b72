#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs to build oneiscsi, run its tests and its lab
# demo: Debian packages, the lab's users, a venv (.venv) and dist/oneiscsi.pyz.
# Idempotent and quick once done. Run as root. tests/cleanup.sh undoes it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "tests/setup.sh: run as root (it installs packages and makes network namespaces)" >&2; exit 1; }

PKGS=(
  tgt libiscsi-bin                     # iSCSI target and userspace initiator
  qemu-utils qemu-block-extra          # qemu-img with the libiscsi driver
  openssh-server openssh-client        # sshd test hosts, the system ssh client
  libvirt-clients libvirt-daemon libvirt-daemon-driver-qemu libxml2-utils  # virsh, libvirtd, virt-xml-validate
  qemu-system-x86 debootstrap          # the real-kernel host (QEMU TCG guest)
  fuse3                                # FUSE exports of the iscsiadm stand-in (test hosts)
  open-iscsi                           # the real iscsiadm, to compare the stand-in with (not started)
  sudo                                 # visudo checks the sudoers line of --selftest --fix sudoers
  iproute2 util-linux rsync procps ca-certificates
)
missing=()
for p in "${PKGS[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
  # what tests/cleanup.sh --all may purge: only what this script installed
  mkdir -p /var/cache/oneiscsi-setup
  printf '%s\n' "${missing[@]}" >> /var/cache/oneiscsi-setup/installed-packages
fi
mkdir -p /run/sshd

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# the tests run the simulator and the lab in-process: runtime pins too
pins="$(python3 build.py --print-pins runtime) $(python3 build.py --print-pins dev) $(python3 build.py --print-pins build)"
# shellcheck disable=SC2086
.venv/bin/pip install -q --disable-pip-version-check $pins
.venv/bin/python build.py >/dev/null
echo "setup done: $(.venv/bin/python --version), $(ls -l dist/oneiscsi.pyz | awk '{print $5}') bytes dist/oneiscsi.pyz"
