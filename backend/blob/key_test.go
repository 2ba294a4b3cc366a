package blob

import (
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func TestParseKeyOption(t *testing.T) {
	tests := []struct {
		opt    string
		want   KeySpec
		errSub string
	}{
		{opt: "file=/k", want: KeySpec{File: "/k", FD: -1, PwdFD: -1, Format: "hex", Mode: "aes-128-cbc", KDF: "pbkdf2"}},
		{opt: "pwdfd=7,mode=aes-256-cbc", want: KeySpec{FD: -1, PwdFD: 7, Format: "hex", Mode: "aes-256-cbc", KDF: "pbkdf2"}},
		{opt: "fd=0,format=binary,remove", want: KeySpec{FD: 0, PwdFD: -1, Format: "binary", Mode: "aes-128-cbc", KDF: "pbkdf2", Remove: true}},
		{opt: "pwdfile=/p,kdf=sha512,mode=aes-cbc,remove=no", want: KeySpec{PwdFile: "/p", FD: -1, PwdFD: -1, Format: "hex", Mode: "aes-cbc", KDF: "sha512"}},
		{opt: "file=/k,file=/ignored", want: KeySpec{File: "/k", FD: -1, PwdFD: -1, Format: "hex", Mode: "aes-128-cbc", KDF: "pbkdf2"}},
		// swtpm checks kdf= only for passphrases
		{opt: "file=/k,kdf=argon2", want: KeySpec{File: "/k", FD: -1, PwdFD: -1, Format: "hex", Mode: "aes-128-cbc", KDF: "argon2"}},
		{opt: "", errSub: "either file=, fd=, pwdfile=, or pwdfd= is required"},
		{opt: "mode=aes-256-cbc", errSub: "is required"},
		{opt: "file=/k,pwdfd=3", errSub: "only one"},
		{opt: "fd=3,pwdfd=4", errSub: "only one"},
		{opt: "file=/k,mode=aes-192-cbc", errSub: "unknown encryption mode 'aes-192-cbc'"},
		{opt: "file=/k,format=base64", errSub: "unknown key format 'base64'"},
		{opt: "pwdfile=/p,kdf=argon2", errSub: "unknown kdf 'argon2'"},
		{opt: "file=/k,size=3", errSub: "unknown option 'size'"},
		{opt: "fd=-3", errSub: "not a file descriptor"},
		{opt: "fd=x", errSub: "as a number"},
		{opt: "file=", errSub: "needs a file name"},
	}
	for _, tt := range tests {
		t.Run(tt.opt, func(t *testing.T) {
			got, err := ParseKeyOption(tt.opt)
			if tt.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("err = %v, want %q", err, tt.errSub)
				}
				return
			}
			if err != nil || *got != tt.want {
				t.Fatalf("got %+v, %v; want %+v", got, err, tt.want)
			}
		})
	}
}

func TestLoadKey(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	const h128 = "000102030405060708090a0b0c0d0e0f"
	const h256 = h128 + "f0e0d0c0b0a090807060504030201000"
	tests := []struct {
		name, content, opt string
		wantHex            string // expected key, hex
		errSub             string
	}{
		{"hex", h128, "", h128, ""},
		{"hex 0x newline", "0x" + h128 + "\n", "", h128, ""},
		{"hex CRLF", h128 + "\r\n", "", h128, ""},
		{"hex upper case", strings.ToUpper(h128), "", h128, ""},
		{"hex, text after whitespace ignored", h128 + " this is my key\n", "", h128, ""},
		{"hex 256", h256, ",mode=aes-256-cbc", h256, ""},
		{"hex 256 with 0x", "0x" + h256 + "\n", ",mode=aes-256-cbc", h256, ""},
		{"hex 128 for aes-256", h128, ",mode=aes-256-cbc", "", "a 128-bit key was given, but mode aes-256-cbc needs 256 bits"},
		{"hex 256 for aes-128", h256, "", "", "a 256-bit key was given, but mode aes-128-cbc needs 128 bits"},
		{"hex too short", h128[:30], "", "", "32 or 64 hex digits"},
		{"hex too long", h256 + "00", ",mode=aes-256-cbc", "", "32 or 64 hex digits"},
		{"hex leading space", " " + h128, "", "", "found 0 characters"},
		{"hex 0X not accepted", "0X" + h128, "", "", "found 34 characters"},
		{"hex bad digit", "g" + h128[1:], "", "", "not a hex key"},
		{"binary 16", strings.Repeat("\x01", 16), ",format=binary", "01010101010101010101010101010101", ""},
		{"binary 32", strings.Repeat("\x02", 32), ",format=binary,mode=aes-256-cbc", strings.Repeat("02", 32), ""},
		// swtpm keeps the 16 bytes read: an AES-128 key despite aes-256-cbc
		{"binary 16 for aes-256", strings.Repeat("\x03", 16), ",format=binary,mode=aes-256-cbc", strings.Repeat("03", 16), ""},
		{"binary too long", strings.Repeat("\x01", 17), ",format=binary", "", "larger than the 16"},
		{"binary 20 for aes-256", strings.Repeat("\x01", 20), ",format=binary,mode=aes-256-cbc", "", "binary key of 20 bytes"},
		{"binary empty", "", ",format=binary", "", "binary key of 0 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := write("key", tt.content)
			spec, err := ParseKeyOption("file=" + p + tt.opt)
			if err != nil {
				t.Fatal(err)
			}
			k, err := LoadKey(spec)
			if tt.errSub != "" {
				if err == nil || !strings.Contains(err.Error(), tt.errSub) {
					t.Fatalf("err = %v, want %q", err, tt.errSub)
				}
				return
			}
			if err != nil || hex.EncodeToString(k.Bytes()) != tt.wantHex {
				t.Fatalf("key %x, %v; want %s", k.Bytes(), err, tt.wantHex)
			}
		})
	}
	t.Run("missing file", func(t *testing.T) {
		spec, _ := ParseKeyOption("file=" + filepath.Join(dir, "nope"))
		if _, err := LoadKey(spec); err == nil || !strings.Contains(err.Error(), "no such file") {
			t.Fatalf("err = %v", err)
		}
	})
}

