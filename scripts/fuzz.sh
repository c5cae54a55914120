#!/usr/bin/env bash
# Runs every fuzz target under fuzz/fuzz_targets for a fixed time each and prints a summary
# (issue 13: "every fuzz target run for a fixed budget with 0 crashes"). By hand, not in CI:
# cargo-fuzz needs a nightly toolchain.
#
#   scripts/fuzz.sh [SECONDS]        seconds per target (default 60)
#
# Corpora stay in fuzz/corpus/<target> (ignored by git) so later runs start where earlier
# ones stopped; crashes land in fuzz/artifacts/<target>, each run's output in
# fuzz/artifacts/<target>.log. Exit status 1 if any target crashed or did not build.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"
case "$secs" in *[!0-9]*|'') echo "usage: $0 [SECONDS]" >&2; exit 2 ;; esac
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "$0: needs a nightly toolchain (rustup toolchain install nightly)" >&2
  exit 2
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz ..." >&2
  cargo install --locked cargo-fuzz
fi
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/fuzz/target}"
targets=$(cd fuzz && cargo +nightly fuzz list)
failed=0
summary=()
for t in $targets; do
  mkdir -p "fuzz/corpus/$t"
  log="fuzz/artifacts/$t.log"
  mkdir -p fuzz/artifacts
  echo "== $t: ${secs}s" >&2
  if (cd fuzz && cargo +nightly fuzz run "$t" -- -max_total_time="$secs" -rss_limit_mb=2048 \
        -print_final_stats=1) >"$log" 2>&1; then
    result=ok
  elif grep -q 'could not compile' "$log"; then
    result=BUILD-FAILED
    failed=1
  else
    result=CRASH
    failed=1
  fi
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1 || true)
  cov=$( (grep -o 'cov: [0-9]*' "$log" || true) | tail -1 | grep -o '[0-9]*' || true)
  summary+=("$(printf '%-22s %-6s runs=%-10s cov=%s' "$t" "$result" "${runs:-?}" "${cov:-?}")")
done
echo
echo "fuzz run $(date -u +%Y-%m-%dT%H:%MZ), ${secs}s per target, $(rustup run nightly rustc --version)"
printf '%s\n' "${summary[@]}"
exit "$failed"
