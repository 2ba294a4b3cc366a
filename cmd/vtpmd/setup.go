package main

import (
	"context"
	"crypto"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/vtpmd/vtpmd/backend/blob"
	"github.com/vtpmd/vtpmd/backend/localca"
	"github.com/vtpmd/vtpmd/backend/setup"
	"github.com/vtpmd/vtpmd/backend/setup/provision"
	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// swtpmSetupCompatVersion is the swtpm_setup whose options and output vtpmd setup reproduces.
const swtpmSetupCompatVersion = "0.7.1"

// setupFlags are swtpm_setup's options (getopt_long names; every one takes its argument as
// the next word or after '=').
func setupFlags() []cli.Flag {
	str := func(name string, aliases ...string) cli.Flag {
		return &cli.StringFlag{Name: name, Aliases: aliases}
	}
	boolean := func(name string) cli.Flag { return &cli.BoolFlag{Name: name} }
	return []cli.Flag{
		str("runas"), str("tpm-state", "tpmstate"), str("tpm"), str("swtpm_ioctl"),
		boolean("tpm2"), boolean("createek"), boolean("allow-signing"), boolean("decryption"), boolean("ecc"),
		boolean("take-ownership"), str("ownerpass"), boolean("owner-well-known"), str("srkpass"), boolean("srk-well-known"),
		boolean("create-ek-cert"), boolean("create-platform-cert"), boolean("create-spk"), boolean("lock-nvram"),
		boolean("display"), str("config"), str("vmid"), str("logfile"), str("keyfile"), str("keyfile-fd"),
		str("pwdfile"), str("pwdfile-fd"), str("cipher"), boolean("overwrite"), boolean("not-overwrite"),
		str("pcr-banks"), str("rsa-keysize"), str("ek1keyalgo"), str("ek2keyalgo"), str("write-ek-cert-files"), str("tcsd-system-ps-file"),
		boolean("print-capabilities"), str("create-config-files"), boolean("reconfigure"),
		boolean("version"), &cli.BoolFlag{Name: "help", Aliases: []string{"h"}},
	}
}

// setupCapabilities is swtpm_setup --print-capabilities for what vtpmd setup implements.
func setupCapabilities() string {
	features := []string{"tpm-1.2", "tpm-2.0", "cmdarg-keyfile-fd", "cmdarg-pwdfile-fd", "tpm12-not-need-root",
		"cmdarg-write-ek-cert-files", "cmdarg-create-config-files", "cmdarg-reconfigure-pcr-banks",
		"tpm2-rsa-keysize-2048", "tpm2-rsa-keysize-3072", "cmdarg-ek1keyalgo", "cmdarg-ek2keyalgo"}
	q := make([]string, len(features))
	for i, f := range features {
		q[i] = `"` + f + `"`
	}
	return fmt.Sprintf(`{ "type": "swtpm_setup", "features": [ %s ], "version": "%s" }`, strings.Join(q, ", "), swtpmSetupCompatVersion)
}

// newSetupApp is swtpm_setup's command line.
func newSetupApp(name string) *cli.App {
	return &cli.App{
		Name:            name,
		HideHelp:        true,
		HideHelpCommand: true,
		HideVersion:     true,
		Flags:           setupFlags(),
		Writer:          os.Stdout,
		ErrWriter:       os.Stderr,
		OnUsageError: func(c *cli.Context, err error, _ bool) error {
			msg := err.Error()
			if f, ok := strings.CutPrefix(msg, "flag provided but not defined: -"); ok {
				msg = "unrecognized option '--" + strings.TrimPrefix(f, "-") + "'"
			}
			fmt.Fprintf(os.Stderr, "%s: %s\n", name, msg)
			fmt.Fprint(os.Stdout, setupUsage(name))
			return cli.Exit("", 1)
		},
		Action: func(c *cli.Context) error {
			if c.NArg() > 0 {
				fmt.Fprintf(os.Stderr, "Unknown argument: %s\n", c.Args().First())
				fmt.Fprint(os.Stdout, setupUsage(name))
				return cli.Exit("", 1)
			}
			return runSetup(c, name)
		},
	}
}

// setupArgs rewrites swtpm_setup's optional-argument option so urfave/cli can parse it:
// "--create-config-files" takes the next word as its argument only when it is not an option
// (as libvirt passes "--create-config-files skip-if-exist").
//
// "--pcr-banks" given more than once is joined with ',' (each value trimmed), as swtpm_setup
// does, instead of the last one winning.
func setupArgs(args []string) []string {
	out := make([]string, 0, len(args))
	banks := -1 // index in out of the first --pcr-banks value
	for i := 0; i < len(args); i++ {
		a := args[i]
		var bv string
		isBanks := false
		if v, ok := strings.CutPrefix(a, "--pcr-banks="); ok {
			bv, isBanks = v, true
		} else if a == "--pcr-banks" && i+1 < len(args) {
			bv, isBanks = args[i+1], true
			i++
		}
		if isBanks {
			if banks < 0 {
				out = append(out, "--pcr-banks", strings.TrimSpace(bv))
				banks = len(out) - 1
			} else {
				out[banks] += "," + strings.TrimSpace(bv)
			}
			continue
		}
		if a == "--create-config-files" {
			if i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				a += "=" + args[i+1]
				i++
			} else {
				a += "="
			}
		}
		out = append(out, a)
	}
	return out
}

