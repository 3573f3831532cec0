#!/usr/bin/env bash
# Mobinux demo: PXE-boot a QEMU VM (stock iPXE firmware, BIOS) from `mobinux serve`
# in a private network namespace. Nothing touches the machine's real network.
#
#   make demo            (installs dependencies first)
#   scripts/demo.sh      (when they are installed)
#
# Environment: DEMO_FIRMWARE=uefi boots OVMF instead of SeaBIOS;
# DEMO_LOADER=pxelinux uses pxelinux.0 instead of iPXE (BIOS only).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "demo: run as root (network namespaces, tap devices, port 67)" >&2; exit 1; }

FIRMWARE=${DEMO_FIRMWARE:-bios}
LOADER=${DEMO_LOADER:-ipxe}
NS=mbxdemo$$
MAC=52:54:00:00:de:01
MARKER="Hello from a diskless machine booted by Mobinux"
WORK=$(mktemp -d /tmp/mobinux-demo.XXXXXX)
MOBINUX=(.venv/bin/mobinux --data-dir "$WORK/data")
PIDS=()

cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT INT TERM

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

say "fetching a guest kernel (Debian's cloud kernel, cached)"
KERNEL=$(scripts/fetch-guest-kernel.sh)
echo "$KERNEL"

say "building a tiny root file system and packing it as a RAM-disk image"
scripts/build-test-rootfs.sh "$WORK/rootfs" "$MARKER" >/dev/null
"${MOBINUX[@]}" image ramdisk "$WORK/rootfs" --kernel "$KERNEL" --name demo \
  --cmdline "console=ttyS0 panic=-1 {ipconfig}"
"${MOBINUX[@]}" node add "$MAC" --name demo-pc --image demo --loader "$LOADER"
"${MOBINUX[@]}" node show demo-pc

say "creating a private network: namespace $NS, bridge br0 10.77.0.1/24, tap0 for the VM"
ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge stp_state 0 forward_delay 0
ip -n "$NS" addr add 10.77.0.1/24 dev br0
ip -n "$NS" addr add fd77::1/64 dev br0 nodad
ip -n "$NS" link set br0 up
ip netns exec "$NS" ip tuntap add tap0 mode tap
ip -n "$NS" link set tap0 master br0
ip -n "$NS" link set tap0 up
# iPXE waits ~10 s for an IPv6 router advertisement on an IPv4-only link; a
# RA-only dnsmasq (no DHCPv4, no TFTP, no DNS) spares the demo that wait.
ip netns exec "$NS" dnsmasq --no-daemon --conf-file=/dev/null --port=0 --interface=br0 \
  --bind-interfaces --enable-ra --dhcp-range=::,constructor:br0,ra-only \
  --dhcp-leasefile=/dev/null >/dev/null 2>&1 &
PIDS+=($!)

say "starting: mobinux serve --interface br0 --dhcp full --dhcp-range 10.77.0.100-10.77.0.150"
ip netns exec "$NS" "${MOBINUX[@]}" serve --interface br0 --dhcp full \
  --dhcp-range 10.77.0.100-10.77.0.150 > "$WORK/serve.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do grep -q "serving on" "$WORK/serve.log" && break; sleep 0.2; done
sed 's/^/  [mobinux] /' "$WORK/serve.log"
tail -n0 -f "$WORK/serve.log" | sed -u 's/^/  [mobinux] /' &
PIDS+=($!)

say "booting a VM ($FIRMWARE firmware, loader $LOADER) from the network; its serial console follows"
QEMU=(qemu-system-x86_64 -accel tcg -m 512 -nographic -no-reboot
      -netdev tap,id=n0,ifname=tap0,script=no,downscript=no
      -device "virtio-net-pci,netdev=n0,mac=$MAC,bootindex=1")
if [[ $FIRMWARE == uefi ]]; then
  cp /usr/share/OVMF/OVMF_VARS_4M.fd "$WORK/vars.fd"
  QEMU+=(-machine q35 -drive if=pflash,format=raw,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd
         -drive "if=pflash,format=raw,file=$WORK/vars.fd")
fi
timeout 300 ip netns exec "$NS" "${QEMU[@]}" </dev/null | tee "$WORK/console.log" || true

say "mobinux status"
"${MOBINUX[@]}" status

if grep -q "$MARKER" "$WORK/console.log"; then
  say "success: the VM booted its RAM-disk root from Mobinux (files in $WORK)"
else
  say "the VM did not reach its /init; see $WORK/console.log and $WORK/serve.log"
  exit 1
fi
