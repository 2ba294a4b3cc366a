package setup

import (
	"context"
	"fmt"
	"strconv"
	"strings"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/seam"
)

// stateKey builds the state key from --keyfile, --pwdfile, --keyfile-fd or --pwdfile-fd (the
// first given wins, in that order, as swtpm_setup) and --cipher, with swtpm's --key
// semantics, and returns swtpm_setup's log line for it. Without any, the host manager's key
// is used if there is a manager and it releases one; else the state is not encrypted (nil key).
func stateKey(ctx context.Context, o Options) (seam.Keys, string, error) {
	cipher := o.Cipher
	switch cipher {
	case "", "aes-128-cbc", "aes-cbc":
		cipher = "aes-128-cbc"
	case "aes-256-cbc":
	default:
		return seam.Keys{}, "", messagef("Unsupported cipher %s.", cipher)
	}
	for _, k := range []struct{ flag, value, sub, msg string }{
		{"keyfile", o.KeyFile, "file", "  The TPM's state will be encrypted with a provided key."},
		{"pwdfile", o.PwdFile, "pwdfile", "  The TPM's state will be encrypted using a key derived from a passphrase."},
		{"keyfile-fd", o.KeyFileFD, "fd", "  The TPM's state will be encrypted with a provided key (fd)."},
		{"pwdfile-fd", o.PwdFileFD, "pwdfd", "  The TPM's state will be encrypted using a key derived from a passphrase (fd)."},
	} {
		if k.value == "" {
			continue
		}
		if strings.HasSuffix(k.flag, "-fd") {
			if _, err := strconv.Atoi(k.value); err != nil {
				return seam.Keys{}, "", messagef("Invalid file descriptor '%s'", k.value)
			}
		}
		key, err := blob.LoadKeyOption(k.sub + "=" + k.value + ",mode=" + cipher)
		if err != nil {
			return seam.Keys{}, "", fmt.Errorf("state key from --%s: %w", k.flag, err)
		}
		return seam.Keys{State: key}, k.msg, nil
	}
	if o.Keys == nil {
		return seam.Keys{}, "", nil
	}
	keys, err := o.Keys.Keys(ctx)
	if err != nil {
		return seam.Keys{}, "", fmt.Errorf("state key from the vtpmd manager: %w", err)
	}
	if keys.State == nil {
		return seam.Keys{}, "", nil
	}
	return keys, "  The TPM's state will be encrypted with a key sealed by the host's vtpmd manager.", nil
}
