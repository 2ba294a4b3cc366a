#!/bin/bash
# Demo: provision a vTPM, boot a small Linux guest under QEMU (TCG, OVMF) against `vtpmd socket`,
# and print what the guest saw through /dev/tpm0.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
bin=$top/bin/vtpmd
[ -x "$bin" ] || go build -o "$bin" ./cmd/vtpmd
guest=$(scripts/build-guest.sh)
W=$(mktemp -d /tmp/vtpmd-demo.XXXXXX)
mkdir -p "$W/state" "$W/links" "$W/ca"
ln -s "$bin" "$W/links/swtpm"
echo "== 1. manufacturing the vTPM (EK + certificates) into $W/state"
cat > "$W/ca/swtpm-localca.conf" <<CONF
statedir = $W/ca
signingkey = $W/ca/signkey.pem
issuercert = $W/ca/issuercert.pem
certserial = $W/ca/certserial
CONF
cat > "$W/swtpm_setup.conf" <<CONF
create_certs_tool = /usr/bin/swtpm_localca
create_certs_tool_config = $W/ca/swtpm-localca.conf
create_certs_tool_options = /etc/swtpm-localca.options
active_pcr_banks = sha256
CONF
setup_ok=0
if "$bin" setup --tpm2 --tpm-state "$W/state" --vmid demo:00000000-0000-4000-8000-000000000001 --config "$W/swtpm_setup.conf" \
     --createek --create-ek-cert --create-platform-cert --lock-nvram --logfile "$W/setup.log" >/dev/null 2>&1; then
  setup_ok=1; echo "   vtpmd setup: done"
elif PATH="$W/links:$PATH" swtpm_setup --tpm2 --tpm-state "$W/state" --vmid demo --config "$W/swtpm_setup.conf" \
     --createek --create-ek-cert --create-platform-cert --lock-nvram --logfile "$W/setup.log" >/dev/null 2>&1; then
  setup_ok=1; echo "   Debian swtpm_setup driving vtpmd (as its 'swtpm'): done"
else
  echo "   provisioning failed (see $W/setup.log); booting with an unprovisioned TPM"
fi
echo "== 2. starting vtpmd socket (the process QEMU talks to)"
"$bin" socket --tpm2 --tpmstate dir="$W/state" --ctrl type=unixio,path="$W/ctrl.sock" --log file="$W/vtpmd.log" --terminate &
for _ in $(seq 100); do [ -S "$W/ctrl.sock" ] && break; sleep 0.05; done
echo "== 3. booting the guest (QEMU, TCG, OVMF, tpm-crb); this takes ~15 s without KVM"
cp /usr/share/OVMF/OVMF_VARS_4M.fd "$W/vars.fd"
timeout 300 qemu-system-x86_64 -machine q35,accel=tcg -m 512 -smp 1 -nographic -nodefaults -no-reboot \
  -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
  -drive if=pflash,format=raw,unit=1,file="$W/vars.fd" \
  -kernel "$guest/vmlinuz" -initrd "$guest/initrd.gz" -append 'console=ttyS0 panic=-1 quiet' \
  -chardev socket,id=chrtpm,path="$W/ctrl.sock" -tpmdev emulator,id=tpm0,chardev=chrtpm \
  -device tpm-crb,tpmdev=tpm0 -serial file:"$W/serial.log" >/dev/null 2>&1 || true
wait || true
S=$(tr -d '\r' < "$W/serial.log")
val() { printf '%s\n' "$S" | sed -n "s/^GUEST: $1=//p" | tail -1; }
echo
echo "== What the guest saw"
printf '  TPM version        : %s.0 (driver %s)\n' "$(val tpm_version_major)" "$(val driver)"
for i in 0 1 2 3 4 5 6 7 16; do printf '  PCR %-2s (sha256)    : %s\n' "$i" "$(val pcr$i)"; done
printf '  extend PCR16 -> %s (%s)\n' "$(val after_extend_pcr16)" "$([ "$(val extend_ok)" = true ] && echo 'as expected' || echo 'UNEXPECTED')"
ev=$(printf '%s\n' "$S" | sed -n '/^GUEST-BEGIN eventlog/,/^GUEST-END eventlog/p' | sed '1d;$d' | tr -d '\n' | base64 -d 2>/dev/null | wc -c)
printf '  firmware event log : %s bytes (OVMF measured boot)\n' "$ev"
cert=$(printf '%s\n' "$S" | sed -n '/^GUEST-BEGIN ekcert-rsa/,/^GUEST-END ekcert-rsa/p' | sed '1d;$d' | tr -d '\n')
if [ -n "$cert" ]; then
  printf '%s' "$cert" | base64 -d > "$W/ek.der"
  printf '  EK certificate     : %s\n' "$(openssl x509 -inform der -in "$W/ek.der" -noout -subject -issuer | paste -sd ';' -)"
  openssl x509 -inform der -in "$W/ek.der" -out "$W/ek.pem"
  printf '  chain to local CA  : %s\n' "$(openssl verify -CAfile "$W/ca/swtpm-localca-rootca-cert.pem" -untrusted "$W/ca/issuercert.pem" "$W/ek.pem" 2>&1 | sed "s|$W/||")"
else
  echo "  EK certificate     : none"
fi
echo
echo "Work directory (state, logs, serial console): $W"
[ "$(val extend_ok)" = true ]
