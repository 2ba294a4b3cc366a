//go:build integration

package integration

// Drop-in gaps of the state layer (issue 10, items 1, 4 and 9), each against Debian's swtpm
// 0.7.1 side by side where it can be: state files of early swtpm releases (a libtpms blob
// without swtpm's header), a missing file:// state (formatted when the backend is opened;
// swtpm_setup relies on it), and a FIFO where a state file belongs (refused at once; SIGTERM
// ends a slow start).

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	gotpm "github.com/google/go-tpm/tpm2"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// scKeys are the key files of these tests (hex, as swtpm's --key file= reads them).
type scKeys struct{ k128, k256, other128 string }

func scMakeKeys(t *testing.T) scKeys {
	t.Helper()
	dir := t.TempDir()
	k := scKeys{filepath.Join(dir, "k128"), filepath.Join(dir, "k256"), filepath.Join(dir, "other128")}
	os.WriteFile(k.k128, []byte("00112233445566778899aabbccddeeff\n"), 0o600)
	os.WriteFile(k.k256, []byte("00112233445566778899aabbccddeeff0123456789abcdeffedcba9876543210\n"), 0o600)
	os.WriteFile(k.other128, []byte("ffeeddccbbaa99887766554433221100\n"), 0o600)
	return k
}

// scLoadKey reads one of scKeys' files.
func scLoadKey(t *testing.T, file string, mode string) *blob.Key {
	t.Helper()
	opt := "file=" + file
	if mode != "" {
		opt += ",mode=" + mode
	}
	spec, err := blob.ParseKeyOption(opt)
	if err != nil {
		t.Fatal(err)
	}
	k, err := blob.LoadKey(spec)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// scLegacyEncrypt is how early swtpm releases encrypted a state file, stored without a header:
// AES-CBC with a zero IV over SHA256(blob) || blob, padded to the key length.
func scLegacyEncrypt(t *testing.T, k *blob.Key, plain []byte) []byte {
	t.Helper()
	sum := sha256.Sum256(plain)
	p := append(sum[:], plain...)
	pad := k.Len() - len(p)%k.Len()
	p = append(p, bytes.Repeat([]byte{byte(pad)}, pad)...)
	c, err := aes.NewCipher(k.Bytes())
	if err != nil {
		t.Fatal(err)
	}
	cipher.NewCBCEncrypter(c, make([]byte, aes.BlockSize)).CryptBlocks(p, p)
	return p
}

// scEmu is a running emulator (Debian's swtpm or vtpmd) with unixio control and data sockets.
type scEmu struct {
	t          *testing.T
	bin        string
	cmd        *exec.Cmd
	ctrl, data string
	out        *scBuffer
	done       chan struct{}
}

type scBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *scBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *scBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

func scIsVtpmd(bin string) bool { return bin == env.bin }

// scName names an emulator binary in messages.
func scName(bin string) string {
	if scIsVtpmd(bin) {
		return "vtpmd"
	}
	return "swtpm"
}

// scStart starts "<bin> socket" on a state (a dir:// path or a file:// URI) with the extra
// arguments, and waits for both sockets. vtpmd is told not to ask a host manager (another
// test may run one at the default socket).
func scStart(t *testing.T, bin string, tpm2 bool, state string, extra ...string) *scEmu {
	t.Helper()
	sock, err := os.MkdirTemp("", "vtpmd-sc-") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	e := &scEmu{t: t, bin: bin, ctrl: filepath.Join(sock, "c"), data: filepath.Join(sock, "d"), out: &scBuffer{}, done: make(chan struct{})}
	tpmstate := "dir=" + state
	if strings.HasPrefix(state, "file://") {
		tpmstate = "backend-uri=" + state
	}
	args := []string{"socket", "--tpmstate", tpmstate, "--ctrl", "type=unixio,path=" + e.ctrl, "--server", "type=unixio,path=" + e.data}
	if tpm2 {
		args = append(args, "--tpm2")
	}
	args = append(args, extra...)
	if scIsVtpmd(bin) {
		args = append(args, "--manager", "none")
	}
	e.cmd = exec.Command(bin, args...)
	e.cmd.Stdout, e.cmd.Stderr = e.out, e.out
	if err := e.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { e.cmd.Wait(); close(e.done) }()
	t.Cleanup(e.stop)
	for i := 0; i < 500; i++ {
		_, errC := os.Stat(e.ctrl)
		_, errD := os.Stat(e.data)
		if errC == nil && errD == nil {
			return e
		}
		select {
		case <-e.done:
			t.Fatalf("%s %v exited: %s", scName(bin), args, e.out)
		case <-time.After(10 * time.Millisecond):
		}
	}
	t.Fatalf("%s: no sockets after 5 s: %s", scName(bin), e.out)
	return nil
}

// ioctl runs Debian's swtpm_ioctl against the control socket; it returns the output and
// whether it succeeded.
func (e *scEmu) ioctl(args ...string) (string, bool) {
	c := exec.Command(refSwtpmIoctl(), append([]string{"--unix", e.ctrl}, args...)...)
	out, err := c.CombinedOutput()
	return strings.TrimSpace(string(out)), err == nil
}

// conn connects to the data socket (it may listen a little after the control socket).
func (e *scEmu) conn() net.Conn {
	e.t.Helper()
	var c net.Conn
	var err error
	for i := 0; i < 300; i++ {
		if c, err = net.Dial("unix", e.data); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		e.t.Fatalf("%s data socket: %v", scName(e.bin), err)
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	e.t.Cleanup(func() { c.Close() })
	return c
}

// stop sends CMD_SHUTDOWN and waits; it kills the process after 5 s.
func (e *scEmu) stop() {
	select {
	case <-e.done:
		return
	default:
	}
	exec.Command(refSwtpmIoctl(), "--unix", e.ctrl, "-s").Run()
	select {
	case <-e.done:
	case <-time.After(5 * time.Second):
		e.cmd.Process.Kill()
		<-e.done
	}
}

const (
	scNV2  = 0x01500043 // the TPM 2 NV index the tests write
	scNV12 = 0x00011000 // the TPM 1.2 NV index (no owner, NV not locked: no authorization)
)

// scSend12 sends raw TPM 1.2 commands; rc is the response code.
func scSend12(t *testing.T, c net.Conn, ord uint32, params ...[]byte) (rc uint32, body []byte) {
	t.Helper()
	rsp, err := tpmclient.RoundTrip(c, tpmwire.Command(0x00c1, ord, params...))
	if err != nil {
		t.Fatalf("TPM 1.2 ordinal %#x: %v", ord, err)
	}
	rc, err = tpmwire.ResponseCode(rsp)
	if err != nil {
		t.Fatal(err)
	}
	return rc, rsp[10:]
}

// scDefineNV12 defines scNV12 (16 bytes, owner-write, which an unlocked NV does not enforce).
func scDefineNV12(t *testing.T, c net.Conn) {
	t.Helper()
	pcrShort := append([]byte{0, 3, 0, 0, 0, 0x1f}, make([]byte, 20)...)
	pub := tpmwire.U16(0x0018) // TPM_TAG_NV_DATA_PUBLIC
	pub = append(pub, tpmwire.U32(scNV12)...)
	pub = append(pub, pcrShort...)
	pub = append(pub, pcrShort...)
	pub = append(pub, tpmwire.U16(0x0017)...) // TPM_TAG_NV_ATTRIBUTES
	pub = append(pub, tpmwire.U32(2)...)      // TPM_NV_PER_OWNERWRITE
	pub = append(pub, 0, 0, 0)
	pub = append(pub, tpmwire.U32(16)...)
	if rc, _ := scSend12(t, c, 0xcc, pub, make([]byte, 20)); rc != 0 {
		t.Fatalf("TPM_NV_DefineSpace: %#x", rc)
	}
}

// scWriteNV writes data to the test NV index.
func scWriteNV(t *testing.T, c net.Conn, tpm2 bool, data []byte) {
	t.Helper()
	if tpm2 {
		if err := tpmclient.NVWrite(tpmclient.Stream(c), scNV2, data, 0); err != nil {
			t.Fatalf("NV_Write: %v", err)
		}
		return
	}
	if rc, _ := scSend12(t, c, 0xcd, tpmwire.U32(scNV12), tpmwire.U32(0), tpmwire.U32(uint32(len(data))), data); rc != 0 {
		t.Fatalf("TPM_NV_WriteValue: %#x", rc)
	}
}

// scObservation is what a started emulator shows of a state: whether CMD_INIT succeeded and
// the TPM answered, its EK (TPM 2: the public area persisted at 0x81010001; TPM 1.2:
// TPM_ReadPubek) and the test NV index.
type scObservation struct {
	ok      bool
	initOut string
	ek, nv  []byte
	conn    net.Conn // the data connection, open (swtpm serves one at a time)
}

// scObserve INITs a started emulator and reads the EK and the NV index.
func scObserve(t *testing.T, e *scEmu, tpm2 bool) scObservation {
	t.Helper()
	out, ok := e.ioctl("-i")
	o := scObservation{initOut: out}
	if !ok {
		return o
	}
	c := e.conn()
	o.conn = c
	if tpm2 {
		tpm := tpmclient.Stream(c)
		if err := tpmclient.Startup(tpm); err != nil {
			o.initOut += fmt.Sprintf(" (Startup: %v)", err)
			return o
		}
		r, err := gotpm.ReadPublic{ObjectHandle: gotpm.TPMHandle(0x81010001)}.Execute(tpm)
		if err != nil {
			o.initOut += fmt.Sprintf(" (ReadPublic: %v)", err)
			return o
		}
		o.ek = r.OutPublic.Bytes()
		if o.nv, err = tpmclient.NVRead(tpm, scNV2, 16, 0); err != nil {
			o.initOut += fmt.Sprintf(" (NV_Read: %v)", err)
			return o
		}
	} else {
		send := provision.Send12(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(c, cmd) })
		if err := provision.Startup12(send); err != nil {
			o.initOut += fmt.Sprintf(" (TPM_Startup: %v)", err)
			return o
		}
		rc, body := scSend12(t, c, 0x7c, bytes.Repeat([]byte{7}, 20))
		if rc != 0 {
			o.initOut += fmt.Sprintf(" (TPM_ReadPubek: %#x)", rc)
			return o
		}
		o.ek = body[:len(body)-20] // TPM_PUBKEY, then the checksum over it and the nonce
		rc, body = scSend12(t, c, 0xcf, tpmwire.U32(scNV12), tpmwire.U32(0), tpmwire.U32(16))
		if rc != 0 || len(body) < 4 {
			o.initOut += fmt.Sprintf(" (TPM_NV_ReadValue: %#x)", rc)
			return o
		}
		o.nv = body[4:]
	}
	o.ok = true
	return o
}

// scPermName is the permall file of the TPM family.
func scPermName(tpm2 bool) string {
	if tpm2 {
		return "tpm2-00.permall"
	}
	return "tpm-00.permall"
}

// scMakeState makes a TPM's state the way an early swtpm's user had it: swtpm_setup
// --createek (Debian's), then an NV index written through Debian's swtpm. It returns the
// state's permall as swtpm stores it now and the libtpms blob inside it, and what swtpm shows
// of it.
func scMakeState(t *testing.T, tpm2 bool) (stored, raw []byte, ref scObservation) {
	t.Helper()
	state := t.TempDir()
	args := []string{"--tpm-state", state, "--createek", "--tpm", refSwtpm() + " socket"}
	if tpm2 {
		args = append(args, "--tpm2")
	}
	if out, err := exec.Command(refSwtpmSetup(), args...).CombinedOutput(); err != nil {
		t.Fatalf("Debian's swtpm_setup: %v\n%s", err, out)
	}
	sw := scStart(t, refSwtpm(), tpm2, state)
	if _, ok := sw.ioctl("-i"); !ok {
		t.Fatalf("swtpm INIT on swtpm_setup's state: %s", sw.out)
	}
	c := sw.conn()
	nv := []byte("old format state")
	if tpm2 {
		tpm := tpmclient.Stream(c)
		if err := tpmclient.Startup(tpm); err != nil {
			t.Fatal(err)
		}
		if err := tpmclient.NVDefine(tpm, scNV2, 16); err != nil {
			t.Fatal(err)
		}
	} else {
		send := provision.Send12(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(c, cmd) })
		if err := provision.Startup12(send); err != nil {
			t.Fatal(err)
		}
		scDefineNV12(t, c)
	}
	scWriteNV(t, c, tpm2, nv)
	c.Close()
	sw.stop()
	stored, err := os.ReadFile(filepath.Join(state, scPermName(tpm2)))
	if err != nil {
		t.Fatal(err)
	}
	if raw, err = blob.Open(stored, nil); err != nil {
		t.Fatal(err)
	}
	if raw[0] != 0 {
		t.Fatalf("libtpms blob begins with %#x", raw[0])
	}
	// what swtpm shows of the current-format state is the reference
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, scPermName(tpm2)), stored, 0o600)
	ref = scObserve(t, scStart(t, refSwtpm(), tpm2, dir), tpm2)
	if !ref.ok || !bytes.Equal(ref.nv, nv) {
		t.Fatalf("swtpm on its own state: %+v", ref)
	}
	return stored, raw, ref
}

