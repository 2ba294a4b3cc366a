package main

import (
	"context"
	"fmt"
	"os"
)

// ioctlMain is swtpm_ioctl's command line. Placeholder until it lands.
func ioctlMain(ctx context.Context, args []string) int {
	fmt.Fprintln(os.Stderr, "not implemented yet")
	return 1
}
