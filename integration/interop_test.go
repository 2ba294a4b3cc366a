//go:build integration

package integration

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// toolsTPM is an emulator serving tpm2-tools over the tss2 swtpm TCTI (tcp data + control).
type toolsTPM struct {
	t    *testing.T
	cmd  *exec.Cmd
	port int
	work string
}

func startToolsTPM(t *testing.T, bin, state, work string, keyArgs []string) *toolsTPM {
	t.Helper()
	p := freePorts(t)
	args := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + state, "--flags", "not-need-init",
		"--server", fmt.Sprintf("type=tcp,port=%d", p), "--ctrl", fmt.Sprintf("type=tcp,port=%d", p+1)}, keyArgs...)
	tt := &toolsTPM{t: t, cmd: exec.Command(bin, args...), port: p, work: work}
	tt.cmd.Stderr = os.Stderr
	if err := tt.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { // a test that failed before stop() leaves no emulator behind
		if tt.cmd.ProcessState == nil {
			tt.cmd.Process.Kill()
			tt.cmd.Wait()
		}
	})
	time.Sleep(300 * time.Millisecond)
	return tt
}

func (tt *toolsTPM) run(args ...string) string {
	tt.t.Helper()
	c := exec.Command(args[0], args[1:]...)
	c.Dir = tt.work
	c.Env = append(os.Environ(), fmt.Sprintf("TPM2TOOLS_TCTI=swtpm:host=127.0.0.1,port=%d", tt.port))
	out, err := c.CombinedOutput()
	if err != nil {
		tt.t.Fatalf("%v: %v\n%s", args, err, out)
	}
	if args[0] != "tpm2_flushcontext" {
		for _, f := range []string{"-t", "-s"} { // no resource manager on this TCTI
			fc := exec.Command("tpm2_flushcontext", f)
			fc.Env = c.Env
			fc.Run()
		}
	}
	return string(out)
}

// stop shuts the TPM down orderly (TPM2_Shutdown(STATE)) and ends the emulator.
func (tt *toolsTPM) stop() {
	tt.t.Helper()
	tt.run("tpm2_shutdown")
	exec.Command(refSwtpmIoctl(), "--tcp", fmt.Sprintf("127.0.0.1:%d", tt.port+1), "-s").Run()
	done := make(chan error, 1)
	go func() { done <- tt.cmd.Wait() }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		tt.cmd.Process.Kill()
		tt.t.Fatal("emulator did not exit on CMD_SHUTDOWN")
	}
}

// check verifies everything the first emulator created: PCR 10, the NV index, the persistent
// primary key, a sealed object under it (unsealed), and a persistent signing key (sign+verify).
func (tt *toolsTPM) check(pcr10, nv string) {
	tt.t.Helper()
	tt.run("tpm2_startup")
	if out := tt.run("tpm2_pcrread", "sha256:10"); !strings.Contains(strings.ToLower(out), strings.ToLower(pcr10)) {
		tt.t.Fatalf("PCR 10 not restored: %s, want %s", out, pcr10)
	}
	if out := tt.run("tpm2_nvread", "0x1500020", "-C", "o", "-s", fmt.Sprint(len(nv))); out != nv {
		tt.t.Fatalf("NV index: %q, want %q", out, nv)
	}
	tt.run("tpm2_load", "-C", "0x81000001", "-u", "seal.pub", "-r", "seal.priv", "-c", "seal.ctx")
	if out := tt.run("tpm2_unseal", "-c", "seal.ctx"); out != "sealed disk key" {
		tt.t.Fatalf("unseal: %q", out)
	}
	os.WriteFile(filepath.Join(tt.work, "msg"), []byte("attest me "+fmt.Sprint(time.Now().UnixNano())), 0o600)
	tt.run("tpm2_sign", "-c", "0x81000002", "-g", "sha256", "-o", "msg.sig", "msg")
	tt.run("tpm2_verifysignature", "-c", "0x81000002", "-g", "sha256", "-m", "msg", "-s", "msg.sig")
}

