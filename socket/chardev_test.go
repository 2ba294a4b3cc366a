package socket

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestCharDevFD: swtpm chardev's --fd takes what is not a regular file, directory, block
// device or link, and never stdin/stdout/stderr.
func TestCharDevFD(t *testing.T) {
	dir := t.TempDir()
	reg, err := os.Create(filepath.Join(dir, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer reg.Close()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for name, fd := range map[string]int{"regular file": int(reg.Fd()), "directory": int(d.Fd())} {
		if _, err := CharDevFD(fd); !errors.Is(err, ErrFDType) {
			t.Errorf("%s: %v, want ErrFDType", name, err)
		}
	}
	if _, err := CharDevFD(1000); !errors.Is(err, unix.EBADF) {
		t.Errorf("closed fd: %v", err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fds[1])
	sp, err := CharDevFD(fds[0])
	if err != nil {
		t.Fatal(err)
	}
	if sp.ConnFD != fds[0] || sp.ListenFD != -1 || sp.Name != "--fd "+strconv.Itoa(fds[0]) {
		t.Fatalf("spec %+v", sp)
	}
	e, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Write(fds[1], []byte("x")); err != nil {
		t.Fatal(err)
	}
	b := make([]byte, 1)
	if _, err := e.conn.Read(b); err != nil || b[0] != 'x' {
		t.Fatalf("read %q %v", b, err)
	}
	e.conn.Close()
	// stdin is refused whatever it is (for its type, or for being fd 0)
	if _, err := CharDevFD(0); err == nil {
		t.Fatal("fd 0 accepted")
	}
}

// TestOpenCharDev: --chardev opens the path read-write at once.
func TestOpenCharDev(t *testing.T) {
	if _, err := OpenCharDev(filepath.Join(t.TempDir(), "missing")); !errors.Is(err, unix.ENOENT) {
		t.Fatalf("missing device: %v", err)
	}
	sp, err := OpenCharDev("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	e, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	if n, err := e.conn.Write([]byte("x")); n != 1 || err != nil {
		t.Fatalf("write /dev/null: %d %v", n, err)
	}
	e.conn.Close()
}

// TestStreamFileCloseEndsRead: a pollable data channel that is not a socket (here a FIFO, as
// the vTPM proxy's fd) is served by the netpoller, so closing it ends a pending read and the
// server can exit.
func TestStreamFileCloseEndsRead(t *testing.T) {
	p := filepath.Join(t.TempDir(), "fifo")
	if err := unix.Mkfifo(p, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := CharDevFD(fd)
	if err != nil {
		t.Fatal(err)
	}
	e, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := e.conn.Read(make([]byte, 16))
		done <- err
	}()
	time.Sleep(50 * time.Millisecond)
	e.conn.Close()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("read returned no error after close")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("closing the channel did not end a pending read")
	}
}

// TestVTPMProxy: the ioctl is VTPM_PROXY_IOC_NEW_DEV; without /dev/vtpmx the error says so; on
// a host with the proxy a TPM device appears and goes away with its channel.
func TestVTPMProxy(t *testing.T) {
	if vtpmProxyIOCNewDev != 0xc014a100 {
		t.Fatalf("VTPM_PROXY_IOC_NEW_DEV = %#x, want 0xc014a100", vtpmProxyIOCNewDev)
	}
	saved := vtpmxPath
	defer func() { vtpmxPath = saved }()
	vtpmxPath = filepath.Join(t.TempDir(), "vtpmx")
	if _, _, err := NewVTPMProxy(true); !errors.Is(err, ErrNoVTPMProxy) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("missing /dev/vtpmx: %v", err)
	}
	vtpmxPath = "/dev/null"
	if _, _, err := NewVTPMProxy(true); !errors.Is(err, syscall.ENOTTY) {
		t.Fatalf("ioctl on /dev/null: %v", err)
	}
	vtpmxPath = saved
	if _, err := os.Stat(vtpmxPath); err != nil {
		t.Skipf("%s: %v (no vTPM proxy here)", vtpmxPath, err)
	}
	sp, dev, err := NewVTPMProxy(true)
	if err != nil {
		t.Fatal(err)
	}
	e, err := sp.Open()
	if err != nil {
		t.Fatal(err)
	}
	defer e.conn.Close()
	if dev.Device() == "" || dev.Major == 0 {
		t.Fatalf("device %+v", dev)
	}
}
