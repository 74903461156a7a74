#!/usr/bin/env bash
# Installs the system packages and Go-built servers the project (and its tests) need.
#
# Idempotent and fast when everything is present (one dpkg query + stamp checks, well under 1 s):
# `make setup` / `make test` run it every time. Any failure is loud (non-zero exit): CI must never
# run with a component silently missing.
#
#   apt (Debian 12):  libsndfile1 (soundfile), libopus-dev libopusfile-dev libsoxr-dev pkg-config
#                     (CGO build of livekit-sip), chromium (browser tests, fake microphone) with a
#                     CJK font (the transcript renders Chinese in screenshots),
#                     redis-server (LiveKit/SIP bus in tests), espeak-ng + sox (real synthetic
#                     speech), sip-tester (= sipp) and baresip (SIP peers for telephony tests)
#   Go -> .tools/bin: livekit-server (SFU, run as `livekit-server --dev` by the tests) and
#                     livekit-sip (LiveKit's SIP bridge); a version stamp in .tools/stamps/ skips
#                     a rebuild when the right version is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

LIVEKIT_SERVER_VERSION=v1.13.5
# livekit/sip: v1.8.0 is the newest release the Go module proxy serves here (v1.9.0 .. v1.11.0
# answer 403 "This module version is not available").
LIVEKIT_SIP_VERSION=v1.8.0

TOOLS_BIN=$ROOT/.tools/bin
STAMPS=$ROOT/.tools/stamps

APT_PACKAGES=(
  libsndfile1
  libopus-dev libopusfile-dev libsoxr-dev pkg-config
  chromium fonts-wqy-microhei
  redis-server
  espeak-ng sox
  sip-tester baresip
)
# Commands that must exist afterwards (checked only after an install, to keep the no-op path fast).
REQUIRED_COMMANDS=(chromium redis-server espeak-ng sox sipp baresip pkg-config)

log() { echo "[system-deps] $*" >&2; }
die() { echo "[system-deps] ERROR: $*" >&2; exit 1; }
trap 'rc=$?; [ $rc -eq 0 ] || echo "[system-deps] FAILED (exit $rc)" >&2' EXIT

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || die "not root and no sudo: cannot install system packages"
  SUDO="sudo"
fi

# ---------------------------------------------------------------- apt packages
missing=()
# One dpkg-query for all packages; a package is present only when its status is "install ok installed".
status=$(dpkg-query -W -f='${Package} ${Status}\n' "${APT_PACKAGES[@]}" 2>/dev/null || true)
for pkg in "${APT_PACKAGES[@]}"; do
  grep -qx "$pkg install ok installed" <<<"$status" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install manually: ${missing[*]}"
  t0=$SECONDS
  log "apt: installing ${missing[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
  # Fail clearly if a package is not in this distribution's archive.
  for pkg in "${missing[@]}"; do
    cand=$(apt-cache policy "$pkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
    [ -n "$cand" ] && [ "$cand" != "(none)" ] || die "apt package '$pkg' is not available in this distribution"
  done
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
    --no-install-recommends "${missing[@]}" >/dev/null
  log "apt: done in $((SECONDS - t0)) s"
  for cmd in "${REQUIRED_COMMANDS[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' still missing after apt install"
  done
fi

# ---------------------------------------------------------------- Go-built servers
# Each server is built from its Go module through the module proxy, inside a throw-away wrapper
# module (`go mod init; go get PKG@VERSION; go build`). This resolves exactly the versions the
# server's own go.mod asks for, like `go install PKG@VERSION`, but does not need the proxy's
# version list (`go install` fetches it to look for deprecations, and the proxy here refuses the
# list for github.com/livekit/sip).
go_tool() {  # go_tool NAME VERSION PACKAGE CGO_ENABLED
  local name=$1 version=$2 pkg=$3 cgo=$4
  local bin=$TOOLS_BIN/$name stamp=$STAMPS/$name
  if [ -x "$bin" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$version" ]; then
    return 0
  fi
  command -v go >/dev/null 2>&1 || die "go not found (needed to build $name $version)"
  mkdir -p "$TOOLS_BIN" "$STAMPS"
  local tmp t0=$SECONDS
  tmp=$(mktemp -d "$ROOT/.tools/build-$name.XXXXXX")
  log "go: building $name $version from $pkg@$version (CGO_ENABLED=$cgo; a few minutes on 2 cores)"
  if ! (
    cd "$tmp"
    export CGO_ENABLED=$cgo GOFLAGS="-buildvcs=false -mod=mod"
    go mod init sg2-live-tools/"$name"
    go get "$pkg@$version"
    go build -o "$tmp/$name" "$pkg"
  ) >"$tmp/build.log" 2>&1; then
    grep -v '^go: \(downloading\|added\) ' "$tmp/build.log" >&2 || true
    rm -rf "$tmp"
    die "building $name $version ($pkg@$version) failed"
  fi
  rm -f "$stamp"
  mv -f "$tmp/$name" "$bin"
  rm -rf "$tmp"
  echo "$version" >"$stamp"
  log "go: $name $version built in $((SECONDS - t0)) s -> .tools/bin/$name"
}

go_tool livekit-server "$LIVEKIT_SERVER_VERSION" github.com/livekit/livekit-server/cmd/server 0
go_tool livekit-sip "$LIVEKIT_SIP_VERSION" github.com/livekit/sip/cmd/livekit-sip 1
