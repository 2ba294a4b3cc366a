package socket

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"time"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
)

// Client speaks the control channel to a TPM emulator (vtpmd or swtpm): what swtpm_ioctl,
// QEMU and the tests send. Each method sends one command and reads its whole reply; a non-zero
// result is returned as a tpmwire.Result error.
type Client struct {
	conn net.Conn
}

// dialTimeout bounds connecting to a control channel.
const dialTimeout = 10 * time.Second

// MaxHashData is the most data one CMD_HASH_DATA carries (the data array of ptm_hdata).
const MaxHashData = 4096

// Reply sizes of the control commands the client sends, the result word included. A non-zero
// result ends a reply after the result word (replyResult bytes), except for GET_STATEBLOB.
const (
	replyResult       = 4  // ptm_res
	replyResultU32    = 8  // ptm_res + one u32: capabilities, tpmEstablished, configuration flags
	replyGetInfo      = 12 // ptm_res, totlength, length; the data follows
	replyBufferSize   = 16 // ptm_res, buffersize, minsize, maxsize
	replyGetStateBlob = 16 // ptm_res, state_flags, totlength, length; the blob follows
)

// Dial connects to a control channel: network "unix" with a path, or "tcp" with host:port.
func Dial(network, addr string) (*Client, error) {
	return DialContext(context.Background(), network, addr)
}

// DialContext is Dial that also gives up when ctx ends.
func DialContext(ctx context.Context, network, addr string) (*Client, error) {
	d := net.Dialer{Timeout: dialTimeout}
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return nil, err
	}
	return &Client{conn: c}, nil
}

// NewClient wraps an established control connection.
func NewClient(c net.Conn) *Client { return &Client{conn: c} }

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }

// Conn is the underlying connection.
func (c *Client) Conn() net.Conn { return c.conn }

// call sends cmd+payload in one write and reads a fixed-size reply. When the result word is
// non-zero only it is read (swtpm's 4-byte error replies), unless fullOnError.
func (c *Client) call(cmd Cmd, payload []byte, respLen int, fullOnError bool) ([]byte, error) {
	msg := putBE32(make([]byte, 0, 4+len(payload)), uint32(cmd))
	msg = append(msg, payload...)
	if _, err := c.conn.Write(msg); err != nil {
		return nil, fmt.Errorf("send %s: %w", cmd, err)
	}
	return c.readReply(cmd, respLen, fullOnError)
}

// command sends cmd+payload and reads a reply that is the result word alone.
func (c *Client) command(cmd Cmd, payload []byte) error {
	_, err := c.call(cmd, payload, replyResult, false)
	return err
}

func (c *Client) readReply(cmd Cmd, respLen int, fullOnError bool) ([]byte, error) {
	resp := make([]byte, respLen)
	if _, err := io.ReadFull(c.conn, resp[:replyResult]); err != nil {
		return nil, fmt.Errorf("read %s reply: %w", cmd, err)
	}
	if r := tpmwire.Result(be32(resp)); r != tpmwire.ResSuccess && !fullOnError {
		return resp[:replyResult], r
	}
	if _, err := io.ReadFull(c.conn, resp[replyResult:]); err != nil {
		return nil, fmt.Errorf("read %s reply: %w", cmd, err)
	}
	if r := tpmwire.Result(be32(resp)); r != tpmwire.ResSuccess {
		return resp, r
	}
	return resp, nil
}

// GetCapability sends CMD_GET_CAPABILITY.
func (c *Client) GetCapability() (uint32, error) {
	r, err := c.call(CmdGetCapability, nil, replyResultU32, false)
	if err != nil {
		return 0, err
	}
	return be32(r[4:]), nil
}

// Init sends CMD_INIT.
func (c *Client) Init(flags uint32) error { return c.command(CmdInit, putBE32(nil, flags)) }

// Shutdown sends CMD_SHUTDOWN.
func (c *Client) Shutdown() error { return c.command(CmdShutdown, nil) }

// Stop sends CMD_STOP.
func (c *Client) Stop() error { return c.command(CmdStop, nil) }

// GetEstablished sends CMD_GET_TPMESTABLISHED (always an 8-byte reply).
func (c *Client) GetEstablished() (bool, error) {
	r, err := c.call(CmdGetTPMEstablished, nil, replyResultU32, false)
	if err != nil {
		return false, err
	}
	return r[4] != 0, nil
}

// putLocality encodes the payload of SET_LOCALITY and RESET_TPMESTABLISHED the way QEMU and
// swtpm_ioctl send it: ptm_loc's u8 locality, padded to the size of the union's result word.
func putLocality(loc uint8) []byte { return []byte{loc, 0, 0, 0} }

// SetLocality sends CMD_SET_LOCALITY.
func (c *Client) SetLocality(loc uint8) error { return c.command(CmdSetLocality, putLocality(loc)) }

// ResetEstablished sends CMD_RESET_TPMESTABLISHED.
func (c *Client) ResetEstablished(loc uint8) error {
	return c.command(CmdResetTPMEstablished, putLocality(loc))
}

// HashStart sends CMD_HASH_START.
func (c *Client) HashStart() error { return c.command(CmdHashStart, nil) }

// HashData sends one CMD_HASH_DATA; b is at most MaxHashData bytes.
func (c *Client) HashData(b []byte) error {
	return c.command(CmdHashData, append(putBE32(nil, uint32(len(b))), b...))
}

// HashEnd sends CMD_HASH_END.
func (c *Client) HashEnd() error { return c.command(CmdHashEnd, nil) }

