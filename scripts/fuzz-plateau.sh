#!/usr/bin/env bash
# Runs each fuzz target until its coverage plateaus: rounds of ROUND seconds on the target's
# growing corpus (plus the committed seeds) until PATIENCE rounds in a row add no coverage, or
# MAX seconds have passed. Prints one Markdown table row per target: time, coverage (libFuzzer's
# `cov`, edges), features (`ft`), corpus size, and the round at which coverage last grew.
#
#   scripts/fuzz-plateau.sh                  # every target
#   ROUND=60 PATIENCE=3 MAX=1800 scripts/fuzz-plateau.sh pdu_stream peer_frames
#
# A crash stops the script with libFuzzer's output; the input is in fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
ROUND=${ROUND:-60}
PATIENCE=${PATIENCE:-3}
MAX=${MAX:-1800}
command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked --quiet
cargo fuzz build --sanitizer none >/dev/null 2>&1 || { cargo fuzz build --sanitizer none; exit 1; }
targets=("$@")
[ "${#targets[@]}" -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
echo "| target | seconds | coverage (cov) | features (ft) | corpus | last growth at |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  seeds=(); [ -d "seeds/$t" ] && seeds=("seeds/$t")
  best=0; ft=0; flat=0; spent=0; grew=0
  while [ "$flat" -lt "$PATIENCE" ] && [ "$spent" -lt "$MAX" ]; do
    out=$(cargo fuzz run --sanitizer none "$t" "corpus/$t" "${seeds[@]}" -- -max_total_time="$ROUND" -print_final_stats=1 2>&1) || { echo "$out" | tail -40; echo "fuzz target $t failed" >&2; exit 1; }
    spent=$((spent + ROUND))
    line=$(echo "$out" | grep -E '^#[0-9]+.*cov: [0-9]+' | tail -1)
    cov=$(echo "$line" | sed -nE 's/.*cov: ([0-9]+).*/\1/p')
    ft=$(echo "$line" | sed -nE 's/.*ft: ([0-9]+).*/\1/p')
    if [ "${cov:-0}" -gt "$best" ]; then best=$cov; flat=0; grew=$spent; else flat=$((flat + 1)); fi
  done
  n=$(find "corpus/$t" -type f | wc -l)
  echo "| $t | $spent | $best | $ft | $n | ${grew} s |"
done