func setupMain(ctx context.Context, args []string) int {
	return exitCode(newSetupApp(filepath.Base(args[0])).RunContext(ctx, setupArgs(args)))
}

// setupLogger writes swtpm_setup's plain log lines: to --logfile (appended) or, without
// one, to stdout; errors without a log file go to stderr.
type setupLogger struct {
	out, err io.Writer
}

func (l setupLogger) Enabled(context.Context, slog.Level) bool { return true }
func (l setupLogger) Handle(_ context.Context, r slog.Record) error {
	w := l.out
	if r.Level >= slog.LevelError {
		w = l.err
	}
	_, e := fmt.Fprintln(w, r.Message)
	return e
}
func (l setupLogger) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l setupLogger) WithGroup(string) slog.Handler      { return l }

func openSetupLog(path string) (*slog.Logger, func(), error) {
	if path == "" {
		return slog.New(setupLogger{os.Stdout, os.Stderr}), func() {}, nil
	}
	if st, err := os.Lstat(path); err == nil && st.Mode()&os.ModeSymlink != 0 {
		return nil, nil, cliMessage("Logfile must not be a symlink.")
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, nil, cliMessage(fmt.Sprintf("Cannot write to logfile %s.", path))
	}
	return slog.New(setupLogger{f, f}), func() { f.Close() }, nil
}

// setupError is a failure already logged: it only sets the exit status.
type setupError struct{}

func (setupError) Error() string { return "" }
func (setupError) ExitCode() int { return 1 }

