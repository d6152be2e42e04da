#!/usr/bin/env bash
# Runs libiscsi's iscsi-test-cu (ALL family, --dataloss, two initiator names) against the
# appliance and against tgt (Debian's tgtd), both on loopback with a 128 MiB file LUN, and
# prints their pass/fail/skip counts side by side.
#
#   scripts/conformance-vs-tgt.sh            # logs in target/conformance-vs-tgt/
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

missing=()
command -v iscsi-test-cu >/dev/null 2>&1 || missing+=(libiscsi-bin)
command -v tgtd >/dev/null 2>&1 || missing+=(tgt)
if [ "${#missing[@]}" -gt 0 ]; then
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi

cargo build --quiet -p appliance -p tests --bin conformance-report
out=target/conformance-vs-tgt
rm -rf "$out" && mkdir -p "$out"
work=$(mktemp -d)
pids=()
ctl_port=""
cleanup() {
  # tgtd ignores SIGTERM while it has targets: ask it to shut down first.
  if [ -n "$ctl_port" ]; then
    tgtadm -C "$ctl_port" --lld iscsi --op delete --mode target --tid 1 --force >/dev/null 2>&1 || true
    tgtadm -C "$ctl_port" --op delete --mode system >/dev/null 2>&1 || true
  fi
  sleep 0.5
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 never opened" >&2; return 1; }

# tgt: its own control port so it never touches a system tgtd.
tgt_port=$(free_port); ctl_port=$((RANDOM % 900 + 100))  # an index, not a TCP port
truncate -s 128M "$work/tgt.img"
tgtd -f -C "$ctl_port" --iscsi portal="127.0.0.1:$tgt_port" >"$out/tgtd.log" 2>&1 &
pids+=($!)
wait_port "$tgt_port"
tgtadm -C "$ctl_port" --lld iscsi --op new --mode target --tid 1 -T iqn.2026-11.io.rainio:tgt
tgtadm -C "$ctl_port" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$work/tgt.img"
tgtadm -C "$ctl_port" --lld iscsi --op bind --mode target --tid 1 -I ALL

# The appliance.
app_port=$(free_port)
cat >"$work/appliance.toml" <<TOML
data_dir = "$work/appliance"
[iscsi]
listen = "127.0.0.1:$app_port"
[target]
iqn = "iqn.2026-11.io.rainio:appliance"
[[volume]]
name = "vol0"
lun = 0
size = "128MiB"
TOML
target/debug/appliance run --config "$work/appliance.toml" >"$out/appliance.log" 2>&1 &
pids+=($!)
wait_port "$app_port"

names=(-i iqn.2026-11.io.rainio:conformance-1 -I iqn.2026-11.io.rainio:conformance-2)
iscsi-test-cu --dataloss --verbose "${names[@]}" --test ALL "iscsi://127.0.0.1:$tgt_port/iqn.2026-11.io.rainio:tgt/1" >"$out/tgt.txt" 2>&1 || true
iscsi-test-cu --dataloss --verbose "${names[@]}" --test ALL "iscsi://127.0.0.1:$app_port/iqn.2026-11.io.rainio:appliance/0" >"$out/appliance.txt" 2>&1 || true

target/debug/conformance-report "appliance=$out/appliance.txt" "tgt $(tgtd -V 2>/dev/null | head -1)=$out/tgt.txt" | tee "$out/summary.md"
