//go:build integration

package integration

import (
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/socket"
)

// chardevProgram is one way to run swtpm chardev: Debian's swtpm, vtpmd chardev, or vtpmd
// through a link named swtpm.
type chardevProgram struct {
	name string
	argv []string
}

func chardevPrograms() []chardevProgram {
	return []chardevProgram{
		{"swtpm", []string{refSwtpm(), "chardev"}},
		{"vtpmd", []string{env.bin, "chardev"}},
		{"vtpmd as swtpm", []string{filepath.Join(env.linkDir, "swtpm"), "chardev"}},
	}
}

// chardevSide is a running chardev process with its data channel on a socketpair (--fd 3)
// and a unix control socket.
type chardevSide struct {
	t     *testing.T
	cmd   *exec.Cmd
	data  net.Conn
	ctrl  *socket.Client
	state string
	done  chan error
}

func startChardev(t *testing.T, p chardevProgram, tpm2 bool, extra ...string) *chardevSide {
	t.Helper()
	dir := t.TempDir()
	s := &chardevSide{t: t, state: filepath.Join(dir, "state"), done: make(chan error, 1)}
	os.MkdirAll(s.state, 0o700)
	ours, theirs, err := socketpair()
	if err != nil {
		t.Fatal(err)
	}
	defer theirs.Close()
	ctrl := filepath.Join(dir, "ctrl.sock")
	args := append(slices.Clone(p.argv[1:]), "--fd", "3", "--ctrl", "type=unixio,path="+ctrl,
		"--tpmstate", "dir="+s.state, "--log", "file="+filepath.Join(dir, "log")+",level=20")
	if tpm2 {
		args = append(args, "--tpm2")
	}
	s.cmd = exec.Command(p.argv[0], append(args, extra...)...)
	s.cmd.ExtraFiles = []*os.File{theirs}
	s.cmd.Stderr = os.Stderr
	if err := s.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { s.done <- s.cmd.Wait() }()
	t.Cleanup(func() {
		s.cmd.Process.Kill()
		<-s.done
		s.done <- nil
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(dir, "log"))
			t.Logf("%s log:\n%s", p.name, tail(string(b), 3000))
		}
	})
	if s.data, err = net.FileConn(ours); err != nil {
		t.Fatal(err)
	}
	ours.Close()
	waitFor(t, 10*time.Second, func() bool { _, err := os.Stat(ctrl); return err == nil })
	if s.ctrl, err = socket.Dial("unix", ctrl); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.ctrl.Close() })
	return s
}

// ctrlRaw sends a control message and returns the reply in hex.
func (s *chardevSide) ctrlRaw(max int, words ...uint32) string {
	var msg []byte
	for _, w := range words {
		msg = binary.BigEndian.AppendUint32(msg, w)
	}
	b, err := s.ctrl.Raw(msg, max, 5*time.Second)
	if err != nil {
		return "error: " + err.Error()
	}
	return hex.EncodeToString(b)
}

// capabilities is GET_CAPABILITY's reply. vtpmd answers as swtpm 0.8 (SwtpmCompatVersion),
// which added PTM_CAP_LOCK_STORAGE (CMD_LOCK_STORAGE) to 0.7's bits: the reference's lack of
// it is filled in where Debian's swtpm is 0.7.
func (s *chardevSide) capabilities(reference bool) string {
	b, err := s.ctrl.Raw(binary.BigEndian.AppendUint32(nil, uint32(socket.CmdGetCapability)), 8, 5*time.Second)
	if err != nil || len(b) != 8 {
		return fmt.Sprintf("error: %x %v", b, err)
	}
	caps := binary.BigEndian.Uint32(b[4:])
	if reference && caps&socket.CapLockStorage == 0 {
		caps |= socket.CapLockStorage
	}
	return hex.EncodeToString(binary.BigEndian.AppendUint32(b[:4:4], caps))
}