// Cancel sends CMD_CANCEL_TPM_CMD.
func (c *Client) Cancel() error { return c.command(CmdCancelTPMCmd, nil) }

// StoreVolatile sends CMD_STORE_VOLATILE.
func (c *Client) StoreVolatile() error { return c.command(CmdStoreVolatile, nil) }

// GetConfig sends CMD_GET_CONFIG.
func (c *Client) GetConfig() (uint32, error) {
	r, err := c.call(CmdGetConfig, nil, replyResultU32, false)
	if err != nil {
		return 0, err
	}
	return be32(r[4:]), nil
}

// SetBufferSize sends CMD_SET_BUFFERSIZE (0 queries).
func (c *Client) SetBufferSize(n uint32) (size, min, max uint32, err error) {
	r, err := c.call(CmdSetBufferSize, putBE32(nil, n), replyBufferSize, false)
	if err != nil {
		return 0, 0, 0, err
	}
	return be32(r[4:]), be32(r[8:]), be32(r[12:]), nil
}

// GET_INFO bounds: swtpm sends at most 3072 bytes per reply; the whole answer is a short JSON
// document. A larger announcement is a broken or hostile peer, not a reason to allocate.
const (
	maxInfoChunk = 3072
	maxInfo      = 64 << 10
)

// GetInfo sends CMD_GET_INFO until the whole answer (without the NUL) is read.
func (c *Client) GetInfo(flags uint64) (string, error) {
	var out []byte
	for {
		p := putBE32(nil, uint32(flags>>32), uint32(flags), uint32(len(out)), 0)
		r, err := c.call(CmdGetInfo, p, replyGetInfo, false)
		if err != nil {
			return "", err
		}
		total, n := be32(r[4:]), be32(r[8:])
		if n > maxInfoChunk || uint64(len(out))+uint64(n) > maxInfo {
			return "", fmt.Errorf("GET_INFO: the TPM announces %d bytes (total %d): too large", n, total)
		}
		chunk := make([]byte, n)
		if _, err := io.ReadFull(c.conn, chunk); err != nil {
			return "", fmt.Errorf("read GET_INFO data: %w", err)
		}
		out = append(out, chunk...)
		if n == 0 || uint32(len(out)) >= total {
			break
		}
	}
	if len(out) > 0 && out[len(out)-1] == 0 {
		out = out[:len(out)-1]
	}
	return string(out), nil
}

// LockStorage sends CMD_LOCK_STORAGE.
func (c *Client) LockStorage(retries uint32) error {
	return c.command(CmdLockStorage, putBE32(nil, retries))
}

// GetStateBlob sends CMD_GET_STATEBLOB and returns the blob and the reply's state flags. A
// missing blob is (nil, 0, tpmwire.ResRetry) as swtpm reports it.
func (c *Client) GetStateBlob(typ, flags uint32) ([]byte, uint32, error) {
	r, err := c.call(CmdGetStateBlob, putBE32(nil, flags, typ, 0), replyGetStateBlob, true)
	if r == nil {
		return nil, 0, err
	}
	if len(r) < replyGetStateBlob { // 4-byte error reply (TPM not running)
		return nil, 0, err
	}
	outFlags, total, n := be32(r[4:]), be32(r[8:]), be32(r[12:])
	if total != n {
		return nil, 0, fmt.Errorf("GET_STATEBLOB: totlength %d != length %d", total, n)
	}
	if n > MaxStateBlob*2 {
		return nil, 0, fmt.Errorf("GET_STATEBLOB: implausible length %d", n)
	}
	blob := make([]byte, n)
	if _, rerr := io.ReadFull(c.conn, blob); rerr != nil {
		return nil, 0, fmt.Errorf("read GET_STATEBLOB data: %w", rerr)
	}
	return blob, outFlags, err
}

// SetStateBlob sends CMD_SET_STATEBLOB: the header, then the body in a second write, as QEMU.
func (c *Client) SetStateBlob(typ, flags uint32, blob []byte) error {
	hdr := putBE32(nil, uint32(CmdSetStateBlob), flags, typ, uint32(len(blob)))
	if _, err := c.conn.Write(hdr); err != nil {
		return fmt.Errorf("send SET_STATEBLOB: %w", err)
	}
	if len(blob) > 0 {
		if _, err := c.conn.Write(blob); err != nil {
			return fmt.Errorf("send SET_STATEBLOB data: %w", err)
		}
	}
	_, err := c.readReply(CmdSetStateBlob, replyResult, false)
	return err
}

// SetDataFD passes f as the data channel (CMD_SET_DATAFD with SCM_RIGHTS).
func (c *Client) SetDataFD(f *os.File) error {
	uc, ok := c.conn.(*net.UnixConn)
	if !ok {
		return fmt.Errorf("SET_DATAFD needs a unix control socket")
	}
	msg := putBE32(nil, uint32(CmdSetDataFD))
	if _, _, err := uc.WriteMsgUnix(msg, rightsFor(f), nil); err != nil {
		return fmt.Errorf("send SET_DATAFD: %w", err)
	}
	_, err := c.readReply(CmdSetDataFD, replyResult, false)
	return err
}

// Raw sends arbitrary bytes and reads up to max reply bytes (for conformance tests).
func (c *Client) Raw(msg []byte, max int, timeout time.Duration) ([]byte, error) {
	if _, err := c.conn.Write(msg); err != nil {
		return nil, err
	}
	c.conn.SetReadDeadline(time.Now().Add(timeout))
	defer c.conn.SetReadDeadline(time.Time{})
	buf := make([]byte, max)
	n, err := c.conn.Read(buf)
	return buf[:n], err
}
