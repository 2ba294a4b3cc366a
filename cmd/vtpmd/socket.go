package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/user"
	"strconv"
	"strings"
	"syscall"

	"github.com/urfave/cli/v2"
	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/backend"
	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
	"github.com/vtpmd/vtpmd/internal/opts"
	"github.com/vtpmd/vtpmd/socket"
)

// optFlag adapts a swtpm sub-option string to urfave/cli: the last occurrence of the option
// wins, as with getopt; unknown sub-options are refused at parse time.
type optFlag struct {
	allowed []string
	set     *opts.Set
}

func (f *optFlag) Set(s string) error {
	p, err := opts.Parse(s, f.allowed...)
	if err != nil {
		return err
	}
	f.set = p
	return nil
}

func (f *optFlag) String() string {
	if f == nil || f.set == nil {
		return ""
	}
	return f.set.Raw
}

// socketOpts are the sub-option schemas of swtpm socket.
type socketOpts struct {
	tpmstate, ctrl, server, pid, log, key, migKey, locality, flags, migration, seccomp optFlag
}

func newSocketOpts() *socketOpts {
	return &socketOpts{
		tpmstate:  optFlag{allowed: []string{"dir", "backend-uri", "mode", "lock", "backup", "fsync"}},
		ctrl:      optFlag{allowed: []string{"type", "path", "port", "bindaddr", "ifname", "fd", "clientfd", "mode", "uid", "gid", "terminate"}},
		server:    optFlag{allowed: []string{"type", "path", "port", "bindaddr", "ifname", "fd", "mode", "uid", "gid", "disconnect"}},
		pid:       optFlag{allowed: []string{"file", "fd"}},
		log:       optFlag{allowed: []string{"file", "fd", "level", "prefix", "truncate"}},
		key:       optFlag{allowed: []string{"file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove"}},
		migKey:    optFlag{allowed: []string{"file", "fd", "pwdfile", "pwdfd", "format", "mode", "kdf", "remove"}},
		locality:  optFlag{allowed: []string{"reject-locality-4", "allow-set-locality"}},
		flags:     optFlag{allowed: []string{"not-need-init", "startup-clear", "startup-state", "startup-deactivated", "startup-none", "disable-auto-shutdown"}},
		migration: optFlag{allowed: []string{"incoming", "release-lock-outgoing"}},
		seccomp:   optFlag{allowed: []string{"action"}},
	}
}

