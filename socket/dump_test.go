package socket

import (
	"bytes"
	"testing"
)

// TestAppendDump: the bytes Debian's swtpm 0.7.1 wrote with --log level=20 for a GET_CONFIG
// and a TPM2_GetRandom(8).
func TestAppendDump(t *testing.T) {
	tests := []struct {
		title string
		b     []byte
		want  string
	}{
		{"Ctrl Cmd", []byte{0, 0, 0, 0x0f}, " Ctrl Cmd: length 4\n 00 00 00 0F \n"},
		{"SWTPM_IO_Write", []byte{0x80, 0x01, 0, 0, 0, 0x14, 0, 0, 0, 0, 0, 0x08, 0x40, 0x2a, 0x09, 0xe9, 0x5d, 0xb0, 0x6a, 0x32},
			" SWTPM_IO_Write: length 20\n 80 01 00 00 00 14 00 00 00 00 00 08 40 2A 09 E9 \n 5D B0 6A 32 \n"},
		{"Ctrl Rsp", nil, " Ctrl Rsp: length 0\n"},
	}
	for _, tt := range tests {
		if got := string(AppendDump(nil, tt.title, tt.b)); got != tt.want {
			t.Errorf("%s: %q, want %q", tt.title, got, tt.want)
		}
	}
	// exactly 16 bytes: one full line, no empty line after it
	if got := AppendDump(nil, "x", make([]byte, 16)); !bytes.HasSuffix(got, []byte("00 \n")) || bytes.Count(got, []byte("\n")) != 2 {
		t.Errorf("16 bytes: %q", got)
	}
}
