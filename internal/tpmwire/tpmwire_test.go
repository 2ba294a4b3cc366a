package tpmwire

import (
	"bytes"
	"errors"
	"testing"
)

func TestCommands(t *testing.T) {
	tests := []struct {
		name string
		got  []byte
		want []byte
	}{
		{"TPM2_Startup(CLEAR)", Startup2(SUClear), []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 0}},
		{"TPM2_Startup(STATE)", Startup2(SUState), []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x44, 0, 1}},
		{"TPM2_Shutdown(STATE)", Shutdown2(SUState), []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x45, 0, 1}},
		{"TPM_Startup(ST_CLEAR)", Startup12(STClear), []byte{0x00, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1}},
		{"TPM2_GetRandom(8)", GetRandom2(8), []byte{0x80, 0x01, 0, 0, 0, 0x0c, 0, 0, 0x01, 0x7b, 0, 8}},
		{"TPM 2 error", ErrorResponse(true, RCSetLocalityRefused), []byte{0x80, 0x01, 0, 0, 0, 0x0a, 0, 0, 0x01, 0x07}},
		{"TPM 1.2 error", ErrorResponse(false, uint32(ResFail)), []byte{0x00, 0xc4, 0, 0, 0, 0x0a, 0, 0, 0, 0x09}},
		{"params concatenated", Command(TagSessions, 0x12b, U32(0x4000000c), nil, []byte{1}), []byte{0x80, 0x02, 0, 0, 0, 0x0f, 0, 0, 0x01, 0x2b, 0x40, 0, 0, 0x0c, 1}},
	}
	for _, tt := range tests {
		if !bytes.Equal(tt.got, tt.want) {
			t.Errorf("%s = % x, want % x", tt.name, tt.got, tt.want)
		}
	}
}

func TestParseHeader(t *testing.T) {
	h, err := ParseHeader([]byte{0x80, 0x01, 0, 0, 0, 0x20, 0, 0, 0x09, 0x22, 0xff})
	if err != nil || h != (Header{Tag: TagNoSessions, Size: 0x20, Code: RCRetry}) {
		t.Fatalf("ParseHeader = %+v, %v", h, err)
	}
	for n := range HeaderSize {
		if _, err := ParseHeader(make([]byte, n)); !errors.Is(err, ErrShort) {
			t.Errorf("ParseHeader(%d bytes) err = %v, want ErrShort", n, err)
		}
	}
	if _, err := ResponseCode([]byte{0x80}); !errors.Is(err, ErrShort) {
		t.Errorf("ResponseCode(short) err = %v, want ErrShort", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	f.Add(Startup2(SUClear))
	f.Add([]byte{0x80, 0x01, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			if len(b) >= HeaderSize {
				t.Fatalf("refused %d bytes: %v", len(b), err)
			}
			return
		}
		if got := h.Append(nil); !bytes.Equal(got, b[:HeaderSize]) {
			t.Fatalf("round trip % x != % x", got, b[:HeaderSize])
		}
	})
}