func socketCommand() *cli.Command {
	o := newSocketOpts()
	return &cli.Command{
		Name:            "socket",
		Usage:           "serve one vTPM over swtpm's socket protocol (swtpm socket's options)",
		HideHelpCommand: true,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "tpm2", Usage: "emulate a TPM 2.0 (default: TPM 1.2)"},
			&cli.GenericFlag{Name: "tpmstate", Value: &o.tpmstate, Usage: "dir=<dir>|backend-uri=dir://<dir>|file://<file>[,mode=0640][,lock]"},
			&cli.GenericFlag{Name: "ctrl", Value: &o.ctrl, Usage: "type=unixio|tcp[,path=<p>][,port=<n>][,bindaddr=<a>][,fd=<n>][,clientfd=<n>][,mode=0770][,uid=][,gid=][,terminate]"},
			&cli.GenericFlag{Name: "server", Value: &o.server, Usage: "type=tcp|unixio[,port=<n>][,bindaddr=<a>][,path=<p>][,fd=<n>][,mode=][,uid=][,gid=][,disconnect]"},
			&cli.IntFlag{Name: "port", Aliases: []string{"p"}, Usage: "TCP data port (implies disconnect)"},
			&cli.IntFlag{Name: "fd", Aliases: []string{"f"}, Value: -1, Usage: "data channel on an inherited connected fd"},
			&cli.BoolFlag{Name: "terminate", Aliases: []string{"t"}, Usage: "exit when the data connection closes"},
			&cli.BoolFlag{Name: "daemon", Aliases: []string{"d"}, Usage: "run in the background"},
			&cli.GenericFlag{Name: "pid", Value: &o.pid, Usage: "file=<path>|fd=<n>"},
			&cli.GenericFlag{Name: "log", Value: &o.log, Usage: "file=<path>|fd=<n>[,level=<n>][,prefix=<s>][,truncate]"},
			&cli.GenericFlag{Name: "key", Value: &o.key, Usage: "file=|fd=|pwdfile=|pwdfd=[,format=hex|binary][,mode=aes-cbc|aes-256-cbc][,kdf=pbkdf2|sha512][,remove]"},
			&cli.GenericFlag{Name: "migration-key", Value: &o.migKey, Usage: "as --key, for state blobs"},
			&cli.GenericFlag{Name: "locality", Value: &o.locality, Usage: "reject-locality-4,allow-set-locality"},
			&cli.GenericFlag{Name: "flags", Value: &o.flags, Usage: "not-need-init,startup-clear|startup-state|startup-none,disable-auto-shutdown"},
			&cli.GenericFlag{Name: "migration", Value: &o.migration, Usage: "incoming,release-lock-outgoing"},
			&cli.StringFlag{Name: "runas", Aliases: []string{"r"}, Usage: "user to run as"},
			&cli.StringFlag{Name: "chroot", Aliases: []string{"R"}, Usage: "directory to chroot into"},
			&cli.GenericFlag{Name: "seccomp", Value: &o.seccomp, Usage: "action=none|kill|log (accepted; vtpmd installs no filter)"},
			&cli.BoolFlag{Name: "print-capabilities", Usage: "print capabilities as JSON and exit"},
			&cli.BoolFlag{Name: "print-states", Usage: "print the existing state blobs as JSON and exit"},
		},
		OnUsageError: func(_ *cli.Context, err error, _ bool) error {
			return cli.Exit(usageMessage(err), 1)
		},
		Action: func(c *cli.Context) error {
			if c.Args().Len() > 0 {
				return cli.Exit(fmt.Sprintf("Unknown parameter '%s'", c.Args().First()), 1)
			}
			if err := runSocket(c.Context, c, o); err != nil {
				var ec cli.ExitCoder
				if errors.As(err, &ec) {
					return err
				}
				return cli.Exit("Error: "+err.Error(), 1)
			}
			return nil
		},
	}
}

// usageMessage rewords urfave/cli's parse errors the way swtpm reports them.
func usageMessage(err error) string {
	msg := err.Error()
	if errors.Is(err, opts.ErrUnknown) || strings.Contains(msg, "unknown option") {
		if i := strings.Index(msg, "unknown option '"); i >= 0 {
			return "Unknown option" + msg[i+len("unknown option"):]
		}
	}
	return msg
}

// swtpmMain is the program when invoked as swtpm: "swtpm socket ..." or "swtpm -v".
func swtpmMain(ctx context.Context, args []string) int {
	if len(args) < 2 {
		fmt.Fprintln(os.Stderr, "Missing TPM interface type.")
		return 1
	}
	switch args[1] {
	case "-v", "--version":
		fmt.Printf("TPM emulator version %s, Copyright (c) 2014-2022 IBM Corp. and others (vtpmd %s)\n", swtpmCompatVersion, version)
		return 0
	case "-h", "--help":
		fmt.Printf("Usage: %s socket|chardev|cuse [options]\n\nvtpmd implements the 'socket' interface.\n", args[0])
		return 0
	case "socket":
		app := &cli.App{Name: "swtpm", HideHelpCommand: true, Commands: []*cli.Command{socketCommand()}}
		return exitCode(app.RunContext(ctx, args))
	case "chardev", "cuse":
		fmt.Fprintf(os.Stderr, "vtpmd does not implement the '%s' interface; use 'socket'.\n", args[1])
		return 1
	}
	fmt.Fprintf(os.Stderr, "Unsupported TPM interface type '%s'.\n", args[1])
	return 1
}

// socketConfig is the validated result of swtpm socket's options.
type socketConfig struct {
	tpm2         bool
	stateURI     string
	storeOpts    store.Options
	notNeedInit  bool
	startup      byte // 0 none, else TPM_SU / ST value to send
	startupName  string
	noAutoShut   bool
	incoming     bool
	stateKey     *blob.Key
	migKey       *blob.Key
	serverOpts   socket.Options
	pidFile      string
	pidFD        int
	removeOnExit []string
}

