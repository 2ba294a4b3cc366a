package socket

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"testing"
)

func TestDialContext(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ctrl.sock")
	l, err := net.Listen("unix", path)
	if err != nil {
		t.Skip(err)
	}
	defer l.Close()
	c, err := DialContext(context.Background(), "unix", path)
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := DialContext(ctx, "unix", path); !errors.Is(err, context.Canceled) {
		t.Fatalf("DialContext with an ended context: %v", err)
	}
}

// TestLocalityPayload pins the 4-byte ptm_loc request swtpm expects (u8 locality, padding).
func TestLocalityPayload(t *testing.T) {
	if got := putLocality(3); len(got) != 4 || got[0] != 3 || got[1]|got[2]|got[3] != 0 {
		t.Fatalf("putLocality(3) = %x", got)
	}
}
