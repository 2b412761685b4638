#!/usr/bin/env bash
# Coverage-guided fuzzing (issue 12): every target of fuzz/ (libFuzzer through cargo-fuzz, on
# the stable toolchain with RUSTC_BOOTSTRAP=1) for SECONDS each (default 60), starting from the
# committed seeds in fuzz/corpus/TARGET. Fails on the first crash, hang (-timeout) or
# allocation past the bound (-malloc_limit_mb, -rss_limit_mb); the input is left in
# fuzz/artifacts/TARGET/. Prints executions and coverage per target.
#   ci/fuzz.sh [SECONDS] [TARGET...]
# FUZZ_SANITIZER (default none) picks cargo-fuzz's sanitizer: `none` keeps the cold build of the
# instrumented dependency tree within CI's budget (the code under test is safe Rust: panics,
# hangs and memory growth are what to find, and -rss_limit_mb bounds the latter); long local
# runs use `address`, whose allocator hooks also enforce -malloc_limit_mb per allocation.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
shift || true

command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
# cargo-fuzz passes -Zsanitizer and friends: allowed on stable only with this.
export RUSTC_BOOTSTRAP=1

san=${FUZZ_SANITIZER:-none}
start=$(date +%s)
cargo fuzz build -O -s "$san"
echo "ci/fuzz.sh: built in $(($(date +%s) - start)) s"

if [ $# -gt 0 ]; then
  targets=("$@")
else
  mapfile -t targets < <(cargo fuzz list)
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The NBD targets put their server's socket under TMPDIR.
export TMPDIR=$work
# No leak check, per input (-detect_leaks=0 below) nor at exit: the NBD server's threads
# outlive an input and the process (real growth still hits -rss_limit_mb).
export ASAN_OPTIONS=detect_leaks=0

summary=()
for t in "${targets[@]}"; do
  mkdir -p "$work/$t"
  log=$work/$t.log
  # New inputs go to the scratch corpus; the committed seeds are only read.
  # 32 MiB is the largest allocation an input may cause (an NBD write payload); the bitmap
  # budget of the engine (512 MiB) bounds what journal records can make it allocate.
  if ! cargo fuzz run -O -s "$san" "$t" "$work/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -timeout=25 -rss_limit_mb=2048 -malloc_limit_mb=1024 \
    -detect_leaks=0 -print_final_stats=1 >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    echo "ci/fuzz.sh: $t failed; the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
  last=$(grep -E '^#[0-9]+' "$log" | tail -n 1)
  cov=$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$last")
  ft=$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$last")
  corp=$(sed -n 's/.* corp: \([^ ]*\).*/\1/p' <<<"$last")
  summary+=("$(printf '%-18s %10s execs %7s/s  cov %6s  ft %6s  corpus %s' \
    "$t" "$execs" "$rate" "$cov" "$ft" "$corp")")
  echo "${summary[-1]}"
done

echo "ci/fuzz.sh: ${#targets[@]} targets, ${secs} s each, no crash; total $(($(date +%s) - start)) s"
printf '  %s\n' "${summary[@]}"