// tpm sends one command on the data channel and returns the response in hex.
func (s *chardevSide) tpm(cmd string) string {
	b, err := hex.DecodeString(strings.ReplaceAll(cmd, " ", ""))
	if err != nil {
		s.t.Fatal(err)
	}
	s.data.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := s.data.Write(b); err != nil {
		return "write: " + err.Error()
	}
	buf := make([]byte, 4096)
	n, err := s.data.Read(buf)
	if err != nil {
		return "read: " + err.Error()
	}
	return hex.EncodeToString(buf[:n])
}

// setDataFD passes a new socketpair end with CMD_SET_DATAFD (a chardev has its data channel).
func (s *chardevSide) setDataFD() string {
	a, b, err := socketpair()
	if err != nil {
		s.t.Fatal(err)
	}
	defer a.Close()
	defer b.Close()
	uc := s.ctrl.Conn().(*net.UnixConn)
	if _, _, err := uc.WriteMsgUnix(binary.BigEndian.AppendUint32(nil, uint32(socket.CmdSetDataFD)), unix.UnixRights(int(a.Fd())), nil); err != nil {
		return "write: " + err.Error()
	}
	uc.SetReadDeadline(time.Now().Add(5 * time.Second))
	buf := make([]byte, 16)
	n, err := uc.Read(buf)
	if err != nil {
		return "read: " + err.Error()
	}
	return hex.EncodeToString(buf[:n])
}

// exitAfterDataClose closes our end of the data channel: a chardev ends when it loses it.
func (s *chardevSide) exitAfterDataClose() string {
	s.data.Close()
	select {
	case err := <-s.done:
		s.done <- err
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fmt.Sprintf("exit %d", ee.ExitCode())
		}
		if err != nil {
			return err.Error()
		}
		return "exit 0"
	case <-time.After(10 * time.Second):
		return "still running 10s after the data channel closed"
	}
}

// seccompMode is the process's Seccomp line (2: filter installed).
func (s *chardevSide) seccompMode() string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return err.Error()
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Seccomp:"); ok {
			return "seccomp " + strings.TrimSpace(v)
		}
	}
	return "no Seccomp line"
}

// chardevSession is one transcript: TPM commands on the --fd socketpair and control
// messages, before and after CMD_INIT, then the loss of the data channel.
func chardevSession(t *testing.T, p chardevProgram, tpm2 bool) []string {
	s := startChardev(t, p, tpm2)
	var cmds []string
	if tpm2 {
		cmds = []string{
			"8001 0000000c 00000144 0000",                       // TPM2_Startup(CLEAR)
			"8001 00000016 0000017a 00000006 00000100 00000010", // GetCapability(TPM_PROPERTIES, PT_FIXED)
			"8001 00000014 0000017e 00000001 000b 03 ff0000",    // PCR_Read(sha256, 0-7)
			"00000008 00 0000000c 8001 0000000c 00000145 0000",  // send-command-header: Shutdown(CLEAR)
			"8001 0000000b 00000144 00",                         // truncated Startup
		}
	} else {
		cmds = []string{
			"00c1 0000000c 00000099 0001",              // TPM_Startup(ST_CLEAR)
			"00c1 00000012 00000065 0000001a 00000000", // GetCapability(VERSION_VAL)
			"00c1 0000000e 00000015 00000000",          // PCRRead(0)
			"00c1 0000000a 00000070",                   // TPM_SaveState
		}
	}
	var out []string
	add := func(name, v string) { out = append(out, name+": "+v) }
	add("command before INIT", s.tpm(cmds[0]))
	add("GET_CAPABILITY", s.capabilities(p.name == "swtpm"))
	add("INIT", s.ctrlRaw(4, uint32(socket.CmdInit), 0))
	for _, c := range cmds {
		add(c, s.tpm(c))
	}
	add("GET_TPMESTABLISHED", s.ctrlRaw(8, uint32(socket.CmdGetTPMEstablished)))
	add("SET_LOCALITY 3", s.ctrlRaw(4, uint32(socket.CmdSetLocality), 0x03000000))
	add("SET_LOCALITY 5", s.ctrlRaw(4, uint32(socket.CmdSetLocality), 0x05000000))
	add("GET_CONFIG", s.ctrlRaw(8, uint32(socket.CmdGetConfig)))
	add("SET_BUFFERSIZE query", s.ctrlRaw(16, uint32(socket.CmdSetBufferSize), 0))
	add("STORE_VOLATILE", s.ctrlRaw(4, uint32(socket.CmdStoreVolatile)))
	add("SET_DATAFD", s.setDataFD())
	add("data channel still serves", s.tpm(cmds[len(cmds)-1]))
	add("seccomp", s.seccompMode())
	add("data channel closed", s.exitAfterDataClose())
	return out
}

