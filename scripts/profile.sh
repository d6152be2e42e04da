#!/usr/bin/env bash
# Profiles the appliance under one fio job and writes a flame graph.
#
#   scripts/profile.sh CONTROLLERS OUT.svg FIO-ARGS...
#   e.g. scripts/profile.sh 1 docs/flame-single-read4k-qd32.svg --rw=randread --bs=4k --iodepth=32
#
# Starts `appliance up --controllers CONTROLLERS` (release build) with its data in /dev/shm on
# loopback ports, fills 256 MiB of the volume (SIZE=1G: that much, as scripts/bench.sh does), runs the fio job (libiscsi engine, the fio that
# scripts/bench.sh builds) for 12 s, records `perf record -g` of `up` and its controllers for
# 8 s in the middle, and folds the stacks into OUT.svg. Prints the job's IOPS. NOPERF=1 only
# measures; STAT=EVENTS counts perf events instead of sampling; either way it also prints
# the appliance's CPU microseconds per I/O. APPLIANCE=PATH runs that binary instead of
# building one (for A/B runs of two builds). Installs what it needs when missing: perf (Debian linux-perf) and inferno (cargo).
# Stops only the processes it started.
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { sed -n 2,4p "$0" >&2; exit 2; }
n=$1 out=$2
shift 2
fio=target/fio-libiscsi/fio
[ -x "$fio" ] || { echo "error: $fio is missing; run scripts/bench.sh once, it builds fio with libiscsi" >&2; exit 1; }
if [ -z "${NOPERF:-}" ]; then
  command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf >/dev/null; }
  command -v inferno-flamegraph >/dev/null || [ -x "$HOME/.cargo/bin/inferno-flamegraph" ] ||
    cargo install --quiet inferno
  export PATH="$PATH:$HOME/.cargo/bin"
fi
app=${APPLIANCE:-target/release/appliance}
[ -n "${APPLIANCE:-}" ] || cargo build --release -q -p appliance
work=$(mktemp -d /dev/shm/rainio-profile.XXXXXX)
port=34560
"$app" up --controllers "$n" --data-dir "$work" --listen 127.0.0.1:$port \
  --api 127.0.0.1:36560 >"$work/up.log" 2>&1 &
up=$!
cleanup() { kill "$up" 2>/dev/null || true; wait "$up" 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
# `up` prints this once the volume is served.
for _ in $(seq 120); do grep -q 'Press Ctrl-C' "$work/up.log" 2>/dev/null && break; sleep 0.5; done
url="iscsi\\://127.0.0.1\\:$port/iqn.2026-11.io.rainio\\:appliance/0"
common=(--ioengine=libiscsi --filename="$url" --initiator=iqn.2026-11.io.rainio:profile --direct=1 --size="${SIZE:-256M}")
"$fio" --name=fill "${common[@]}" --rw=write --bs=1M --iodepth=8 >/dev/null
"$fio" --name=job "${common[@]}" --time_based --runtime=12 "$@" --output-format=json >"$work/fio.json" 2>/dev/null &
job=$!
# CPU ticks of `up` and its controllers (utime + stime), to report CPU per I/O: steadier than
# IOPS on a shared machine.
ticks() { for p in "$up" $(pgrep -P "$up"); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done | awk '{s += $1} END {print s + 0}'; }
t0=$(ticks)
sleep 2
if [ -z "${NOPERF:-}" ]; then
  pids=$(echo "$up" $(pgrep -P "$up") | tr ' ' ',')
  if [ -n "${STAT:-}" ]; then
    # STAT=EVENTS: count those perf events (e.g. syscall tracepoints) for 8 s instead.
    perf stat -e "$STAT" -p "$pids" -- sleep 8 2>&1 | grep -E '^ +[0-9]' || true
  else
    perf record -F 999 -g -o "$work/perf.data" -p "$pids" -- sleep 8 2>/dev/null
  fi
fi
while kill -0 "$job" 2>/dev/null && [ "$(ps -o etimes= -p "$job" | tr -d ' ')" -lt 12 ]; do sleep 0.2; done
t1=$(ticks)
wait "$job"
python3 -c "import json,sys;t=open(sys.argv[1]).read();j=json.loads(t[t.index('{'):])['jobs'][0];r,w=j['read']['iops'],j['write']['iops'];ios=(r+w)*12;cpu=(int(sys.argv[2])-int(sys.argv[3]))/float(sys.argv[4]);print('IOPS read',round(r),'write',round(w),'| appliance CPU us per I/O',round(cpu*1e6/ios,1) if ios else '-')" "$work/fio.json" "$t1" "$t0" "$(getconf CLK_TCK)"
if [ -z "${NOPERF:-}" ] && [ -z "${STAT:-}" ]; then
  perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf | inferno-flamegraph --title "$(basename "$out" .svg): $*" >"$out"
  # KEEP_PERF=PATH keeps the samples (for perf report / annotate).
  [ -z "${KEEP_PERF:-}" ] || cp "$work/perf.data" "$KEEP_PERF"
  echo "wrote $out"
fi
