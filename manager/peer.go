package manager

import (
	"context"
	"errors"
	"fmt"
	"net"

	"golang.org/x/sys/unix"
)

// Peer is the process at the other end of a unix socket, as the kernel reports it
// (SO_PEERCRED): it cannot be forged by the peer.
type Peer struct {
	PID, UID, GID int
}

// PeerOf reads the credentials of a unix-socket connection.
func PeerOf(c net.Conn) (Peer, error) {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return Peer{}, errors.New("peer credentials: not a unix socket")
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	var cred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		cred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", err)
	}
	if serr != nil {
		return Peer{}, fmt.Errorf("peer credentials: %w", serr)
	}
	return Peer{PID: int(cred.Pid), UID: int(cred.Uid), GID: int(cred.Gid)}, nil
}

type peerKey struct{}

type peerResult struct {
	peer Peer
	err  error
}

// withPeer stores a connection's peer in its requests' context (http.Server.ConnContext).
func withPeer(ctx context.Context, c net.Conn) context.Context {
	p, err := PeerOf(c)
	return context.WithValue(ctx, peerKey{}, peerResult{p, err})
}

// peerFrom returns the request's peer; a request whose peer is unknown is never served.
func peerFrom(ctx context.Context) (Peer, error) {
	r, ok := ctx.Value(peerKey{}).(peerResult)
	if !ok {
		return Peer{}, fmt.Errorf("%w: unknown peer", ErrForbidden)
	}
	if r.err != nil {
		return Peer{}, fmt.Errorf("%w: %w", ErrForbidden, r.err)
	}
	return r.peer, nil
}

// syscallNoFollow refuses a symbolic link where a manager file should be.
const syscallNoFollow = unix.O_NOFOLLOW
