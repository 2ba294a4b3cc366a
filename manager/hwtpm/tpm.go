package hwtpm

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// ErrClosed is returned by every method of a closed TPM.
var ErrClosed = errors.New("TPM is closed")

// dialTimeout bounds connecting to a TPM when the context sets no deadline.
const dialTimeout = 10 * time.Second

// cleanupTimeout bounds flushing a transient object or session after an operation, which
// runs even when the operation's context has ended.
const cleanupTimeout = 5 * time.Second

// familyTPM20 is TPM_PT_FAMILY_INDICATOR of a TPM 2.0: "2.0\0".
const familyTPM20 = 0x322e3000

// TPM is an open TPM. Its methods are safe for concurrent use: operations take turns, each
// one holding the TPM from its first command to its last flush.
type TPM struct {
	spec Spec
	link *link
	turn chan struct{} // holds a token while an operation runs

	// storage is the template of the storage key, chosen on first use (ECC, else RSA);
	// guarded by turn.
	storage *tpm2.TPMTPublic
}

// Open connects to the TPM spec names and checks that a started TPM 2.0 answers. For an MS
// simulator it signals power-on and NV-on and runs TPM2_Startup(CLEAR) first, as a TSS and
// tpm2_startup would; a device or swtpm must already be started.
func Open(ctx context.Context, spec Spec) (*TPM, error) {
	if parsed, err := ParseSpec(spec.String()); err != nil || parsed != spec {
		return nil, fmt.Errorf("hwtpm: %w: %+v is not a spec ParseSpec gives", ErrBadSpec, spec)
	}
	t := &TPM{
		spec: spec,
		link: &link{spec: spec, dialTimeout: dialTimeout},
		turn: make(chan struct{}, 1),
	}
	err := t.do(ctx, func(tp transport.TPM) error {
		if spec.Kind == KindMssim {
			if err := mssimPowerUp(ctx, spec); err != nil {
				return err
			}
			_, err := tpm2.Startup{StartupType: tpm2.TPMSUClear}.Execute(tp)
			if err != nil && !errors.Is(err, tpm2.TPMRCInitialize) {
				return fmt.Errorf("TPM2_Startup: %w", err)
			}
		}
		if err := probe(tp); err != nil {
			return err
		}
		if spec.Kind != KindDevice {
			// no resource manager between us and the TPM: a manager killed mid-operation
			// leaves its objects and sessions loaded, and three of them exhaust swtpm
			flushLeftovers(tp)
		}
		return nil
	})
	if err != nil {
		_ = t.link.close()
		return nil, fmt.Errorf("hwtpm: open %s: %w", spec, err)
	}
	return t, nil
}

// probe asks for TPM_PT_FAMILY_INDICATOR, which a started TPM 2.0 answers with "2.0".
func probe(tp transport.TPM) error {
	resp, err := tpm2.GetCapability{
		Capability:    tpm2.TPMCapTPMProperties,
		Property:      uint32(tpm2.TPMPTFamilyIndicator),
		PropertyCount: 1,
	}.Execute(tp)
	switch {
	case errors.Is(err, tpm2.TPMRCInitialize):
		return fmt.Errorf("the TPM is not started (TPM2_Startup; swtpm: --flags startup-clear): %w", err)
	case errors.Is(err, tpm2.TPMRCFailure):
		return fmt.Errorf("the TPM is not initialized or in failure mode (swtpm: --flags not-need-init): %w", err)
	case errors.Is(err, ErrTransport):
		return err
	case err != nil:
		return fmt.Errorf("no TPM 2.0 answered TPM2_GetCapability: %w", err)
	}
	props, err := resp.CapabilityData.Data.TPMProperties()
	if err != nil || len(props.TPMProperty) != 1 || props.TPMProperty[0].Property != tpm2.TPMPTFamilyIndicator {
		return fmt.Errorf("the TPM did not report its family (%v)", err)
	}
	if v := props.TPMProperty[0].Value; v != familyTPM20 {
		return fmt.Errorf("the TPM is family 0x%08x, not 2.0", v)
	}
	return nil
}

// Spec is the spec the TPM was opened with.
func (t *TPM) Spec() Spec { return t.spec }

// Close closes the connection. An operation in progress fails; later ones return ErrClosed.
func (t *TPM) Close() error {
	if err := t.link.close(); err != nil {
		return fmt.Errorf("hwtpm: close %s: %w", t.spec, err)
	}
	return nil
}

// do runs op with the TPM to itself, its commands bound to ctx.
func (t *TPM) do(ctx context.Context, op func(tp transport.TPM) error) error {
	select {
	case t.turn <- struct{}{}:
	case <-ctx.Done():
		return fmt.Errorf("waiting for the TPM: %w", ctx.Err())
	}
	defer func() { <-t.turn }()
	err := op(t.transport(ctx))
	if t.spec.Kind != KindDevice {
		// swtpm and the simulator serve one connection at a time: leave the TPM to others
		// between operations. A device (the kernel's resource manager) is shared anyway.
		_ = t.link.release()
	}
	return err
}

// transport is the link as go-tpm wants it, every command bound to ctx.
func (t *TPM) transport(ctx context.Context) transport.TPM { return ctxTransport{ctx, t.link} }

type ctxTransport struct {
	ctx  context.Context
	link *link
}

func (c ctxTransport) Send(cmd []byte) ([]byte, error) { return c.link.send(c.ctx, cmd) }

// flush unloads a transient object or session. It runs when an operation ends, whatever ended
// it, so it has its own short deadline rather than the operation's context.
func (t *TPM) flush(ctx context.Context, h tpm2.TPMHandle) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cleanupTimeout)
	defer cancel()
	// An error leaves nothing to do: the transport has been dropped (a resource manager
	// flushes the connection's objects) or the handle is already gone.
	_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(t.transport(ctx))
}

// flushLeftovers flushes every transient object and session the TPM holds, as the kernel's
// resource manager (/dev/tpmrm0) does for a process that went away. Only for TPMs the manager
// owns alone (swtpm, simulator): it would pull objects from under other clients.
func flushLeftovers(tp transport.TPM) {
	for _, first := range []tpm2.TPMHandle{0x80000000, 0x02000000, 0x03000000} { // transient, loaded and saved sessions
		resp, err := tpm2.GetCapability{Capability: tpm2.TPMCapHandles, Property: uint32(first), PropertyCount: 64}.Execute(tp)
		if err != nil {
			continue
		}
		handles, err := resp.CapabilityData.Data.Handles()
		if err != nil {
			continue
		}
		for _, h := range handles.Handle {
			if h>>24 != first>>24 {
				continue
			}
			_, _ = tpm2.FlushContext{FlushHandle: h}.Execute(tp)
		}
	}
}

// isResourceError reports the TPM running out of object or session slots.
func isResourceError(err error) bool {
	return errors.Is(err, tpm2.TPMRCObjectMemory) || errors.Is(err, tpm2.TPMRCSessionMemory) ||
		errors.Is(err, tpm2.TPMRCSessionHandles) || errors.Is(err, tpm2.TPMRCObjectHandles)
}
