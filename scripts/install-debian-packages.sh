#!/usr/bin/env bash
# Installs the Debian packages listed in $1 (one per line, '#' comments) that are missing.
set -euo pipefail
list=$1
mapfile -t wanted < <(sed 's/#.*//' "$list" | awk 'NF {print $1}')
missing=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "flowtap set-up: missing Debian packages: ${missing[*]}; run as root or install them with apt-get" >&2
  exit 2
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
