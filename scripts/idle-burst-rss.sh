#!/usr/bin/env bash
# Memory after a burst of idle HTTP/2 mTLS connections (issue 13): starts the real agent,
# opens N connections (one request each, so each also holds a backend connection), leaves them
# idle, closes them, and prints the agent's RSS before, during and after.
#
#   scripts/idle-burst-rss.sh [N] [--release]     N: connections (default 500, at most 5000)
#
# Bounded: the burst has a 300 s deadline, the settle phase 10 s. Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=500
profile=()
for a in "$@"; do
  case "$a" in
    --release) profile=(--release) ;;
    *[!0-9]*|'') echo "usage: $0 [N] [--release]" >&2; exit 2 ;;
    *) n="$a" ;;
  esac
done
IDLE_BURST_CONNECTIONS="$n" cargo test "${profile[@]}" -p outrigger --test limits -- \
  --ignored --exact idle_burst_rss --nocapture 2>&1 | grep -E '^idle-burst|test result'
