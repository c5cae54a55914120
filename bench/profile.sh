#!/usr/bin/env bash
# Profile Outrigger (or another target) under one benchmark scenario with perf (cpu-clock
# sampling, works without hardware counters, e.g. in VMs).
#
#   bench/profile.sh                    # Outrigger, keep-alive, 10 s
#   bench/profile.sh newconn 10         # Outrigger, new connection per request
#   TARGET=envoy bench/profile.sh h2    # another proxy
#
# Builds an unstripped Outrigger (frame pointers on) in target/prof, so its numbers are for
# reading profiles, not for the benchmark table. Needs `perf` (Debian: linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SCENARIO=${1:-keepalive}
DURATION=${2:-10}
TARGET=${TARGET:-outrigger}
OUT=${OUT:-$ROOT/target/prof/perf}

command -v perf >/dev/null || { echo "perf not found (apt-get install linux-perf)" >&2; exit 1; }
CARGO_TARGET_DIR="$ROOT/target/prof" CARGO_PROFILE_RELEASE_STRIP=none \
  RUSTFLAGS="-Cforce-frame-pointers=yes" cargo build --release --locked -p outrigger
CARGO_TARGET_DIR="$ROOT/target" cargo build --release --manifest-path bench/loadgen/Cargo.toml

OUTRIGGER_BIN="$ROOT/target/prof/release/outrigger" python3 bench/bench.py \
  --targets "$TARGET" --scenarios "$SCENARIO" --duration "$DURATION" \
  --perf "$OUT" --results "$OUT/results"

DATA="$OUT/perf-$TARGET-$SCENARIO.data"
echo
echo "== top symbols (self time), $DATA"
perf report -i "$DATA" --no-children --sort symbol --stdio 2>/dev/null | grep -v '^$' | grep -v '^#' | grep '%' | head -40
echo
echo "== by shared object / crate prefix"
perf report -i "$DATA" --no-children --sort dso --stdio 2>/dev/null | grep '%' | head -10
echo
echo "full report: perf report -i $DATA --no-children"