// TestChardevFD: vtpmd chardev --fd (and swtpm chardev through the link) answer TPM 2 and TPM
// 1.2 commands and control messages on a socketpair exactly as Debian's swtpm chardev --fd,
// confine themselves by default, and end when the data channel goes away.
func TestChardevFD(t *testing.T) {
	needRefSwtpm(t)
	for _, tpm2 := range []bool{true, false} {
		name := map[bool]string{true: "tpm2", false: "tpm1.2"}[tpm2]
		t.Run(name, func(t *testing.T) {
			progs := chardevPrograms()
			want := chardevSession(t, progs[0], tpm2)
			for _, p := range progs[1:] {
				got := chardevSession(t, p, tpm2)
				if !slices.Equal(got, want) {
					t.Errorf("%s differs from swtpm:\n%s", p.name, diffLines(want, got))
				}
			}
			t.Logf("transcript:\n%s", strings.Join(want, "\n"))
		})
	}
}

func diffLines(want, got []string) string {
	var b strings.Builder
	for i := 0; i < max(len(want), len(got)); i++ {
		w, g := "", ""
		if i < len(want) {
			w = want[i]
		}
		if i < len(got) {
			g = got[i]
		}
		if w != g {
			fmt.Fprintf(&b, "  swtpm: %s\n  got:   %s\n", w, g)
		}
	}
	return b.String()
}

// TestChardevPrint: --print-capabilities is socket's (every feature Debian's swtpm lists, in
// its order), --print-states lists what swtpm lists for the same state.
func TestChardevPrint(t *testing.T) {
	needRefSwtpm(t)
	for _, tpm2 := range []bool{true, false} {
		flag := map[bool][]string{true: {"--tpm2"}, false: nil}[tpm2]
		ref := features(t, append([]string{refSwtpm(), "chardev", "--print-capabilities"}, flag...))
		socketCaps := features(t, append([]string{env.bin, "socket", "--print-capabilities"}, flag...))
		for _, p := range chardevPrograms()[1:] {
			got := features(t, append(slices.Clone(p.argv), append([]string{"--print-capabilities"}, flag...)...))
			if !slices.Equal(got, socketCaps) {
				t.Errorf("%s: chardev capabilities %v, socket's %v", p.name, got, socketCaps)
			}
			var common []string
			for _, f := range got {
				if slices.Contains(ref, f) {
					common = append(common, f)
				}
			}
			if !slices.Equal(common, ref) {
				t.Errorf("%s: capabilities %v lack or reorder swtpm's %v", p.name, got, ref)
			}
		}
	}
	// a state made by a chardev session, listed by each
	s := startChardev(t, chardevPrograms()[0], true)
	s.ctrlRaw(4, uint32(socket.CmdInit), 0)
	s.tpm("8001 0000000c 00000144 0000")
	s.ctrlRaw(4, uint32(socket.CmdStoreVolatile))
	s.exitAfterDataClose()
	var want string
	for i, p := range chardevPrograms() {
		out, err := exec.Command(p.argv[0], append(slices.Clone(p.argv[1:]), "--tpm2", "--print-states", "--tpmstate", "dir="+s.state)...).Output()
		if err != nil {
			t.Fatalf("%s --print-states: %v", p.name, err)
		}
		var v any
		if err := json.Unmarshal(out, &v); err != nil {
			t.Fatalf("%s --print-states: %q: %v", p.name, out, err)
		}
		if i == 0 {
			want = string(out)
			if !strings.Contains(want, `"permall"`) || !strings.Contains(want, `"volatilestate"`) {
				t.Fatalf("swtpm lists %s", want)
			}
		} else if string(out) != want {
			t.Errorf("%s --print-states: %s, swtpm %s", p.name, out, want)
		}
	}
}

