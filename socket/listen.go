package socket

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/opts"
)

// Sub-options of swtpm's --ctrl and --server, refused when unknown.
var (
	CtrlOptions   = []string{"type", "path", "port", "bindaddr", "ifname", "fd", "clientfd", "mode", "uid", "gid", "terminate"}
	ServerOptions = []string{"type", "path", "port", "bindaddr", "ifname", "fd", "mode", "uid", "gid", "disconnect"}
)

// ListenSpec says where one channel is served: a socket to listen on (unix path or TCP
// address), an inherited listening socket, or an inherited connection. It is parsed once from
// swtpm's --ctrl or --server sub-options (ParseCtrl, ParseData) and opened by Open.
type ListenSpec struct {
	// Name is the option it came from ("--ctrl", "--server", "--fd"), for error messages.
	Name string
	// Network is "unix" or "tcp" for a socket vtpmd creates; empty for an inherited fd.
	Network string
	// Path (unix) or Addr (tcp) to listen on.
	Path, Addr string
	// Mode, UID and GID of a unix socket file (UID/GID -1: unchanged).
	Mode     os.FileMode
	UID, GID int
	// ListenFD is an inherited listening socket, ConnFD an inherited connected socket or
	// character device (-1: none).
	ListenFD, ConnFD int
	// Terminate ends the server when the control client disconnects (--ctrl ...,terminate).
	Terminate bool
	// Disconnect closes the data connection after every response (--server ...,disconnect).
	Disconnect bool
	// charDevOK lets ConnFD be a character device (only -f/--fd); anyFile lets it be any file
	// but a socket (swtpm chardev's data channel: a device, a FIFO, the vTPM proxy's fd).
	charDevOK, anyFile bool
}

func newSpec(name string) *ListenSpec {
	return &ListenSpec{Name: name, UID: -1, GID: -1, ListenFD: -1, ConnFD: -1}
}

// ParseCtrl parses --ctrl's sub-options; a nil set means no control channel (nil spec).
func ParseCtrl(s *opts.Set) (*ListenSpec, error) {
	if s == nil {
		return nil, nil
	}
	typ := s.String("type", "")
	fd, err := s.Int("clientfd", -1)
	if err != nil {
		return nil, fmt.Errorf("--ctrl: %w", err)
	}
	if fd >= 0 {
		if typ != "unixio" {
			return nil, errors.New("--ctrl: clientfd= requires type=unixio")
		}
		sp := newSpec("--ctrl clientfd=" + strconv.Itoa(fd))
		sp.ConnFD, sp.Terminate = fd, s.Bool("terminate", false)
		return sp, nil
	}
	switch typ {
	case "unixio", "tcp":
	case "":
		return nil, errors.New("--ctrl: missing type=unixio|tcp")
	default:
		return nil, fmt.Errorf("--ctrl: unsupported type '%s'", typ)
	}
	sp, err := parseListener("--ctrl", typ, s)
	if err != nil {
		return nil, err
	}
	sp.Terminate = s.Bool("terminate", false)
	return sp, nil
}

// ParseData parses the data channel from --server's sub-options, -p PORT (port >= 0) or
// -f/--fd FD (fd >= 0), which win in that order as in swtpm. No data channel is a nil spec.
func ParseData(s *opts.Set, port, fd int) (*ListenSpec, error) {
	if port >= 0 {
		s, _ = opts.Parse("type=tcp,disconnect,port="+strconv.Itoa(port), ServerOptions...)
	}
	if fd >= 0 {
		return parseDataFD(fd)
	}
	if s == nil {
		return nil, nil
	}
	typ := s.String("type", "tcp")
	switch typ {
	case "tcp":
		if fd, err := s.Int("fd", -1); err != nil {
			return nil, fmt.Errorf("--server: %w", err)
		} else if fd >= 0 {
			// swtpm_setup's case: an already connected stream socket; losing it ends the process.
			sp := newSpec("--server fd=" + strconv.Itoa(fd))
			sp.ConnFD = fd
			return sp, nil
		}
		if !s.Has("port") {
			p := os.Getenv("TPM_PORT")
			if p == "" {
				return nil, errors.New("--server: no port given and TPM_PORT is not set")
			}
			s, _ = opts.Parse(s.Raw+",port="+p, ServerOptions...)
		}
	case "unixio":
	default:
		return nil, fmt.Errorf("--server: unsupported type '%s'", typ)
	}
	sp, err := parseListener("--server", typ, s)
	if err != nil {
		return nil, err
	}
	sp.Disconnect = s.Bool("disconnect", false)
	return sp, nil
}

// parseDataFD is -f/--fd: an inherited connected socket or character device.
func parseDataFD(fd int) (*ListenSpec, error) {
	if fd <= 2 {
		return nil, fmt.Errorf("--fd %d: stdin/stdout/stderr cannot be the data channel", fd)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("--fd %d: %w", fd, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFSOCK, unix.S_IFCHR:
	default:
		return nil, fmt.Errorf("--fd %d: must be a socket or a character device", fd)
	}
	sp := newSpec("--fd " + strconv.Itoa(fd))
	sp.ConnFD, sp.charDevOK = fd, true
	return sp, nil
}

// Errors of swtpm chardev's data channel.
var (
	ErrFDType  = errors.New("given file descriptor type is not supported")
	ErrStdioFD = errors.New("cannot accept file descriptors with values 0, 1, or 2")
)

// CharDevFD is swtpm chardev's -f/--fd: an inherited character device, socket, FIFO or
// anonymous file such as the vTPM proxy's; a regular file, directory, block device or symbolic
// link is refused, as are stdin, stdout and stderr. Losing it ends the server.
func CharDevFD(fd int) (*ListenSpec, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("--fd %d: cannot stat file descriptor: %w", fd, err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFDIR, unix.S_IFBLK, unix.S_IFLNK:
		return nil, fmt.Errorf("--fd %d: %w", fd, ErrFDType)
	}
	if fd <= 2 {
		return nil, fmt.Errorf("--fd %d: %w", fd, ErrStdioFD)
	}
	return charDevSpec("--fd "+strconv.Itoa(fd), fd), nil
}

// OpenCharDev is swtpm chardev's -c/--chardev: the file at path, opened read-write now (as
// swtpm does while parsing its options, before --chroot and --runas).
func OpenCharDev(path string) (*ListenSpec, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("cannot open %s: %w", path, err)
	}
	return charDevSpec("--chardev "+path, fd), nil
}