// refSwtpmSetup is Debian's swtpm_setup (SWTPM_SETUP_BIN overrides).
func refSwtpmSetup() string { return envOr("SWTPM_SETUP_BIN", "/usr/bin/swtpm_setup") }

// TestOldFormatStateFiles: state files of early swtpm releases, a libtpms blob stored without
// swtpm's header (plain, or AES-CBC with a zero IV over SHA256 || blob under --key, 128 and 256
// bits), TPM 2 and 1.2, load in vtpmd exactly when they load in Debian's swtpm 0.7.1, with the
// same EK and NV; wrong keys, and truncated or tampered current-format files, are refused by
// both. Loaded old files are written back in the current format at the next write, by both,
// and each loads what the other wrote.
func TestOldFormatStateFiles(t *testing.T) {
	needRefSwtpm(t)
	need(t, refSwtpmSetup())
	keys := scMakeKeys(t)
	k128, k256 := scLoadKey(t, keys.k128, ""), scLoadKey(t, keys.k256, "aes-256-cbc")
	arg128 := []string{"--key", "file=" + keys.k128}
	arg256 := []string{"--key", "file=" + keys.k256 + ",mode=aes-256-cbc"}
	argOther := []string{"--key", "file=" + keys.other128}
	for _, tpm2 := range []bool{true, false} {
		family := map[bool]string{true: "TPM 2", false: "TPM 1.2"}[tpm2]
		t.Run(family, func(t *testing.T) {
			stored, raw, ref := scMakeState(t, tpm2)
			cur128, err := blob.Seal(raw, k128)
			if err != nil {
				t.Fatal(err)
			}
			flip := func(b []byte, i int) []byte { b = bytes.Clone(b); b[i] ^= 0x10; return b }
			totlenPlus := bytes.Clone(stored)
			binary.BigEndian.PutUint32(totlenPlus[6:], uint32(len(stored)+1))
			for _, c := range []struct {
				name  string
				file  []byte
				args  []string
				loads bool
				flags uint16 // header flags of the file written back
			}{
				{"old plain", raw, nil, true, 0},
				{"old aes-128", scLegacyEncrypt(t, k128, raw), arg128, true, blob.FlagEncrypted},
				{"old aes-256", scLegacyEncrypt(t, k256, raw), arg256, true, blob.FlagEncrypted | blob.FlagEncrypted256},
				{"old aes-128 with another key", scLegacyEncrypt(t, k128, raw), argOther, false, 0},
				{"old aes-256 with a 128-bit key", scLegacyEncrypt(t, k256, raw), arg128, false, 0},
				{"old aes-128 with no key", scLegacyEncrypt(t, k128, raw), nil, false, 0},
				{"old plain with a key", raw, arg128, false, 0},
				{"old aes-128 with a bit flipped", flip(scLegacyEncrypt(t, k128, raw), 100), arg128, false, 0},
				{"old aes-128 truncated", scLegacyEncrypt(t, k128, raw)[:len(raw)-16], arg128, false, 0},
				{"current plain truncated", stored[:len(stored)-100], nil, false, 0},
				{"current plain with totlen changed", totlenPlus, nil, false, 0},
				{"current aes-128 truncated", cur128[:len(cur128)-7], arg128, false, 0},
				{"current aes-128 with a bit flipped", flip(cur128, len(cur128)/2), arg128, false, 0},
				{"current aes-128 without its header", cur128[blob.HeaderSize:], arg128, false, 0},
			} {
				t.Run(c.name, func(t *testing.T) {
					var obs [2]scObservation
					var dirs [2]string
					for i, bin := range []string{refSwtpm(), env.bin} {
						dirs[i] = t.TempDir()
						p := filepath.Join(dirs[i], scPermName(tpm2))
						if err := os.WriteFile(p, c.file, 0o600); err != nil {
							t.Fatal(err)
						}
						e := scStart(t, bin, tpm2, dirs[i], c.args...)
						obs[i] = scObserve(t, e, tpm2)
						if obs[i].ok {
							// the next write puts the state in the current format
							scWriteNV(t, obs[i].conn, tpm2, []byte("written by "+scName(bin)))
						}
						e.stop()
					}
					sw, vt := obs[0], obs[1]
					if sw.ok != vt.ok {
						t.Fatalf("swtpm loads: %v (%s), vtpmd loads: %v (%s)", sw.ok, sw.initOut, vt.ok, vt.initOut)
					}
					if sw.ok != c.loads {
						t.Fatalf("both load: %v, want %v (%s)", sw.ok, c.loads, sw.initOut)
					}
					if !c.loads {
						if sw.initOut != vt.initOut { // the same CMD_INIT result
							t.Fatalf("CMD_INIT: swtpm %q, vtpmd %q", sw.initOut, vt.initOut)
						}
						for i := range dirs { // a refused file is left as it was
							if b, _ := os.ReadFile(filepath.Join(dirs[i], scPermName(tpm2))); !bytes.Equal(b, c.file) {
								t.Fatalf("%s changed a state file it refused", []string{"swtpm", "vtpmd"}[i])
							}
						}
						return
					}
					for i, o := range obs {
						if !bytes.Equal(o.ek, ref.ek) || !bytes.Equal(o.nv, ref.nv) {
							t.Fatalf("%s: EK or NV differ from the state's (NV %q, want %q)", []string{"swtpm", "vtpmd"}[i], o.nv, ref.nv)
						}
					}
					// both wrote the state back in the current format, with the same flags
					key := map[uint16]*blob.Key{0: nil, blob.FlagEncrypted: k128, blob.FlagEncrypted | blob.FlagEncrypted256: k256}[c.flags]
					for i := range dirs {
						b, _ := os.ReadFile(filepath.Join(dirs[i], scPermName(tpm2)))
						h, _, err := blob.ParseHeader(b)
						if err != nil || h.Version != blob.Version || h.Flags != c.flags {
							t.Fatalf("%s wrote back header %+v (%v), want the current format with flags %#x", []string{"swtpm", "vtpmd"}[i], h, err, c.flags)
						}
						if _, err := blob.Open(b, key); err != nil {
							t.Fatalf("%s's written state: %v", []string{"swtpm", "vtpmd"}[i], err)
						}
					}
					// each loads what the other wrote
					for i, bin := range []string{env.bin, refSwtpm()} {
						o := scObserve(t, scStart(t, bin, tpm2, dirs[i], c.args...), tpm2)
						writer := []string{"swtpm", "vtpmd"}[i]
						if !o.ok || !bytes.Equal(o.ek, ref.ek) || !bytes.HasPrefix(o.nv, []byte("written by "+writer)) {
							t.Fatalf("%s on the state %s wrote back: %+v", scName(bin), writer, o)
						}
					}
				})
			}
		})
	}
}

