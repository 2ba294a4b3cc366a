package setup

import (
	"os"
	"strings"
)

// checkOptions makes swtpm_setup's checks of the options, in its order, and returns the
// state location as a dir:// or file:// URI.
func (s *session) checkOptions() (state string, err error) {
	if err := s.checkTPMVersion(); err != nil {
		return "", err
	}
	if state, err = s.stateURI(); err != nil {
		return "", err
	}
	o := s.opts
	if o.Reconfigure && (o.CreateEK || o.CreateEKCert || o.CreatePlatformCert) {
		return "", s.failf("Reconfiguration is not supported with creation of EK or certificates")
	}
	if dir := o.WriteEKCertFiles; dir != "" {
		if st, err := os.Stat(dir); err != nil || !st.IsDir() || accessRW(dir) != nil {
			return "", s.failf("User %s cannot access directory %s. Make sure it exists and is a directory.", currentUser(), dir)
		}
	}
	return state, nil
}

// checkTPMVersion refuses the options the TPM version lacks.
func (s *session) checkTPMVersion() error {
	o := s.opts
	if o.TPM2 {
		if o.TakeOwnership {
			return s.failf("Taking ownership is not supported for TPM 2.")
		}
		return nil
	}
	for _, f := range []struct {
		name string
		set  bool
	}{{"ecc", o.ECC}, {"create-spk", o.CreateSPK}, {"reconfigure", o.Reconfigure}, {"allow-signing", o.AllowSigning}, {"decryption", o.Decryption}} {
		if f.set {
			return s.failf("--%s requires --tpm2.", f.name)
		}
	}
	if o.PCRBanksGiven {
		return s.failf("--pcr-banks requires --tpm2.")
	}
	if o.RSAKeySize == "3072" {
		return s.failf("3072 bit RSA keys are not supported by libtpms.")
	}
	return nil
}

// stateURI is --tpm-state as a URI (a plain path is a directory); a directory must exist
// and be writable by the user.
func (s *session) stateURI() (string, error) {
	state := s.opts.StatePath
	if state == "" {
		return "", s.failf("--tpm-state must be provided")
	}
	if !strings.Contains(state, "://") {
		state = "dir://" + state
	}
	dir, isDir := strings.CutPrefix(state, "dir://")
	if !isDir && !strings.HasPrefix(state, "file://") {
		return "", s.failf("Unsupported TPM state backend in %s: use a directory, dir:// or file://", state)
	}
	if isDir {
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return "", s.failf("User %s cannot access directory %s. Make sure it exists and is a directory.", currentUser(), dir)
		}
		if err := accessRW(dir); err != nil {
			return "", s.failf("Need read/write access rights on TPM state directory %s for user %s.", dir, currentUser())
		}
	}
	return state, nil
}
