#!/usr/bin/env bash
# 10,000 idle mTLS connections (issue 13): starts the real agent, measures the latency of
# legitimate requests (each on a new mTLS connection), opens N connections that complete the
# handshake and then send nothing, measures memory and legitimate latency while they are held,
# closes them and measures memory again.
#
#   scripts/idle-mtls.sh [N] [--release]     N: connections (default 10000, at most 15000)
#
# Needs an open-file limit of about N + 200 for this shell (the test process holds one
# descriptor per connection, the agent another). Bounded: opening has a 600 s deadline.
# Loopback only.
set -euo pipefail
cd "$(dirname "$0")/.."
n=10000
profile=()
for a in "$@"; do
  case "$a" in
    --release) profile=(--release) ;;
    *[!0-9]*|'') echo "usage: $0 [N] [--release]" >&2; exit 2 ;;
    *) n="$a" ;;
  esac
done
need=$((n + 200))
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt "$need" ]; then
  ulimit -n "$need" 2>/dev/null || {
    echo "$0: the open-file limit $(ulimit -n) is below $need and cannot be raised (ulimit -Hn: $(ulimit -Hn))" >&2
    exit 1
  }
fi
IDLE_MTLS_CONNECTIONS="$n" cargo test "${profile[@]}" -p outrigger --test limits -- \
  --ignored --exact idle_mtls_connections --nocapture 2>&1 | grep -E '^idle-mtls|test result|panicked'
