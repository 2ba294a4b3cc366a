//go:build cgo

// These tests run against libtpms itself (emulator/libtpms, cgo); the package does not need it.

package store

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/vtpmd/vtpmd/emulator/libtpms"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
)

// bootAndReadPCR starts libtpms on s (as vtpmd does at INIT) and reads the fixture PCR. With
// a volatile state in s, libtpms resumes it, so the PCR shows what swtpm extended.
func bootAndReadPCR(t *testing.T, s *Store) []byte {
	t.Helper()
	e, err := libtpms.Open(emulator.TPM2, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Start(); err != nil {
		t.Fatalf("libtpms refused the state: %v", err)
	}
	v, err := tpmclient.PCRRead(tpmclient.SendFunc(e.Process), fixturePCR)
	if err != nil {
		t.Fatalf("PCR_Read: %v", err)
	}
	return v
}

// TestBootSwtpmFixtures loads state recorded from Debian's swtpm 0.7.1 (directories and linear
// files, plain and encrypted) through Store into libtpms; the resumed volatile state must show
// the PCR value swtpm had.
func TestBootSwtpmFixtures(t *testing.T) {
	for _, c := range fixtureCases {
		t.Run(c.Name, func(t *testing.T) {
			dir := copyFixture(t, c)
			s := mustOpen(t, c.uri(dir), Options{TPM2: true, StateKey: loadFixtureKey(t, c.Key)})
			raw, err := s.LoadRaw(emulator.StatePermanent)
			if err != nil {
				t.Fatal(err)
			}
			if h, _, err := blob.ParseHeader(raw); err != nil || h.Flags != c.PermFlags {
				t.Fatalf("stored permall flags %#x (%v), want %#x", h.Flags, err, c.PermFlags)
			}
			perm, err := s.Load(emulator.StatePermanent)
			if err != nil {
				t.Fatal(err)
			}
			mig, _ := os.ReadFile(filepath.Join(dir, "permanent.mig"))
			if h, _, _ := blob.ParseHeader(mig); h.Flags != c.MigPermFlags {
				t.Fatalf("GET_STATEBLOB flags %#x, want %#x", h.Flags, c.MigPermFlags)
			}
			fromMig, err := blob.UnwrapMigration(mig, false, loadFixtureKey(t, c.Key), loadFixtureKey(t, c.MigKey))
			if err != nil || !bytes.Equal(fromMig, perm) {
				t.Fatalf("GET_STATEBLOB(permanent) != stored permall: %v", err)
			}
			if got, want := bootAndReadPCR(t, s), pcrAfterExtend(fixtureDigest(c.Name)); !bytes.Equal(got, want) {
				t.Fatalf("PCR %d = %x, swtpm had %x", fixturePCR, got, want)
			}
		})
	}
}

// versionedVariants are false, and true for a case with a state key: a versioned store.
func versionedVariants(c fixtureCase) []bool {
	if c.Key == "" {
		return []bool{false}
	}
	return []bool{false, true}
}

func variantName(c fixtureCase, versioned bool) string {
	if versioned {
		return c.Name + "/versioned"
	}
	return c.Name
}

// TestSwtpmToVtpmd: state written now by Debian's swtpm loads through Store into libtpms; a
// versioned store finds it at version 0 (swtpm writes no versions).
func TestSwtpmToVtpmd(t *testing.T) {
	bins := debianSwtpm(t)
	for _, c := range fixtureCases {
		for _, versioned := range versionedVariants(c) {
			t.Run(variantName(c, versioned), func(t *testing.T) {
				dir := t.TempDir()
				recordSwtpmState(t, bins, c, dir, fixtureRoot)
				s := mustOpen(t, c.uri(dir), Options{TPM2: true, StateKey: loadFixtureKey(t, c.Key), Versioned: versioned})
				if s.Version() != 0 {
					t.Fatalf("swtpm's state at version %d", s.Version())
				}
				if got, want := bootAndReadPCR(t, s), pcrAfterExtend(fixtureDigest(c.Name)); !bytes.Equal(got, want) {
					t.Fatalf("PCR %d = %x, swtpm had %x", fixturePCR, got, want)
				}
			})
		}
	}
}

// lastTLV is the tag of a stored blob's last TLV.
func lastTLV(t testing.TB, raw []byte) uint16 {
	t.Helper()
	_, body, err := blob.ParseHeader(raw)
	if err != nil {
		t.Fatal(err)
	}
	var tag uint16
	for len(body) >= 6 {
		tag = binary.BigEndian.Uint16(body)
		body = body[6+binary.BigEndian.Uint32(body[2:]):]
	}
	return tag
}

// writeVtpmdState makes a TPM in libtpms over s: manufactured, started, PCR extended, volatile
// state stored, as vtpmd leaves it after CMD_STORE_VOLATILE.
func writeVtpmdState(t *testing.T, s *Store, digest []byte) {
	t.Helper()
	e, err := libtpms.Open(emulator.TPM2, s, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	if err := e.Start(); err != nil {
		t.Fatal(err)
	}
	tpm := tpmclient.SendFunc(e.Process)
	if err := tpmclient.Startup(tpm); err != nil {
		t.Fatal(err)
	}
	if err := tpmclient.PCRExtend(tpm, fixturePCR, digest); err != nil {
		t.Fatal(err)
	}
	vol, err := e.VolatileState()
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Store(emulator.StateVolatile, vol); err != nil {
		t.Fatal(err)
	}
}

// TestVtpmdToSwtpm: state written through Store (directory and linear file, with each kind of
// key, and versioned with a key) is resumed by Debian's swtpm: INIT succeeds and PCR 16 has
// the value vtpmd extended. swtpm with a wrong key refuses it, which shows the files really
// are encrypted.
func TestVtpmdToSwtpm(t *testing.T) {
	bins := debianSwtpm(t)
	for _, c := range fixtureCases {
		for _, versioned := range versionedVariants(c) {
			t.Run(variantName(c, versioned), func(t *testing.T) { vtpmdToSwtpm(t, bins, c, versioned) })
		}
	}
}

func vtpmdToSwtpm(t *testing.T, bins swtpmBins, c fixtureCase, versioned bool) {
	dir := t.TempDir()
	key := loadFixtureKey(t, c.Key)
	s := mustOpen(t, c.uri(dir), Options{TPM2: true, StateKey: key, Versioned: versioned})
	digest := fixtureDigest("vtpmd " + c.Name)
	writeVtpmdState(t, s, digest)
	states, _ := s.States()
	if versioned {
		for _, st := range []emulator.StateType{emulator.StatePermanent, emulator.StateVolatile} {
			raw, err := s.LoadRaw(st)
			if err != nil {
				t.Fatal(err)
			}
			if tag := lastTLV(t, raw); tag != blob.TagStateVersion {
				t.Fatalf("%s: last TLV %d, not the state version", st.Name(), tag)
			}
			if _, v, err := s.LoadVersioned(st); err != nil || v == 0 {
				t.Fatalf("%s: version %d, %v", st.Name(), v, err)
			}
		}
		if s.Version() < 2 {
			t.Fatalf("Version %d after writing permall and volatilestate", s.Version())
		}
	}
	s.Close()

	args := append([]string{"--tpmstate", c.tpmstate(dir)}, c.swtpmKeyArgs(fixtureRoot)...)
	// --print-states sees the same blobs and sizes
	out, err := exec.Command(bins.swtpm, append([]string{"socket", "--tpm2", "--print-states"}, args...)...).Output()
	if err != nil {
		t.Fatalf("swtpm --print-states: %v", err)
	}
	var want []string
	for _, st := range states {
		want = append(want, fmt.Sprintf(`{"name": "%s", "size": %d}`, st.Name, st.Size))
	}
	if w := `{ "type": "swtpm", "states": [ ` + strings.Join(want, ", ") + ` ] }`; string(out) != w {
		t.Fatalf("swtpm --print-states:\n%s\nwant\n%s", out, w)
	}
	p := startSwtpm(t, bins, args...)
	p.mustIoctl("-i")
	got, err := tpmclient.PCRRead(p.tpm(), fixturePCR)
	if err != nil {
		t.Fatalf("PCR_Read on swtpm: %v (%s)", err, p.out)
	}
	if want := pcrAfterExtend(digest); !bytes.Equal(got, want) {
		t.Fatalf("swtpm resumed PCR %d = %x, vtpmd had %x", fixturePCR, got, want)
	}
	p.stop()
	if key != nil {
		bad := filepath.Join(t.TempDir(), "bad")
		os.WriteFile(bad, []byte(strings.Repeat("5a", key.Len())), 0o600)
		opt := "file=" + bad
		if key.Is256() {
			opt += ",mode=aes-256-cbc"
		}
		p := startSwtpm(t, bins, "--tpmstate", c.tpmstate(dir), "--key", opt)
		if _, err := p.ioctl("-i"); err == nil {
			t.Fatal("swtpm initialized vtpmd's state with a wrong key")
		}
	}
}

// TestMigrationBlobsWithSwtpm: GET_STATEBLOB from a running Debian swtpm unwraps to the state
// it stores, and blobs made by WrapMigration are accepted by its SET_STATEBLOB.
func TestMigrationBlobsWithSwtpm(t *testing.T) {
	bins := debianSwtpm(t)
	for _, c := range fixtureCases {
		if c.Linear {
			continue
		}
		t.Run(c.Name, func(t *testing.T) {
			sk, mk := loadFixtureKey(t, c.Key), loadFixtureKey(t, c.MigKey)
			// swtpm -> vtpmd
			dir := t.TempDir()
			recordSwtpmState(t, bins, c, dir, fixtureRoot)
			mig, _ := os.ReadFile(filepath.Join(dir, "permanent.mig"))
			plain, err := blob.UnwrapMigration(mig, false, sk, mk)
			if err != nil {
				t.Fatal(err)
			}
			s := mustOpen(t, dir, Options{TPM2: true, StateKey: sk})
			if perm, err := s.Load(emulator.StatePermanent); err != nil || !bytes.Equal(perm, plain) {
				t.Fatalf("GET_STATEBLOB != stored permall: %v", err)
			}
			if mk != nil {
				if _, err := blob.UnwrapMigration(mig, false, sk, nil); !errors.Is(err, blob.ErrKeyNotFound) {
					t.Fatalf("without the migration key: %v", err)
				}
			}
			// vtpmd -> swtpm: our state as migration blobs, loaded into a fresh swtpm
			src := mustOpen(t, t.TempDir(), Options{TPM2: true})
			digest := fixtureDigest("migrated " + c.Name)
			writeVtpmdState(t, src, digest)
			perm, _ := src.Load(emulator.StatePermanent)
			vol, _ := src.Load(emulator.StateVolatile)
			for _, decrypt := range []bool{true, false} {
				t.Run(fmt.Sprintf("decrypt=%v", decrypt), func(t *testing.T) {
					files := map[string]string{}
					for name, data := range map[string][]byte{"permanent": perm, "volatile": vol} {
						b, enc, err := blob.WrapMigration(data, sk, mk, decrypt)
						if err != nil {
							t.Fatal(err)
						}
						if enc != (sk != nil && !decrypt) {
							t.Fatal("innerEncrypted")
						}
						files[name] = filepath.Join(t.TempDir(), name)
						os.WriteFile(files[name], b, 0o600)
					}
					dst := t.TempDir()
					p := startSwtpm(t, bins, append([]string{"--tpmstate", "dir=" + dst}, c.swtpmKeyArgs(fixtureRoot)...)...)
					p.mustIoctl("--load", "permanent", files["permanent"])
					p.mustIoctl("--load", "volatile", files["volatile"])
					p.mustIoctl("-i")
					got, err := tpmclient.PCRRead(p.tpm(), fixturePCR)
					if err != nil || !bytes.Equal(got, pcrAfterExtend(digest)) {
						t.Fatalf("swtpm after SET_STATEBLOB: PCR %x, %v (%s)", got, err, p.out)
					}
				})
			}
		})
	}
}

// TestLockAgainstSwtpm: vtpmd's OFD lock and swtpm's classic fcntl lock exclude each other.
func TestLockAgainstSwtpm(t *testing.T) {
	bins := debianSwtpm(t)
	dir := t.TempDir()
	p := startSwtpm(t, bins, "--tpmstate", "dir="+dir, "--flags", "not-need-init,startup-clear")
	// the control socket appears before swtpm's INIT takes the lock: wait for an answer
	if _, err := tpmclient.GetRandom(p.tpm(), 8); err != nil {
		t.Fatalf("swtpm does not answer: %v (%s)", err, p.out)
	}
	s := mustOpen(t, dir, Options{TPM2: true, Lock: true})
	err := s.Lock(3)
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("lock while swtpm holds the directory: %v", err)
	}
	t.Log(err)
	p.stop()
	if err := s.Lock(0); err != nil {
		t.Fatalf("lock after swtpm exited: %v", err)
	}
	// now swtpm cannot take the directory: its INIT fails
	p2 := startSwtpm(t, bins, "--tpmstate", "dir="+dir)
	if out, err := p2.ioctl("-i"); err == nil {
		t.Fatalf("swtpm initialized while vtpmd holds the lock: %s", out)
	}
	if !p2.waitOutput("Could not lock access to lockfile") {
		t.Fatalf("swtpm did not report the lock: %s", p2.out)
	}
	// and started with not-need-init it does not come up at all
	s.Unlock()
	s.Lock(0)
	sock, _ := os.MkdirTemp("", "vtpmd-swtpm-")
	defer os.RemoveAll(sock)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, bins.swtpm, "socket", "--tpm2", "--tpmstate", "dir="+dir, "--flags", "not-need-init",
		"--ctrl", "type=unixio,path="+filepath.Join(sock, "c")).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "Could not lock access to lockfile") {
		t.Fatalf("swtpm --flags not-need-init on a locked directory: %v: %s", err, out)
	}
	s.Unlock()
	p2.mustIoctl("-i")
}
