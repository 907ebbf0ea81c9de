#!/usr/bin/env bash
# Install the Debian packages given as arguments, but only those missing: a no-op (and no
# `apt-get update`) when everything is already there, so `make` stays fast on a ready machine.
set -euo pipefail
missing=()
for pkg in "$@"; do
  status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
  [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "error: missing Debian packages (${missing[*]}); run as root or install them first" >&2
  exit 3
fi
echo "installing Debian packages: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"
