// Command guest runs inside the tiny integration-test VM (packed into its initramfs by
// scripts/build-guest.sh). It talks to /dev/tpm0 and prints what it saw as "GUEST: key=value"
// lines on the serial console for the tests to parse.
package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/linuxtpm"

	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

func say(k string, v any) { fmt.Printf("GUEST: %s=%v\n", k, v) }

func blob(name string, b []byte) {
	fmt.Printf("GUEST-BEGIN %s\n", name)
	s := base64.StdEncoding.EncodeToString(b)
	for len(s) > 76 {
		fmt.Println(s[:76])
		s = s[76:]
	}
	fmt.Println(s)
	fmt.Printf("GUEST-END %s\n", name)
}

func main() {
	cmdline, _ := os.ReadFile("/proc/cmdline")
	modes := strings.Fields(string(cmdline))
	has := func(m string) bool {
		for _, x := range modes {
			if x == m {
				return true
			}
		}
		return false
	}
	ver, _ := os.ReadFile("/sys/class/tpm/tpm0/tpm_version_major")
	say("tpm_version_major", strings.TrimSpace(string(ver)))
	if drv, err := os.Readlink("/sys/class/tpm/tpm0/device/driver"); err == nil {
		say("driver", filepath.Base(drv))
	}
	if strings.TrimSpace(string(ver)) != "2" {
		if caps, err := os.ReadFile("/sys/class/tpm/tpm0/device/caps"); err == nil {
			say("tpm12_caps", strings.ReplaceAll(strings.TrimSpace(string(caps)), "\n", "; "))
		}
		say("done", "tpm12")
		return
	}
	t, err := linuxtpm.Open("/dev/tpmrm0")
	if err != nil {
		say("error", err)
		return
	}
	defer t.Close()
	var tp transport.TPM = tpmclient.SendFunc(t.Send)
	for _, p := range []uint{0, 1, 2, 3, 4, 5, 6, 7, 16} {
		v, err := tpmclient.PCRRead(tp, p)
		if err != nil {
			say("error", fmt.Sprintf("PCR_Read %d: %v", p, err))
			return
		}
		say(fmt.Sprintf("pcr%d", p), fmt.Sprintf("%X", v))
	}
	if b, err := os.ReadFile("/sys/kernel/security/tpm0/binary_bios_measurements"); err == nil && len(b) > 0 {
		blob("eventlog", b)
	}
	if cert, err := readNV(tp, 0x01c00002); err == nil {
		blob("ekcert-rsa", cert)
	} else {
		say("ekcert-rsa", "none")
	}
	if cert, err := readNV(tp, 0x01c00016); err == nil {
		blob("ekcert-ecc", cert)
	}
	projectionChecks(tp, modes)
	if has("attest") {
		deepAttest(modes)
	}
	a := bytes.Repeat([]byte("A"), 32)
	if has("nvmark") {
		// persistent marker: define once, then count boots in it
		const idx = 0x01500099
		old, err := tpmclient.NVRead(tp, idx, 8, 0)
		if err != nil {
			if err := tpmclient.NVDefine(tp, idx, 8); err != nil {
				say("error", err)
			}
			old = make([]byte, 8)
		}
		say("nvmark_before", fmt.Sprintf("%x", old))
		old[7]++
		if err := tpmclient.NVWrite(tp, idx, old, 0); err != nil {
			say("error", err)
		}
		say("nvmark_after", fmt.Sprintf("%x", old))
	}
	if has("migloop") {
		migLoop(tp)
	}
	if has("tpmloop") {
		for n := 1; ; n++ {
			if err := tpmclient.PCRExtend(tp, 16, a); err != nil {
				say("error", err)
			}
			v, _ := tpmclient.PCRRead(tp, 16)
			fmt.Printf("GUEST: iter=%d PCR16=%X\n", n, v)
			time.Sleep(time.Second)
		}
	}
	if err := tpmclient.PCRExtend(tp, 16, a); err != nil {
		say("error", err)
	}
	v, _ := tpmclient.PCRRead(tp, 16)
	want := sha256.Sum256(append(make([]byte, 32), a...))
	say("after_extend_pcr16", fmt.Sprintf("%X", v))
	say("extend_ok", bytes.Equal(v, want[:]))
	if has("hang") {
		for {
			time.Sleep(time.Hour)
		}
	}
	say("done", "tpm2")
}

func readNV(tp transport.TPM, idx uint32) ([]byte, error) {
	pub, err := tpm2.NVReadPublic{NVIndex: tpm2.TPMHandle(idx)}.Execute(tp)
	if err != nil {
		return nil, err
	}
	p, err := pub.NVPublic.Contents()
	if err != nil {
		return nil, err
	}
	var out []byte
	for off := uint16(0); off < p.DataSize; {
		n := min(p.DataSize-off, 1024)
		r, err := tpm2.NVRead{
			AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMHandle(idx), Name: pub.NVName, Auth: tpm2.PasswordAuth(nil)},
			NVIndex:    tpm2.NamedHandle{Handle: tpm2.TPMHandle(idx), Name: pub.NVName},
			Size:       n, Offset: off,
		}.Execute(tp)
		if err != nil {
			return nil, err
		}
		out = append(out, r.Data.Buffer...)
		off += n
	}
	return out, nil
}