func runSetup(c *cli.Context, name string) error {
	switch {
	case c.Bool("help"):
		fmt.Fprint(os.Stdout, setupUsage(name))
		return nil
	case c.Bool("version"):
		fmt.Printf("TPM emulator setup tool version %s (vtpmd %s)\n", swtpmSetupCompatVersion, version)
		return nil
	case c.Bool("print-capabilities"):
		fmt.Println(setupCapabilities())
		return nil
	}
	if c.IsSet("create-config-files") {
		return createConfigFiles(c.String("create-config-files"))
	}
	if u := c.String("runas"); u != "" {
		if err := runAs(u); err != nil {
			return cli.Exit(err.Error(), 1)
		}
	}
	log, closeLog, err := openSetupLog(c.String("logfile"))
	if err != nil {
		return cli.Exit(err.Error(), 1)
	}
	defer closeLog()
	fail := func(format string, a ...any) error {
		log.Error(fmt.Sprintf(format, a...))
		return setupError{}
	}
	tpm2 := c.Bool("tpm2")
	if tpm2 && c.Bool("take-ownership") {
		return fail("Taking ownership is not supported for TPM 2.")
	}
	if !tpm2 {
		for _, o := range []string{"ecc", "create-spk", "reconfigure", "allow-signing", "decryption"} {
			if c.Bool(o) {
				return fail("--%s requires --tpm2.", o)
			}
		}
		if c.IsSet("pcr-banks") {
			return fail("--pcr-banks requires --tpm2.")
		}
		if s := c.String("rsa-keysize"); s == "3072" {
			return fail("3072 bit RSA keys are not supported by libtpms.")
		}
	}
	state := c.String("tpm-state")
	if state == "" {
		return fail("--tpm-state must be provided")
	}
	if !strings.Contains(state, "://") {
		state = "dir://" + state
	}
	if !strings.HasPrefix(state, "dir://") && !strings.HasPrefix(state, "file://") {
		return fail("Unsupported TPM state backend in %s: use a directory, dir:// or file://", state)
	}
	if strings.HasPrefix(state, "dir://") {
		dir := strings.TrimPrefix(state, "dir://")
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return fail("User %s cannot access directory %s. Make sure it exists and is a directory.", currentUser(), dir)
		}
		if err := accessRW(dir); err != nil {
			return fail("Need read/write access rights on TPM state directory %s for user %s.", dir, currentUser())
		}
	}
	reconfigure := c.Bool("reconfigure")
	if reconfigure && (c.Bool("createek") || c.Bool("create-ek-cert") || c.Bool("create-platform-cert")) {
		return fail("Reconfiguration is not supported with creation of EK or certificates")
	}
	if dir := c.String("write-ek-cert-files"); dir != "" {
		if st, err := os.Stat(dir); err != nil || !st.IsDir() || accessRW(dir) != nil {
			return fail("User %s cannot access directory %s. Make sure it exists and is a directory.", currentUser(), dir)
		}
	}
	for _, o := range []string{"swtpm_ioctl", "tcsd-system-ps-file"} {
		if c.IsSet(o) {
			log.Info(fmt.Sprintf("Warning: --%s is deprecated and has no effect.", o))
		}
	}
	// swtpm_setup decides about existing state before it reads its configuration or keys
	if !reconfigure && (c.Bool("not-overwrite") || !c.Bool("overwrite")) {
		exists, err := setup.HasState(state, tpm2)
		switch {
		case err != nil:
			return fail("%v", err)
		case exists && c.Bool("not-overwrite"):
			log.Info("Not overwriting existing state file.")
			return nil
		case exists:
			return fail("Found existing TPM state 'permall'.")
		}
	}
	conf, err := loadSetupConfig(c.String("config"))
	if err != nil {
		return fail("%v", err)
	}
	key, keyMsg, err := setupKey(c)
	if err != nil {
		return fail("%v", err)
	}
	if keyMsg != "" {
		log.Info(keyMsg)
	}
	// as swtpm_setup: an empty list falls back to the configured active_pcr_banks, then
	// sha256; unknown names are dropped; a list left empty by that is an error
	banks := c.String("pcr-banks")
	for _, def := range []string{conf.activeBanks, "sha256"} {
		if strings.Trim(banks, ",") == "" {
			banks = def
		}
	}
	var pcrBanks []string
	if tpm2 {
		if pcrBanks, err = provision.ParseBanks(banks); err != nil {
			return fail("%v", err)
		}
		if pcrBanks != nil && len(pcrBanks) == 0 {
			return fail("No PCR banks could be allocated. None of the selected algorithms are supported.")
		}
	}
	bits := 2048
	if s := c.String("rsa-keysize"); s != "" {
		if s == "max" {
			if tpm2 {
				bits = 3072
			}
		} else if bits, err = strconv.Atoi(s); err != nil || (bits != 2048 && bits != 3072) {
			log.Info(fmt.Sprintf("Unsupported RSA key size %s.", s))
			return setupError{}
		}
	}
	// as swtpm_setup 0.7.1 does (its help text says otherwise): --create-platform-cert makes
	// the EKs and the platform certificate, not the EK certificates
	ekCert := c.Bool("create-ek-cert")
	po := provision.Options{
		CreateEK:     c.Bool("createek") || ekCert || c.Bool("create-platform-cert"),
		RSAKeyBits:   bits,
		EK1:          stringOr(c.String("ek1keyalgo"), conf.ek1),
		EK2:          stringOr(c.String("ek2keyalgo"), conf.ek2),
		AllowSigning: c.Bool("allow-signing"),
		Decryption:   c.Bool("decryption"),
		EKCert:       ekCert,
		PlatformCert: c.Bool("create-platform-cert"),
		LockNVRAM:    c.Bool("lock-nvram"),
		CreateSPK:    c.Bool("create-spk"),
		SPKECC:       c.Bool("ecc"),
		PCRBanks:     pcrBanks,
	}
	vmid := c.String("vmid")
	what := "manufacturing"
	if reconfigure {
		what = "reconfiguration"
	}
	ending := func() { log.Info(fmt.Sprintf("Ending vTPM manufacturing @ %s", setupTime())) }
	res, err := setup.Manufacture(c.Context, setup.ManufactureConfig{
		StateURI: state, TPM2: tpm2, StateKey: key,
		Overwrite: c.Bool("overwrite"), NotOverwrite: c.Bool("not-overwrite"), Reconfigure: reconfigure,
		Provision: po,
		Provision12: provision.Options12{
			CreateEK:      po.CreateEK || c.Bool("take-ownership"),
			TakeOwnership: c.Bool("take-ownership"),
			OwnerAuth:     provision.Secret12(stringOr(c.String("ownerpass"), provision.DefaultOwnerPassword), c.Bool("owner-well-known")),
			SRKAuth:       provision.Secret12(stringOr(c.String("srkpass"), provision.DefaultSRKPassword), c.Bool("srk-well-known")),
			EKCert:        ekCert,
			PlatformCert:  c.Bool("create-platform-cert"),
			LockNVRAM:     c.Bool("lock-nvram"),
		},
		NewCertifier: func(ctx context.Context, info localca.TPMInfo) (provision.Certifier, error) {
			return newLocalCertifier(ctx, conf, vmid, info, log)
		},
		Started: func() { log.Info(fmt.Sprintf("Starting vTPM %s as %s @ %s", what, currentUserGroup(), setupTime())) },
		Log:     log,
	})
	switch {
	case errors.Is(err, setup.ErrStateExists):
		return fail("Found existing TPM state 'permall'.")
	case err != nil:
		log.Error(err.Error())
		log.Error("An error occurred. Authoring the TPM state failed.")
		ending()
		return setupError{}
	case res.Kept:
		return nil
	}
	if dir := c.String("write-ek-cert-files"); dir != "" {
		certs := map[string][]byte{} // file kind -> DER
		if res.TPM12 != nil && res.TPM12.EKCert != nil {
			certs["rsa2048"] = res.TPM12.EKCert
		}
		if res.Result != nil {
			for _, ek := range res.EKs {
				if ek.Cert != nil {
					certs[ek.Kind] = ek.Cert
				}
			}
		}
		for kind, der := range certs {
			if err := atomicfile.WriteFile(filepath.Join(dir, "ek-"+kind+".crt"), der, 0o640); err != nil {
				return fail("Could not write EK certificate file: %v", err)
			}
		}
	}
	if c.Bool("display") {
		displayResult(res)
	}
	log.Info("Successfully authored TPM state.")
	ending()
	return nil
}