// TestOldFormatStateBlobs: SET_STATEBLOB with blobs in the formats of early swtpm releases,
// with and without --migration-key (and --key): swtpm 0.7.1 checks the blob header before
// anything else, so a headerless blob is refused (plain or encrypted), while a version-1
// header (raw payload, or SHA256 || payload encrypted with a zero IV) is read. vtpmd answers
// each as swtpm does, and a loaded blob gives the same EK and NV.
func TestOldFormatStateBlobs(t *testing.T) {
	needRefSwtpm(t)
	need(t, refSwtpmSetup())
	keys := scMakeKeys(t)
	k128, k256 := scLoadKey(t, keys.k128, ""), scLoadKey(t, keys.k256, "aes-256-cbc")
	mig256 := []string{"--migration-key", "file=" + keys.k256 + ",mode=aes-256-cbc"}
	key128 := []string{"--key", "file=" + keys.k128}
	v1 := func(flags uint16, body []byte) []byte {
		b := binary.BigEndian.AppendUint16([]byte{1, 1}, blob.HeaderSize)
		b = binary.BigEndian.AppendUint16(b, flags)
		b = binary.BigEndian.AppendUint32(b, uint32(blob.HeaderSize+len(body)))
		return append(b, body...)
	}
	for _, tpm2 := range []bool{true, false} {
		family := map[bool]string{true: "TPM 2", false: "TPM 1.2"}[tpm2]
		t.Run(family, func(t *testing.T) {
			_, raw, ref := scMakeState(t, tpm2)
			for _, c := range []struct {
				name  string
				blob  []byte
				args  []string
				loads bool
			}{
				{"headerless plain", raw, nil, false},
				{"headerless plain with a migration key", raw, mig256, false},
				{"headerless migration-key encrypted", scLegacyEncrypt(t, k256, raw), mig256, false},
				{"version 1 plain", v1(blob.FlagMigrationData, raw), nil, true},
				{"version 1 plain with a migration key", v1(blob.FlagMigrationData, raw), mig256, true},
				{"version 1 migration-key encrypted", v1(blob.FlagMigrationData|blob.FlagMigrationEncrypted, scLegacyEncrypt(t, k256, raw)), mig256, true},
				{"version 1 migration-key encrypted with a bit flipped", v1(blob.FlagMigrationData|blob.FlagMigrationEncrypted,
					func() []byte { b := scLegacyEncrypt(t, k256, raw); b[100] ^= 0x10; return b }()), mig256, false},
				{"version 1 migration-key encrypted without the key", v1(blob.FlagMigrationData|blob.FlagMigrationEncrypted, scLegacyEncrypt(t, k256, raw)), nil, false},
				{"version 1 encrypted with both keys", v1(blob.FlagMigrationData|blob.FlagMigrationEncrypted|blob.FlagEncrypted,
					scLegacyEncrypt(t, k256, scLegacyEncrypt(t, k128, raw))), append(mig256, key128...), true},
			} {
				t.Run(c.name, func(t *testing.T) {
					file := filepath.Join(t.TempDir(), "permanent.blob")
					if err := os.WriteFile(file, c.blob, 0o600); err != nil {
						t.Fatal(err)
					}
					var loaded [2]bool
					var outs [2]string
					var obs [2]scObservation
					for i, bin := range []string{refSwtpm(), env.bin} {
						e := scStart(t, bin, tpm2, t.TempDir(), c.args...)
						outs[i], loaded[i] = e.ioctl("--load", "permanent", file)
						if loaded[i] {
							obs[i] = scObserve(t, e, tpm2)
						}
						e.stop()
					}
					if loaded[0] != loaded[1] || outs[0] != outs[1] {
						t.Fatalf("SET_STATEBLOB: swtpm %v %q, vtpmd %v %q", loaded[0], outs[0], loaded[1], outs[1])
					}
					if loaded[0] != c.loads {
						t.Fatalf("SET_STATEBLOB accepted: %v, want %v (%s)", loaded[0], c.loads, outs[0])
					}
					for i, o := range obs {
						if loaded[i] && (!o.ok || !bytes.Equal(o.ek, ref.ek) || !bytes.Equal(o.nv, ref.nv)) {
							t.Fatalf("%s after SET_STATEBLOB: %+v", []string{"swtpm", "vtpmd"}[i], o)
						}
					}
				})
			}
		})
	}
}

