package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"
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

// measureBlocks times each function in blocks of back-to-back calls, the servers taking turns
// block by block: a round trip to a server that has just answered, as in a burst of commands.
func measureBlocks(rounds, block int, fs map[string]func() error) (map[string]stats, error) {
	ds := map[string][]time.Duration{}
	for i := 0; i < rounds; i++ {
		for _, name := range sortedNames(nil, fs) {
			for j := 0; j < block; j++ {
				t0 := time.Now()
				if err := fs[name](); err != nil {
					return nil, fmt.Errorf("%s: %w", name, err)
				}
				ds[name] = append(ds[name], time.Since(t0))
			}
		}
	}
	out := map[string]stats{}
	for name, d := range ds {
		out[name] = summarize(d)
	}
	return out, nil
}

// sortedNames lists the keys of m, or of fs when m is nil.
func sortedNames(m map[string]stats, fs map[string]func() error) []string {
	var names []string
	for name := range m {
		names = append(names, name)
	}
	for name := range fs {
		names = append(names, name)
	}
	sort.Strings(names)
	return names
}

// getRandom8 is TPM2_GetRandom(8), answered with 20 bytes.
var getRandom8 = []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 0x08}

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
	spawn := func(name string, cmd *exec.Cmd, sock string, req []byte, n int) error {
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
		fns[name] = roundTrip(c, req, n)
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
	if err := spawn("echo server in C (blocking read/write)", exec.Command(bin, filepath.Join(r.work, "echo-c.sock")), filepath.Join(r.work, "echo-c.sock"), getRandom8, len(getRandom8)); err != nil {
		return "", err
	}
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	if err := spawn("echo server in Go (netpoller)", exec.Command(self, "-echo", filepath.Join(r.work, "echo-go.sock")), filepath.Join(r.work, "echo-go.sock"), getRandom8, len(getRandom8)); err != nil {
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
		for _, name := range sortedNames(set, nil) {
			fmt.Fprintf(&b, "| %s | %s | %s |\n", name, fmtDur(set[name].median), fmtDur(set[name].p10))
		}
	}
	return b.String(), nil
}
