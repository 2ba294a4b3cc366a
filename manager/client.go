package manager

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"time"
)

// Client speaks to a manager's API on its unix socket.
type Client struct {
	Socket string
	http   *http.Client
}

// NewClient returns a client of the manager at socket ("" means DefaultSocket).
func NewClient(socket string) *Client {
	if socket == "" {
		socket = DefaultSocket
	}
	d := net.Dialer{Timeout: 2 * time.Second}
	return &Client{Socket: socket, http: &http.Client{
		Timeout: 30 * time.Second,
		Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", socket)
			},
			MaxIdleConns: 1,
		},
	}}
}

// Key asks for the state key of the vTPM at req.StatePath.
func (c *Client) Key(ctx context.Context, req KeyRequest) (*KeyResponse, error) {
	var resp KeyResponse
	return &resp, c.call(ctx, http.MethodPost, pathKey, req, &resp)
}

// ReportVersion records a durable state version.
func (c *Client) ReportVersion(ctx context.Context, statePath string, version uint64) error {
	var st VMStatus
	return c.call(ctx, http.MethodPost, pathVersion, VersionReport{StatePath: statePath, Version: version}, &st)
}

// Status is the manager's view of every enrolled vTPM.
func (c *Client) Status(ctx context.Context) (*Status, error) {
	var st Status
	return &st, c.call(ctx, http.MethodGet, pathStatus, nil, &st)
}

// Enroll, Unenroll and Accept are the operator's requests.
func (c *Client) Enroll(ctx context.Context, req VMRequest) (*VMStatus, error) {
	var st VMStatus
	return &st, c.call(ctx, http.MethodPost, pathEnroll, req, &st)
}

// Unenroll decrypts a vTPM's state and forgets its key.
func (c *Client) Unenroll(ctx context.Context, req VMRequest) (*VMStatus, error) {
	var st VMStatus
	return &st, c.call(ctx, http.MethodPost, pathUnenroll, req, &st)
}

// Accept lets a refused (older) state start once.
func (c *Client) Accept(ctx context.Context, req VMRequest) (*VMStatus, error) {
	var st VMStatus
	return &st, c.call(ctx, http.MethodPost, pathAccept, req, &st)
}

// maxResponse bounds an answer (a status of many VMs included).
const maxResponse = 16 << 20

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://manager"+path, body)
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.http.Do(req)
	if err != nil {
		return fmt.Errorf("%w at %s: %w", ErrUnavailable, c.Socket, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return fmt.Errorf("manager %s: %w", path, err)
	}
	if resp.StatusCode != http.StatusOK {
		var e apiError
		if json.Unmarshal(data, &e) != nil || e.Error == "" {
			return fmt.Errorf("manager %s: HTTP %d", path, resp.StatusCode)
		}
		for _, k := range errorKinds {
			if k.kind == e.Kind {
				return &remoteError{msg: e.Error, kind: k.err}
			}
		}
		return errors.New(e.Error)
	}
	if err := json.Unmarshal(data, out); err != nil {
		return fmt.Errorf("manager %s: %w", path, err)
	}
	return nil
}

// remoteError is an error the manager answered: its message, and the sentinel its kind names
// (for errors.Is).
type remoteError struct {
	msg  string
	kind error
}

func (e *remoteError) Error() string { return e.msg }
func (e *remoteError) Unwrap() error { return e.kind }