// Known answers computed independently (Python hashlib) for the passphrases.
func TestDeriveKeyKnownAnswers(t *testing.T) {
	tests := []struct {
		pass, kdf string
		n         int
		want      string
	}{
		{"secret\n", "pbkdf2", 32, "92bb9ef4ea654697a65e1689d0a0185b4e7f7e2b3173633277e1408c93d83826"},
		{"secret\n", "pbkdf2", 16, "92bb9ef4ea654697a65e1689d0a0185b"},
		{"correct horse battery staple\n", "pbkdf2", 32, "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee"},
		{"migration secret", "pbkdf2", 32, "44080c1ae85e3b27e20ebba456bf53a3ddea55938c3d75bf966956dc76565d43"},
		{"correct horse battery staple\n", "sha512", 16, "b3bf1950a302702ce2661a76c1c69f9d"},
	}
	for _, tt := range tests {
		k, err := DeriveKey([]byte(tt.pass), tt.n, tt.kdf)
		if err != nil || hex.EncodeToString(k.Bytes()) != tt.want {
			t.Fatalf("%q %s %d: %x %v, want %s", tt.pass, tt.kdf, tt.n, k.Bytes(), err, tt.want)
		}
	}
	if _, err := DeriveKey([]byte("x"), 16, "scrypt"); err == nil {
		t.Fatal("unknown kdf accepted")
	}
}

func TestLoadKeyPassphraseAndFDs(t *testing.T) {
	dir := t.TempDir()
	pwd := filepath.Join(dir, "pwd")
	os.WriteFile(pwd, []byte("correct horse battery staple\n"), 0o600)
	spec, _ := ParseKeyOption("pwdfile=" + pwd + ",mode=aes-256-cbc")
	k, err := LoadKey(spec)
	if err != nil || hex.EncodeToString(k.Bytes()) != "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee" {
		t.Fatalf("pwdfile: %x %v", k.Bytes(), err)
	}
	// pwdfd= and fd= read a pipe to EOF and close it
	for _, c := range []struct{ opt, content, want string }{
		{"pwdfd=%d,mode=aes-256-cbc", "correct horse battery staple\n", "a1d3850e5a1805f07bc139ea1ef5b740ba5d20229e06e7318691d73e56ae1dee"},
		{"fd=%d", "000102030405060708090a0b0c0d0e0f\n", "000102030405060708090a0b0c0d0e0f"},
	} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.WriteString(c.content)
		w.Close()
		fd, err := unix.Dup(int(r.Fd())) // LoadKey closes its own descriptor
		r.Close()
		if err != nil {
			t.Fatal(err)
		}
		spec, err := ParseKeyOption(fmt.Sprintf(c.opt, fd))
		if err != nil {
			t.Fatal(err)
		}
		k, err := LoadKey(spec)
		if err != nil || hex.EncodeToString(k.Bytes()) != c.want {
			t.Fatalf("%s: %x %v", c.opt, k.Bytes(), err)
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != unix.EBADF {
			unix.Close(fd)
			t.Fatalf("%s: descriptor %d still open (%v)", c.opt, fd, err)
		}
	}
	// remove unlinks the file only when the key was loaded
	bad := filepath.Join(dir, "bad")
	os.WriteFile(bad, []byte("not hex"), 0o600)
	spec, _ = ParseKeyOption("file=" + bad + ",remove")
	if _, err := LoadKey(spec); err == nil {
		t.Fatal("bad key accepted")
	}
	if _, err := os.Stat(bad); err != nil {
		t.Fatal("remove unlinked a key file that failed to load")
	}
	spec, _ = ParseKeyOption("pwdfile=" + pwd + ",remove=true")
	if _, err := LoadKey(spec); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(pwd); !os.IsNotExist(err) {
		t.Fatal("remove did not unlink the passphrase file")
	}
}

func TestKeyDoesNotLeak(t *testing.T) {
	k := key(t, 32, 0xab)
	for _, s := range []string{fmt.Sprint(k), fmt.Sprintf("%v %s %+v %#v", k, k, k, k)} {
		if strings.Contains(strings.ToLower(s), "abab") || strings.Contains(s, "171") {
			t.Fatalf("key bytes in %q", s)
		}
	}
	if fmt.Sprint(k) != "AES-256 key" || !k.Equal(key(t, 32, 0xab)) || k.Equal(key(t, 32, 0xac)) || k.Equal(nil) {
		t.Fatal("String/Equal")
	}
	if _, err := NewKey(make([]byte, 24)); err == nil {
		t.Fatal("24-byte key accepted")
	}
}