func runSocket(ctx context.Context, c *cli.Context, o *socketOpts) error {
	if c.Bool("daemon") && os.Getenv(daemonEnv) == "" {
		return daemonize(c.Context)
	}
	if dir := c.String("chroot"); dir != "" {
		if err := syscall.Chroot(dir); err != nil {
			return fmt.Errorf("chroot %s: %w", dir, err)
		}
		if err := os.Chdir("/"); err != nil {
			return fmt.Errorf("chdir / in chroot: %w", err)
		}
	}
	if u := c.String("runas"); u != "" {
		if err := runAs(u); err != nil {
			return err
		}
	}
	log, closeLog, err := openLog(o.log.set)
	if err != nil {
		return err
	}
	defer closeLog()
	tpm2 := c.Bool("tpm2")
	if c.Bool("print-capabilities") {
		fmt.Println(socketCapabilities(tpm2))
		return nil
	}
	cfg := &socketConfig{tpm2: tpm2, pidFD: -1}
	if err := cfg.parseState(o); err != nil {
		return err
	}
	if c.Bool("print-states") {
		return printStates(cfg)
	}
	if err := cfg.parseRest(c, o); err != nil {
		return err
	}
	return serveSocket(ctx, c, o, cfg, log)
}

func (cfg *socketConfig) parseState(o *socketOpts) error {
	s := o.tpmstate.set
	switch {
	case s.Has("backend-uri"):
		cfg.stateURI = s.String("backend-uri", "")
	case s.Has("dir"):
		cfg.stateURI = "dir://" + s.String("dir", "")
	case os.Getenv("TPM_PATH") != "":
		cfg.stateURI = "dir://" + os.Getenv("TPM_PATH")
	default:
		return errors.New("missing TPM state location: use --tpmstate dir=<dir> or set TPM_PATH")
	}
	if !strings.HasPrefix(cfg.stateURI, "dir://") && !strings.HasPrefix(cfg.stateURI, "file://") {
		return fmt.Errorf("unsupported tpmstate backend URI '%s': use dir:// or file://", cfg.stateURI)
	}
	mode, err := s.Mode("mode", 0o640)
	if err != nil {
		return err
	}
	isDir := strings.HasPrefix(cfg.stateURI, "dir://")
	if !isDir && (s.Has("backup") || s.Has("fsync")) {
		return errors.New("tpmstate options backup and fsync apply to dir:// backends only")
	}
	// fsync is vtpmd's default; "fsync=false" turns it off (for measurements only).
	cfg.storeOpts = store.Options{TPM2: cfg.tpm2, Mode: mode, ModeSet: s.Has("mode"), Lock: s.Bool("lock", isDir),
		NoFsync: s.Has("fsync") && !s.Bool("fsync", true)}
	return nil
}

