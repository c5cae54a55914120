#!/usr/bin/env bash
# Builds every release artifact from a clean checkout into dist/ (gitignored):
#
#   outrigger-VERSION-x86_64-linux-musl.tar.gz   the static Linux binary, unit, man pages, completions
#   outrigger_VERSION-1_amd64.deb                 Debian/Ubuntu package (cargo-deb)
#   outrigger-VERSION-1.x86_64.rpm                RHEL-family package (cargo-generate-rpm)
#   outrigger-VERSION-x86_64-windows.zip          outrigger.exe, agent.yaml, docs, LICENSE, completions
#   outrigger-VERSION-x64.msi                     Windows installer (wixl, msitools)
#   outrigger-VERSION-linux.cdx.json, -windows.cdx.json   CycloneDX SBOMs (scripts/sbom.py)
#   SHA256SUMS                                    checksums of all the above
#
# Both binaries are built with `cargo auditable` (the dependency list embedded in a `.dep-v0`
# section; `cargo audit bin` and similar tools read it). Dependencies' licences, bans and
# sources are checked first with `cargo deny` (deny.toml), offline; its advisories check needs
# the network (the RustSec database) and is not run here.
#
# Installs what it needs when missing: Debian packages (musl-tools, gcc-mingw-w64-x86-64,
# wixl, msitools), the Rust targets, and the cargo tools (cargo install --locked, pinned
# versions). Uses CARGO_TARGET_DIR (default target/) so a second run rebuilds nothing;
# DIST_DIR overrides dist/. Every step is bounded by `timeout`. docs/install.md says how the
# artifacts are installed and verified.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

log() { printf '\n==> %s\n' "$*"; }
die() { echo "error: $*" >&2; exit 1; }
started=$(date +%s)

LINUX=x86_64-unknown-linux-musl
WIN=x86_64-pc-windows-gnu
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(cd "$CARGO_TARGET_DIR" && pwd)"
DIST="${DIST_DIR:-$ROOT/dist}"
VERSION="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' Cargo.toml | head -1)"
[ -n "$VERSION" ] || die "cannot read the workspace version from Cargo.toml"
# Reproducible dates: the commit's, unless the caller set one (build.rs, cargo-deb, the zips).
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH="$(git log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

# 1. Tools.
if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
need_apt=()
command -v musl-gcc >/dev/null || need_apt+=(musl-tools)
command -v x86_64-w64-mingw32-gcc >/dev/null || need_apt+=(gcc-mingw-w64-x86-64)
command -v wixl >/dev/null || need_apt+=(wixl)
command -v msibuild >/dev/null || need_apt+=(msitools)
command -v dpkg-deb >/dev/null || need_apt+=(dpkg)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  timeout 600 $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
for t in "$LINUX" "$WIN"; do
  if ! rustup target list --installed | grep -qx "$t"; then
    log "rustup target add $t"
    timeout 600 rustup target add "$t"
  fi
done
# The versions these scripts were written and tested with. Built unoptimized (`--debug`): each
# runs once per release on small inputs (cargo-deny checks in 2 s either way), and a debug
# build compiles in about a quarter of the time (cargo-deny: 1.5 min instead of 7 on 2 cores),
# which is what a fresh CI machine pays.
cargo_tool() { # cargo_tool COMMAND CRATE VERSION
  if ! command -v "$1" >/dev/null; then
    log "installing $2 $3 (cargo install --locked --debug)"
    # Without our CARGO_TARGET_DIR: cargo install then builds in a temporary directory that it
    # deletes afterwards, instead of leaving gigabytes of the tool's objects (no debug
    # information either) in target/.
    env -u CARGO_TARGET_DIR CARGO_PROFILE_DEV_DEBUG=0 \
      timeout 1200 cargo install --locked --debug --quiet "$2" --version "$3"
  fi
}
cargo_tool cargo-auditable cargo-auditable 0.7.7
cargo_tool cargo-deny cargo-deny 0.20.2
cargo_tool cargo-deb cargo-deb 3.8.0
cargo_tool cargo-generate-rpm cargo-generate-rpm 0.21.1

# 2. Dependency policy: licences, bans, sources (deny.toml), without the network.
# cargo-deny reads every package of Cargo.lock, those of other platforms too (wasm's `wasi`,
# `bumpalo`), which no build on this machine downloads: fetch them first, then check offline.
log "cargo fetch --locked (every package in Cargo.lock, for cargo deny)"
timeout 600 cargo fetch --locked
log "cargo deny check licenses bans sources (offline)"
timeout 300 cargo deny --frozen check --hide-inclusion-graph licenses bans sources

