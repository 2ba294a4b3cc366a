package manager

import (
	"context"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"

	"github.com/vtpmd/vtpmd/manager/registry"
)

// RunConfig is `vtpmd manager`'s command line as types.
type RunConfig struct {
	TPM    string // hwtpm spec: device:/dev/tpmrm0, swtpm:path=SOCK, mssim:host=H,port=P
	Dir    string
	Listen string
	// Group owns the API socket (mode 0660): the group the vTPM processes run in.
	Group      string
	AutoEnroll bool
	// Policy is the unseal policy: "none" or "pcr:BANK:N,N,...".
	Policy string
	// RecoveryKey is a PEM file with the operator's RSA recovery public key ("": none).
	RecoveryKey string
	// CounterIndex is the hardware NV index of the ledger's monotonic counter.
	CounterIndex uint32
	RegistryDir  string
	// Migration is secure migration's configuration (its listener is served with the API).
	Migration MigrationConfig
	// Projection says where the host's event log and the property policy are.
	Projection ProjectionConfig
	Log        *slog.Logger
}

// DefaultCounterIndex is an owner NV index for the ledger's counter.
const DefaultCounterIndex = 0x01500e01

// Run is `vtpmd manager`: it opens the hardware TPM, the records, and serves the API until
// ctx ends.
func Run(ctx context.Context, cfg RunConfig) error {
	log := cfg.Log
	if log == nil {
		log = slog.Default()
	}
	hw, err := OpenHardware(ctx, cfg.TPM, cfg.Policy, cfg.CounterIndex)
	if err != nil {
		return err
	}
	defer hw.Close()
	var rk *rsa.PublicKey
	if cfg.RecoveryKey != "" {
		if rk, err = LoadRecoveryPublicKey(cfg.RecoveryKey); err != nil {
			return err
		}
	}
	srv, err := New(ctx, Config{Dir: cfg.Dir, AutoEnroll: cfg.AutoEnroll, RecoveryKey: rk,
		Registry: registry.New(cfg.RegistryDir), Log: log}, hw)
	if err != nil {
		return err
	}
	if err := srv.ConfigureMigration(cfg.Migration); err != nil {
		return err
	}
	if err := srv.ConfigureProjection(cfg.Projection); err != nil {
		return err
	}
	if err := srv.startMigration(ctx); err != nil {
		return err
	}
	ln, err := listenAPI(cfg.Listen, cfg.Group)
	if err != nil {
		return err
	}
	defer os.Remove(cfg.Listen)
	log.Info("vtpmd manager ready", "tpm", hw.Describe(), "dir", cfg.Dir, "listen", cfg.Listen, "auto_enroll", cfg.AutoEnroll)
	return srv.Serve(ctx, ln)
}

// listenAPI creates the API socket with mode 0660 and the given group.
func listenAPI(path, group string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("manager socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("another manager answers on %s", path)
		}
		os.Remove(path)
	}
	// bound under a temporary name, given its mode and group, then renamed into place: the
	// socket appears with its final permissions, never with the umask's
	tmp := path + ".new"
	os.Remove(tmp)
	ln, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", path, err)
	}
	ln.(*net.UnixListener).SetUnlinkOnClose(false)
	gid := -1
	if group != "" {
		g, err := user.LookupGroup(group)
		if err != nil {
			ln.Close()
			os.Remove(tmp)
			return nil, fmt.Errorf("socket group %q: %w", group, err)
		}
		gid, _ = strconv.Atoi(g.Gid)
	}
	err = os.Chmod(tmp, 0o660)
	if err == nil && gid >= 0 {
		err = os.Chown(tmp, -1, gid)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		ln.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("manager socket %s: %w", path, err)
	}
	return ln, nil
}

// LoadRecoveryPublicKey reads the operator's RSA recovery public key (PEM: PUBLIC KEY or
// RSA PUBLIC KEY, or a certificate).
func LoadRecoveryPublicKey(path string) (*rsa.PublicKey, error) {
	raw, err := readLimited(path, 1<<20)
	if err != nil {
		return nil, fmt.Errorf("recovery key: %w", err)
	}
	b, _ := pem.Decode(raw)
	if b == nil {
		return nil, fmt.Errorf("recovery key %s: no PEM block", path)
	}
	var pub any
	switch b.Type {
	case "PUBLIC KEY":
		pub, err = x509.ParsePKIXPublicKey(b.Bytes)
	case "RSA PUBLIC KEY":
		pub, err = x509.ParsePKCS1PublicKey(b.Bytes)
	case "CERTIFICATE":
		var c *x509.Certificate
		if c, err = x509.ParseCertificate(b.Bytes); err == nil {
			pub = c.PublicKey
		}
	default:
		err = fmt.Errorf("PEM block %q", b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("recovery key %s: %w", path, err)
	}
	rk, ok := pub.(*rsa.PublicKey)
	if !ok || rk.N.BitLen() < 2048 {
		return nil, errors.New("recovery key: an RSA key of at least 2048 bits is needed")
	}
	return rk, nil
}
