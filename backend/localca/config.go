package localca

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
)

// Default locations of Debian's swtpm packages.
const (
	DefaultConfigFile  = "/etc/swtpm-localca.conf"
	DefaultOptionsFile = "/etc/swtpm-localca.options"
	DefaultStateDir    = "/var/lib/swtpm-localca"
)

// ErrConfig is wrapped by every configuration error.
var ErrConfig = errors.New("bad local CA configuration")

// maxConfigSize bounds a configuration or options file.
const maxConfigSize = 1 << 20

// Config is swtpm-localca.conf.
type Config struct {
	// StateDir holds the lock file and, by default, the serial counter (statedir).
	StateDir string
	// SigningKey and IssuerCert are the intermediate CA's key and certificate (signingkey,
	// issuercert). When the key file is missing, the CA is created.
	SigningKey, IssuerCert string
	// SigningKeyPassword is signingkey_password (not supported: see LoadSigner).
	SigningKeyPassword string
	// CertSerial is the serial counter file (certserial; default StateDir/certserial).
	CertSerial string
}

// DefaultConfig is Debian's /etc/swtpm-localca.conf.
func DefaultConfig() Config {
	return Config{
		StateDir:   DefaultStateDir,
		SigningKey: filepath.Join(DefaultStateDir, "signkey.pem"),
		IssuerCert: filepath.Join(DefaultStateDir, "issuercert.pem"),
		CertSerial: filepath.Join(DefaultStateDir, "certserial"),
	}
}

// envRef is a ${NAME} reference in a configuration value (compiled when a configuration is
// read, not at every vtpmd start).
var envRef = sync.OnceValue(func() *regexp.Regexp { return regexp.MustCompile(`\$\{([A-Za-z_][A-Za-z0-9_]*)\}`) })

// ParseKeyValues reads swtpm's "key = value" configuration format as swtpm's lookup does: one
// assignment per line, a value ends at '#' (a comment) and blanks around it are dropped,
// ${NAME} is replaced from the environment, lines without '=' are ignored, and the first
// assignment of a key wins.
func ParseKeyValues(data []byte) (map[string]string, error) {
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("%w: %d bytes is too large for a configuration file", ErrConfig, len(data))
	}
	out := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 0, 4096), maxConfigSize)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k = strings.TrimSpace(k)
		if !ok || k == "" {
			continue
		}
		v, _, _ = strings.Cut(v, "#")
		if _, seen := out[k]; seen {
			continue
		}
		re := envRef()
		out[k] = re.ReplaceAllStringFunc(strings.TrimSpace(v), func(ref string) string {
			return os.Getenv(re.FindStringSubmatch(ref)[1])
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrConfig, err)
	}
	return out, nil
}

// ParseConfig parses swtpm-localca.conf. statedir, signingkey and issuercert are required, as
// swtpm_localca requires them; keys for PKCS#11 and TPM-held signing keys are refused because
// this CA signs in-process.
func ParseConfig(data []byte) (Config, error) {
	kv, err := ParseKeyValues(data)
	if err != nil {
		return Config{}, err
	}
	c := Config{StateDir: kv["statedir"], SigningKey: kv["signingkey"], IssuerCert: kv["issuercert"],
		SigningKeyPassword: kv["signingkey_password"], CertSerial: kv["certserial"]}
	for name, v := range map[string]string{"statedir": c.StateDir, "signingkey": c.SigningKey, "issuercert": c.IssuerCert} {
		if v == "" {
			return Config{}, fmt.Errorf("%w: missing '%s' config value", ErrConfig, name)
		}
	}
	if strings.HasPrefix(c.SigningKey, "pkcs11:") || strings.HasPrefix(c.SigningKey, "tpmkey:") {
		return Config{}, fmt.Errorf("%w: signingkey %q: PKCS#11 and TPM-held CA keys are not supported by vtpmd's local CA (use Debian's swtpm_localca for them)", ErrConfig, c.SigningKey)
	}
	if c.CertSerial == "" {
		c.CertSerial = filepath.Join(c.StateDir, "certserial")
	}
	return c, nil
}

// LoadConfig reads and parses a swtpm-localca.conf file.
func LoadConfig(path string) (Config, error) {
	data, err := readBounded(path)
	if err != nil {
		return Config{}, fmt.Errorf("read local CA config: %w", err)
	}
	c, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("local CA config %s: %w", path, err)
	}
	return c, nil
}

// Platform is what a platform certificate says about the platform (swtpm-localca.options).
type Platform struct {
	Manufacturer, Model, Version string
}

// DefaultPlatform is what Debian's /etc/swtpm-localca.options says.
var DefaultPlatform = Platform{Manufacturer: "Fedora", Model: "QEMU", Version: "2.1"}

// ParseOptions parses swtpm-localca.options: swtpm_cert options separated by blanks and
// newlines. The platform options are understood; any other option is refused, because
// silently dropping it would issue a certificate other than the one the host asked for.
func ParseOptions(data []byte) (Platform, error) {
	if len(data) > maxConfigSize {
		return Platform{}, fmt.Errorf("%w: %d bytes is too large for an options file", ErrConfig, len(data))
	}
	var p Platform
	f := strings.Fields(string(data))
	for i := 0; i < len(f); i++ {
		var dst *string
		switch f[i] {
		case "--platform-manufacturer":
			dst = &p.Manufacturer
		case "--platform-model":
			dst = &p.Model
		case "--platform-version":
			dst = &p.Version
		default:
			return Platform{}, fmt.Errorf("%w: option %q in the options file is not supported", ErrConfig, f[i])
		}
		if i+1 >= len(f) {
			return Platform{}, fmt.Errorf("%w: option %s needs a value", ErrConfig, f[i])
		}
		i++
		*dst = f[i]
	}
	return p, nil
}

// LoadOptions reads an options file; a missing file gives empty platform fields, as
// swtpm_localca ignores an unreadable options file when issuing.
func LoadOptions(path string) (Platform, error) {
	data, err := readBounded(path)
	if errors.Is(err, os.ErrNotExist) {
		return Platform{}, nil
	}
	if err != nil {
		return Platform{}, fmt.Errorf("read local CA options: %w", err)
	}
	p, err := ParseOptions(data)
	if err != nil {
		return Platform{}, fmt.Errorf("local CA options %s: %w", path, err)
	}
	return p, nil
}

func readBounded(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxConfigSize+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(data) > maxConfigSize {
		return nil, fmt.Errorf("%w: %s is larger than %d bytes", ErrConfig, path, maxConfigSize)
	}
	return data, nil
}