func (cfg *socketConfig) parseRest(c *cli.Context, o *socketOpts) error {
	var err error
	if o.key.set != nil {
		if cfg.stateKey, err = loadKey(o.key.set.Raw); err != nil {
			return fmt.Errorf("--key: %w", err)
		}
		cfg.storeOpts.StateKey = cfg.stateKey
	}
	if o.migKey.set != nil {
		if cfg.migKey, err = loadKey(o.migKey.set.Raw); err != nil {
			return fmt.Errorf("--migration-key: %w", err)
		}
	}
	f := o.flags.set
	cfg.noAutoShut = f.Bool("disable-auto-shutdown", false)
	cfg.notNeedInit = f.Bool("not-need-init", false)
	for _, name := range []string{"startup-clear", "startup-state", "startup-deactivated", "startup-none"} {
		if !f.Bool(name, false) {
			continue
		}
		if cfg.startupName != "" {
			return fmt.Errorf("--flags: only one of the startup-* options may be given")
		}
		cfg.startupName = name
		cfg.notNeedInit = true
		switch name {
		case "startup-clear":
			cfg.startup = 1
		case "startup-state":
			cfg.startup = 2
		case "startup-deactivated":
			if cfg.tpm2 {
				return errors.New("--flags startup-deactivated is not supported for TPM 2")
			}
			cfg.startup = 3
		}
	}
	m := o.migration.set
	cfg.incoming = m.Bool("incoming", false)
	l := o.locality.set
	cfg.serverOpts = socket.Options{
		Terminate:        c.Bool("terminate"),
		CtrlTerminate:    o.ctrl.set.Bool("terminate", false),
		RejectLocality4:  l.Bool("reject-locality-4", false),
		AllowSetLocality: l.Bool("allow-set-locality", false),
	}
	if o.seccomp.set != nil {
		switch a := o.seccomp.set.String("action", "kill"); a {
		case "none", "kill", "log":
		default:
			return fmt.Errorf("--seccomp: unsupported action '%s'", a)
		}
	}
	if p := o.pid.set; p != nil {
		cfg.pidFile = p.String("file", "")
		if cfg.pidFD, err = p.Int("fd", -1); err != nil {
			return fmt.Errorf("--pid: %w", err)
		}
		if cfg.pidFile == "" && cfg.pidFD < 0 {
			return errors.New("--pid: file= or fd= is required")
		}
	}
	return nil
}

func loadKey(raw string) (*blob.Key, error) {
	spec, err := blob.ParseKeyOption(raw)
	if err != nil {
		return nil, err
	}
	return blob.LoadKey(spec)
}

// socketCapabilities is --print-capabilities: only what vtpmd implements, in swtpm's shape.
func socketCapabilities(tpm2 bool) string {
	features := []string{"tpm-1.2", "tpm-2.0", "tpm-send-command-header", "flags-opt-startup",
		"flags-opt-disable-auto-shutdown", "ctrl-opt-terminate", "cmdarg-key-fd", "cmdarg-pwd-fd",
		"cmdarg-print-states", "cmdarg-chroot", "cmdarg-migration", "nvram-backend-dir", "nvram-backend-file"}
	if tpm2 {
		for _, n := range rsaKeySizes() {
			features = append(features, fmt.Sprintf("rsa-keysize-%d", n))
		}
	}
	features = append(features, "tpmstate-opt-lock")
	q := make([]string, len(features))
	for i, f := range features {
		q[i] = `"` + f + `"`
	}
	return fmt.Sprintf(`{ "type": "swtpm", "features": [ %s ], "version": "%s" }`, strings.Join(q, ", "), swtpmCompatVersion)
}

// rsaKeySizes are the RSA key sizes libtpms supports (its TPMFeatures info).
func rsaKeySizes() []int { return []int{1024, 2048, 3072} }

func printStates(cfg *socketConfig) error {
	st, err := store.Open(cfg.stateURI, store.Options{TPM2: cfg.tpm2})
	if err != nil {
		return err
	}
	defer st.Close()
	states, err := st.States()
	if err != nil {
		return err
	}
	parts := make([]string, len(states))
	for i, s := range states {
		parts[i] = fmt.Sprintf(`{"name": "%s", "size": %d}`, s.Name, s.Size)
	}
	if len(parts) == 0 {
		fmt.Print(`{ "type": "swtpm", "states": [] }`)
	} else {
		fmt.Printf(`{ "type": "swtpm", "states": [ %s ] }`, strings.Join(parts, ", "))
	}
	return nil
}

