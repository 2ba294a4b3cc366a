package main

import (
	"errors"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"golang.org/x/sys/unix"
)

// reaperEnv marks the bench process that runs under the bench's own child subreaper.
const reaperEnv = "VTPMD_BENCH_UNDER_REAPER"

// underReaper runs the bench as the child of a child subreaper (PR_SET_CHILD_SUBREAPER), as
// on a real host, where init reaps orphans at once: swtpm_setup's swtpm, for one, is orphaned
// and swtpm_setup waits until it is reaped (~0.6 s in a sandbox whose PID 1 does not reap).
// The first call makes this process the subreaper, runs the bench again as its child, reaps
// every orphan until the child exits, and returns the child's exit code and false; in the
// child it returns true.
func underReaper() (int, bool) {
	if os.Getenv(reaperEnv) == "1" {
		return 0, true
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "bench: no child subreaper:", err)
		return 0, true
	}
	self, err := os.Executable()
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1, false
	}
	pid, err := syscall.ForkExec(self, os.Args, &syscall.ProcAttr{
		Env: append(os.Environ(), reaperEnv+"=1"), Files: []uintptr{0, 1, 2}})
	if err != nil {
		fmt.Fprintln(os.Stderr, "bench:", err)
		return 1, false
	}
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			syscall.Kill(pid, s.(syscall.Signal)) // the bench decides; it is waited for below
		}
	}()
	for {
		var ws syscall.WaitStatus
		p, err := syscall.Wait4(-1, &ws, 0, nil)
		if errors.Is(err, syscall.EINTR) {
			continue
		}
		if err != nil {
			return 1, false
		}
		if p != pid {
			continue // an orphan, reaped
		}
		code := ws.ExitStatus()
		if ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
		// the bench is over: reap what has exited, leave what still runs
		for {
			if p, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil); p <= 0 || err != nil {
				return code, false
			}
		}
	}
}
