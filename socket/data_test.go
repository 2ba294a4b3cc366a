package socket

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"testing"
)

func cmdBytes(size int) []byte {
	b := make([]byte, size)
	binary.BigEndian.PutUint16(b, 0x8001)
	binary.BigEndian.PutUint32(b[2:], uint32(size))
	binary.BigEndian.PutUint32(b[6:], 0x17b)
	for i := 10; i < size; i++ {
		b[i] = byte(i)
	}
	return b
}

func TestReadFrame(t *testing.T) {
	getRandom := cmdBytes(12)
	prefixed := append([]byte{0, 0, 0, 8, 3, 0, 0, 0, 12}, getRandom...)
	tests := []struct {
		name     string
		in       []byte
		tpm2     bool
		want     []byte
		prefixed bool
		loc      uint8
		oversize bool
		errFrame bool
		errEOF   bool
	}{
		{name: "plain", in: getRandom, tpm2: true, want: getRandom},
		{name: "two commands take the first", in: append(append([]byte{}, getRandom...), getRandom...), tpm2: true, want: getRandom},
		{name: "send-command header", in: prefixed, tpm2: true, want: getRandom, prefixed: true, loc: 3},
		{name: "prefix ignored for tpm 1.2", in: prefixed, tpm2: false, errFrame: true},
		{name: "size below header", in: []byte{0x80, 1, 0, 0, 0, 4, 0, 0, 0, 0}, tpm2: true, errFrame: true},
		{name: "oversized is discarded", in: cmdBytes(5000), tpm2: true, oversize: true},
		{name: "truncated body", in: cmdBytes(30)[:20], tpm2: true, errFrame: true},
		{name: "empty", in: nil, tpm2: true, errEOF: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f, err := ReadFrame(bytes.NewReader(tt.in), tt.tpm2, 4096)
			switch {
			case tt.errEOF:
				if !errors.Is(err, io.EOF) {
					t.Fatalf("err = %v, want EOF", err)
				}
				return
			case tt.errFrame:
				if !errors.Is(err, ErrFrame) {
					t.Fatalf("err = %v, want ErrFrame", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if f.Oversize != tt.oversize {
				t.Fatalf("oversize = %v", f.Oversize)
			}
			if tt.oversize {
				return
			}
			if !bytes.Equal(f.Command, tt.want) || f.Prefixed != tt.prefixed || f.Locality != tt.loc {
				t.Fatalf("frame = %x prefixed=%v loc=%d", f.Command, f.Prefixed, f.Locality)
			}
		})
	}
}

func FuzzReadFrame(f *testing.F) {
	f.Add(cmdBytes(12), true)
	f.Add(append([]byte{0, 0, 0, 8, 0, 0, 0, 0, 12}, cmdBytes(12)...), true)
	f.Add([]byte{0, 0xc1, 0, 0, 0, 0x0c, 0, 0, 0, 0x99, 0, 1}, false)
	f.Add([]byte{0x80, 1, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0}, true)
	f.Fuzz(func(t *testing.T, in []byte, tpm2 bool) {
		r := bytes.NewReader(in)
		for i := 0; i < 8; i++ {
			fr, err := ReadFrame(r, tpm2, 4096)
			if err != nil {
				return
			}
			if !fr.Oversize {
				if len(fr.Command) < 10 || int(binary.BigEndian.Uint32(fr.Command[2:6])) != len(fr.Command) {
					t.Fatalf("frame size mismatch: %x", fr.Command)
				}
				if len(fr.Command) > 4096 {
					t.Fatalf("frame larger than max: %d", len(fr.Command))
				}
			}
		}
	})
}