func runAs(name string) error {
	u, err := user.Lookup(name)
	if err != nil {
		if _, nerr := strconv.Atoi(name); nerr == nil {
			u, err = user.LookupId(name)
		}
		if err != nil {
			return fmt.Errorf("user '%s' does not exist", name)
		}
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	groups, _ := u.GroupIds()
	var gids []int
	for _, g := range groups {
		if n, err := strconv.Atoi(g); err == nil {
			gids = append(gids, n)
		}
	}
	if err := syscall.Setgroups(gids); err != nil {
		return fmt.Errorf("runas %s: setgroups: %w", name, err)
	}
	if err := syscall.Setgid(gid); err != nil {
		return fmt.Errorf("runas %s: setgid: %w", name, err)
	}
	if err := syscall.Setuid(uid); err != nil {
		return fmt.Errorf("runas %s: setuid: %w", name, err)
	}
	return nil
}

// openLog builds the logger from --log. Without --log, warnings and errors go to stderr.
func openLog(s *opts.Set) (*slog.Logger, func(), error) {
	nop := func() {}
	if s == nil {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), nop, nil
	}
	level, err := s.Int("level", 1)
	if err != nil {
		return nil, nop, fmt.Errorf("--log: %w", err)
	}
	var w io.Writer
	closer := nop
	switch {
	case s.String("file", "") == "-":
		return slog.New(slog.DiscardHandler), nop, nil
	case s.Has("file"):
		flags := os.O_WRONLY | os.O_CREATE | os.O_APPEND
		if s.Bool("truncate", false) {
			flags = os.O_WRONLY | os.O_CREATE | os.O_TRUNC
		}
		f, err := os.OpenFile(s.String("file", ""), flags, 0o640)
		if err != nil {
			return nil, nop, fmt.Errorf("could not open logfile: %w", err)
		}
		w, closer = f, func() { f.Close() }
	case s.Has("fd"):
		fd, err := s.Int("fd", -1)
		if err != nil || fd < 0 {
			return nil, nop, fmt.Errorf("--log: invalid fd")
		}
		w = os.NewFile(uintptr(fd), "log")
	default:
		return nil, nop, errors.New("--log: file= or fd= is required")
	}
	lv := slog.LevelInfo
	if level >= 2 {
		lv = slog.LevelDebug
	}
	h := slog.NewTextHandler(w, &slog.HandlerOptions{Level: lv})
	log := slog.New(h)
	if p := s.String("prefix", ""); p != "" {
		log = log.With("prefix", p)
	}
	return log, closer, nil
}

// listener specs --------------------------------------------------------------------------

type endpoint struct {
	ln       net.Listener
	conn     net.Conn
	rw       io.ReadWriteCloser
	unixPath string
}

// openCtrl creates the control channel endpoint from --ctrl.
func openCtrl(s *opts.Set) (*endpoint, error) {
	if s == nil {
		return nil, nil
	}
	typ := s.String("type", "")
	if fd, err := s.Int("clientfd", -1); err != nil {
		return nil, fmt.Errorf("--ctrl: %w", err)
	} else if fd >= 0 {
		if typ != "unixio" {
			return nil, errors.New("--ctrl: clientfd= requires type=unixio")
		}
		c, err := fdConn(fd)
		if err != nil {
			return nil, fmt.Errorf("--ctrl clientfd=%d: %w", fd, err)
		}
		return &endpoint{conn: c}, nil
	}
	switch typ {
	case "unixio", "tcp":
	case "":
		return nil, errors.New("--ctrl: missing type=unixio|tcp")
	default:
		return nil, fmt.Errorf("--ctrl: unsupported type '%s'", typ)
	}
	return openListener("--ctrl", typ, s)
}

// openServer creates the data channel endpoint from --server, -p or -f.
func openServer(c *cli.Context, s *opts.Set, so *socket.Options) (*endpoint, error) {
	if c.IsSet("port") {
		s, _ = opts.Parse("type=tcp,disconnect,port="+strconv.Itoa(c.Int("port")), "type", "disconnect", "port")
	}
	if fd := c.Int("fd"); fd >= 0 {
		if fd <= 2 {
			return nil, fmt.Errorf("--fd %d: stdin/stdout/stderr cannot be the data channel", fd)
		}
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return nil, fmt.Errorf("--fd %d: %w", fd, err)
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFSOCK:
			conn, err := fdConn(fd)
			if err != nil {
				return nil, fmt.Errorf("--fd %d: %w", fd, err)
			}
			return &endpoint{rw: conn}, nil
		case unix.S_IFCHR:
			return &endpoint{rw: os.NewFile(uintptr(fd), "tpm-data")}, nil
		}
		return nil, fmt.Errorf("--fd %d: must be a socket or a character device", fd)
	}
	if s == nil {
		return nil, nil
	}
	so.Disconnect = s.Bool("disconnect", false)
	typ := s.String("type", "tcp")
	if typ == "tcp" {
		if fd, err := s.Int("fd", -1); err != nil {
			return nil, fmt.Errorf("--server: %w", err)
		} else if fd >= 0 {
			// swtpm_setup's case: an already connected stream socket; losing it ends the process.
			conn, err := fdConn(fd)
			if err != nil {
				return nil, fmt.Errorf("--server fd=%d: %w", fd, err)
			}
			return &endpoint{rw: conn}, nil
		}
		if !s.Has("port") {
			p := os.Getenv("TPM_PORT")
			if p == "" {
				return nil, errors.New("--server: no port given and TPM_PORT is not set")
			}
			s2, _ := opts.Parse(s.Raw+",port="+p, "type", "path", "port", "bindaddr", "ifname", "fd", "mode", "uid", "gid", "disconnect")
			s = s2
		}
	} else if typ != "unixio" {
		return nil, fmt.Errorf("--server: unsupported type '%s'", typ)
	}
	return openListener("--server", typ, s)
}

