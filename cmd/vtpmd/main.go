// Command vtpmd is the virtual TPM service. Invoked as swtpm, swtpm_setup or swtpm_ioctl (a
// link of that name), it behaves as that program.
package main

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	code := run(ctx, os.Args)
	stop()
	os.Exit(code)
}

// run dispatches on the name the binary was invoked as.
func run(ctx context.Context, args []string) int {
	switch filepath.Base(args[0]) {
	case "swtpm":
		return swtpmMain(ctx, args)
	case "swtpm_setup":
		return setupMain(ctx, args)
	case "swtpm_ioctl":
		return ioctlMain(ctx, args)
	}
	return exitCode(newVtpmdApp().RunContext(ctx, args))
}
