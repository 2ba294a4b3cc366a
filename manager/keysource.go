package manager

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/vtpmd/vtpmd/backend/seam"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/store"
	"github.com/vtpmd/vtpmd/emulator"
)

// KeySource is the seam.KeySource of a vTPM on a host with a manager: the state key comes
// from the manager, unsealed by the hardware TPM, and every durable state version is reported
// back to it. A vTPM the manager does not know (not enrolled), or whose own --key is given
// (libvirt's <encryption secret>: that key protects the state), uses Fallback, as without a
// manager.
type KeySource struct {
	Client   *Client
	StateURI string
	TPM2     bool
	// Fallback are the instance's own key options (--key, --migration-key).
	Fallback seam.KeySource
	// Required refuses to start when the manager cannot be reached (--manager given
	// explicitly); otherwise an unreachable manager is only fatal for encrypted state.
	Required bool
	// Synchronous reports each version before the write returns (vtpmd setup, which exits
	// right after its one write); otherwise reports follow the writes (a served vTPM).
	Synchronous bool
	Log         *slog.Logger
}

// Keys implements seam.KeySource.
func (k *KeySource) Keys(ctx context.Context) (seam.Keys, error) {
	own := seam.Keys{}
	if k.Fallback != nil {
		var err error
		if own, err = k.Fallback.Keys(ctx); err != nil {
			return seam.Keys{}, err
		}
	}
	if own.State != nil {
		return own, nil
	}
	if !k.Required && !Available(k.Client.Socket) {
		// no manager on this host (or not running): a plain state is served as without one;
		// an encrypted one without its key is explained now rather than failing at INIT
		if _, encrypted, err := k.inspect(); err == nil && encrypted {
			own.Zero()
			return seam.Keys{}, fmt.Errorf("the state at %s is encrypted and no key is given: if the host's vtpmd manager sealed it, "+
				"the manager is not running (no socket at %s)", statePathOfURI(k.StateURI), k.Client.Socket)
		}
		return own, nil
	}
	path := statePathOfURI(k.StateURI)
	fresh, encrypted, err := k.inspect()
	if err != nil {
		own.Zero()
		return seam.Keys{}, err
	}
	resp, err := k.Client.Key(ctx, KeyRequest{StatePath: path, TPM2: k.TPM2, Fresh: fresh})
	switch {
	case errors.Is(err, ErrNotEnrolled) && encrypted:
		own.Zero()
		return seam.Keys{}, fmt.Errorf("the state at %s is encrypted, but this host's vtpmd manager holds no key for it "+
			"(enrolled on another host? 'vtpmd manager recover' brings it here with the recovery key): %w", path, err)
	case errors.Is(err, ErrNotEnrolled):
		return own, nil
	case errors.Is(err, ErrUnavailable) && !k.Required && !encrypted:
		k.log().Warn("no vtpmd manager: serving the vTPM without one", "err", err)
		return own, nil
	case errors.Is(err, ErrUnavailable) && encrypted:
		own.Zero()
		return seam.Keys{}, fmt.Errorf("the state at %s is encrypted and its key is sealed by the vtpmd manager, which cannot be reached: %w", path, err)
	case err != nil:
		own.Zero()
		return seam.Keys{}, err
	}
	key, err := blob.NewKey(resp.Key)
	clear(resp.Key)
	if err != nil {
		own.Zero()
		return seam.Keys{}, fmt.Errorf("state key from the manager: %w", err)
	}
	rep := newVersionReporter(k.Client, path, k.log())
	return seam.Keys{State: key, Migration: own.Migration, MinVersion: resp.Version, RecordVersion: rep.record,
		Flush: rep.flush, Owner: "the vtpmd manager (vTPM " + resp.VM + ")"}, nil
}

func (k *KeySource) log() *slog.Logger {
	if k.Log == nil {
		return slog.New(slog.DiscardHandler)
	}
	return k.Log
}

// inspect reports whether the state holds no blobs yet (a new vTPM), and whether its
// permanent state is encrypted.
func (k *KeySource) inspect() (fresh, encrypted bool, err error) {
	st, err := store.Open(k.StateURI, store.Options{TPM2: k.TPM2})
	if err != nil {
		return false, false, err
	}
	defer st.Close()
	states, err := st.States()
	if err != nil {
		return false, false, err
	}
	if len(states) == 0 {
		return true, false, nil
	}
	raw, err := st.LoadRaw(emulator.StatePermanent)
	if err != nil {
		return false, false, nil
	}
	h, _, err := blob.ParseHeader(raw)
	return false, err == nil && h.Flags&blob.FlagEncrypted != 0, nil
}

// statePathOfURI is the path of a dir:// or file:// state URI.
func statePathOfURI(uri string) string {
	p := strings.TrimPrefix(strings.TrimPrefix(uri, "dir://"), "file://")
	if c, err := cleanStatePath(p); err == nil {
		return c
	}
	return p
}

// versionReporter sends the latest durable state version to the manager off the TPM's hot
// path: a write is answered once it is durable on disk; its record follows within one round
// trip (the window docs/manager.md describes). Reports coalesce; failures are retried.
type versionReporter struct {
	c    *Client
	path string
	log  *slog.Logger

	mu      sync.Mutex
	latest  uint64 // guarded by mu
	sent    uint64 // guarded by mu; the last version the manager acknowledged
	pending bool   // guarded by mu
	kick    chan struct{}
}

func newVersionReporter(c *Client, path string, log *slog.Logger) *versionReporter {
	r := &versionReporter{c: c, path: path, log: log, kick: make(chan struct{}, 1)}
	go r.loop()
	return r
}

func (r *versionReporter) record(v uint64) {
	r.mu.Lock()
	if v > r.latest {
		r.latest, r.pending = v, true
	}
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// flush waits until the latest recorded version was reported (or ctx ends).
func (r *versionReporter) flush(ctx context.Context) {
	for {
		r.mu.Lock()
		done := !r.pending && r.sent >= r.latest
		r.mu.Unlock()
		if done {
			return
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (r *versionReporter) loop() {
	backoff := 10 * time.Millisecond
	for range r.kick {
		for {
			r.mu.Lock()
			v, pending := r.latest, r.pending
			r.pending = false
			r.mu.Unlock()
			if !pending {
				break
			}
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err := r.c.ReportVersion(ctx, r.path, v)
			cancel()
			if err == nil {
				r.mu.Lock()
				r.sent = max(r.sent, v)
				r.mu.Unlock()
				backoff = 10 * time.Millisecond
				continue
			}
			r.log.Warn("record state version with the manager", "version", v, "err", err)
			r.mu.Lock()
			r.pending = r.pending || v == r.latest
			r.mu.Unlock()
			time.Sleep(backoff)
			backoff = min(2*backoff, 5*time.Second)
		}
	}
}

// Available reports whether a manager socket exists at path (vtpmd socket asks the default
// manager only when one is installed).
func Available(path string) bool {
	fi, err := os.Stat(path)
	return err == nil && fi.Mode()&os.ModeSocket != 0
}