// TestPrintStatesFormatsMissingFile: --print-states on a file:// state that does not exist (or
// is empty, or has no magic) formats it as a new, empty linear store, as Debian's swtpm does:
// the same output, message, exit status, bytes, size and mode.
func TestPrintStatesFormatsMissingFile(t *testing.T) {
	needRefSwtpm(t)
	junk := make([]byte, 300)
	rand.Read(junk)
	for _, tpm2 := range []bool{true, false} {
		for _, content := range [][]byte{nil, {}, junk} {
			what := map[bool]string{true: "missing", false: fmt.Sprintf("%d bytes", len(content))}[content == nil]
			t.Run(map[bool]string{true: "TPM 2 ", false: "TPM 1.2 "}[tpm2]+what, func(t *testing.T) {
				var results [2]string
				var files [2][]byte
				var modes [2]os.FileMode
				for i, bin := range []string{refSwtpm(), env.bin} {
					dir := t.TempDir()
					img := filepath.Join(dir, "tpm.img")
					if content != nil {
						os.WriteFile(img, content, 0o644)
					}
					args := []string{"socket", "--print-states", "--tpmstate", "backend-uri=file://" + img}
					if tpm2 {
						args = append(args, "--tpm2")
					}
					c := exec.Command(bin, args...)
					var stdout, stderr bytes.Buffer
					c.Stdout, c.Stderr = &stdout, &stderr
					err := c.Run()
					results[i] = strings.ReplaceAll(fmt.Sprintf("exit %v\nstdout %q\nstderr %q", err, stdout.String(), stderr.String()), dir, "DIR")
					b, rerr := os.ReadFile(img)
					if rerr != nil {
						t.Fatalf("%s created no file: %v\n%s", scName(bin), rerr, results[i])
					}
					st, _ := os.Stat(img)
					files[i], modes[i] = b, st.Mode()
				}
				if results[0] != results[1] {
					t.Fatalf("swtpm:\n%s\nvtpmd:\n%s", results[0], results[1])
				}
				if !bytes.Equal(files[0], files[1]) || modes[0] != modes[1] {
					t.Fatalf("the file differs: swtpm %d bytes %v, vtpmd %d bytes %v", len(files[0]), modes[0], len(files[1]), modes[1])
				}
				if !strings.Contains(results[0], "Formatting 'file://DIR/tpm.img' as new linear NVRAM store") {
					t.Fatalf("no formatting message:\n%s", results[0])
				}
			})
		}
	}
}

