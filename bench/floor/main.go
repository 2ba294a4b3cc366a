// Command floor is the least a Go vTPM process can be, for the bench's floor rows: the Go
// runtime, cgo and libtpms, one TPM manufactured in memory, one unix socket whose connections
// are served on libtpms.Engine's native data thread — none of vtpmd's CLI, state files,
// control channel or manager code. The bench builds it (go build ./bench/floor) and measures
// its start-up and idle memory beside vtpmd's and swtpm's.
package main

import (
	"flag"
	"fmt"
	"net"
	"os"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/emulator/libtpms"
)

func main() {
	sock := flag.String("sock", "", "unix socket to serve")
	flag.Parse()
	err := serve(*sock) // serves until killed
	fmt.Fprintln(os.Stderr, "floor:", err)
	os.Exit(1)
}

// serve returns only when it cannot go on.
func serve(path string) error {
	e, err := libtpms.Open(emulator.TPM2, emulator.NewMemStore(), nil)
	if err != nil {
		return err
	}
	if err := e.Start(); err != nil {
		return err
	}
	if _, err := e.Process([]byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}); err != nil {
		return err
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return err
	}
	for {
		c, err := l.Accept()
		if err != nil {
			return err
		}
		f, err := c.(*net.UnixConn).File()
		c.Close()
		if err != nil {
			return err
		}
		fd, err := unix.Dup(int(f.Fd()))
		f.Close()
		if err != nil {
			return err
		}
		var buf []byte
		if _, err := e.ServeData(fd, 4096+9, nil, func(msg []byte) ([]byte, bool) {
			resp, err := e.ProcessAppendArmed(buf[:0], msg, e.Epoch())
			if err != nil {
				return nil, false
			}
			buf = resp
			return resp, true
		}); err != nil {
			return err
		}
	}
}
