#!/usr/bin/env bash
# The release packages, tested: runs scripts/release.sh, then checks each artifact it wrote.
# scripts/test.sh (and so CI) runs it; it also runs on its own.
#
#  1. the static Linux binary: `file` and `ldd` say static, it runs (`outrigger version`), its
#     dependency list is embedded (cargo auditable's .dep-v0 section), man page and completions
#     are non-empty;
#  2. the .deb: metadata, conffile, then installed into a scratch root with
#     `dpkg --root DIR --force-script-chrootless` (its postinst creates the outrigger user
#     there), the files, owners and modes checked, the installed example configuration
#     accepted by the installed binary (`run --check-config`, with a certificate from
#     `outrigger ca`), reinstalled over itself (the upgrade path keeps an edited conffile),
#     removed (configuration and state kept) and purged;
#  3. the systemd unit: `systemd-analyze verify` (the ExecStart path pointed into the scratch
#     root) and its hardening exposure (`systemd-analyze security --offline`);
#  4. the .rpm: metadata, scripts, payload, config flags, its files (rpm2cpio), and its %post
#     run into a scratch root;
#  5. the Windows zip's contents and the MSI under Wine, in a fresh prefix of its own:
#     `msiexec /i … /qn`, files, the service's registry entries (as `outrigger service
#     install` writes them) and the Event Log source, the service started with a certificate
#     from `outrigger.exe ca` and answering /healthz/ready, stopped, then `msiexec /x … /qn`:
#     the service and the program files gone, ProgramData\Outrigger kept;
#  6. SHA256SUMS and the SBOMs.
#
# Uses CARGO_TARGET_DIR (default target/) like the rest of the suite. Every step is bounded
# by `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

log() { printf '\n==> %s\n' "$*"; }
fail() { echo "FAIL: $*" >&2; exit 1; }
ok() { echo "  ok: $*"; }
# grep reading all its input: `producer | grep -q` fails under pipefail when grep quits first
# and the producer is killed by SIGPIPE.
match() { grep "$@" >/dev/null; }
started=$(date +%s)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
mkdir -p "$CARGO_TARGET_DIR"
CARGO_TARGET_DIR="$(cd "$CARGO_TARGET_DIR" && pwd)"
DIST="$CARGO_TARGET_DIR/package-test/dist"
SCRATCH="$CARGO_TARGET_DIR/package-test/scratch"