func charDevSpec(name string, fd int) *ListenSpec {
	sp := newSpec(name)
	sp.ConnFD, sp.charDevOK, sp.anyFile = fd, true, true
	return sp
}

func parseListener(name, typ string, s *opts.Set) (*ListenSpec, error) {
	sp := newSpec(name)
	fd, err := s.Int("fd", -1)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", name, err)
	}
	if fd >= 0 {
		sp.ListenFD = fd
		return sp, nil
	}
	if typ == "unixio" {
		sp.Network, sp.Path = "unix", s.String("path", "")
		if sp.Path == "" {
			return nil, fmt.Errorf("%s: type=unixio needs path= or fd=", name)
		}
		mode, err := s.Mode("mode", 0o770)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		sp.Mode = os.FileMode(mode)
		if sp.UID, err = s.UID("uid"); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		if sp.GID, err = s.GID("gid"); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
		return sp, nil
	}
	port, err := s.Uint("port", 0)
	if err != nil || !s.Has("port") || port > 65535 {
		return nil, fmt.Errorf("%s: type=tcp needs a valid port= or fd=", name)
	}
	addr := s.String("bindaddr", "127.0.0.1")
	if strings.Contains(addr, ":") {
		if ifn := s.String("ifname", ""); ifn != "" {
			addr += "%" + ifn
		}
	}
	sp.Network, sp.Addr = "tcp", net.JoinHostPort(addr, strconv.Itoa(int(port)))
	return sp, nil
}

// Endpoint is an opened ListenSpec: a listener, or one connection.
type Endpoint struct {
	spec     ListenSpec
	ln       net.Listener
	conn     io.ReadWriteCloser
	unixPath string // removed on Close
}

// Open creates the socket (a unix socket file gets the spec's mode and owner) or adopts the
// inherited fd.
func (sp *ListenSpec) Open() (*Endpoint, error) {
	e := &Endpoint{spec: *sp}
	switch {
	case sp.ConnFD >= 0:
		c, err := adoptConn(sp.ConnFD, sp.charDevOK, sp.anyFile)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", sp.Name, err)
		}
		e.conn = c
	case sp.ListenFD >= 0:
		f := os.NewFile(uintptr(sp.ListenFD), "listener")
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s fd=%d: not a listening socket: %w", sp.Name, sp.ListenFD, err)
		}
		e.ln = ln
	case sp.Network == "unix":
		ln, err := listenUnix(sp)
		if err != nil {
			return nil, err
		}
		e.ln, e.unixPath = ln, sp.Path
	default:
		ln, err := net.Listen("tcp", sp.Addr)
		if err != nil {
			return nil, fmt.Errorf("%s: could not open TCP socket: %w", sp.Name, err)
		}
		e.ln = ln
	}
	return e, nil
}

func listenUnix(sp *ListenSpec) (net.Listener, error) {
	_ = os.Remove(sp.Path)
	ln, err := net.Listen("unix", sp.Path)
	if err != nil {
		return nil, fmt.Errorf("%s: could not open UnixIO socket %s: %w", sp.Name, sp.Path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	if err := os.Chmod(sp.Path, sp.Mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("%s: chmod %s: %w", sp.Name, sp.Path, err)
	}
	if sp.UID >= 0 || sp.GID >= 0 {
		if err := os.Chown(sp.Path, sp.UID, sp.GID); err != nil {
			ln.Close()
			return nil, fmt.Errorf("%s: chown %s: %w", sp.Name, sp.Path, err)
		}
	}
	return ln, nil
}

// adoptConn wraps an inherited connected stream socket, or a character device as a stream.
func adoptConn(fd int, charDevOK, anyFile bool) (io.ReadWriteCloser, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFSOCK:
		f := os.NewFile(uintptr(fd), "conn")
		defer f.Close()
		return net.FileConn(f)
	case unix.S_IFCHR:
		if charDevOK {
			return streamFile(fd), nil
		}
	}
	if anyFile {
		return streamFile(fd), nil
	}
	return nil, errors.New("not a socket")
}

// streamFile wraps a data channel that is not a socket. When epoll accepts it (the vTPM
// proxy's fd, a FIFO, most character devices) it is made non-blocking, so that the netpoller
// serves it and closing it ends a pending read; otherwise reads block their thread.
func streamFile(fd int) *os.File {
	if ep, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC); err == nil {
		if unix.EpollCtl(ep, unix.EPOLL_CTL_ADD, fd, &unix.EpollEvent{Events: unix.EPOLLIN}) == nil {
			_ = unix.SetNonblock(fd, true)
		}
		unix.Close(ep)
	}
	return os.NewFile(uintptr(fd), "tpm-data")
}

// Close closes the listener and removes the unix socket file it created; an adopted
// connection is closed by the server that serves it.
func (e *Endpoint) Close() {
	if e == nil {
		return
	}
	if e.ln != nil {
		e.ln.Close()
	}
	if e.unixPath != "" {
		os.Remove(e.unixPath)
		e.unixPath = ""
	}
}