func openListener(opt, typ string, s *opts.Set) (*endpoint, error) {
	if fd, err := s.Int("fd", -1); err != nil {
		return nil, fmt.Errorf("%s: %w", opt, err)
	} else if fd >= 0 {
		f := os.NewFile(uintptr(fd), "listener")
		ln, err := net.FileListener(f)
		f.Close()
		if err != nil {
			return nil, fmt.Errorf("%s fd=%d: not a listening socket: %w", opt, fd, err)
		}
		return &endpoint{ln: ln}, nil
	}
	if typ == "unixio" {
		path := s.String("path", "")
		if path == "" {
			return nil, fmt.Errorf("%s: type=unixio needs path= or fd=", opt)
		}
		mode, err := s.Mode("mode", 0o770)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", opt, err)
		}
		uid, err := s.UID("uid")
		if err != nil {
			return nil, fmt.Errorf("%s: %w", opt, err)
		}
		gid, err := s.GID("gid")
		if err != nil {
			return nil, fmt.Errorf("%s: %w", opt, err)
		}
		_ = os.Remove(path)
		ln, err := net.Listen("unix", path)
		if err != nil {
			return nil, fmt.Errorf("%s: could not open UnixIO socket %s: %w", opt, path, err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		if err := os.Chmod(path, os.FileMode(mode)); err != nil {
			ln.Close()
			return nil, fmt.Errorf("%s: chmod %s: %w", opt, path, err)
		}
		if uid >= 0 || gid >= 0 {
			if err := os.Chown(path, uid, gid); err != nil {
				ln.Close()
				return nil, fmt.Errorf("%s: chown %s: %w", opt, path, err)
			}
		}
		return &endpoint{ln: ln, unixPath: path}, nil
	}
	port, err := s.Uint("port", 0)
	if err != nil || !s.Has("port") || port > 65535 {
		return nil, fmt.Errorf("%s: type=tcp needs a valid port= or fd=", opt)
	}
	addr := s.String("bindaddr", "127.0.0.1")
	if strings.Contains(addr, ":") {
		if ifn := s.String("ifname", ""); ifn != "" {
			addr += "%" + ifn
		}
	}
	ln, err := net.Listen("tcp", net.JoinHostPort(addr, strconv.Itoa(int(port))))
	if err != nil {
		return nil, fmt.Errorf("%s: could not open TCP socket: %w", opt, err)
	}
	return &endpoint{ln: ln}, nil
}

// fdConn wraps an inherited connected stream socket.
func fdConn(fd int) (net.Conn, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, err
	}
	if st.Mode&unix.S_IFMT != unix.S_IFSOCK {
		return nil, errors.New("not a socket")
	}
	f := os.NewFile(uintptr(fd), "conn")
	defer f.Close()
	return net.FileConn(f)
}