// displayResult prints what was made (swtpm_setup 0.7.1 accepts --display and prints nothing;
// vtpmd says what it made).
func displayResult(res *setup.ManufactureResult) {
	fmt.Printf("TPM %s, manufacturer %s, model %s, firmware %s\n", res.TPM.Family, res.TPM.Manufacturer, res.TPM.Model, res.TPM.Version)
	if r := res.TPM12; r != nil {
		if r.EK != nil {
			fmt.Printf("EK rsa2048 (%d-bit modulus)\n", r.EK.N.BitLen())
		}
		if r.EKCert != nil {
			fmt.Printf("EK certificate in NV 0x%x (%d bytes)\n", provision.Index12EKCert, len(r.EKCert))
		}
		if r.PlatformCert != nil {
			fmt.Printf("platform certificate in NV 0x%x (%d bytes)\n", provision.Index12PlatformCert, len(r.PlatformCert))
		}
		return
	}
	if res.Result == nil {
		return
	}
	for _, ek := range res.EKs {
		line := fmt.Sprintf("EK %s at handle 0x%x", ek.Kind, uint32(ek.Handle))
		if ek.CertIndex != 0 {
			line += fmt.Sprintf(", certificate in NV 0x%x (%d bytes)", ek.CertIndex, len(ek.Cert))
		}
		fmt.Println(line)
	}
	if res.PlatformCert != nil {
		fmt.Printf("platform certificate in NV 0x%x (%d bytes)\n", provision.IndexPlatformCert, len(res.PlatformCert))
	}
}

