package socket

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"
)

// ctrlBufSize is swtpm's receive buffer: u32 cmd + sizeof(ptm_hdata).
const ctrlBufSize = 4 + 4100

// errIncomplete means a control message (or a further part of a streamed payload) did not
// arrive within partialWindow; the connection is closed without an answer, as swtpm does.
var errIncomplete = errors.New("socket: incomplete control message")

// ctrlRequest is one received control message.
type ctrlRequest struct {
	cmd     Cmd
	payload []byte // bytes after the command word that arrived with it
	fd      *os.File
}

// wire is the message as it came: the command word and the payload that arrived with it.
func (r *ctrlRequest) wire() []byte {
	return append(putBE32(make([]byte, 0, 4+len(r.payload)), uint32(r.cmd)), r.payload...)
}

// ctrlReader reads control messages the way swtpm's ctrlchannel_recv_cmd does.
type ctrlReader struct {
	conn net.Conn
	unix *net.UnixConn
	buf  []byte
	oob  []byte
}

func newCtrlReader(c net.Conn) *ctrlReader {
	r := &ctrlReader{conn: c, buf: make([]byte, ctrlBufSize)}
	if uc, ok := c.(*net.UnixConn); ok {
		r.unix = uc
		r.oob = make([]byte, unix.CmsgSpace(4*4))
	}
	return r
}

// neededLen is how many bytes a command needs before it can be processed, given what has
// arrived so far (swtpm computes it only for these commands; others need the word alone).
func neededLen(cmd Cmd, got []byte) int {
	switch cmd {
	case CmdInit:
		return 8
	case CmdSetLocality, CmdResetTPMEstablished:
		return 5
	case CmdGetStateBlob:
		return 16
	case CmdHashData:
		if len(got) < 8 {
			return 8
		}
		return min(8+int(binary.BigEndian.Uint32(got[4:8])), ctrlBufSize)
	case CmdSetStateBlob:
		if len(got) < 16 {
			return 16
		}
		n := int(binary.BigEndian.Uint32(got[12:16]))
		if n > MaxStateBlob {
			return 16 // refused at once, no need to wait for a body that will not be read
		}
		return min(16+n, ctrlBufSize)
	}
	return 4
}

// read receives one command. io.EOF means the client closed between commands.
func (r *ctrlReader) read() (*ctrlRequest, error) {
	req := &ctrlRequest{}
	n, err := r.readSome(req, 0)
	if err != nil {
		if n == 0 {
			return nil, err
		}
	}
	deadline := time.Now().Add(partialWindow)
	defer r.conn.SetReadDeadline(time.Time{})
	for {
		need := 4
		if n >= 4 {
			need = neededLen(Cmd(binary.BigEndian.Uint32(r.buf[:4])), r.buf[:n])
		}
		if n >= need {
			break
		}
		if err != nil {
			req.closeFD()
			return nil, fmt.Errorf("%w: %d bytes: %w", errIncomplete, n, err)
		}
		r.conn.SetReadDeadline(deadline)
		var m int
		m, err = r.readSome(req, n)
		n += m
	}
	req.cmd = Cmd(binary.BigEndian.Uint32(r.buf[:4]))
	req.payload = append([]byte(nil), r.buf[4:n]...)
	return req, nil
}

// readSome does one read into buf[off:], collecting at most one passed fd.
func (r *ctrlReader) readSome(req *ctrlRequest, off int) (int, error) {
	if r.unix == nil {
		return r.conn.Read(r.buf[off:])
	}
	n, oobn, _, _, err := r.unix.ReadMsgUnix(r.buf[off:], r.oob)
	if oobn > 0 {
		r.collectFDs(req, r.oob[:oobn])
	}
	if n == 0 && err == nil {
		err = io.EOF
	}
	return n, err
}

func (r *ctrlReader) collectFDs(req *ctrlRequest, oob []byte) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return
	}
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			if req.fd == nil && fd >= 0 {
				req.fd = os.NewFile(uintptr(fd), "tpm-data")
			} else {
				unix.Close(fd) // only one fd is ever meaningful
			}
		}
	}
}

func (req *ctrlRequest) closeFD() {
	if req != nil && req.fd != nil {
		req.fd.Close()
		req.fd = nil
	}
}

// readMore reads exactly len(dst) further bytes of a streamed payload (SET_STATEBLOB,
// HASH_DATA). Each read must bring data within partialWindow: a stalled client loses its
// connection instead of holding the control channel (swtpm waits without bound there).
func (r *ctrlReader) readMore(dst []byte) error {
	defer r.conn.SetReadDeadline(time.Time{})
	want := len(dst)
	for len(dst) > 0 {
		r.conn.SetReadDeadline(time.Now().Add(partialWindow))
		n, err := r.conn.Read(dst)
		dst = dst[n:]
		if err != nil && len(dst) > 0 {
			return fmt.Errorf("%w: %d of %d bytes: %w", errIncomplete, want-len(dst), want, err)
		}
	}
	return nil
}

func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }

func putBE32(b []byte, vals ...uint32) []byte {
	for _, v := range vals {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

// rightsFor builds the SCM_RIGHTS message that passes f.
func rightsFor(f *os.File) []byte { return unix.UnixRights(int(f.Fd())) }
