#!/bin/bash
# Build the tiny TPM test guest: Debian's kernel (tpm_tis and tpm_crb built in) and a busybox
# initramfs whose /init runs the Go guest checker (integration/guest). Cached: the kernel and
# busybox are downloaded once per version; the initramfs is rebuilt when the checker changes.
# Usage: scripts/build-guest.sh [OUTDIR]   (default: .cache/guest)
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
W=${1:-${VTPMD_GUEST_DIR:-$top/.cache/guest}}
mkdir -p "$W/dl"
if [ ! -s "$W/vmlinuz" ] || [ ! -x "$W/x/bin/busybox" ]; then
  rm -rf "$W/x"; mkdir -p "$W/x"
  ( cd "$W/dl"
    apt-get download linux-image-amd64 busybox-static >/dev/null 2>&1
    kpkg=$(dpkg-deb -f linux-image-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,]*' | head -1)
    apt-get download "$kpkg" >/dev/null 2>&1
    dpkg-deb -x "$kpkg"_*.deb "$W/x"
    dpkg-deb -x busybox-static_*.deb "$W/x" )
  cp "$W"/x/boot/vmlinuz-* "$W/vmlinuz"
fi
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,proc,sys,dev}
cp "$W/x/bin/busybox" "$root/bin/busybox"
# tpm2-tools, for the guest modes that use stock tools (deep attestation): the tpm2 binary and
# its tpm2_* links, the shared libraries ldd finds, the dynamic loader, and the device TCTI that
# libtss2-tctildr opens at run time (/dev/tpmrm0, /dev/tpm0)
if [ -x /usr/bin/tpm2 ]; then
  mkdir -p "$root/usr/bin" "$root/tmp"
  cp /usr/bin/tpm2 "$root/usr/bin/tpm2"
  for l in /usr/bin/tpm2_*; do ln -s tpm2 "$root/usr/bin/${l##*/}"; done
  tcti=$(/sbin/ldconfig -p | awk '/libtss2-tcti-device\.so\.0 / && !p {p = $NF} END {print p}')  # reads to the end: no SIGPIPE under pipefail
  [ -n "$tcti" ] || { echo "build-guest: libtss2-tcti-device not found (apt-get install libtss2-tcti-device0)" >&2; exit 1; }
  for f in $( (ldd /usr/bin/tpm2; ldd "$tcti"; echo "$tcti") | grep -o '/[^ ]*' | sort -u); do
    cp -L --parents "$f" "$root"
  done
fi
(cd "$top" && CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$root/bin/guest" ./integration/guest)
cat > "$root/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t securityfs securityfs /sys/kernel/security 2>/dev/null
echo "GUEST: booted uptime=$(cut -d' ' -f1 /proc/uptime)"
/bin/guest
echo "GUEST: poweroff"
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | "$W/x/bin/busybox" cpio -o -H newc 2>/dev/null | gzip -1 > "$W/initrd.gz.tmp")
mv "$W/initrd.gz.tmp" "$W/initrd.gz"
echo "$W"