// currentUser names the real uid now (user.Current caches its first answer, from before --runas).
func currentUser() string {
	if u, err := user.LookupId(strconv.Itoa(os.Getuid())); err == nil {
		return u.Username
	}
	return strconv.Itoa(os.Getuid())
}

func currentUserGroup() string {
	g := strconv.Itoa(os.Getgid())
	if gr, err := user.LookupGroupId(g); err == nil {
		g = gr.Name
	}
	return currentUser() + ":" + g
}

// accessRW checks that the process may create files in dir (access(2) W_OK|R_OK|X_OK).
func accessRW(dir string) error {
	return unixAccess(dir, 7)
}

// setupKey builds the state key from --keyfile/--pwdfile/--keyfile-fd/--pwdfile-fd (the
// first given wins, in that order, as swtpm_setup) and --cipher, with swtpm's --key
// semantics, and returns swtpm_setup's log line for it.
func setupKey(c *cli.Context) (*blob.Key, string, error) {
	cipher := c.String("cipher")
	switch cipher {
	case "", "aes-128-cbc", "aes-cbc":
		cipher = "aes-128-cbc"
	case "aes-256-cbc":
	default:
		return nil, "", cliMessage(fmt.Sprintf("Unsupported cipher %s.", cipher))
	}
	for _, k := range []struct{ flag, sub, msg string }{
		{"keyfile", "file", "  The TPM's state will be encrypted with a provided key."},
		{"pwdfile", "pwdfile", "  The TPM's state will be encrypted using a key derived from a passphrase."},
		{"keyfile-fd", "fd", "  The TPM's state will be encrypted with a provided key (fd)."},
		{"pwdfile-fd", "pwdfd", "  The TPM's state will be encrypted using a key derived from a passphrase (fd)."},
	} {
		v := c.String(k.flag)
		if v == "" {
			continue
		}
		if strings.HasSuffix(k.flag, "-fd") {
			if _, err := strconv.Atoi(v); err != nil {
				return nil, "", cliMessage(fmt.Sprintf("Invalid file descriptor '%s'", v))
			}
		}
		key, err := loadKey(k.sub + "=" + v + ",mode=" + cipher)
		if err != nil {
			return nil, "", fmt.Errorf("state key from --%s: %w", k.flag, err)
		}
		return key, k.msg, nil
	}
	return nil, "", nil
}

// setupTime is swtpm_setup's timestamp (strftime "%a %d %h %Y %I:%M:%S %p %Z").
func setupTime() string { return time.Now().Format("Mon 02 Jan 2006 03:04:05 PM MST") }

// localCertifier issues certificates with the local CA, lazily opened (and created on first
// use) only when a certificate is asked for.
type localCertifier struct {
	ca       *localca.CA
	vmid     string
	info     localca.TPMInfo
	platform localca.Platform
}

