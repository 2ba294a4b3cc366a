package seam

import (
	"context"
	"testing"
)

type hookGuard struct{ recGuard }

func (hookGuard) Export(context.Context, uint32, []byte) ([]byte, error) { return nil, nil }
func (hookGuard) Import(context.Context, map[uint32][]byte) (map[uint32][]byte, error) {
	return nil, nil
}
func (hookGuard) Admit(context.Context) error { return nil }

func TestBlobHookOf(t *testing.T) {
	var log []string
	plain := recGuard{name: "a", log: &log}
	h := hookGuard{recGuard{name: "h", log: &log}}
	if BlobHookOf(nil) != nil || BlobHookOf(plain) != nil || BlobHookOf(Guards(plain, plain)) != nil {
		t.Fatal("a hook found where there is none")
	}
	if BlobHookOf(h) == nil || BlobHookOf(Guards(plain, h)) == nil {
		t.Fatal("the hook among the guard's parts not found")
	}
	if !IsSealed([]byte(SealedMagic+"x")) || IsSealed([]byte{2, 1, 0, 10}) || IsSealed(nil) {
		t.Fatal("IsSealed")
	}
}
