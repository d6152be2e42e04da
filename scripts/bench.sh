#!/usr/bin/env bash
# The end-to-end benchmark: the appliance (one controller, and the three-controller k=2 m=1
# cluster of `appliance up`) against Debian's tgt, on loopback on this machine, each serving a
# 1 GiB LU with its data in /dev/shm, all driven by the same client: fio's libiscsi engine.
# Debian's fio has no libiscsi engine, so fio is built from Debian's source package with
# --enable-libiscsi into target/fio-libiscsi (once). Targets alternate within each round; per
# job it reports IOPS, MB/s, mean and p99 completion latency and the target processes' CPU
# seconds per GB moved, and the ratios to tgt, as a Markdown table; with --record the table
# is appended to docs/benchmarks.md with the machine and commit.
#
#   scripts/bench.sh [rounds] [seconds-per-job] [--record]
#
# While iterating, BENCH_TARGETS="tgt single" and BENCH_JOBS="rand4k-read-qd32 ..." narrow a
# run (tgt always runs: every ratio is against it). Recorded runs use every target and job.
#
# Run it on an otherwise idle machine: every figure is a ratio measured in the same run.
set -euo pipefail
cd "$(dirname "$0")/.."
record=no
args=()
for a in "$@"; do if [ "$a" = --record ]; then record=yes; else args+=("$a"); fi; done
rounds=${args[0]:-3}
secs=${args[1]:-10}
if [ "$record" = yes ] && { [ -n "${BENCH_TARGETS:-}" ] || [ -n "${BENCH_JOBS:-}" ]; }; then
  echo "error: --record needs every target and job; unset BENCH_TARGETS and BENCH_JOBS" >&2; exit 1
fi
# shellcheck source=scripts/tgt-lib.sh
source scripts/tgt-lib.sh
need_tools tgtd:tgt iscsi-ls:libiscsi-bin
root=$PWD

# fio with the libiscsi engine, from Debian's source package (a private sources list: the
# system's apt configuration is not changed).
fio=$root/target/fio-libiscsi/fio
if [ ! -x "$fio" ]; then
  need_tools pkg-config:pkg-config
  dpkg -s libiscsi-dev >/dev/null 2>&1 || { as_root apt-get update -qq; DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq libiscsi-dev zlib1g-dev >/dev/null; }
  src=$root/target/fio-src
  rm -rf "$src"; mkdir -p "$src/lists/partial"
  . /etc/os-release
  echo "deb-src http://deb.debian.org/debian $VERSION_CODENAME main" >"$src/sources.list"
  apt_src=(-o Dir::Etc::SourceList="$src/sources.list" -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$src/lists")
  (cd "$src" && apt-get -qq "${apt_src[@]}" update && apt-get -qq "${apt_src[@]}" source --download-only fio >/dev/null 2>&1)
  (cd "$src" && tar xzf fio_*.orig.tar.gz && cd fio-*/ && ./configure --enable-libiscsi --disable-native >/dev/null && make -s -j"$(nproc)" >/dev/null)
  mkdir -p "$(dirname "$fio")"
  cp "$src"/fio-*/fio "$fio"
  "$fio" --enghelp 2>/dev/null | grep -qw libiscsi || { echo "error: the fio built has no libiscsi engine" >&2; exit 1; }
fi
cargo build --quiet --release -p appliance

work=$(mktemp -d /dev/shm/rainio-bench.XXXXXX)
iqn=iqn.2026-11.io.rainio:appliance

# tgt: a 1 GiB file in /dev/shm as LUN 1.
truncate -s 1G "$work/tgt.img"
tgt_start "$work/tgt.img" iqn.2026-11.io.rainio:tgt "$work/tgtd.log"

# The appliance: `appliance up` with 1 and with 3 controllers (each a process per controller).
ports_block() { python3 - <<'PY'
import socket, random
for _ in range(500):
    b = random.randint(20000, 50000)
    ok = True
    for p in [b, b+1, b+2, b+1000, b+1001, b+1002, b+2000, b+2001, b+2002]:
        s = socket.socket()
        try:
            s.bind(("127.0.0.1", p))
        except OSError:
            ok = False
        s.close()
    if ok:
        print(b); break
PY
}
start_up() { # name controllers -> sets up_port, up_pid
  up_port=$(ports_block)
  target/release/appliance up --controllers "$2" --data-dir "$work/$1" --listen "127.0.0.1:$up_port" --api "127.0.0.1:$((up_port + 2000))" >"$work/$1.out" 2>&1 &
  up_pid=$!; pids+=("$up_pid")
  # `up` prints its banner once every controller serves the volume.
  for _ in $(seq 240); do grep -q 'Press Ctrl-C' "$work/$1.out" && break; sleep 0.5; done
  grep -q 'Press Ctrl-C' "$work/$1.out" || { echo "error: appliance up ($1) did not come up in 120 s:" >&2; cat "$work/$1.out" >&2; exit 1; }
}
targets=(tgt)
for t in ${BENCH_TARGETS:-single cluster}; do [ "$t" = tgt ] || targets+=("$t"); done
wants() { [[ " ${targets[*]} " == *" $1 "* ]]; }
if wants single; then start_up single 1; single_port=$up_port; single_pid=$up_pid; fi
if wants cluster; then start_up cluster 3; cluster_port=$up_port; cluster_pid=$up_pid; fi

# The processes whose CPU time counts for a target: tgtd, or `up` and its controllers.
procs() { if [ "$1" = tgt ]; then echo "$tgt_pid"; else echo "$2 $(pgrep -P "$2" | tr '\n' ' ')"; fi; }
cpu_ticks() { local t=0 p; for p in $1; do t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done; echo $t; }
url() { # target -> fio filename (colons escaped for fio)
  case $1 in
    tgt) echo "iscsi\\://127.0.0.1\\:$tgt_port/iqn.2026-11.io.rainio\\:tgt/1" ;;
    single) echo "iscsi\\://127.0.0.1\\:$single_port/iqn.2026-11.io.rainio\\:appliance/0" ;;
    cluster) echo "iscsi\\://127.0.0.1\\:$cluster_port/iqn.2026-11.io.rainio\\:appliance/0" ;;
  esac
}
run_fio() { # target name fio-args... -> JSON on stdout
  local t=$1 name=$2; shift 2
  "$fio" --name="$name" --ioengine=libiscsi --filename="$(url "$t")" --initiator="iqn.2026-11.io.rainio:bench-$t" \
    --direct=1 --size=1G --output-format=json "$@"
}