# Tools the checks use (release.sh installs what the build needs).
need_apt=()
command -v file >/dev/null || need_apt+=(file)
command -v objdump >/dev/null || need_apt+=(binutils)
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
command -v rpm2cpio >/dev/null || need_apt+=(rpm)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v curl >/dev/null || need_apt+=(curl)
command -v useradd >/dev/null || need_apt+=(passwd)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]} (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  timeout 600 $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive timeout 900 $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
# shellcheck source=scripts/wine-env.sh
. scripts/wine-env.sh
wine_tools

log "scripts/release.sh (into $DIST)"
# The packages are what this tests, not the optimizer: unless PACKAGE_TEST_FULL_RELEASE=1, the
# release profile is built without fat LTO, with parallel codegen and opt-level 1 (the same
# targets, features, static linking, panic=abort, stripping and cargo auditable), which keeps
# two release builds inside CI's time budget. scripts/release.sh on its own builds the real
# thing.
if [ "${PACKAGE_TEST_FULL_RELEASE:-0}" != 1 ]; then
  export CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 \
    CARGO_PROFILE_RELEASE_OPT_LEVEL=1
fi
DIST_DIR="$DIST" timeout 3600 ./scripts/release.sh
VERSION="$(sed -n 's/^version = "\([^"]*\)"$/\1/p' Cargo.toml | head -1)"
deb="$DIST/outrigger_${VERSION}-1_amd64.deb"
rpm="$DIST/outrigger-${VERSION}-1.x86_64.rpm"
zip="$DIST/outrigger-${VERSION}-x86_64-windows.zip"
msi="$DIST/outrigger-${VERSION}-x64.msi"
tgz="$DIST/outrigger-${VERSION}-x86_64-linux-musl.tar.gz"
for f in "$deb" "$rpm" "$zip" "$msi" "$tgz" "$DIST/SHA256SUMS" \
    "$DIST/outrigger-$VERSION-linux.cdx.json" "$DIST/outrigger-$VERSION-windows.cdx.json"; do
  [ -s "$f" ] || fail "release.sh did not write $f"
done
ok "every artifact written"
rm -rf "$SCRATCH"
mkdir -p "$SCRATCH"

# 1. The static binary.
log "the static Linux binary"
bin="$CARGO_TARGET_DIR/x86_64-unknown-linux-musl/release/outrigger"
file "$bin"
file "$bin" | match -E 'statically linked|static-pie linked' || fail "file does not say static"
ldd_out="$(ldd "$bin" 2>&1 || true)"
echo "ldd: $ldd_out"
echo "$ldd_out" | match -E 'not a dynamic executable|statically linked' || fail "ldd lists libraries"
ok "static (file, ldd)"
v="$(timeout 10 "$bin" version)"
echo "$v"
echo "$v" | match "^outrigger $VERSION$" || fail "outrigger version: no version line"
echo "$v" | match "target:  x86_64-unknown-linux-musl" || fail "outrigger version: wrong target"
objdump -h "$bin" | match '\.dep-v0' || fail "no .dep-v0 section (cargo auditable)"
x86_64-w64-mingw32-objdump -h "$CARGO_TARGET_DIR/x86_64-pc-windows-gnu/release/outrigger.exe" \
  | match '\.dep-v0' || fail "outrigger.exe: no .dep-v0 section (cargo auditable)"
ok "dependency lists embedded (.dep-v0) in both binaries"
for shell in bash zsh powershell; do
  n="$(timeout 10 "$bin" completions "$shell" | wc -c)"
  [ "$n" -gt 1000 ] || fail "completions $shell: $n bytes"
done
timeout 10 "$bin" man | match '^\.TH outrigger' || fail "outrigger man: no .TH header"
ok "completions (bash, zsh, powershell) and man page non-empty"
tar -tzf "$tgz" | match "outrigger-$VERSION-x86_64-linux-musl/outrigger$" || fail "tarball lacks the binary"

# 2. The .deb.
log "the .deb: metadata"
dpkg-deb --info "$deb" >"$SCRATCH/deb-info"
grep -E '^ (Package|Version|Architecture|Depends|Recommends):' "$SCRATCH/deb-info"
grep -Eq '^ Depends: *[^ ]' "$SCRATCH/deb-info" && fail "the static binary's .deb should depend on nothing"
dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | match -x /etc/outrigger/agent.yaml \
  || fail "agent.yaml is not a conffile"
dpkg-deb --contents "$deb" >"$SCRATCH/deb-contents"
for f in ./usr/bin/outrigger ./lib/systemd/system/outrigger.service ./etc/outrigger/agent.yaml \
    ./usr/share/man/man1/outrigger.1.gz ./usr/share/man/man1/outrigger-run.1.gz \
    ./usr/share/bash-completion/completions/outrigger ./usr/share/zsh/vendor-completions/_outrigger \
    ./usr/share/doc/outrigger/install.md ./usr/share/doc/outrigger/copyright; do
  grep -q " $f\$" "$SCRATCH/deb-contents" || fail ".deb lacks $f"
done
ok ".deb: Depends none, conffile, files"

log "the .deb: dpkg --root (scratch root, maintainer scripts run chrootless)"
droot="$SCRATCH/deb-root"
mkdir -p "$droot/etc" "$droot/var/lib/dpkg/info" "$droot/var/lib/dpkg/updates" "$droot/var/lib/dpkg/triggers"
: >"$droot/var/lib/dpkg/status"
# A minimal user database for useradd --prefix (the postinst's DPKG_ROOT path).
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$droot/etc/passwd"
printf 'root:x:0:\n' >"$droot/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$droot/etc/shadow"
printf 'root:*::\n' >"$droot/etc/gshadow"
dpkgr() { timeout 120 dpkg --root="$droot" --force-script-chrootless --log=/dev/null "$@"; }
dpkgr -i "$deb"
dpkgr -s outrigger | match '^Status: install ok installed' || fail "dpkg -s: not installed"
uid="$(awk -F: '$1 == "outrigger" { print $3 }' "$droot/etc/passwd")"
gid="$(awk -F: '$1 == "outrigger" { print $3 }' "$droot/etc/group")"
[ -n "$uid" ] && [ -n "$gid" ] || fail "postinst did not create the outrigger user and group"
grep '^outrigger:' "$droot/etc/passwd"
awk -F: '$1 == "outrigger" && $7 == "/usr/sbin/nologin" && $6 == "/var/lib/outrigger"' "$droot/etc/passwd" \
  | match . || fail "outrigger user: wrong shell or home"
mode() { stat -c '%a %u:%g' "$1"; }
[ "$(mode "$droot/etc/outrigger")" = "750 0:$gid" ] || fail "/etc/outrigger: $(mode "$droot/etc/outrigger")"
[ "$(mode "$droot/etc/outrigger/certs")" = "750 0:$gid" ] || fail "/etc/outrigger/certs: $(mode "$droot/etc/outrigger/certs")"
[ "$(mode "$droot/etc/outrigger/agent.yaml")" = "640 0:$gid" ] || fail "agent.yaml: $(mode "$droot/etc/outrigger/agent.yaml")"
[ "$(mode "$droot/var/lib/outrigger")" = "750 $uid:$gid" ] || fail "/var/lib/outrigger: $(mode "$droot/var/lib/outrigger")"
cmp "$droot/usr/bin/outrigger" "$bin" || fail "the packaged binary differs from the built one"
for f in usr/share/man/man1/outrigger.1.gz usr/share/bash-completion/completions/outrigger \
    usr/share/zsh/vendor-completions/_outrigger; do
  [ -s "$droot/$f" ] || fail "/$f is empty"
done
zcat "$droot/usr/share/man/man1/outrigger.1.gz" | match '^\.TH outrigger' || fail "man page unreadable"
ok "installed: user outrigger ($uid:$gid), /etc/outrigger 750 root:outrigger, agent.yaml 640, /var/lib/outrigger 750 outrigger"

log "the installed configuration, as shipped, with a certificate from outrigger ca"
etc="$droot/etc/outrigger"
timeout 30 "$droot/usr/bin/outrigger" ca init --trust-domain cluster.local --dir "$SCRATCH/ca" >/dev/null
timeout 30 "$droot/usr/bin/outrigger" ca issue --dir "$SCRATCH/ca" \
  --spiffe spiffe://cluster.local/ns/legacy/sa/legacy-app --out "$etc/certs" >/dev/null
check="$(timeout 30 "$droot/usr/bin/outrigger" run --config "$etc/agent.yaml" --check-config)"
echo "$check"
echo "$check" | match '^configuration OK' || fail "the shipped agent.yaml is not accepted"
ok "the shipped agent.yaml passes --check-config"

log "the .deb: reinstall over itself (upgrade path), remove, purge"
echo "# edited by the administrator" >>"$etc/agent.yaml"
dpkgr -i "$deb"
grep -q 'edited by the administrator' "$etc/agent.yaml" || fail "upgrade replaced the edited conffile"
dpkgr -r outrigger
[ ! -e "$droot/usr/bin/outrigger" ] || fail "remove left /usr/bin/outrigger"
[ -f "$etc/agent.yaml" ] && [ -f "$etc/certs/key.pem" ] && [ -d "$droot/var/lib/outrigger" ] \
  || fail "remove deleted configuration, certificates or state"
dpkgr --purge outrigger
[ ! -e "$etc/agent.yaml" ] || fail "purge left the conffile"
[ -f "$etc/certs/key.pem" ] || fail "purge deleted the certificates"
ok "upgrade keeps an edited conffile; remove keeps configuration and state; purge removes the conffile only"

# 3. The systemd unit.
log "the systemd unit: systemd-analyze verify and security"
unit="$SCRATCH/unit/outrigger.service"
mkdir -p "$(dirname "$unit")"
dpkg-deb --fsys-tarfile "$deb" | tar -xO ./lib/systemd/system/outrigger.service \
  | sed "s|/usr/bin/outrigger|$bin|" >"$unit"
grep -q '^ExecStart=.* run --config /etc/outrigger/agent.yaml$' "$unit" || fail "ExecStart"
# --man=no: the man pages are checked above, not installed on this machine.
rc=0
verify="$(timeout 60 systemd-analyze verify --man=no "$unit" 2>&1)" || rc=$?
# Lines about other units on this machine are not ours.
ours="$(printf '%s\n' "$verify" | grep -i 'outrigger' || true)"
if [ "$rc" != 0 ] || [ -n "$ours" ]; then
  printf '%s\n' "$verify"
  fail "systemd-analyze verify: exit status $rc"
fi
ok "systemd-analyze verify: clean"
for d in 'User=outrigger' 'ProtectSystem=strict' 'ReadWritePaths=/var/lib/outrigger' \
    'NoNewPrivileges=yes' 'CapabilityBoundingSet=$' 'AmbientCapabilities=$' 'Restart=on-failure'; do
  grep -q "^$d" "$unit" || fail "the unit lacks $d"
done
if sec="$(timeout 60 systemd-analyze security --offline=true "$unit" 2>&1)"; then
  printf '%s\n' "$sec" | tail -1
else
  echo "  (systemd-analyze security --offline is not available here: $(printf '%s\n' "$sec" | tail -1))"
fi

# 4. The .rpm.
log "the .rpm: metadata, scripts, files"
rpm -qp --qf '%{NAME} %{VERSION}-%{RELEASE} %{ARCH} payload=%{PAYLOADCOMPRESSOR}\n' "$rpm"
rpm -qp --qf '%{PAYLOADCOMPRESSOR}' "$rpm" | match -x gzip || fail "rpm payload is not gzip (old rpm reads only gzip/xz)"
req="$(rpm -qp --requires "$rpm")"
echo "requires: $(echo "$req" | tr '\n' ' ')"
echo "$req" | grep -Ev '^(/bin/sh|rpmlib\(.*|config\(outrigger\) = .*)$' && fail "the rpm requires more than /bin/sh"
rpm -qp --scripts "$rpm" >"$SCRATCH/rpm-scripts"
grep -q '^postinstall scriptlet' "$SCRATCH/rpm-scripts" && grep -q 'useradd' "$SCRATCH/rpm-scripts" \
  || fail "rpm %post does not create the user"
grep -q '^preuninstall scriptlet' "$SCRATCH/rpm-scripts" || fail "rpm has no %preun"
rpm -qp --configfiles "$rpm" | match -x /etc/outrigger/agent.yaml || fail "agent.yaml is not %config"
rpm -qp --qf '[%{FILENAMES} %{FILEFLAGS:fflags}\n]' "$rpm" | match '^/etc/outrigger/agent.yaml .*n' \
  || fail "agent.yaml is not %config(noreplace)"
rroot="$SCRATCH/rpm-root"
mkdir -p "$rroot/etc"
# The payload's integrity is rpm's own check (header and payload digests); rpm2cpio's exit
# status is not used: rpm 4.18's compares the bytes it copied with the header's archive size,
# which cargo-generate-rpm does not write, and so exits 1 after writing the whole payload
# (the files are compared with the built ones below).
rpm -Kv "$rpm" | match 'Payload SHA256 digest: OK' || fail "rpm payload digest"
(cd "$rroot" && { rpm2cpio "$rpm" || true; } | timeout 60 cpio -idm --quiet)
cmp "$rroot/usr/bin/outrigger" "$bin" || fail "the rpm's binary differs from the built one"
for f in usr/lib/systemd/system/outrigger.service etc/outrigger/agent.yaml usr/share/man/man1/outrigger.1.gz \
    usr/share/bash-completion/completions/outrigger usr/share/zsh/site-functions/_outrigger; do
  [ -s "$rroot/$f" ] || fail "rpm lacks /$f"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rroot/etc/passwd"
printf 'root:x:0:\n' >"$rroot/etc/group"
printf 'root:*:19000:0:99999:7:::\n' >"$rroot/etc/shadow"
printf 'root:*::\n' >"$rroot/etc/gshadow"
DPKG_ROOT="$rroot" timeout 60 sh packaging/linux/scripts/postinst 1
grep -q '^outrigger:' "$rroot/etc/passwd" || fail "rpm %post (1) did not create the user"
ok "rpm: gzip payload, requires /bin/sh only, %config(noreplace), files, %post creates the user"

# 5. Windows: the zip and the MSI under Wine.
log "the Windows zip"
unzip_list="$(python3 -m zipfile -l "$zip")"
for f in outrigger.exe agent.yaml LICENSE.txt windows.md install.md outrigger-completions.ps1; do
  echo "$unzip_list" | match "x86_64-windows/$f " || fail "the zip lacks $f"
done
ok "zip: outrigger.exe, agent.yaml, LICENSE.txt, windows.md, install.md, outrigger-completions.ps1"

log "the MSI under Wine (a fresh prefix)"
trap wine_stop EXIT
rm -rf "$CARGO_TARGET_DIR/wine-prefix-msi"
wine_prefix "$CARGO_TARGET_DIR/wine-prefix-msi"
c="$WINEPREFIX/drive_c"
pf="$c/Program Files/Outrigger"
pd="$c/ProgramData/Outrigger"
svckey='HKLM\SYSTEM\CurrentControlSet\Services\Outrigger'
evkey='HKLM\SYSTEM\CurrentControlSet\Services\EventLog\Application\Outrigger'
# Wine's programs write UTF-16 and CRLF; this makes their output greppable.
w() { timeout "$1" "$WINE" "${@:2}" 2>/dev/null | tr -d '\r\0'; }
cp "$msi" "$c/outrigger.msi"
timeout 300 "$WINE" msiexec /i 'C:\outrigger.msi' /qn /l*v 'C:\msi-install.log' \
  || { iconv -f utf-16 -t utf-8 "$c/msi-install.log" 2>/dev/null | tail -40 || true; fail "msiexec /i failed"; }
timeout 60 "$WINESERVER" -w || true
cmp "$pf/outrigger.exe" "$CARGO_TARGET_DIR/x86_64-pc-windows-gnu/release/outrigger.exe" \
  || fail "Program Files\\Outrigger\\outrigger.exe differs from the built one"
for f in agent.example.yaml LICENSE.txt windows.md install.md outrigger-completions.ps1; do
  [ -s "$pf/$f" ] || fail "Program Files\\Outrigger\\$f missing"
done
[ -s "$pd/agent.yaml" ] || fail "ProgramData\\Outrigger\\agent.yaml missing"
for d in certs policies logs; do [ -d "$pd/$d" ] || fail "ProgramData\\Outrigger\\$d missing"; done
ok "files: Program Files\\Outrigger\\outrigger.exe (+docs), ProgramData\\Outrigger\\{agent.yaml,certs,policies,logs}"

svc="$(w 60 reg query "$svckey")"
echo "$svc" | grep -E 'ImagePath|Start|ObjectName|DisplayName|DependOnService|Type|Description'
echo "$svc" | match 'ImagePath.*Program Files\\Outrigger\\outrigger.exe.* service run --config "C:\\ProgramData\\Outrigger\\agent.yaml" --name Outrigger --log-dir "C:\\ProgramData\\Outrigger\\logs"' \
  || fail "service ImagePath"
echo "$svc" | match -E 'Start[[:space:]]+REG_DWORD[[:space:]]+0x2$' || fail "service start type is not Automatic"
echo "$svc" | match 'ObjectName.*NT SERVICE\\Outrigger' || fail "service account is not NT SERVICE\\Outrigger"
echo "$svc" | match 'DisplayName.*Outrigger mesh agent' || fail "service display name"
echo "$svc" | match 'DependOnService.*Tcpip' || fail "service does not depend on Tcpip"
ev="$(w 60 reg query "$evkey")"
echo "$ev" | match 'EventMessageFile.*REG_EXPAND_SZ.*EventLogMessages.dll' || fail "Event Log source: $ev"
ok "service Outrigger registered as \`outrigger service install\` does (registry); Event Log source"
# The custom actions (recovery, service SID, ACLs) run under Wine, but Wine's sc.exe and
# icacls.exe do not keep what they are told: check that the MSI carries them.
ca="$(msiinfo export "$msi" CustomAction | tr -d '\r')"
for a in 'SvcFailure	3170	.*sc.exe" failure Outrigger reset= 86400 actions= restart/5000/restart/10000/restart/60000' \
    'SvcFailureFlag	3170	.*failureflag Outrigger 1' 'SvcSidType	3170	.*sidtype Outrigger unrestricted' \
    'AclCerts	3170	.*icacls.exe" "\[CERTSDIR\]." /inheritance:r' 'AclLogs	3170	.*icacls.exe" "\[LOGSDIR\]." /grant'; do
  echo "$ca" | match "^$a" || fail "the MSI lacks the custom action $a"
done
comp="$(msiinfo export "$msi" Component | tr -d '\r' | awk -F'\t' '{print $1 "=" $4}')"
for c in DataDir=272 CertsDir=272 PoliciesDir=272 LogsDir=272 AgentYaml=400; do
  echo "$comp" | match -x "$c" || fail "MSI component attributes: want $c (Permanent; AgentYaml NeverOverwrite)"
done
ok "MSI tables: recovery, SID and ACL custom actions; permanent data folders, never-overwritten agent.yaml"

log "the installed service, started (a certificate from outrigger.exe ca, free ports)"
exe='C:\Program Files\Outrigger\outrigger.exe'
w 60 "$exe" ca init --trust-domain cluster.local --dir 'C:\ProgramData\Outrigger\ca' >/dev/null
w 60 "$exe" ca issue --dir 'C:\ProgramData\Outrigger\ca' \
  --spiffe spiffe://cluster.local/ns/legacy/sa/legacy-app --out 'C:\ProgramData\Outrigger\certs' >/dev/null
[ -s "$pd/certs/key.pem" ] || fail "outrigger.exe ca issue wrote no key"
# The shipped configuration with the test's own free ports.
read -r p_in p_admin < <(python3 -c 'import socket
s=[socket.socket() for _ in range(2)]
[x.bind(("127.0.0.1",0)) for x in s]
print(*[x.getsockname()[1] for x in s])')
sed -i "s/0\.0\.0\.0:8080/127.0.0.1:$p_in/; s/127\.0\.0\.1:15000/127.0.0.1:$p_admin/" "$pd/agent.yaml"
w 120 "$exe" service start || fail "outrigger service start (the service the MSI registered)"
ready=""
for _ in $(seq 1 60); do
  if curl -fsS -m 2 "http://127.0.0.1:$p_admin/healthz/ready" >/dev/null 2>&1; then ready=yes; break; fi
  sleep 1
done
[ -n "$ready" ] || { w 30 "$exe" service status || true; cat "$pd/logs/agent.log" 2>/dev/null | tail -20; fail "the service never became ready"; }
ok "the MSI's service runs: /healthz/ready on 127.0.0.1:$p_admin"
w 120 "$exe" service stop || fail "outrigger service stop"
echo "# edited by the administrator" >>"$pd/agent.yaml"

log "msiexec /x: the service and program files go, the data stays"
timeout 300 "$WINE" msiexec /x 'C:\outrigger.msi' /qn /l*v 'C:\msi-uninstall.log' \
  || { iconv -f utf-16 -t utf-8 "$c/msi-uninstall.log" 2>/dev/null | tail -40 || true; fail "msiexec /x failed"; }
timeout 60 "$WINESERVER" -w || true
if w 60 reg query "$svckey" | match ImagePath; then fail "the service is still registered"; fi
if w 60 reg query "$evkey" | match EventMessageFile; then fail "the Event Log source is still registered"; fi
[ ! -e "$pf/outrigger.exe" ] || fail "outrigger.exe left behind"
grep -q 'edited by the administrator' "$pd/agent.yaml" || fail "uninstall removed or replaced agent.yaml"
[ -s "$pd/certs/key.pem" ] && [ -d "$pd/policies" ] && [ -s "$pd/logs/agent.log" ] \
  || fail "uninstall removed certificates, policies or logs"
ok "uninstalled: service and Event Log source removed, ProgramData\\Outrigger (config, certs, policies, logs) kept"

# 6. Checksums and SBOMs.
log "SHA256SUMS and SBOMs"
(cd "$DIST" && sha256sum --quiet -c SHA256SUMS) || fail "SHA256SUMS does not match"
[ "$(wc -l <"$DIST/SHA256SUMS")" -eq "$(find "$DIST" -maxdepth 1 -type f ! -name SHA256SUMS | wc -l)" ] \
  || fail "SHA256SUMS does not list every artifact"
for s in linux windows; do
  python3 - "$DIST/outrigger-$VERSION-$s.cdx.json" <<'PY' || fail "SBOM $s"
import json, sys
d = json.load(open(sys.argv[1]))
assert d["bomFormat"] == "CycloneDX", d.get("bomFormat")
names = {c["name"] for c in d.get("components", [])}
for n in ("rustls", "tokio", "aws-lc-rs"):
    assert n in names, f"{n} not in the SBOM"
# What ships, not what builds or tests: no dev-dependencies; the Windows service crates on
# Windows only.
for n in ("proptest", "criterion", "outrigger-testkit"):
    assert n not in names, f"dev-dependency {n} in the SBOM"
assert ("windows-service" in names) == sys.argv[1].endswith("windows.cdx.json"), "windows-service"
assert all(c.get("hashes") for c in d["components"] if not c["name"].startswith("outrigger")), "hashes"
print(f"  {sys.argv[1].rsplit('/', 1)[1]}: CycloneDX {d['specVersion']}, {len(names)} components")
PY
done
ok "SHA256SUMS verifies; SBOMs list the dependencies"

log "package tests passed in $(( $(date +%s) - started ))s"
