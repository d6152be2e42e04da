#!/usr/bin/env bash
# The one test command: installs what the tests need, then runs every test.
#
#   scripts/test.sh                 # everything (lint, fuzz smoke, unit, property, integration, conformance)
#   FUZZ_SECONDS=300 scripts/test.sh   # longer fuzzing
#
# It ends with cargo test's summary so a run that executed nothing is visible.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: libiscsi-bin gives iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-readcapacity16;
# tcpdump captures peer traffic on loopback (the peer TLS test looks for plaintext in it).
missing=()
command -v iscsi-test-cu >/dev/null 2>&1 || missing+=(libiscsi-bin)
command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
fi
for tool in iscsi-test-cu iscsi-ls iscsi-inq iscsi-readcapacity16; do
  command -v "$tool" >/dev/null 2>&1 || { echo "error: $tool is still missing after installing libiscsi-bin" >&2; exit 1; }
done
command -v tcpdump >/dev/null 2>&1 || { echo "error: tcpdump is still missing after installing it" >&2; exit 1; }

# The console's browser test: Debian's chromium, driven by playwright-core from npm (the
# version pinned in tests/console/package-lock.json; it never downloads a browser of its own).
command -v chromium >/dev/null 2>&1 || {
  log "installing chromium"
  as_root apt-get update -qq
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq chromium >/dev/null
}
command -v node >/dev/null 2>&1 || { echo "error: node is missing (the browser test needs Node.js 20 or later)" >&2; exit 1; }
if [ ! -d tests/console/node_modules/playwright-core ]; then
  log "installing playwright-core (npm ci in tests/console)"
  (cd tests/console && npm ci --no-audit --no-fund --loglevel=error)
fi

# promtool (checks /metrics), unpacked from Debian's prometheus package into target/promtool:
# nothing is installed system-wide and no Prometheus service is started.
if [ ! -x target/promtool/usr/bin/promtool ]; then
  log "unpacking promtool from Debian's prometheus package"
  mkdir -p target/promtool
  (cd target/promtool && rm -f prometheus_*.deb && { apt-get download prometheus >/dev/null 2>&1 || { as_root apt-get update -qq && apt-get download prometheus >/dev/null; }; } && dpkg -x prometheus_*.deb .)
  [ -x target/promtool/usr/bin/promtool ] || { echo "error: promtool is missing after unpacking prometheus" >&2; exit 1; }
fi

# cargo-fuzz, for the fuzz smoke (stable toolchain: --sanitizer none).
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  log "installing cargo-fuzz"
  cargo install cargo-fuzz --locked --quiet
fi

log "format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --quiet -- -D warnings

log "fuzz smoke (${FUZZ_SECONDS:-5}s per target)"
(
  cd fuzz
  build=$(cargo fuzz build --sanitizer none 2>&1) || { echo "$build" | grep -v '^ *Compiling' | tail -40; echo "fuzz targets do not build" >&2; exit 1; }
  echo "$build" | tail -1
  for t in $(cargo fuzz list); do
    mkdir -p "corpus/$t"
    # Committed seeds (e.g. real libiscsi sessions, scripts/capture-fuzz-seeds.py) join the corpus.
    seeds=(); [ -d "seeds/$t" ] && seeds=("seeds/$t")
    out=$(cargo fuzz run --sanitizer none "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="${FUZZ_SECONDS:-5}" 2>&1) || { echo "$out" | tail -40; echo "fuzz target $t failed" >&2; exit 1; }
    echo "$t: $(echo "$out" | grep -E '^Done [0-9]+ runs' | tail -1)"
  done
)

log "the stock Linux initiator in a qemu guest (alone, so it does not slow the others)"
# Integration tests start the appliance binary of the same (debug) profile.
cargo build -p appliance --quiet
mkdir -p target
status=0
cargo test -p tests --test linux_guest 2>&1 | tee target/test-output.log || status=$?

log "unit, property, integration and conformance tests"
cargo test --workspace -- --skip stock_linux_initiator 2>&1 | tee -a target/test-output.log || status=$?

log "the device and shard store tests again with their files on tmpfs (the mapped path)"
TMPDIR=/dev/shm cargo test -p disk-io -p raid-engine --lib 2>&1 | tee -a target/test-output.log || status=$?
# One closing line over every cargo test binary (the last binaries are doc tests with 0 tests).
awk '/^test result:/ { p += $4; f += $6; i += $8 } END { printf "\ntotal: %d passed, %d failed, %d ignored\n", p, f, i }' target/test-output.log
exit "$status"
