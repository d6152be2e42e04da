#!/usr/bin/env bash
# The stock Linux kernel initiator against a three-controller cluster, end to end: boots a
# throw-away Debian guest under qemu (software emulation: -accel tcg) whose root carries
# open-iscsi, multipath-tools, e2fsprogs and fio from Debian's packages; the guest logs in
# through every controller's portal, checks that dm-multipath builds one map with one path per
# controller (ALUA prioritizer), makes ext4, writes with fio verification data while this
# script kills one controller, verifies every block, and logs out.
#
#   scripts/linux-guest-test.sh
#
# Needs root (debootstrap, apt-get). The guest root is built once into target/linux-guest/.
set -euo pipefail
cd "$(dirname "$0")/.."
root_dir=target/linux-guest
log() { printf '\n==> %s\n' "$*"; }
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "${#need[@]}" -gt 0 ]; then
  log "installing ${need[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need[@]}" >/dev/null
fi

if [ ! -x "$root_dir/root/sbin/iscsiadm" ]; then
  log "building the guest root (debootstrap, a few minutes once)"
  rm -rf "$root_dir/root"
  mkdir -p "$root_dir"
  as_root debootstrap --variant=minbase \
    --include=open-iscsi,multipath-tools,e2fsprogs,fio,linux-image-amd64,kmod,iproute2,procps \
    bookworm "$root_dir/root" http://deb.debian.org/debian >"$root_dir/debootstrap.log" 2>&1 \
    || { tail -20 "$root_dir/debootstrap.log"; echo "debootstrap failed" >&2; exit 1; }
fi
as_root install -m 0755 tests/linux-guest/guest-init.sh "$root_dir/root/rainio-guest-init.sh"
kernel=$(ls "$root_dir"/root/boot/vmlinuz-* | head -1)
initrd=$(ls "$root_dir"/root/boot/initrd.img-* | head -1)
log "guest disk image"
rm -f "$root_dir/disk.img"
as_root mkfs.ext4 -q -F -d "$root_dir/root" "$root_dir/disk.img" 2G

cargo build --quiet --release -p appliance
work=$(mktemp -d /tmp/rainio-guest.XXXXXX)
pids=()
cleanup() {
  status=$?
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  # The cluster's 1 GiB of shards and the logs: kept only when the test failed.
  if [ "$status" -eq 0 ]; then
    for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
    rm -rf "$work"
  else
    echo "logs kept in $work" >&2
  fi
}
trap cleanup EXIT
base=$(python3 -c 'import socket,random
for _ in range(500):
    b=random.randint(20000,50000); ok=True
    for p in [b,b+1,b+2,b+1000,b+1001,b+1002,b+2000,b+2001,b+2002]:
        s=socket.socket()
        try: s.bind(("127.0.0.1",p))
        except OSError: ok=False
        s.close()
    if ok: print(b); break')
iqn=iqn.2026-11.io.rainio:appliance
log "cluster on 127.0.0.1:$base-$((base + 2))"
target/release/appliance up --data-dir "$work/cluster" --listen "127.0.0.1:$base" --api "127.0.0.1:$((base + 2000))" >"$work/up.out" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q "Press Ctrl-C" "$work/up.out" && break; sleep 0.2; done
victim=$(sed -nE 's/.*controller 3, TPGT 3, pid ([0-9]+).*/\1/p' "$work/up.out")
portals="10.0.2.2:$base,10.0.2.2:$((base + 1)),10.0.2.2:$((base + 2))"

log "booting the guest (tcg)"
serial="$work/serial.log"
: >"$serial"
qemu-system-x86_64 -accel tcg -m 1024 -smp 1 -display none -monitor none -no-reboot \
  -serial "file:$serial" -kernel "$kernel" -initrd "$initrd" \
  -append "root=/dev/vda rw console=ttyS0 panic=-1 init=/rainio-guest-init.sh rainio.portals=$portals rainio.iqn=$iqn" \
  -drive "file=$root_dir/disk.img,if=virtio,format=raw" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 &
qemu=$!
pids+=("$qemu")
killed=0
deadline=$((SECONDS + ${GUEST_TIMEOUT:-1500}))
while kill -0 "$qemu" 2>/dev/null; do
  if [ "$killed" = 0 ] && grep -q "RAINIO-KILL-NOW" "$serial"; then
    log "killing controller 3 (pid $victim) while the guest writes"
    kill -KILL "$victim"
    killed=1
  fi
  if [ "$SECONDS" -gt "$deadline" ]; then
    echo "guest timed out" >&2
    break
  fi
  sleep 1
done
grep -a "RAINIO-\|mpath\|status=\|err=" "$serial" || true
if grep -aq "RAINIO-RESULT: PASS" "$serial" && [ "$killed" = 1 ]; then
  echo "linux guest: PASS"
else
  echo "linux guest: FAIL (serial log: $serial)"
  tail -40 "$serial"
  exit 1
fi