// scNoSeccomp is what the file:// tests below add to vtpmd's options: nothing, so they run
// under vtpmd's default seccomp filter. They once needed action=none: a file:// store's atomic
// replacement keeps the file's security labels and ACLs with f*xattr calls, which swtpm's
// deny-list forbids; internal/seccomp now allows the descriptor calls.
var scNoSeccomp []string

// scTPMWrapper is an executable that runs vtpmd with "--manager none" (another test may run a
// host manager at the default socket) and scNoSeccomp added, for swtpm_setup's --tpm.
func scTPMWrapper(t *testing.T) string {
	t.Helper()
	w := filepath.Join(t.TempDir(), "vtpmd-swtpm")
	script := fmt.Sprintf("#!/bin/sh\nexec %q \"$@\" --manager none %s\n", env.bin, strings.Join(scNoSeccomp, " "))
	if err := os.WriteFile(w, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return w
}

// TestSwtpmSetupOnMissingLinearFile: Debian's swtpm_setup makes TPM 2 and TPM 1.2 states on
// file:// paths that do not exist, with vtpmd as its --tpm (it asks --print-states first,
// which formats the file, and clears the state by unlinking it), as with Debian's swtpm; the
// state made is then used by both (INIT, the EK).
func TestSwtpmSetupOnMissingLinearFile(t *testing.T) {
	needRefSwtpm(t)
	need(t, refSwtpmSetup())
	wrapper := scTPMWrapper(t)
	for _, tpm2 := range []bool{true, false} {
		for _, tool := range []string{refSwtpm(), wrapper} {
			name := map[bool]string{true: "TPM 2", false: "TPM 1.2"}[tpm2] + " with " + map[bool]string{true: "swtpm", false: "vtpmd"}[tool == refSwtpm()]
			t.Run(name, func(t *testing.T) {
				img := filepath.Join(t.TempDir(), "tpm.img")
				args := []string{"--tpm-state", "file://" + img, "--createek", "--tpm", tool + " socket"}
				if tpm2 {
					args = append(args, "--tpm2")
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				defer cancel()
				out, err := exec.CommandContext(ctx, refSwtpmSetup(), args...).CombinedOutput()
				if err != nil || !strings.Contains(string(out), "Successfully authored TPM state.") {
					t.Fatalf("swtpm_setup %v: %v\n%s", args, err, out)
				}
				var eks [2][]byte
				for i, bin := range []string{refSwtpm(), env.bin} {
					o := scObserveEK(t, scStart(t, bin, tpm2, "file://"+img, scNoSeccomp...), tpm2)
					if o == nil {
						t.Fatalf("%s on the state: no EK", scName(bin))
					}
					eks[i] = o
				}
				if !bytes.Equal(eks[0], eks[1]) {
					t.Fatal("swtpm and vtpmd read different EKs")
				}
			})
		}
	}
}

// scObserveEK INITs a started emulator and returns its EK (nil when it has none).
func scObserveEK(t *testing.T, e *scEmu, tpm2 bool) []byte {
	t.Helper()
	defer e.stop()
	if out, ok := e.ioctl("-i"); !ok {
		t.Fatalf("%s INIT: %s %s", scName(e.bin), out, e.out)
	}
	c := e.conn()
	if tpm2 {
		tpm := tpmclient.Stream(c)
		if err := tpmclient.Startup(tpm); err != nil {
			t.Fatal(err)
		}
		r, err := gotpm.ReadPublic{ObjectHandle: gotpm.TPMHandle(0x81010001)}.Execute(tpm)
		if err != nil {
			return nil
		}
		return r.OutPublic.Bytes()
	}
	send := provision.Send12(func(cmd []byte) ([]byte, error) { return tpmclient.RoundTrip(c, cmd) })
	if err := provision.Startup12(send); err != nil {
		t.Fatal(err)
	}
	rc, body := scSend12(t, c, 0x7c, bytes.Repeat([]byte{7}, 20))
	if rc != 0 {
		return nil
	}
	return body[:len(body)-20]
}

// scProc is a started process whose exit is awaited once, by whoever asks.
type scProc struct {
	cmd    *exec.Cmd
	out    *scBuffer
	exited chan struct{} // closed at exit; err is then set
	err    error
}

// scSpawn starts bin with args (vtpmd: with --manager none); the process is killed when the
// test ends.
func scSpawn(t *testing.T, bin string, args ...string) *scProc {
	t.Helper()
	if scIsVtpmd(bin) {
		args = append(args, "--manager", "none")
	}
	p := &scProc{cmd: exec.Command(bin, args...), out: &scBuffer{}, exited: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.exited
	})
	return p
}

// wait waits up to d for the exit; ok is false when the process still runs.
func (p *scProc) wait(d time.Duration) (err error, ok bool) {
	select {
	case <-p.exited:
		return p.err, true
	case <-time.After(d):
		return nil, false
	}
}

// TestFIFOStateFailsFast: a FIFO where a state file belongs is refused at once with an error
// that names the file and what it is (Debian's swtpm blocks forever in open(2) there, and
// ignores SIGTERM once it serves). A FIFO permall or file:// store makes vtpmd socket --flags
// not-need-init exit at once; without not-need-init CMD_INIT fails at once and the control
// channel keeps working. A FIFO volatilestate is an unreadable volatile state: the error is
// logged at once and the TPM starts without it, as swtpm starts when its volatile state
// cannot be read (a directory there, say).
func TestFIFOStateFailsFast(t *testing.T) {
	for _, c := range []struct {
		name, fifo string
		linear     bool
	}{
		{"dir permall", "tpm2-00.permall", false},
		{"file store", "tpm.img", true},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			fifo := filepath.Join(dir, c.fifo)
			if err := syscall.Mkfifo(fifo, 0o600); err != nil {
				t.Fatal(err)
			}
			tpmstate := "dir=" + dir
			if c.linear {
				tpmstate = "backend-uri=file://" + fifo
			}
			sock := filepath.Join(t.TempDir(), "c.sock")
			start := time.Now()
			p := scSpawn(t, env.bin, "socket", "--tpm2", "--tpmstate", tpmstate, "--ctrl", "type=unixio,path="+sock, "--flags", "not-need-init")
			err, exited := p.wait(3 * time.Second)
			if !exited {
				t.Fatalf("vtpmd still runs 3 s after start with a FIFO at %s: %s", fifo, p.out)
			}
			if err == nil {
				t.Fatalf("exit status 0: %s", p.out)
			}
			if msg := p.out.String(); !strings.Contains(msg, fifo) || !strings.Contains(msg, "FIFO") {
				t.Fatalf("the error does not name the FIFO: %s", msg)
			}
			t.Logf("vtpmd exited after %v: %v: %s", time.Since(start).Round(time.Millisecond), err, strings.TrimSpace(p.out.String()))
			if c.linear {
				return
			}
			// without not-need-init: CMD_INIT fails at once, the channel keeps working
			e := scStart(t, env.bin, true, dir)
			begin := time.Now()
			if out, ok := e.ioctl("-i"); ok || time.Since(begin) > 3*time.Second {
				t.Fatalf("INIT with a FIFO state: %v %s (after %v)", ok, out, time.Since(begin))
			}
			if out, ok := e.ioctl("-g"); !ok {
				t.Fatalf("control channel after the failed INIT: %s", out)
			}
		})
	}
	t.Run("dir volatilestate", func(t *testing.T) {
		dir := t.TempDir()
		fifo := filepath.Join(dir, "tpm2-00.volatilestate")
		if err := syscall.Mkfifo(fifo, 0o600); err != nil {
			t.Fatal(err)
		}
		e := scStart(t, env.bin, true, dir)
		begin := time.Now()
		if out, ok := e.ioctl("-i"); !ok || time.Since(begin) > 3*time.Second {
			t.Fatalf("INIT with a FIFO volatile state: %v %s (after %v)", ok, out, time.Since(begin))
		}
		if msg := e.out.String(); !strings.Contains(msg, fifo) || !strings.Contains(msg, "FIFO") {
			t.Fatalf("no error naming the FIFO: %s", msg)
		}
	})
}