func writePid(cfg *socketConfig) error {
	pid := []byte(strconv.Itoa(os.Getpid())) // swtpm writes no newline
	if cfg.pidFile != "" {
		f, err := os.OpenFile(cfg.pidFile, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|syscall.O_NOFOLLOW, 0o644)
		if err != nil {
			return fmt.Errorf("could not open pidfile %s: %w", cfg.pidFile, err)
		}
		defer f.Close()
		if _, err := f.Write(pid); err != nil {
			return fmt.Errorf("write pidfile %s: %w", cfg.pidFile, err)
		}
		cfg.removeOnExit = append(cfg.removeOnExit, cfg.pidFile)
		return nil
	}
	if cfg.pidFD >= 0 {
		var st unix.Stat_t
		if err := unix.Fstat(cfg.pidFD, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG {
			return fmt.Errorf("--pid fd=%d: not a regular file", cfg.pidFD)
		}
		f := os.NewFile(uintptr(cfg.pidFD), "pidfile")
		defer f.Close()
		if err := f.Truncate(0); err == nil {
			_, err = f.WriteAt(pid, 0)
			if err != nil {
				return fmt.Errorf("write pid fd: %w", err)
			}
		}
	}
	return nil
}

// startupCommand is the TPM_Startup / TPM2_Startup command for --flags startup-*.
func startupCommand(tpm2 bool, su byte) []byte {
	if tpm2 {
		// TPM2: SU_CLEAR = 0, SU_STATE = 1 (startup-clear -> 0, startup-state -> 1)
		return []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, su - 1}
	}
	return []byte{0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, su}
}

func serveSocket(ctx context.Context, c *cli.Context, o *socketOpts, cfg *socketConfig, log *slog.Logger) error {
	ctrl, err := openCtrl(o.ctrl.set)
	if err != nil {
		return err
	}
	data, err := openServer(c, o.server.set, &cfg.serverOpts)
	if err != nil {
		closeEndpoint(ctrl)
		return err
	}
	defer closeEndpoint(ctrl)
	defer closeEndpoint(data)
	if ctrl == nil && data == nil {
		return errors.New("no control channel and no data channel: use --ctrl and/or --server")
	}
	st, err := store.Open(cfg.stateURI, cfg.storeOpts)
	if err != nil {
		return err
	}
	defer st.Close()
	ver := emulator.TPM12
	if cfg.tpm2 {
		ver = emulator.TPM2
	}
	inst, err := backend.New(backend.Config{
		Version: ver, Store: st, StateKey: cfg.stateKey, MigrationKey: cfg.migKey,
		IncomingMigration: cfg.incoming, DisableAutoShutdown: cfg.noAutoShut, Log: log,
	})
	if err != nil {
		return err
	}
	defer inst.Close()
	if err := writePid(cfg); err != nil {
		return err
	}
	defer func() {
		for _, p := range cfg.removeOnExit {
			os.Remove(p)
		}
	}()
	if cfg.notNeedInit {
		var startup []byte
		if cfg.startup != 0 {
			startup = startupCommand(cfg.tpm2, cfg.startup)
		}
		resp, err := inst.StartWith(startup)
		if err != nil {
			return fmt.Errorf("could not initialize the TPM: %w", err)
		}
		if startup != nil && (len(resp) < 10 || binary.BigEndian.Uint32(resp[6:10]) != 0) {
			return fmt.Errorf("TPM startup (%s) failed: %x", cfg.startupName, resp)
		}
	}
	cfg.serverOpts.Log = log
	srv := socket.NewServer(inst, cfg.serverOpts)
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if ctrl != nil {
		if ctrl.conn != nil {
			srv.ServeCtrlConn(sctx, ctrl.conn)
		} else {
			srv.ServeCtrl(sctx, ctrl.ln)
		}
	}
	if data != nil {
		if data.rw != nil {
			srv.ServeDataConn(sctx, data.rw)
		} else {
			srv.ServeData(sctx, data.ln)
		}
	}
	signalReady()
	log.Info("vtpmd socket ready", "state", cfg.stateURI, "tpm2", cfg.tpm2)
	select {
	case <-ctx.Done():
		log.Info("exiting on signal")
	case <-srv.Done():
	}
	cancel()
	closeEndpoint(ctrl)
	closeEndpoint(data)
	srv.Wait()
	return nil
}

func closeEndpoint(e *endpoint) {
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
