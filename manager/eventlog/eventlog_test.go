package eventlog

import (
	"bytes"
	"crypto"
	"crypto/sha1"
	"crypto/sha256"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func sampleEvents() []Event {
	mk := func(pcr, typ uint32, data string) Event {
		s1 := sha1.Sum([]byte(data))
		s2 := sha256.Sum256([]byte(data))
		return Event{PCR: pcr, Type: typ, Data: []byte(data),
			Digests: []Digest{{AlgSHA1, s1[:]}, {AlgSHA256, s2[:]}}}
	}
	return []Event{
		mk(0, 0x8, "crtm"),
		mk(1, EvEventTag, "config"),
		mk(7, EvSeparator, "\x00\x00\x00\x00"),
		{PCR: 0, Type: EvNoAction, Data: []byte("ignored")},
		mk(0, EvSeparator, "\x00\x00\x00\x00"),
	}
}

func TestBuildParseReplay(t *testing.T) {
	evs := sampleEvents()
	b, err := Build([]uint16{AlgSHA1, AlgSHA256}, evs)
	if err != nil {
		t.Fatal(err)
	}
	l, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if len(l.Events) != len(evs) || !l.HasAlgorithm(AlgSHA1) || !l.HasAlgorithm(AlgSHA256) || l.HasAlgorithm(AlgSHA384) {
		t.Fatalf("parsed %d events, algorithms %v", len(l.Events), l.Spec.Algorithms)
	}
	for i, e := range l.Events {
		if e.PCR != evs[i].PCR || e.Type != evs[i].Type || !bytes.Equal(e.Data, evs[i].Data) {
			t.Fatalf("event %d: %+v, want %+v", i, e, evs[i])
		}
	}
	pcrs, err := l.Replay(AlgSHA256)
	if err != nil {
		t.Fatal(err)
	}
	d0 := sha256.Sum256([]byte("crtm"))
	sep := sha256.Sum256([]byte{0, 0, 0, 0})
	want0 := Extend(cryptoSHA256, Extend(cryptoSHA256, make([]byte, 32), d0[:]), sep[:])
	if !bytes.Equal(pcrs[0], want0) {
		t.Fatalf("PCR 0 = %x, want %x", pcrs[0], want0)
	}
	if !bytes.Equal(pcrs[2], make([]byte, 32)) {
		t.Fatalf("PCR 2 = %x, want zeros", pcrs[2])
	}
	if _, err := l.Replay(AlgSHA512); !errors.Is(err, ErrBank) {
		t.Fatalf("replay of a bank the log lacks: %v", err)
	}
	// building what was parsed gives the same bytes
	again, err := Build([]uint16{AlgSHA1, AlgSHA256}, l.Events)
	if err != nil || !bytes.Equal(again, b) {
		t.Fatalf("rebuild differs (%v)", err)
	}
}

func TestStartupLocality(t *testing.T) {
	evs := append([]Event{{PCR: 0, Type: EvNoAction, Data: append([]byte("StartupLocality\x00"), 3)}}, sampleEvents()[:1]...)
	b, err := Build([]uint16{AlgSHA256}, evs)
	if err != nil {
		t.Fatal(err)
	}
	l, err := Parse(b)
	if err != nil {
		t.Fatal(err)
	}
	if l.StartupLocality() != 3 {
		t.Fatalf("startup locality %d", l.StartupLocality())
	}
	pcrs, _ := l.Replay(AlgSHA256)
	init := make([]byte, 32)
	init[31] = 3
	d := sha256.Sum256([]byte("crtm"))
	if !bytes.Equal(pcrs[0], Extend(cryptoSHA256, init, d[:])) {
		t.Fatal("PCR 0 does not start at the startup locality")
	}
}

func TestParseRejects(t *testing.T) {
	good, err := Build([]uint16{AlgSHA256}, sampleEvents()[:2])
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{
		"empty":          nil,
		"truncated":      good[:len(good)-3],
		"header only":    good[:31],
		"bad signature":  bytes.Replace(good, []byte("Spec ID Event03"), []byte("Spec ID Event00"), 1),
		"trailing bytes": append(bytes.Clone(good), 1, 2, 3),
	} {
		if _, err := Parse(b); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", name, err)
		}
	}
	if _, err := Build([]uint16{AlgSHA256}, []Event{{PCR: 1, Type: EvSeparator}}); err == nil {
		t.Error("Build accepted an event without the bank's digest")
	}
}

// TestRealLog parses the OVMF boot logs in testdata (captured from QEMU/OVMF guests with
// Debian's swtpm as their TPM) and replays them.
func TestRealLog(t *testing.T) {
	files, _ := filepath.Glob("testdata/*.bin")
	if len(files) == 0 {
		t.Skip("no captured logs in testdata")
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		l, err := Parse(b)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		pcrs, err := l.Replay(AlgSHA256)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		if bytes.Equal(pcrs[0], make([]byte, 32)) {
			t.Fatalf("%s: PCR 0 not extended", f)
		}
		again, err := Build(algIDs(l.Spec.Algorithms), l.Events)
		if err != nil {
			t.Fatal(err)
		}
		l2, err := Parse(again)
		if err != nil {
			t.Fatal(err)
		}
		p2, _ := l2.Replay(AlgSHA256)
		for i := range pcrs {
			if !bytes.Equal(pcrs[i], p2[i]) {
				t.Fatalf("%s: rebuilt log replays PCR %d differently", f, i)
			}
		}
	}
}

func algIDs(as []Algorithm) []uint16 {
	var out []uint16
	for _, a := range as {
		out = append(out, a.ID)
	}
	return out
}

func FuzzParse(f *testing.F) {
	for _, evs := range [][]Event{sampleEvents(), nil, sampleEvents()[:1]} {
		b, err := Build([]uint16{AlgSHA1, AlgSHA256}, evs)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	files, _ := filepath.Glob("testdata/*.bin")
	for _, p := range files {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		l, err := Parse(b)
		if err != nil {
			if !errors.Is(err, ErrFormat) {
				t.Fatalf("error not ErrFormat: %v", err)
			}
			return
		}
		for _, a := range l.Spec.Algorithms {
			l.Replay(a.ID)
		}
		l.StartupLocality()
		// what parses and lists only known banks builds back to what parses
		ids := algIDs(l.Spec.Algorithms)
		for _, id := range ids {
			if _, err := Hash(id); err != nil {
				return
			}
		}
		out, err := Build(ids, l.Events)
		if err != nil {
			return // an event without every bank's digest
		}
		if _, err := Parse(out); err != nil {
			t.Fatalf("a built log does not parse: %v", err)
		}
	})
}

var cryptoSHA256 = crypto.SHA256