// TestSigtermDuringSlowStart: SIGTERM ends vtpmd socket while its start-up is blocked (here in
// open(2) of a --key file that is a FIFO nobody writes), as it ends Debian's swtpm there.
func TestSigtermDuringSlowStart(t *testing.T) {
	needRefSwtpm(t)
	for _, bin := range []string{refSwtpm(), env.bin} {
		t.Run(scName(bin), func(t *testing.T) {
			dir := t.TempDir()
			keyFIFO := filepath.Join(dir, "key")
			if err := syscall.Mkfifo(keyFIFO, 0o600); err != nil {
				t.Fatal(err)
			}
			args := []string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", "type=unixio,path=" + filepath.Join(dir, "c.sock"),
				"--key", "file=" + keyFIFO, "--flags", "not-need-init"}
			p := scSpawn(t, bin, args...)
			if _, exited := p.wait(700 * time.Millisecond); exited { // blocked in start-up
				t.Fatalf("exited before the key was written: %v %s", p.err, p.out)
			}
			if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			err, exited := p.wait(3 * time.Second)
			if !exited {
				t.Fatalf("%s ignored SIGTERM during start-up: %s", scName(bin), p.out)
			}
			t.Logf("%s after SIGTERM: %v, in %v: %s", scName(bin), err, time.Since(start).Round(time.Millisecond), strings.TrimSpace(p.out.String()))
			var ee *exec.ExitError
			if !errors.As(err, &ee) {
				t.Fatalf("exit after SIGTERM: %v", err)
			}
		})
	}
}
