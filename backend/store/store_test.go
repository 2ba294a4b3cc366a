package store

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
)

func mustKey(t testing.TB, n int) *blob.Key {
	k, err := blob.NewKey(bytes.Repeat([]byte{0x42}, n))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func hashDir(t *testing.T, dir string) string {
	t.Helper()
	h := sha256.New()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		b, _ := os.ReadFile(filepath.Join(dir, e.Name()))
		h.Write([]byte(e.Name()))
		h.Write(b)
	}
	return string(h.Sum(nil))
}

func TestDirStoreRoundTrip(t *testing.T) {
	for _, k := range []*blob.Key{nil, mustKey(t, 16), mustKey(t, 32)} {
		dir := t.TempDir()
		s, err := Open("dir://"+dir, Options{TPM2: true, Mode: 0o600, ModeSet: true, Lock: true, StateKey: k})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Load(emulator.StatePermanent); !errors.Is(err, emulator.ErrNotExist) {
			t.Fatalf("empty load: %v", err)
		}
		data := bytes.Repeat([]byte{1, 2, 3}, 500)
		if err := s.Store(emulator.StatePermanent, data); err != nil {
			t.Fatal(err)
		}
		got, err := s.Load(emulator.StatePermanent)
		if err != nil || !bytes.Equal(got, data) {
			t.Fatalf("load: %v", err)
		}
		st, _ := os.Stat(filepath.Join(dir, "tpm2-00.permall"))
		if st.Mode().Perm() != 0o600 {
			t.Fatalf("mode %o", st.Mode().Perm())
		}
		if _, err := os.Stat(filepath.Join(dir, "TMP2-00.permall")); !os.IsNotExist(err) {
			t.Fatal("temporary file left behind")
		}
		states, _ := s.States()
		if len(states) != 1 || states[0].Name != "permall" || states[0].Size != st.Size() {
			t.Fatalf("States = %+v", states)
		}
		if err := s.Delete(emulator.StateVolatile, false); err != nil {
			t.Fatal(err)
		}
		if err := s.Delete(emulator.StateVolatile, true); !errors.Is(err, emulator.ErrNotExist) {
			t.Fatalf("mustExist delete: %v", err)
		}
		s.Close()
	}
}

func TestBadStateLeavesFilesUnchanged(t *testing.T) {
	dir := t.TempDir()
	k := mustKey(t, 32)
	s, _ := Open(dir, Options{TPM2: true, StateKey: k})
	s.Store(emulator.StatePermanent, bytes.Repeat([]byte{9}, 1000))
	path := filepath.Join(dir, "tpm2-00.permall")
	good, _ := os.ReadFile(path)
	cases := map[string]func([]byte) []byte{
		"truncated": func(b []byte) []byte { return b[:len(b)/2] },
		"bit flip":  func(b []byte) []byte { b = bytes.Clone(b); b[len(b)/2] ^= 1; return b },
		"oversized": func(b []byte) []byte { return append(bytes.Clone(b), 0) },
		"empty":     func(b []byte) []byte { return nil },
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			os.WriteFile(path, mutate(good), 0o640)
			before := hashDir(t, dir)
			if _, err := s.Load(emulator.StatePermanent); err == nil {
				t.Fatal("bad state accepted")
			}
			if hashDir(t, dir) != before {
				t.Fatal("a failed load changed the state directory")
			}
		})
	}
	os.WriteFile(path, good, 0o640)
	wrong, _ := Open(dir, Options{TPM2: true, StateKey: mustKey(t, 16)})
	if _, err := wrong.Load(emulator.StatePermanent); !errors.Is(err, blob.ErrKeyLength) {
		t.Fatalf("wrong key length: %v", err)
	}
	nokey, _ := Open(dir, Options{TPM2: true})
	if _, err := nokey.Load(emulator.StatePermanent); !errors.Is(err, blob.ErrKeyNotFound) {
		t.Fatalf("no key: %v", err)
	}
}

func TestLockExcludesSecondStore(t *testing.T) {
	dir := t.TempDir()
	a, _ := Open(dir, Options{TPM2: true, Lock: true})
	b, _ := Open(dir, Options{TPM2: true, Lock: true})
	if err := a.Lock(0); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if err := b.Lock(5); !errors.Is(err, ErrLocked) {
		t.Fatalf("second lock: %v", err)
	}
	if time.Since(start) < 40*time.Millisecond {
		t.Fatal("retries were not waited for")
	}
	a.Unlock()
	if err := b.Lock(0); err != nil {
		t.Fatalf("lock after hand-off: %v", err)
	}
	b.Close()
}

func TestLinearStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tpm.img")
	s, err := Open("file://"+path, Options{TPM2: true})
	if err != nil {
		t.Fatal(err)
	}
	perm, vol := bytes.Repeat([]byte{1}, 1315), bytes.Repeat([]byte{2}, 8900)
	s.Store(emulator.StatePermanent, perm)
	s.Store(emulator.StateVolatile, vol)
	img, _ := os.ReadFile(path)
	if !bytes.Equal(img[:8], []byte("nilmptws")) || len(img) != 192+2048+16384 {
		t.Fatalf("image %d bytes, magic %q", len(img), img[:8])
	}
	for typ, want := range map[emulator.StateType][]byte{emulator.StatePermanent: perm, emulator.StateVolatile: vol} {
		if got, err := s.Load(typ); err != nil || !bytes.Equal(got, want) {
			t.Fatalf("load %v: %v", typ, err)
		}
	}
	s.Delete(emulator.StatePermanent, true)
	if _, err := s.Load(emulator.StatePermanent); !errors.Is(err, emulator.ErrNotExist) {
		t.Fatal("deleted blob still there")
	}
	if got, err := s.Load(emulator.StateVolatile); err != nil || !bytes.Equal(got, vol) {
		t.Fatal("compaction lost the volatile blob")
	}
}

func FuzzParseLinear(f *testing.F) {
	li := &LinearImage{blobs: map[string][]byte{"permall": {1, 2, 3}, "volatilestate": bytes.Repeat([]byte{4}, 100)}}
	f.Add(li.Marshal())
	f.Add([]byte("nilmptws"))
	f.Fuzz(func(t *testing.T, img []byte) {
		p, err := ParseLinear(img)
		if err != nil {
			return
		}
		q, err := ParseLinear(p.Marshal())
		if err != nil {
			t.Fatal(err)
		}
		for k, v := range p.blobs {
			if !bytes.Equal(q.blobs[k], v) {
				t.Fatalf("round trip changed %s", k)
			}
		}
	})
}

// --- interoperability with Debian's swtpm --------------------------------------------------

func needSwtpm(t *testing.T) {
	t.Helper()
	for _, p := range []string{"swtpm", "swtpm_ioctl"} {
		if _, err := exec.LookPath(p); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s missing (CI=true)", p)
			}
			t.Skipf("%s not installed", p)
		}
	}
}

// runSwtpm starts swtpm on dir with extra args and returns its control socket and a stop func.
func runSwtpm(t *testing.T, dir string, args ...string) (string, func()) {
	t.Helper()
	ctrl := filepath.Join(t.TempDir(), "c.sock")
	all := append([]string{"socket", "--tpm2", "--tpmstate", "dir=" + dir, "--ctrl", "type=unixio,path=" + ctrl}, args...)
	cmd := exec.Command("swtpm", all...)
	out := &bytes.Buffer{}
	cmd.Stderr = out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(ctrl); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	return ctrl, func() {
		exec.Command("swtpm_ioctl", "--unix", ctrl, "-s").Run()
		cmd.Wait()
	}
}

func ioctl(t *testing.T, ctrl string, args ...string) error {
	out, err := exec.Command("swtpm_ioctl", append([]string{"--unix", ctrl}, args...)...).CombinedOutput()
	if err != nil {
		return errors.New(string(out))
	}
	return nil
}

