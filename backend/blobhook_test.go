package backend

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/vtpmd/vtpmd/backend/seam"
	"github.com/vtpmd/vtpmd/internal/tpmclient"
	"github.com/vtpmd/vtpmd/socket"
)

// xorHook is a BlobHook that "seals" by prefixing the sealed magic and inverting the bytes,
// and records what the instance asked.
type xorHook struct {
	exports, imports, admits int
	admitErr, importErr      error
}

func (h *xorHook) Export(_ context.Context, _ uint32, b []byte) ([]byte, error) {
	h.exports++
	out := []byte(seam.SealedMagic)
	for _, c := range b {
		out = append(out, ^c)
	}
	return out, nil
}

func (h *xorHook) Import(_ context.Context, blobs map[uint32][]byte) (map[uint32][]byte, error) {
	h.imports++
	if h.importErr != nil {
		return nil, h.importErr
	}
	out := map[uint32][]byte{}
	for typ, b := range blobs {
		if !seam.IsSealed(b) {
			return nil, errors.New("not sealed")
		}
		p := make([]byte, 0, len(b))
		for _, c := range b[len(seam.SealedMagic):] {
			p = append(p, ^c)
		}
		out[typ] = p
	}
	return out, nil
}

func (h *xorHook) Admit(context.Context) error { h.admits++; return h.admitErr }

// TestBlobHook: exported blobs pass through the hook; the instance asks before it runs again;
// once released it refuses every command; arriving blobs are opened at INIT, and a refused
// import leaves the destination's state untouched.
func TestBlobHook(t *testing.T) {
	src := t.TempDir()
	hook := &xorHook{}
	in := newInstance(t, src, Config{Blobs: hook})
	tp := tpmclient.SendFunc(in.Process)
	if err := in.Init(0); err != nil {
		t.Fatal(err)
	}
	if hook.admits != 1 {
		t.Fatalf("admits at start: %d", hook.admits)
	}
	tpmclient.Startup(tp)
	a := bytes.Repeat([]byte{7}, 32)
	if err := tpmclient.PCRExtend(tp, 16, a); err != nil {
		t.Fatal(err)
	}
	want, _ := tpmclient.PCRRead(tp, 16)
	sealed := map[uint32][]byte{}
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile} {
		b, _, err := in.GetStateBlob(typ, true)
		if err != nil || !seam.IsSealed(b) {
			t.Fatalf("blob %d: %v", typ, err)
		}
		sealed[typ] = b
	}
	if hook.exports != 2 || hook.admits != 1 {
		t.Fatalf("exports %d admits %d", hook.exports, hook.admits)
	}
	// the next command asks first; a migration that failed before the release goes on
	if _, err := tpmclient.PCRRead(tp, 16); err != nil || hook.admits != 2 {
		t.Fatalf("after export: %v, admits %d", err, hook.admits)
	}
	if _, err := tpmclient.PCRRead(tp, 16); err != nil || hook.admits != 2 {
		t.Fatalf("admitted once per export: %v, admits %d", err, hook.admits)
	}
	// released: nothing runs any more, INIT included
	for _, typ := range []uint32{socket.BlobPermanent, socket.BlobVolatile} {
		b, _, err := in.GetStateBlob(typ, true)
		if err != nil {
			t.Fatal(err)
		}
		sealed[typ] = b
	}
	hook.admitErr = seam.ErrReleased
	if _, err := in.Process(make([]byte, 10)); !errors.Is(err, seam.ErrReleased) {
		t.Fatalf("released source ran a command: %v", err)
	}
	hook.admitErr = nil
	if err := in.Init(0); !errors.Is(err, seam.ErrReleased) {
		t.Fatalf("released source ran INIT: %v", err)
	}
	exportsBefore := hook.exports
	if _, _, err := in.GetStateBlob(socket.BlobPermanent, true); !errors.Is(err, seam.ErrReleased) || hook.exports != exportsBefore {
		t.Fatalf("released source exported again: %v", err)
	}
	in.Close()

	// a vTPM without a hook refuses sealed blobs, saying why
	plainDst := t.TempDir()
	plain := newInstance(t, plainDst, Config{})
	if err := plain.SetStateBlob(socket.BlobPermanent, false, sealed[socket.BlobPermanent]); err == nil || ResultOf(err) != 0x03 {
		t.Fatalf("sealed blob without a hook: %v (result %#x)", err, uint32(ResultOf(err)))
	}
	plain.Close()

	// the destination: a refused import writes nothing
	dst := t.TempDir()
	dhook := &xorHook{importErr: errors.New("refused by the manager")}
	out := newInstance(t, dst, Config{Blobs: dhook})
	for typ, b := range sealed {
		if err := out.SetStateBlob(typ, false, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := out.Init(socket.InitFlagDeleteVolatile); err == nil {
		t.Fatal("INIT succeeded with a refused import")
	}
	if names, _ := filepath.Glob(filepath.Join(dst, "tpm2-*")); len(names) != 0 {
		t.Fatalf("a refused import wrote %v", names)
	}
	// sent again and accepted: the TPM resumes where the source stopped
	dhook.importErr = nil
	for typ, b := range sealed {
		if err := out.SetStateBlob(typ, false, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := out.Init(socket.InitFlagDeleteVolatile); err != nil {
		t.Fatal(err)
	}
	got, err := tpmclient.PCRRead(tpmclient.SendFunc(out.Process), 16)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("PCR16 after the move: %x, want %x (%v)", got, want, err)
	}
	if dhook.imports != 2 || dhook.admits != 0 {
		t.Fatalf("imports %d admits %d", dhook.imports, dhook.admits)
	}
	if _, err := os.Stat(filepath.Join(dst, "tpm2-00.permall")); err != nil {
		t.Fatal(err)
	}
}
