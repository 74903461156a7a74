#!/usr/bin/env bash
# Installs the system packages and Go-built servers the project needs.
# Idempotent: each piece is skipped when already present. Grows with the transports.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in libsndfile1; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
