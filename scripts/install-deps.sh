#!/usr/bin/env bash
# Install what Mobinux, its tests and its demo need on Debian 12, then the Python venv.
# Idempotent: packages already present are not fetched again.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(
  # run the demo and the end-to-end tests: QEMU with real PXE firmware
  qemu-system-x86 qemu-utils ipxe-qemu ipxe ovmf
  # boot loaders Mobinux serves
  pxelinux syslinux-common
  # the tiny test image and initrd tools
  busybox-static cpio gzip xz-utils zstd kmod
  # real clients and peers for interop tests and benchmarks
  isc-dhcp-client dnsmasq kea-dhcp4-server kea-admin atftp atftpd tftp-hpa curl
  iproute2 procps python3-venv
  # iSCSI: disk import (qemu-img), real initiators (libiscsi tools and its compliance
  # suite, QEMU's iscsi:// driver, open-iscsi's iscsistart), tgt as the peer to beat
  libiscsi-bin qemu-block-extra open-iscsi tgt
  # bootable test disks without root or loop devices: FAT, MBR, syslinux for BIOS and UEFI
  dosfstools mtools fdisk syslinux syslinux-efi
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# dnsmasq and atftpd must not run as system services: tests start their own.
for svc in dnsmasq atftpd kea-dhcp4-server tgt iscsid open-iscsi; do
  systemctl disable --now "$svc" >/dev/null 2>&1 || true
done

PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  "$PY" -m venv .venv
fi
.venv/bin/pip install -q --upgrade pip >/dev/null
.venv/bin/pip install -q -e '.[test]'
