#!/usr/bin/env bash
# Runs libiscsi's iscsi-test-cu (ALL family, --dataloss, two initiator names) against the
# appliance and against tgt (Debian's tgtd), both on loopback with a 128 MiB file LUN, and
# prints their pass/fail/skip counts side by side.
#
#   scripts/conformance-vs-tgt.sh            # logs in target/conformance-vs-tgt/
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/tgt-lib.sh
source scripts/tgt-lib.sh
need_tools iscsi-test-cu:libiscsi-bin tgtd:tgt

cargo build --quiet -p appliance -p tests --bin conformance-report
out=target/conformance-vs-tgt
rm -rf "$out" && mkdir -p "$out"
work=$(mktemp -d)
truncate -s 128M "$work/tgt.img"
tgt_start "$work/tgt.img" iqn.2026-11.io.rainio:tgt "$out/tgtd.log"

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
