#!/usr/bin/env bash
# Interim end-to-end READ benchmark: the appliance (release build) and Debian's tgt on loopback,
# both backed by a 1 GiB file in /dev/shm, driven by the same client (libiscsi's iscsi-perf,
# which only reads), alternating targets for several rounds. Prints a Markdown table with IOPS,
# MB/s and the target process's CPU seconds per GB moved, and appliance/tgt ratios.
#
#   scripts/bench-read-vs-tgt.sh [rounds] [seconds-per-job]
#
# The full benchmark (fio's libiscsi engine: writes, mixes, latency percentiles) is the
# performance issue's; this one gives comparable read figures with tools Debian ships.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
secs=${2:-8}
# shellcheck source=scripts/tgt-lib.sh
source scripts/tgt-lib.sh
need_tools iscsi-perf:libiscsi-bin tgtd:tgt
cargo build --quiet --release -p appliance

work=$(mktemp -d /dev/shm/rainio-bench.XXXXXX)
truncate -s 1G "$work/tgt.img"
tgt_start "$work/tgt.img" iqn.2026-11.io.rainio:tgt "$work/tgtd.log"

app_port=$(free_port)
cat >"$work/appliance.toml" <<TOML
data_dir = "$work/appliance"
log_level = "warn"
[iscsi]
listen = "127.0.0.1:$app_port"
[target]
iqn = "iqn.2026-11.io.rainio:appliance"
[[volume]]
name = "vol0"
lun = 0
size = "1GiB"
TOML
target/release/appliance run --config "$work/appliance.toml" >"$work/appliance.log" 2>&1 &
app_pid=$!; pids+=("$app_pid")
wait_port "$app_port"
# Fill both LUs so reads hit real data, not holes.
dd if=/dev/urandom of="$work/tgt.img" bs=1M count=1024 conv=notrunc status=none
cp "$work/tgt.img" "$work/appliance/vol0.img"

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
declare -A iops mbs cpu
jobs=("rand4k-qd32:-m 32 -b 8 -r" "rand4k-qd1:-m 1 -b 8 -r" "seq1m-qd8:-m 8 -b 2048")
for round in $(seq "$rounds"); do
  for t in appliance tgt; do
    if [ "$t" = appliance ]; then url="iscsi://127.0.0.1:$app_port/iqn.2026-11.io.rainio:appliance/0"; pid=$app_pid
    else url="iscsi://127.0.0.1:$tgt_port/iqn.2026-11.io.rainio:tgt/1"; pid=$tgt_pid; fi
    for j in "${jobs[@]}"; do
      name=${j%%:*}; args=${j#*:}
      before=$(cpu_ticks "$pid")
      # shellcheck disable=SC2086
      line=$(timeout $((secs + 10)) iscsi-perf $args -t "$secs" "$url" 2>&1 | tr '\r' '\n' | grep -E '^iops average' | tail -1)
      after=$(cpu_ticks "$pid")
      i=$(echo "$line" | awk '{print $3}'); m=$(echo "$line" | sed -E 's/.*\(([0-9]+) MB\/s\).*/\1/')
      iops[$t,$name]=$(( ${iops[$t,$name]:-0} + i )); mbs[$t,$name]=$(( ${mbs[$t,$name]:-0} + m ))
      cpu[$t,$name]=$(( ${cpu[$t,$name]:-0} + after - before ))
    done
  done
done
echo "| job | appliance IOPS (MB/s) | tgt IOPS (MB/s) | IOPS ratio | appliance CPU s/GB | tgt CPU s/GB |"
echo "| --- | --- | --- | --- | --- | --- |"
for j in "${jobs[@]}"; do
  name=${j%%:*}
  ai=$(( iops[appliance,$name] / rounds )); ti=$(( iops[tgt,$name] / rounds ))
  am=$(( mbs[appliance,$name] / rounds )); tm=$(( mbs[tgt,$name] / rounds ))
  ratio=$(python3 -c "print(f'{$ai/$ti:.2f}' if $ti else 'n/a')")
  acpu=$(python3 -c "gb=${mbs[appliance,$name]}*$secs/1000; print(f'{${cpu[appliance,$name]}/$hz/gb:.2f}' if gb else 'n/a')")
  tcpu=$(python3 -c "gb=${mbs[tgt,$name]}*$secs/1000; print(f'{${cpu[tgt,$name]}/$hz/gb:.2f}' if gb else 'n/a')")
  echo "| $name | $ai ($am) | $ti ($tm) | $ratio | $acpu | $tcpu |"
done