# Fill each LU so reads hit written data, not holes.
for t in "${targets[@]}"; do
  run_fio "$t" fill --rw=write --bs=1M --iodepth=8 >"$work/fill.json" 2>&1 || { echo "fio could not fill $t:" >&2; cat "$work/fill.json" >&2; exit 1; }
done

jobs=(
  "rand4k-read-qd1:--rw=randread --bs=4k --iodepth=1"
  "rand4k-read-qd32:--rw=randread --bs=4k --iodepth=32"
  "rand4k-write-qd1:--rw=randwrite --bs=4k --iodepth=1"
  "rand4k-write-qd32:--rw=randwrite --bs=4k --iodepth=32"
  "seq64k-read-qd8:--rw=read --bs=64k --iodepth=8"
  "seq64k-write-qd8:--rw=write --bs=64k --iodepth=8"
  "seq1m-read-qd8:--rw=read --bs=1M --iodepth=8"
  "seq1m-write-qd8:--rw=write --bs=1M --iodepth=8"
  "mix70-4k-qd32:--rw=randrw --rwmixread=70 --bs=4k --iodepth=32"
)
results=$work/results.jsonl
hz=$(getconf CLK_TCK)
for round in $(seq "$rounds"); do
  for j in "${jobs[@]}"; do
    name=${j%%:*}; read -r -a fargs <<<"${j#*:}"
    [ -z "${BENCH_JOBS:-}" ] || [[ " $BENCH_JOBS " == *" $name "* ]] || continue
    for t in "${targets[@]}"; do
      case $t in tgt) p=$(procs tgt) ;; single) p=$(procs x "$single_pid") ;; cluster) p=$(procs x "$cluster_pid") ;; esac
      before=$(cpu_ticks "$p")
      run_fio "$t" "$name" "${fargs[@]}" --time_based --runtime="$secs" --ramp_time=1 >"$work/fio.json" 2>"$work/fio.err" || { echo "fio failed on $t $name:" >&2; cat "$work/fio.err" >&2; exit 1; }
      after=$(cpu_ticks "$p")
      python3 -c '