// TestInteropWithSwtpm: state written by swtpm 0.7.1 (plain, AES-128/256 key file, passphrase)
// loads in vtpmd's store and libtpms; state written by vtpmd's store starts in swtpm.
func TestInteropWithSwtpm(t *testing.T) {
	needSwtpm(t)
	kdir := t.TempDir()
	hex128 := filepath.Join(kdir, "k128")
	os.WriteFile(hex128, []byte("00112233445566778899aabbccddeeff\n"), 0o600)
	hex256 := filepath.Join(kdir, "k256")
	os.WriteFile(hex256, []byte("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"), 0o600)
	pwd := filepath.Join(kdir, "pwd")
	os.WriteFile(pwd, []byte("correct horse\n"), 0o600)
	for _, c := range []struct{ name, keyOpt string }{
		{"plain", ""},
		{"aes-128 key file", "file=" + hex128},
		{"aes-256 key file", "file=" + hex256 + ",mode=aes-256-cbc"},
		{"passphrase", "pwdfile=" + pwd + ",mode=aes-256-cbc"},
	} {
		t.Run(c.name, func(t *testing.T) {
			var key *blob.Key
			var args []string
			if c.keyOpt != "" {
				spec, err := blob.ParseKeyOption(c.keyOpt)
				if err != nil {
					t.Fatal(err)
				}
				if key, err = blob.LoadKey(spec); err != nil {
					t.Fatal(err)
				}
				args = []string{"--key", c.keyOpt}
			}
			// swtpm -> vtpmd
			dir := t.TempDir()
			ctrl, stop := runSwtpm(t, dir, append(args, "--flags", "not-need-init,startup-clear")...)
			if err := ioctl(t, ctrl, "-v"); err != nil { // store volatile state too
				t.Fatal(err)
			}
			stop()
			s, _ := Open(dir, Options{TPM2: true, StateKey: key})
			perm, err := s.Load(emulator.StatePermanent)
			if err != nil {
				t.Fatalf("swtpm's permall: %v", err)
			}
			if _, err := s.Load(emulator.StateVolatile); err != nil {
				t.Fatalf("swtpm's volatilestate: %v", err)
			}
			e, err := emulator.Open(emulator.TPM2, s, nil)
			if err != nil {
				t.Fatal(err)
			}
			if err := e.Start(); err != nil {
				e.Close()
				t.Fatalf("libtpms refused swtpm's state: %v", err)
			}
			e.Close()
			// vtpmd -> swtpm: write the state through our store, then swtpm must INIT on it
			dir2 := t.TempDir()
			s2, _ := Open(dir2, Options{TPM2: true, StateKey: key})
			if err := s2.Store(emulator.StatePermanent, perm); err != nil {
				t.Fatal(err)
			}
			ctrl2, stop2 := runSwtpm(t, dir2, args...)
			defer stop2()
			if err := ioctl(t, ctrl2, "-i"); err != nil {
				t.Fatalf("swtpm cannot INIT on vtpmd-written state: %v", err)
			}
			// and a wrong key is refused by swtpm too: proves the files really are encrypted
			if key != nil {
				stop2()
				bad := filepath.Join(kdir, "bad")
				os.WriteFile(bad, []byte("ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"), 0o600)
				ctrl3, stop3 := runSwtpm(t, dir2, "--key", "file="+bad+",mode=aes-256-cbc")
				defer stop3()
				if err := ioctl(t, ctrl3, "-i"); err == nil {
					t.Fatal("swtpm accepted the state with a wrong key")
				}
			}
		})
	}
}

// TestLockAgainstSwtpm: vtpmd's OFD lock and swtpm's fcntl lock exclude each other.
func TestLockAgainstSwtpm(t *testing.T) {
	needSwtpm(t)
	dir := t.TempDir()
	_, stop := runSwtpm(t, dir, "--flags", "not-need-init,startup-clear")
	s, _ := Open(dir, Options{TPM2: true, Lock: true})
	if err := s.Lock(2); !errors.Is(err, ErrLocked) {
		t.Fatalf("lock while swtpm runs: %v", err)
	}
	stop()
	if err := s.Lock(0); err != nil {
		t.Fatalf("lock after swtpm exited: %v", err)
	}
	ctrl, stop2 := runSwtpm(t, dir)
	defer stop2()
	if err := ioctl(t, ctrl, "-i"); err == nil {
		t.Fatal("swtpm initialized while vtpmd holds the lock")
	}
	s.Close()
}

func TestDeferredSync(t *testing.T) {
	dir := t.TempDir()
	s, _ := Open(dir, Options{TPM2: true})
	s.Defer()
	for i := 0; i < 3; i++ {
		if err := s.Store(emulator.StatePermanent, []byte{byte(i), 1, 2}); err != nil {
			t.Fatal(err)
		}
	}
	if got, err := s.Load(emulator.StatePermanent); err != nil || got[0] != 2 {
		t.Fatalf("deferred write not visible: %v %v", got, err)
	}
	if err := s.Sync(); err != nil {
		t.Fatal(err)
	}
	if d := s.be.(*dirBackend); d.deferred || len(d.dirty) != 0 {
		t.Fatal("Sync did not end the deferral")
	}
	if _, err := os.Stat(filepath.Join(dir, "TMP2-00.permall")); !os.IsNotExist(err) {
		t.Fatal("temporary file left behind")
	}
}