# 3. The binaries, with their dependency lists embedded.
log "cargo auditable build --release --target $LINUX (static, musl)"
timeout 2400 cargo auditable build --release --locked --target "$LINUX" -p outrigger
log "cargo auditable build --release --target $WIN"
timeout 2400 cargo auditable build --release --locked --target "$WIN" -p outrigger
linux_bin="$CARGO_TARGET_DIR/$LINUX/release/outrigger"
win_exe="$CARGO_TARGET_DIR/$WIN/release/outrigger.exe"
[ -x "$linux_bin" ] || die "$linux_bin was not built"
[ -f "$win_exe" ] || die "$win_exe was not built"
if ! file "$linux_bin" | grep -Eq 'statically linked|static-pie linked'; then
  die "$linux_bin is not statically linked: $(file "$linux_bin")"
fi

# 4. Man pages and completions, generated by the binary from its own command definitions.
#    cargo-deb and cargo-generate-rpm take them from pkg/ beside the binary (Cargo.toml).
log "man pages and completions"
pkg="$CARGO_TARGET_DIR/$LINUX/release/pkg"
rm -rf "$pkg"
mkdir -p "$pkg/man" "$pkg/completions"
timeout 60 "$linux_bin" man --dir "$pkg/man" >/dev/null
gzip -9n "$pkg"/man/*.1
timeout 60 "$linux_bin" completions bash >"$pkg/completions/outrigger"
timeout 60 "$linux_bin" completions zsh >"$pkg/completions/_outrigger"
timeout 60 "$linux_bin" completions powershell >"$pkg/completions/outrigger-completions.ps1"
for f in "$pkg"/man/outrigger.1.gz "$pkg"/completions/*; do
  [ -s "$f" ] || die "$f is empty"
done

rm -rf "$DIST"
mkdir -p "$DIST"
stage="$CARGO_TARGET_DIR/release-stage"
rm -rf "$stage"
mkdir -p "$stage"

# A file tree as a reproducible archive: sorted names, the commit's date, no owners.
tarball() { # tarball OUT.tar.gz DIR NAME
  tar --sort=name --mtime="@$SOURCE_DATE_EPOCH" --owner=0 --group=0 --numeric-owner \
    -C "$2" -cf - "$3" | gzip -9n >"$1"
}
zipdir() { # zipdir OUT.zip DIR NAME
  python3 - "$@" "$SOURCE_DATE_EPOCH" <<'PY'
import os, sys, time, zipfile
out, base, name, epoch = sys.argv[1:5]
stamp = time.gmtime(max(int(epoch), 315532800))[:6]
with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
    for d, dirs, files in os.walk(os.path.join(base, name)):
        dirs.sort()
        for f in sorted(files):
            path = os.path.join(d, f)
            info = zipfile.ZipInfo(os.path.relpath(path, base), stamp)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = (0o755 if os.access(path, os.X_OK) else 0o644) << 16
            with open(path, "rb") as fh:
                z.writestr(info, fh.read())
PY
}

# 5. Linux: the static tarball, the .deb and the .rpm.
log "Linux: tarball, .deb, .rpm"
t="$stage/outrigger-$VERSION-x86_64-linux-musl"
mkdir -p "$t/man" "$t/completions"
cp "$linux_bin" "$t/"
cp packaging/agent.yaml packaging/linux/outrigger.service LICENSE README.md docs/install.md "$t/"
cp "$pkg"/man/*.1.gz "$t/man/"
cp "$pkg"/completions/outrigger "$pkg"/completions/_outrigger "$t/completions/"
tarball "$DIST/outrigger-$VERSION-x86_64-linux-musl.tar.gz" "$stage" "$(basename "$t")"
# The binary is already stripped (profile.release); --no-strip keeps it byte for byte.
timeout 600 cargo deb --no-build --no-strip --locked -p outrigger --target "$LINUX" \
  --output "$DIST/" >/dev/null
timeout 600 cargo generate-rpm -p crates/outrigger --target "$LINUX" \
  --target-dir "$CARGO_TARGET_DIR" --payload-compress gzip -o "$DIST/" >/dev/null

# 6. Windows: the zip and the MSI.
log "Windows: zip, MSI"
w="$stage/outrigger-$VERSION-x86_64-windows"
mkdir -p "$w"
cp "$win_exe" "$w/outrigger.exe"
# Windows line endings for the text files a Windows administrator opens.
crlf() { sed 's/\r*$/\r/' "$1" >"$2"; }
crlf packaging/agent.yaml "$w/agent.yaml"
crlf LICENSE "$w/LICENSE.txt"
crlf docs/windows.md "$w/windows.md"
crlf docs/install.md "$w/install.md"
crlf "$pkg/completions/outrigger-completions.ps1" "$w/outrigger-completions.ps1"
zipdir "$DIST/outrigger-$VERSION-x86_64-windows.zip" "$stage" "$(basename "$w")"

msi="$DIST/outrigger-$VERSION-x64.msi"
# wixl resolves Source= paths from the current directory.
(cd "$stage" && timeout 300 wixl -a x64 -D Version="$VERSION" -D Stage="$(basename "$w")" \
  -o "$msi" "$ROOT/packaging/windows/outrigger.wxs")
# What wixl's WiX subset has no attribute or element for, written into the MSI's tables with
# msibuild (msitools) — see the comments in outrigger.wxs and docs/install.md:
q() { timeout 60 msibuild "$msi" -q "$1" || die "msibuild: $1"; }
#  - Permanent (16) data folders and configuration, NeverOverwrite (128) agent.yaml; 256: 64-bit.
for c in DataDir CertsDir PoliciesDir LogsDir; do
  q "UPDATE \`Component\` SET \`Attributes\` = 272 WHERE \`Component\` = '$c'"
done
q "UPDATE \`Component\` SET \`Attributes\` = 400 WHERE \`Component\` = 'AgentYaml'"
#  - the Event Log message file as REG_EXPAND_SZ ("#%" prefix), as `service install` writes it.
q "UPDATE \`Registry\` SET \`Value\` = '#%%SystemRoot%\\Microsoft.NET\\Framework64\\v4.0.30319\\EventLogMessages.dll' WHERE \`Name\` = 'EventMessageFile'"
#  - service recovery, the service SID, and the ACLs: deferred custom actions as SYSTEM (type 34
#    exe + 64 ignore exit code + 1024 deferred + 2048 no impersonation = 3170), after
#    InstallServices (5800), on install and repair, not on removal.
seq=5810
custom() { # custom ID COMMAND
  q "INSERT INTO \`CustomAction\` (\`Action\`, \`Type\`, \`Source\`, \`Target\`) VALUES ('$1', 3170, 'INSTALLDIR', '$2')"
  q "INSERT INTO \`InstallExecuteSequence\` (\`Action\`, \`Condition\`, \`Sequence\`) VALUES ('$1', 'NOT REMOVE', $seq)"
  seq=$((seq + 1))
}
custom SvcFailure '"[SystemFolder]sc.exe" failure Outrigger reset= 86400 actions= restart/5000/restart/10000/restart/60000'
custom SvcFailureFlag '"[SystemFolder]sc.exe" failureflag Outrigger 1'
custom SvcSidType '"[SystemFolder]sc.exe" sidtype Outrigger unrestricted'
custom AclCerts '"[SystemFolder]icacls.exe" "[CERTSDIR]." /inheritance:r /grant:r *S-1-5-18:(OI)(CI)F *S-1-5-32-544:(OI)(CI)F "NT SERVICE\Outrigger:(OI)(CI)RX"'
custom AclLogs '"[SystemFolder]icacls.exe" "[LOGSDIR]." /grant "NT SERVICE\Outrigger:(OI)(CI)M"'

# 7. SBOMs: one per target (their dependency sets differ), CycloneDX 1.5 JSON, from Cargo's
#    resolved graph and Cargo.lock's checksums (scripts/sbom.py).
log "CycloneDX SBOMs"
timeout 300 python3 scripts/sbom.py "$LINUX" "$DIST/outrigger-$VERSION-linux.cdx.json"
timeout 300 python3 scripts/sbom.py "$WIN" "$DIST/outrigger-$VERSION-windows.cdx.json"

# 8. Checksums.
(cd "$DIST" && find . -maxdepth 1 -type f ! -name SHA256SUMS -printf '%f\n' | sort | xargs sha256sum >SHA256SUMS)

log "release $VERSION built in $(( $(date +%s) - started ))s, in $DIST:"
(cd "$DIST" && ls -l --time-style=+ | sed 1d | awk '{printf "  %-48s %10s bytes\n", $NF, $5}')
cat <<EOF

  binaries: $linux_bin
            $win_exe
  verify:   (cd $DIST && sha256sum -c SHA256SUMS)
  install:  docs/install.md
EOF
