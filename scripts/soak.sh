#!/usr/bin/env bash
# The soak of RELIABILITY.md: traffic at a fixed rate from an allowed and a denied peer while the
# workload certificate rotates every 10 s and the policy file is rewritten every 2 s (in place
# and by atomic rename, alternately). Fails on any wrong answer, any failed request, or RSS
# growth. CI runs the same test for 20 s (scripts/test.sh); this runs it for longer.
#
#   scripts/soak.sh [SECONDS]      default 600; the summary lands in target/soak-report.json
#   PROFILE=release scripts/soak.sh   the same against a release build (~6 min to build)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-600}"
profile=()
[ "${PROFILE:-}" = release ] && profile=(--release)
mkdir -p target
# cargo test (not nextest): nextest's per-test limit is 10 minutes (.config/nextest.toml).
OUTRIGGER_SOAK_SECS="$secs" OUTRIGGER_SOAK_REPORT="$PWD/target/soak-report.json" \
  timeout $((secs + 900)) cargo test "${profile[@]}" -p outrigger --test soak -- --nocapture
echo "summary: target/soak-report.json"
cat target/soak-report.json
