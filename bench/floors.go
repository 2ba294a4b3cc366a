package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// echoC is the cheapest server a round trip can have: blocking read, write back.
const echoC = `#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
	struct sockaddr_un a = {.sun_family = AF_UNIX};
	char b[4096];
	int s = socket(AF_UNIX, SOCK_STREAM, 0), c, n;
	strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
	if (s < 0 || bind(s, (void *)&a, sizeof a) || listen(s, 1) || (c = accept(s, 0, 0)) < 0)
		return 1;
	while ((n = read(c, b, sizeof b)) > 0)
		if (write(c, b, n) != n)
			return 1;
	return 0;
}
`

// serveEcho is the Go counterpart of echoC (the netpoller path vtpmd's data channel uses); the
// bench runs itself with -echo PATH for it.
func serveEcho(path string) error {
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	c, err := l.Accept()
	if err != nil {
		return err
	}
	_, err = io.Copy(c, c)
	return err
}

// getRandom8 is TPM2_GetRandom(8), answered with 20 bytes.
var getRandom8 = tpmwire.GetRandom2(8)

// roundTrip writes req and reads n bytes back: the client side of the floor rows, without
// go-tpm's marshalling.
func roundTrip(c net.Conn, req []byte, n int) func() error {
	buf := make([]byte, n)
	return func() error {
		if _, err := c.Write(req); err != nil {
			return err
		}
		_, err := io.ReadFull(c, buf)
		return err
	}
}

// floors measures, in the same run, what the targets are bounded by on this machine: process
// start alone, and a unix-socket round trip to servers that do no TPM work.
func (r *run) floors() (string, error) {
	var b strings.Builder
	fmt.Fprintf(&b, "\n## Floors on this machine (same run)\n\n")
	fmt.Fprintf(&b, "What a server cannot go below here. Round trips are raw (12-byte command, no go-tpm on the client), 10 rounds of %d back-to-back calls per server.\n\n", r.iters)
	b.WriteString("| measure | median | p10 |\n|---|---|---|\n")

	startFns := map[string]func() error{}
	for _, im := range r.impls {
		startFns[im.name+" --version (process start alone)"] = func() error {
			return exec.Command(im.bin, "--version").Run()
		}
	}
	starts, err := measureInterleaved(max(20, r.iters/5), startFns)
	if err != nil {
		return "", fmt.Errorf("process start: %w", err)
	}

	fns := map[string]func() error{}
	var stops []func()
	defer func() {
		for _, f := range stops {
			f()
		}
	}()
	// echo starts an echo server whose last argument is its socket and connects to it.
	echo := func(name string, argv ...string) error {
		sock := argv[len(argv)-1]
		cmd := exec.Command(argv[0], argv[1:]...)
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		stops = append(stops, func() { cmd.Process.Kill(); cmd.Wait() })
		in := &instance{data: sock}
		c, err := in.dial(10 * time.Second)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		stops = append(stops, func() { c.Close() })
		fns[name] = roundTrip(c, getRandom8, len(getRandom8))
		return nil
	}
	src := filepath.Join(r.work, "echo.c")
	bin := filepath.Join(r.work, "echo-c")
	if err := os.WriteFile(src, []byte(echoC), 0o644); err != nil {
		return "", err
	}
	if out, err := exec.Command("cc", "-O2", "-o", bin, src).CombinedOutput(); err != nil {
		return "", fmt.Errorf("cc echo.c: %v: %s", err, out)
	}
	if err := echo("echo server in C (blocking read/write)", bin, filepath.Join(r.work, "echo-c.sock")); err != nil {
		return "", err
	}
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	if err := echo("echo server in Go (netpoller)", self, "-echo", filepath.Join(r.work, "echo-go.sock")); err != nil {
		return "", err
	}
	for _, im := range r.impls {
		in, err := r.start(im)
		if err != nil {
			return "", err
		}
		stops = append(stops, in.stop)
		c, err := in.dial(10 * time.Second)
		if err != nil {
			return "", err
		}
		stops = append(stops, func() { c.Close() })
		fns[im.name+" GetRandom(8), raw"] = roundTrip(c, getRandom8, 20)
	}
	trips, err := measureBlocks(10, r.iters, fns)
	if err != nil {
		return "", fmt.Errorf("round trips: %w", err)
	}
	for _, set := range []map[string]stats{starts, trips} {
		for _, name := range sortedKeys(set) {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", name, fmtDur(set[name].median), fmtDur(set[name].p10))
		}
	}
	return b.String(), nil
}
