package main

import (
	"context"
	"path/filepath"
	"testing"
)

// TestIoctlMainExitStatus checks the exit status; socket/ioctl tests what is printed.
func TestIoctlMainExitStatus(t *testing.T) {
	ctx := context.Background()
	missing := filepath.Join(t.TempDir(), "none.sock")
	for _, tt := range []struct {
		args []string
		code int
	}{
		{[]string{"swtpm_ioctl", "--unix", "/s"}, 1},
		{[]string{"swtpm_ioctl", "--unix", missing, "-c"}, 1},
		{nil, 1},
	} {
		if code := ioctlMain(ctx, tt.args); code != tt.code {
			t.Errorf("%q: exit %d, want %d", tt.args, code, tt.code)
		}
	}
}
