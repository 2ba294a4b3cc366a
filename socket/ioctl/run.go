package ioctl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"

	"github.com/vtpmd/vtpmd/internal/tpmwire"
	"github.com/vtpmd/vtpmd/socket"
)

// Run carries out req: it prints the help or version text, or connects to req.Endpoint and
// sends the command (see Send). ctx ending closes the connection.
func Run(ctx context.Context, req *Request, stdout io.Writer, stdin io.Reader) error {
	if req == nil {
		return failf(ErrInvalidArgs, nil, msgNoValidCommand)
	}
	switch req.Command {
	case ShowHelp:
		fmt.Fprintf(stdout, banner+"\n"+usage, req.Program.Version, req.Program.Name)
		return nil
	case ShowVersion:
		fmt.Fprintf(stdout, banner, req.Program.Version)
		return nil
	}
	c, err := connect(ctx, req.Endpoint)
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.Close() })
	defer stop()
	return Send(c, req, stdout, stdin)
}

// connect dials the control socket; a failure has swtpm_ioctl's message.
func connect(ctx context.Context, ep Endpoint) (*socket.Client, error) {
	c, err := socket.DialContext(ctx, ep.Network, ep.Address)
	if err == nil {
		return c, nil
	}
	if ep.Network == "tcp" {
		host, port, _ := net.SplitHostPort(ep.Address)
		return nil, failf(ErrConnect, err, "Could not connect to host '%s' on port '%s' using TCP socket: %v",
			host, port, bareErrno(err))
	}
	return nil, failf(ErrConnect, err, "Connect failed: %v", bareErrno(err))
}

// bareErrno is the errno alone ("no such file or directory"), without Go's "dial unix …"
// prefix, as the C tool prints strerror alone.
func bareErrno(err error) error {
	var se *os.SyscallError
	if errors.As(err, &se) {
		return se.Err
	}
	return err
}

// commandFailed is a failed control command with swtpm_ioctl's message.
func commandFailed(cmd socket.Cmd, err error) error {
	var r tpmwire.Result
	if errors.As(err, &r) {
		return failf(ErrCommandFailed, err, "TPM result from PTM_%s: 0x%x", cmd, uint32(r))
	}
	return failf(ErrCommandFailed, err, "PTM_%s failed: %v", cmd, err)
}

// Send sends req's command over c and prints what swtpm_ioctl prints for its answer.
func Send(c *socket.Client, req *Request, stdout io.Writer, stdin io.Reader) error {
	if req == nil {
		return failf(ErrInvalidArgs, nil, msgNoValidCommand)
	}
	switch req.Command {
	case GetCapability, GetEstablished, GetConfig, SetBufferSize, GetInfo:
		return query(c, req, stdout)
	case Hash:
		return hash(c, req.HashData, stdin)
	case SaveStateBlob:
		return saveStateBlob(c, req.BlobType, req.File)
	case LoadStateBlob:
		return loadStateBlob(c, req.BlobType, req.File)
	}
	return control(c, req)
}

// control sends a command whose answer is the result alone.
func control(c *socket.Client, req *Request) error {
	var cmd socket.Cmd
	var err error
	switch req.Command {
	case Init:
		cmd, err = socket.CmdInit, c.Init(socket.InitFlagDeleteVolatile)
	case Stop:
		cmd, err = socket.CmdStop, c.Stop()
	case Shutdown:
		cmd, err = socket.CmdShutdown, c.Shutdown()
	case ResetEstablished:
		cmd, err = socket.CmdResetTPMEstablished, c.ResetEstablished(req.Locality)
	case SetLocality:
		cmd, err = socket.CmdSetLocality, c.SetLocality(req.Locality)
	case StoreVolatile:
		cmd, err = socket.CmdStoreVolatile, c.StoreVolatile()
	case Cancel:
		cmd, err = socket.CmdCancelTPMCmd, c.Cancel()
	default:
		return failf(ErrInvalidArgs, nil, msgNoValidCommand)
	}
	if err != nil {
		return commandFailed(cmd, err)
	}
	return nil
}

// query sends a command whose answer is printed.
func query(c *socket.Client, req *Request, stdout io.Writer) error {
	switch req.Command {
	case GetCapability:
		caps, err := c.GetCapability()
		if err != nil {
			return commandFailed(socket.CmdGetCapability, err)
		}
		fmt.Fprintf(stdout, "ptm capability is 0x%x\n", caps)
	case GetEstablished:
		established, err := c.GetEstablished()
		if err != nil {
			return commandFailed(socket.CmdGetTPMEstablished, err)
		}
		bit := 0
		if established {
			bit = 1
		}
		fmt.Fprintf(stdout, "tpmEstablished is %d\n", bit)
	case GetConfig:
		flags, err := c.GetConfig()
		if err != nil {
			return commandFailed(socket.CmdGetConfig, err)
		}
		fmt.Fprintf(stdout, "ptm configuration flags: 0x%x\n", flags)
	case SetBufferSize:
		size, minSize, maxSize, err := c.SetBufferSize(req.BufferSize)
		if err != nil {
			return commandFailed(socket.CmdSetBufferSize, err)
		}
		fmt.Fprintf(stdout, "TPM buffersize: %d\nminimum size  : %d\nmaximum size  : %d\n", size, minSize, maxSize)
	case GetInfo:
		info, err := c.GetInfo(req.InfoFlags)
		if err != nil {
			return commandFailed(socket.CmdGetInfo, err)
		}
		fmt.Fprintln(stdout, info)
	}
	return nil
}

// hash runs _TPM_Hash_Start/Data/End over data ('-' reads stdin), one CMD_HASH_DATA per read
// of at most socket.MaxHashData bytes.
func hash(c *socket.Client, data string, stdin io.Reader) error {
	var r io.Reader = strings.NewReader(data)
	if data == "-" {
		r = stdin
	}
	if err := c.HashStart(); err != nil {
		return commandFailed(socket.CmdHashStart, err)
	}
	buf := make([]byte, socket.MaxHashData)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			if herr := c.HashData(buf[:n]); herr != nil {
				return commandFailed(socket.CmdHashData, herr)
			}
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("read hash data: %w", err)
		}
	}
	if err := c.HashEnd(); err != nil {
		return commandFailed(socket.CmdHashEnd, err)
	}
	return nil
}

// saveStateBlob writes the state blob of a type to file. A blob the TPM does not have
// (TPM_RETRY) is written as an empty file.
func saveStateBlob(c *socket.Client, typ uint32, file string) error {
	blob, _, err := c.GetStateBlob(typ, 0)
	var r tpmwire.Result
	if err != nil && !(errors.As(err, &r) && r&tpmwire.ResRetry != 0) {
		return commandFailed(socket.CmdGetStateBlob, err)
	}
	if err := os.WriteFile(file, blob, 0o600); err != nil {
		return failf(ErrStateFile, err, "Could not write to file '%s': %v", file, err)
	}
	return nil
}

// loadStateBlob sends the state blob of a type read from file.
func loadStateBlob(c *socket.Client, typ uint32, file string) error {
	blob, err := os.ReadFile(file)
	if err != nil {
		return failf(ErrStateFile, err, "Could not read file '%s': %v", file, err)
	}
	if err := c.SetStateBlob(typ, 0, blob); err != nil {
		return commandFailed(socket.CmdSetStateBlob, err)
	}
	return nil
}