// features runs a --print-capabilities command and returns its feature list.
func features(t *testing.T, argv []string) []string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).Output()
	if err != nil {
		t.Fatalf("%v: %v", argv, err)
	}
	var caps struct {
		Type     string   `json:"type"`
		Features []string `json:"features"`
		Version  string   `json:"version"`
	}
	if err := json.Unmarshal(out, &caps); err != nil || caps.Type != "swtpm" || caps.Version == "" {
		t.Fatalf("%v: %q: %v", argv, out, err)
	}
	return caps.Features
}

// TestChardevErrors: the refusals of swtpm chardev's data channel options, with swtpm's exit
// status; --vtpm-proxy says clearly when the host has no vTPM proxy.
func TestChardevErrors(t *testing.T) {
	needRefSwtpm(t)
	reg := filepath.Join(t.TempDir(), "file")
	os.WriteFile(reg, nil, 0o600)
	cases := []struct {
		name  string
		args  []string
		fd3   string // opened as fd 3 when set
		wantV string // in vtpmd's message
	}{
		{"no data channel", []string{"--tpm2"}, "", "missing character device or file descriptor"},
		{"regular file as --fd", []string{"--fd", "3"}, reg, "given file descriptor type is not supported"},
		{"closed --fd", []string{"--fd", "7"}, "", "bad file descriptor"},
		{"missing --chardev", []string{"-c", "/nonexistent/tpm"}, "", "cannot open /nonexistent/tpm"},
		{"--vtpm-proxy with --fd", []string{"--fd", "3", "--vtpm-proxy"}, "/dev/null", "cannot use vTPM proxy with a provided device"},
		{"unknown parameter", []string{"extra"}, "", "Unknown parameter 'extra'"},
	}
	if _, err := os.Stat("/dev/vtpmx"); err != nil {
		cases = append(cases, struct {
			name  string
			args  []string
			fd3   string
			wantV string
		}{"no /dev/vtpmx", []string{"--vtpm-proxy", "--tpm2"}, "", "could not open /dev/vtpmx: no such file or directory"})
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			codes := map[string]int{}
			for _, p := range chardevPrograms() {
				cmd := exec.Command(p.argv[0], append(slices.Clone(p.argv[1:]), c.args...)...)
				if c.fd3 != "" {
					f, err := os.OpenFile(c.fd3, os.O_RDWR, 0)
					if err != nil {
						t.Fatal(err)
					}
					defer f.Close()
					cmd.ExtraFiles = []*os.File{f}
				}
				out, err := cmd.CombinedOutput()
				var ee *exec.ExitError
				if !errors.As(err, &ee) {
					t.Fatalf("%s: %v (%s)", p.name, err, out)
				}
				codes[p.name] = ee.ExitCode()
				if p.name != "swtpm" && !strings.Contains(string(out), c.wantV) {
					t.Errorf("%s: %q lacks %q", p.name, out, c.wantV)
				}
			}
			for n, code := range codes {
				if code != codes["swtpm"] {
					t.Errorf("%s exits %d, swtpm %d", n, code, codes["swtpm"])
				}
			}
		})
	}
}
