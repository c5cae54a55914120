# Wine for the Windows tests, shared by scripts/windows-test.sh and scripts/package-test.sh
# (sourced, not run). Needs CARGO_TARGET_DIR set to an absolute path and `log` defined.
#
#   wine_tools              installs mingw-w64's gcc and Wine (Debian packages) when missing
#   wine_prefix DIR         sets WINE, WINESERVER, WINEPREFIX=DIR and the environment below,
#                           creates the prefix if needed and puts the ProcessPrng shim in it
#
# The prefix has no display and no Mono/Gecko installers. Debian 12's Wine 8 lacks
# ProcessPrng, which Rust's std imports: windows/bcryptprimitives-shim provides it
# (windows/README.md), loaded native-first. The caller ends Wine with `wine_stop` (trap).

wine_bin() { command -v wine64 || { [ -x /usr/lib/wine/wine64 ] && echo /usr/lib/wine/wine64; } || true; }

wine_tools() {
  local need_apt=() sudo=""
  command -v x86_64-w64-mingw32-gcc >/dev/null || need_apt+=(gcc-mingw-w64-x86-64)
  [ -n "$(wine_bin)" ] || need_apt+=(wine64)
  if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]} (apt)"
    [ "$(id -u)" = 0 ] || sudo="sudo"
    timeout 600 $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive timeout 900 $sudo apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
  fi
}

wine_prefix() {
  WINE="$(wine_bin)"
  [ -n "$WINE" ] || { echo "error: wine64 not found (wine_tools installs it)" >&2; return 1; }
  echo "wine: $WINE ($("$WINE" --version 2>/dev/null || echo '?'))"
  export WINEPREFIX="$1"
  export WINEDEBUG=-all
  export WINEDLLOVERRIDES="mscoree,mshtml=;bcryptprimitives=n"
  unset DISPLAY
  # Debian keeps wineserver beside wine64 in /usr/lib/wine, off PATH.
  WINESERVER="$(command -v wineserver || echo "$(dirname "$WINE")/wineserver")"
  if [ ! -f "$WINEPREFIX/system.reg" ]; then
    log "creating the Wine prefix $WINEPREFIX"
    timeout 300 "$WINE" wineboot --init >/dev/null 2>&1
    timeout 60 "$WINESERVER" -w || true
  fi
  local shim="$CARGO_TARGET_DIR/x86_64-pc-windows-gnu/bcryptprimitives.dll"
  local src=windows/bcryptprimitives-shim
  mkdir -p "$(dirname "$shim")"
  if [ ! -f "$shim" ] || [ "$src/bcryptprimitives.c" -nt "$shim" ] || [ "$src/bcryptprimitives.def" -nt "$shim" ]; then
    log "building the ProcessPrng shim ($src)"
    x86_64-w64-mingw32-gcc -O2 -Wall -Wextra -Werror -shared -s -o "$shim" \
      "$src/bcryptprimitives.c" "$src/bcryptprimitives.def" -ladvapi32
  fi
  cp "$shim" "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll"
}

# Wine leaves its server and services running for a while; end them.
wine_stop() { [ -z "${WINESERVER:-}" ] || timeout 30 "$WINESERVER" -k 2>/dev/null || true; }
