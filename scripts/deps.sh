#!/bin/bash
# Install what vtpmd's build, tests, demo and benchmarks need on Debian 12, idempotently.
set -euo pipefail
pkgs=(libtpms-dev pkg-config swtpm swtpm-tools qemu-system-x86 ovmf tpm2-tools libtss2-tcti-swtpm0 libtss2-tcti-device0
      socat busybox-static openssl libvirt-daemon-system libvirt-clients)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "installing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
