package main

import (
	"context"

	"github.com/urfave/cli/v2"
)

func socketCommand() *cli.Command {
	return &cli.Command{Name: "socket", Usage: "serve one vTPM over swtpm's socket protocol (swtpm socket's options)"}
}

func swtpmMain(ctx context.Context, args []string) int { return 1 }