import json, sys
t, name, rnd, ticks, hz = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
text = open(sys.argv[6]).read()
j = json.loads(text[text.index("{"):])["jobs"][0]
r, w = j["read"], j["write"]
ios = r["total_ios"] + w["total_ios"]
mean = (r["clat_ns"]["mean"] * r["total_ios"] + w["clat_ns"]["mean"] * w["total_ios"]) / max(ios, 1)
p99 = max(d["clat_ns"].get("percentile", {}).get("99.000000", 0) for d in (r, w))
print(json.dumps({"target": t, "job": name, "round": rnd, "iops": r["iops"] + w["iops"],
  "mbs": (r["bw_bytes"] + w["bw_bytes"]) / 1e6, "mean_us": mean / 1000, "p99_us": p99 / 1000,
  "bytes": r["io_bytes"] + w["io_bytes"], "cpu_s": ticks / hz}))
' "$t" "$name" "$round" "$((after - before))" "$hz" "$work/fio.json" >>"$results"
      # Progress: each measurement as it lands (the table comes at the end).
      tail -n 1 "$results" | python3 -c 'import json, sys; r = json.loads(sys.stdin.read()); print("round %d %s %s: %.0f IOPS" % (r["round"], r["job"], r["target"], r["iops"]), file=sys.stderr)'
    done
  done
done

table=$(python3 - "$results" "$rounds" "$secs" <<'PY'
import json, sys, statistics
rows = [json.loads(l) for l in open(sys.argv[1])]
jobs = []
for r in rows:
    if r["job"] not in jobs:
        jobs.append(r["job"])
def agg(t, j):
    rs = [r for r in rows if r["target"] == t and r["job"] == j]
    gb = sum(r["bytes"] for r in rs) / 1e9
    return {
        "iops": statistics.mean(r["iops"] for r in rs),
        "mbs": statistics.mean(r["mbs"] for r in rs),
        "mean": statistics.mean(r["mean_us"] for r in rs),
        "p99": statistics.mean(r["p99_us"] for r in rs),
        "cpu": sum(r["cpu_s"] for r in rs) / gb if gb else float("nan"),
    }
print("| job | target | IOPS | MB/s | mean us | p99 us | CPU s/GB | IOPS vs tgt | p99 vs tgt | CPU s/GB vs tgt |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
for j in jobs:
    base = agg("tgt", j)
    for t in ("tgt", "single", "cluster"):
        if not any(r["target"] == t for r in rows):
            continue
        a = agg(t, j)
        ratio = lambda k: f"{a[k] / base[k]:.2f}" if base[k] else "n/a"
        print(f"| {j} | {t} | {a['iops']:.0f} | {a['mbs']:.1f} | {a['mean']:.0f} | {a['p99']:.0f} | {a['cpu']:.2f} | {ratio('iops')} | {ratio('p99')} | {ratio('cpu')} |")
PY
)
echo "$table"
if [ "$record" = yes ]; then
  # The machine's cost of a hop between processes, which sets the QD1 figures of the cluster
  # (each hop between controllers is one) more than anything the targets do.
  rtt=$(python3 scripts/loopback-rtt.py 20000)
  {
    echo
    echo "## $(date -u +%Y-%m-%d), end to end against tgt with fio's libiscsi engine (commit $(git rev-parse --short HEAD))"
    echo
    echo "    scripts/bench.sh $rounds $secs --record"
    echo
    echo "$(nproc) CPUs ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo). tgt $(dpkg-query -W -f '${Version}' tgt), fio $("$fio" --version) with libiscsi $(dpkg-query -W -f '${Version}' libiscsi-dev). Each target serves a 1 GiB LU in /dev/shm, filled first; $rounds rounds of $secs s per job (1 s ramp), targets alternated within each job; figures are means over rounds; single = \`appliance up --controllers 1\`, cluster = \`appliance up\` (3 controllers, k=2, m=1, all on this machine). CPU s/GB counts every process of a target (tgtd; \`up\` and its controllers). \`scripts/loopback-rtt.py\`: $rtt."
    echo
    echo "$table"
  } >>docs/benchmarks.md
  echo "appended to docs/benchmarks.md"
fi