// TestStateInteropWithTools: state made by Debian's swtpm 0.7.1 — plain, AES-128 and AES-256
// key files, a passphrase — is used by vtpmd with PCRs, an NV index, persistent keys and a sealed
// object intact (tpm2-tools: pcrread, nvread, unseal, sign + verify), and the state vtpmd then
// writes is used by swtpm the same way.
func TestStateInteropWithTools(t *testing.T) {
	needRefSwtpm(t)
	need(t, "tpm2_unseal", "tpm2_verifysignature")
	keys := t.TempDir()
	os.WriteFile(filepath.Join(keys, "k128"), []byte("00112233445566778899aabbccddeeff\n"), 0o600)
	os.WriteFile(filepath.Join(keys, "k256"), []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"), 0o600)
	os.WriteFile(filepath.Join(keys, "pwd"), []byte("correct horse battery staple\n"), 0o600)
	for _, c := range []struct {
		name string
		key  []string
	}{
		{"plain", nil},
		{"aes-128 key file", []string{"--key", "file=" + keys + "/k128"}},
		{"aes-256 key file", []string{"--key", "file=" + keys + "/k256,mode=aes-256-cbc"}},
		{"passphrase", []string{"--key", "pwdfile=" + keys + "/pwd,mode=aes-256-cbc"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			state, work := t.TempDir(), t.TempDir()
			os.WriteFile(filepath.Join(work, "secret"), []byte("sealed disk key"), 0o600)
			// 1. swtpm creates the objects
			sw := startToolsTPM(t, refSwtpm(), state, work, c.key)
			sw.run("tpm2_startup", "-c")
			sw.run("tpm2_createprimary", "-C", "o", "-c", "prim.ctx")
			sw.run("tpm2_evictcontrol", "-C", "o", "-c", "prim.ctx", "0x81000001")
			sw.run("tpm2_create", "-C", "0x81000001", "-i", "secret", "-u", "seal.pub", "-r", "seal.priv")
			sw.run("tpm2_create", "-C", "0x81000001", "-G", "ecc", "-u", "sign.pub", "-r", "sign.priv")
			sw.run("tpm2_load", "-C", "0x81000001", "-u", "sign.pub", "-r", "sign.priv", "-c", "sign.ctx")
			sw.run("tpm2_evictcontrol", "-C", "o", "-c", "sign.ctx", "0x81000002")
			sw.run("tpm2_nvdefine", "0x1500020", "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
			os.WriteFile(filepath.Join(work, "nv1"), []byte("written by swtpm"), 0o600)
			sw.run("tpm2_nvwrite", "0x1500020", "-C", "o", "-i", "nv1")
			sw.run("tpm2_pcrextend", "10:sha256=1111111111111111111111111111111111111111111111111111111111111111")
			pcr := pcrValue(t, sw.run("tpm2_pcrread", "sha256:10"))
			sw.stop()

			// 2. vtpmd resumes it
			vt := startToolsTPM(t, env.bin, state, work, c.key)
			vt.check(pcr, "written by swtpm")
			os.WriteFile(filepath.Join(work, "nv2"), []byte("written by vtpmd"), 0o600)
			vt.run("tpm2_nvwrite", "0x1500020", "-C", "o", "-i", "nv2")
			vt.run("tpm2_pcrextend", "10:sha256=2222222222222222222222222222222222222222222222222222222222222222")
			pcr2 := pcrValue(t, vt.run("tpm2_pcrread", "sha256:10"))
			vt.stop()

			// 3. swtpm resumes what vtpmd wrote
			sw2 := startToolsTPM(t, refSwtpm(), state, work, c.key)
			sw2.check(pcr2, "written by vtpmd")
			sw2.stop()
		})
	}
}

func pcrValue(t *testing.T, out string) string {
	t.Helper()
	for _, line := range strings.Split(out, "\n") {
		if i := strings.Index(line, "0x"); i >= 0 && strings.Contains(line, "10") {
			return strings.TrimSpace(line[i:])
		}
	}
	t.Fatalf("no PCR value in %q", out)
	return ""
}
