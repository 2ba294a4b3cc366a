package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	golibvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket/dialers"
)

// DefaultURI is the connection `vtpmd status` uses unless told otherwise.
const DefaultURI = "qemu:///system"

// DefaultSocket is the system libvirtd's socket.
const DefaultSocket = "/var/run/libvirt/libvirt-sock"

// ErrConnect is wrapped when libvirt cannot be reached.
var ErrConnect = errors.New("cannot connect to libvirt")

// Connect opens a go-libvirt connection for uri ("" means DefaultURI). qemu:///system and
// qemu:///session use the local socket (socket= in the query overrides it); qemu+tcp, +tls,
// +ssh and +unix are handled by go-libvirt.
func Connect(ctx context.Context, uri string, timeout time.Duration) (*golibvirt.Libvirt, error) {
	if uri == "" {
		uri = DefaultURI
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, fmt.Errorf("%w: bad URI %q: %v", ErrConnect, uri, err)
	}
	type result struct {
		l   *golibvirt.Libvirt
		err error
	}
	ch := make(chan result, 1)
	go func() {
		if u.Host == "" && (u.Scheme == "qemu" || u.Scheme == "qemu+unix") {
			sock := u.Query().Get("socket")
			if sock == "" {
				sock = DefaultSocket
			}
			l := golibvirt.NewWithDialer(dialers.NewLocal(dialers.WithSocket(sock), dialers.WithLocalTimeout(timeout)))
			err := l.ConnectToURI(golibvirt.RemoteURI(u))
			ch <- result{l, err}
			return
		}
		l, err := golibvirt.ConnectToURI(u)
		ch <- result{l, err}
	}()
	select {
	case r := <-ch:
		if r.err != nil {
			return nil, fmt.Errorf("%w %s: %v", ErrConnect, uri, r.err)
		}
		return r.l, nil
	case <-ctx.Done():
		go func() {
			if r := <-ch; r.l != nil {
				r.l.Disconnect()
			}
		}()
		return nil, fmt.Errorf("%w %s: %v", ErrConnect, uri, ctx.Err())
	case <-time.After(timeout + time.Second):
		return nil, fmt.Errorf("%w %s: timed out after %v", ErrConnect, uri, timeout)
	}
}
