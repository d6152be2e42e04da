#!/usr/bin/env bash
# The cost of distribution, end to end: one controller with a local 1 GiB volume against the
# three-controller cluster from `appliance up` (k=2, m=1), both release builds with their data
# in /dev/shm, driven through the first portal by the same clients: libiscsi's iscsi-perf for
# reads and the project's write-load (tests/src/bin/write-load.rs) for writes (libiscsi has
# no write benchmark). Prints a Markdown table with single-controller and cluster figures
# and their ratio, then healthy against degraded random reads (controller 3 killed).
#
#   scripts/bench-cluster.sh [seconds-per-job]
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-8}
# shellcheck source=scripts/tgt-lib.sh
source scripts/tgt-lib.sh
need_tools iscsi-perf:libiscsi-bin
cargo build --quiet --release -p appliance -p tests --bin appliance --bin write-load

work=$(mktemp -d /dev/shm/rainio-cluster-bench.XXXXXX)
iqn=iqn.2026-11.io.rainio:appliance
# A block of free ports: portals base..base+2, peers base+1000..base+1002.
base=$(python3 - <<'PY'
import socket, random
for _ in range(500):
    b = random.randint(20000, 50000)
    ok = True
    for p in [b, b+1, b+2, b+1000, b+1001, b+1002]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        s.close()
    if ok:
        print(b); break
PY
)

declare -A res
run_jobs() { # name portal
  local name=$1 portal=$2 line
  # Fill the first 256 MiB so reads hit written data.
  target/release/write-load write "$portal" "$iqn" 4 1048576 4 268435456 >/dev/null
  for j in "seq1m-read:-m 8 -b 2048" "rand4k-read-qd32:-m 32 -b 8 -r"; do
    local jn=${j%%:*} args=${j#*:}
    # shellcheck disable=SC2086
    line=$(timeout $((secs + 10)) iscsi-perf $args -t "$secs" "iscsi://$portal/$iqn/0" 2>&1 | tr '\r' '\n' | grep -E '^iops average' | tail -1)
    res[$name,$jn]="$(echo "$line" | awk '{print $3}') $(echo "$line" | sed -E 's/.*\(([0-9]+) MB\/s\).*/\1/')"
  done
  res[$name,seq64k-write-4sessions]=$(target/release/write-load write "$portal" "$iqn" 4 65536 "$secs" 268435456)
  res[$name,rand4k-write-1session]=$(target/release/write-load write "$portal" "$iqn" 1 4096 "$secs" 268435456)
}

# One controller.
target/release/appliance up --controllers 1 --data-dir "$work/single" --listen "127.0.0.1:$base" --api "127.0.0.1:$((base + 2000))" >"$work/single.out" 2>&1 &
pid=$!; pids+=("$pid")
wait_port "$base"
run_jobs single "127.0.0.1:$base"
kill -TERM "$pid"; wait "$pid" || true

# Three controllers.
target/release/appliance up --data-dir "$work/cluster" --listen "127.0.0.1:$base" --api "127.0.0.1:$((base + 2000))" >"$work/cluster.out" 2>&1 &
pid=$!; pids+=("$pid")
wait_port "$base"; wait_port $((base + 2))
sleep 3 # the metadata log forms and brings every controller up
run_jobs cluster "127.0.0.1:$base"
# Degraded reads: random 4 KiB reads (32 sessions, one command each) over the whole volume,
# and over only the data chunks controller 3 holds, healthy and then with controller 3 killed
# (every read of the second kind is then reconstructed from the other two).
rr() { target/release/write-load randread "127.0.0.1:$base" "$iqn" 32 4096 "$secs" 268435456 "$@"; }
lost=lost=3/3/2/1/65536
res[healthy,randread-all]=$(rr); res[healthy,randread-lost]=$(rr "$lost")
pid3=$(sed -nE 's/.*controller 3, TPGT 3, pid ([0-9]+).*/\1/p' "$work/cluster.out")
kill -KILL "$pid3"
for _ in $(seq 100); do
  target/release/appliance status --peer "127.0.0.1:$((base + 1000))" --pki "$work/cluster/pki" | grep -Eq '^ +3 +down' && break
  sleep 0.2
done
res[degraded,randread-all]=$(rr); res[degraded,randread-lost]=$(rr "$lost")
kill -TERM "$pid"; wait "$pid" || true

echo "| job | 1 controller IOPS (MB/s) | 3 controllers k=2 m=1 IOPS (MB/s) | cluster / single |"
echo "| --- | --- | --- | --- |"
for jn in seq1m-read rand4k-read-qd32 seq64k-write-4sessions rand4k-write-1session; do
  read -r si sm <<<"${res[single,$jn]}"; read -r ci cm <<<"${res[cluster,$jn]}"
  ratio=$(python3 -c "print(f'{float($ci)/float($si):.2f}' if float($si) else 'n/a')")
  echo "| $jn | $si ($sm) | $ci ($cm) | $ratio |"
done

echo
echo "| 4 KiB random reads, 32 sessions, 3 controllers | healthy IOPS (MB/s) | controller 3 killed IOPS (MB/s) | degraded / healthy |"
echo "| --- | --- | --- | --- |"
for jn in randread-all randread-lost; do
  read -r hi hm <<<"${res[healthy,$jn]}"; read -r di dm <<<"${res[degraded,$jn]}"
  ratio=$(python3 -c "print(f'{float($di)/float($hi):.2f}' if float($hi) else 'n/a')")
  echo "| $jn | $hi ($hm) | $di ($dm) | $ratio |"
done
