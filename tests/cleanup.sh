#!/usr/bin/env bash
# Remove what tests/setup.sh and the test suite installed, created and downloaded.
#
#   bash tests/cleanup.sh            caches, build outputs, .venv, test temp folders
#   bash tests/cleanup.sh --all      also the users/folders the lab made and the Debian
#                                    packages setup.sh installed (only those it recorded)
#   bash tests/cleanup.sh -n [...]   say what would go, change nothing
#
# Run as root from the checkout. Nothing of a real OpenNebula is touched: the users are
# kept when an opennebula or opennebula-node package is installed, libvirt-qemu when
# libvirt-daemon-system is.
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0 ALL=0
for a in "$@"; do
  case "$a" in
    -n|--dry-run) DRY=1 ;;
    --all) ALL=1 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "tests/cleanup.sh: unknown option $a (use -n, --all)" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "tests/cleanup.sh: run as root (the caches are root's)" >&2; exit 1; }
RECORD=/var/cache/oneiscsi-setup/installed-packages

say() { echo "$*"; }
gone() {  # remove paths that exist, with their size
  for p in "$@"; do
    [ -e "$p" ] || [ -L "$p" ] || continue
    say "remove $(du -sh --exclude=proc "$p" 2>/dev/null | cut -f1) $p"
    [ $DRY = 1 ] || rm -rf --one-file-system "$p"
  done
}
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "ok installed"; }

# downloads and images (realhost guest, Python roots, backports udev)
gone /var/cache/oneiscsi-realhost /var/cache/oneiscsi-pyroots /var/cache/oneiscsi-bpo
# pytest's temp folders, unpacked builds and driver state of the users that ran tests
gone /tmp/pytest-of-root /root/.cache/oneiscsi
for d in /tmp/oneiscsi-test-*; do gone "$d"; done
# the checkout's build environment and outputs
gone .venv build dist
gone /var/lock/one/oneiscsi

if [ $ALL = 1 ]; then
  if installed opennebula || installed opennebula-node || installed opennebula-node-kvm; then
    say "keep user oneadmin and /var/lib/one: an OpenNebula package is installed"
  elif id oneadmin >/dev/null 2>&1; then
    say "remove user oneadmin and its home /var/lib/one"
    [ $DRY = 1 ] || { userdel oneadmin 2>/dev/null || true; rm -rf --one-file-system /var/lib/one; }
  fi
  if installed libvirt-daemon-system; then
    say "keep user libvirt-qemu: libvirt-daemon-system is installed"
  elif id libvirt-qemu >/dev/null 2>&1; then
    say "remove user libvirt-qemu"
    [ $DRY = 1 ] || { userdel libvirt-qemu 2>/dev/null || true; groupdel libvirt-qemu 2>/dev/null || true; }
  fi
  if [ -s "$RECORD" ]; then
    # shellcheck disable=SC2046
    pkgs=$(sort -u "$RECORD" | while read -r p; do installed "$p" && echo "$p"; done | tr '\n' ' ')
    if [ -n "$pkgs" ]; then
      say "purge packages setup.sh installed: $pkgs"
      # shellcheck disable=SC2086
      [ $DRY = 1 ] || DEBIAN_FRONTEND=noninteractive apt-get purge -y -q $pkgs
    fi
    gone /var/cache/oneiscsi-setup
  fi
fi
[ $DRY = 1 ] && say "(dry run: nothing changed)"
exit 0
