package main

import (
	"context"
	"fmt"
	"os"

	"github.com/vtpmd/vtpmd/socket/ioctl"
)

// ioctlMain is swtpm_ioctl: one control command against a socket, swtpm_ioctl's output.
// args[0] is the program name its messages use. Errors are printed as they are: their text is
// swtpm_ioctl's.
func ioctlMain(ctx context.Context, args []string) int {
	if len(args) == 0 {
		args = []string{"swtpm_ioctl"}
	}
	tool := ioctl.Program{Name: args[0], Version: swtpmCompatVersion}
	req, err := ioctl.ParseArgs(tool, args[1:])
	if err == nil {
		err = ioctl.Run(ctx, req, os.Stdout, os.Stdin)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	return 0
}