func newLocalCertifier(ctx context.Context, conf setupConfig, vmid string, info localca.TPMInfo, log *slog.Logger) (provision.Certifier, error) {
	if err := conf.checkCertTool(); err != nil {
		return nil, err
	}
	cfg, err := localca.LoadConfig(conf.caConfig)
	if err != nil {
		return nil, err
	}
	platform, err := localca.LoadOptions(conf.caOptions)
	if err != nil {
		return nil, err
	}
	ca, err := localca.Open(ctx, cfg, log)
	if err != nil {
		return nil, err
	}
	return &localCertifier{ca: ca, vmid: vmid, info: info, platform: platform}, nil
}

func (l *localCertifier) EKCertificate(ctx context.Context, ek crypto.PublicKey, sign, dec bool) ([]byte, error) {
	return l.ca.IssueEK(ctx, localca.EKRequest{PublicKey: ek, VMID: l.vmid, TPM: l.info, AllowSigning: sign, Decryption: dec})
}

func (l *localCertifier) PlatformCertificate(ctx context.Context, ek crypto.PublicKey) ([]byte, error) {
	return l.ca.IssuePlatform(ctx, localca.PlatformRequest{PublicKey: ek, VMID: l.vmid, TPM: l.info, Platform: l.platform})
}

func stringOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func setupUsage(name string) string {
	return "TPM emulator setup tool version " + swtpmSetupCompatVersion + " (vtpmd " + version + ")\n" +
		"Usage: " + name + ` [options]

vtpmd setup manufactures a vTPM's state in-process, with swtpm_setup's options:

--tpm-state <dir>|dir://<dir>|file://<file>
                 : Where the TPM's state is written (--tpmstate is an alias); mandatory.
--tpm2           : Set up a TPM 2; by default a TPM 1.2 is set up.
--createek       : Create the EKs (RSA and ECC P-384 for a TPM 2).
--allow-signing  : Create EKs that can sign (non-standard EKs!).
--decryption     : Keep such EKs able to decrypt.
--ecc            : Make the storage primary key an ECC key (with --create-spk).
--take-ownership : Take ownership of a TPM 1.2 (implies --createek); with
  --ownerpass <password> (default ooo) or --owner-well-known, and
  --srkpass <password> (default sss) or --srk-well-known.
--create-ek-cert : Create EK certificates with the local CA; implies --createek.
--create-platform-cert
                 : Create a platform certificate; implies --createek (not
                   --create-ek-cert: swtpm_setup 0.7.1 behaves so, whatever its help says).
--create-spk     : Create a storage primary key at 0x81000001.
--lock-nvram     : Write-lock the certificate NV indices.
--display        : Show what was created.
--config <file>  : swtpm_setup.conf to use (default: the user's, else /etc/swtpm_setup.conf).
--vmid <vmid>    : VM identity for the certificates' subject.
--logfile <file> : Append the log to <file> (default: stdout/stderr).
--keyfile <file>, --keyfile-fd <fd>, --pwdfile <file>, --pwdfile-fd <fd>
                 : Encrypt the state with a key or a passphrase (swtpm's --key).
--cipher <cipher>: aes-128-cbc (default) or aes-256-cbc.
--overwrite      : Replace existing state.
--not-overwrite  : Keep existing state and succeed.
--pcr-banks <banks>
                 : Comma-separated PCR banks to keep active; '-' keeps all (default: sha256).
--rsa-keysize <bits>
                 : 2048 (default), 3072 or max.
--ek1keyalgo <alg>, --ek2keyalgo <alg>
                 : The two EKs (swtpm master's options): rsa2048, rsa3072, secp256r1 or
                   secp384r1; default RSA of --rsa-keysize, then secp384r1.
--write-ek-cert-files <dir>
                 : Also write the EK certificates into <dir>.
--reconfigure    : Change the PCR banks of existing state; creates nothing.
--create-config-files [overwrite][,root][,skip-if-exist]
                 : Create per-user swtpm_setup and swtpm-localca config files.
--runas <user>   : Run as <user>.
--tpm, --swtpm_ioctl, --tcsd-system-ps-file
                 : Accepted for compatibility; vtpmd runs the TPM in-process.
--print-capabilities
                 : Print JSON capabilities and exit.
--version        : Display version and exit.
--help,-h        : Display this help screen.
`
}
