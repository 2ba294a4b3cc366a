package seam

import (
	"bytes"
	"errors"
	"slices"
	"testing"
)

type recGuard struct {
	name    string
	refuse  []byte
	failErr error
	log     *[]string
}

func (g recGuard) Check(cmd []byte) []byte {
	*g.log = append(*g.log, g.name+".check")
	return g.refuse
}
func (g recGuard) Started(Exec) error {
	*g.log = append(*g.log, g.name+".started")
	return g.failErr
}
func (g recGuard) Done(cmd, rsp []byte, exec Exec) { *g.log = append(*g.log, g.name+".done") }

func TestGuards(t *testing.T) {
	if Guards() != nil || Guards(nil, nil) != nil {
		t.Fatal("no guards must be nil")
	}
	var log []string
	a := &recGuard{name: "a", log: &log}
	if g := Guards(nil, a); g != Guard(a) {
		t.Fatal("one guard must be itself")
	}
	b := &recGuard{name: "b", refuse: []byte{1}, failErr: errors.New("no"), log: &log}
	c := &recGuard{name: "c", log: &log}
	g := Guards(a, b, c)
	if r := g.Check(nil); !bytes.Equal(r, []byte{1}) {
		t.Fatalf("Check = %v, want b's refusal", r)
	}
	if err := g.Started(nil); err == nil {
		t.Fatal("Started must stop at b's error")
	}
	g.Done(nil, nil, nil)
	want := "a.check b.check a.started b.started a.done b.done c.done"
	if got := join(log); got != want {
		t.Fatalf("calls %q, want %q", got, want)
	}
}

func join(s []string) string {
	var b bytes.Buffer
	for i, x := range s {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(x)
	}
	return b.String()
}

// filterGuard is a recGuard that names the commands it must see.
type filterGuard struct {
	recGuard
	cmds []uint32
}

func (g *filterGuard) Commands() []uint32 { return g.cmds }

func TestCommandsOf(t *testing.T) {
	a := &filterGuard{cmds: []uint32{0x182, 0x144}}
	b := &filterGuard{cmds: []uint32{0x144, 0x137}}
	plain := &recGuard{}
	tests := []struct {
		name string
		g    Guard
		want []uint32
		ok   bool
	}{
		{"no guard", nil, nil, true},
		{"a guard that sees everything", plain, nil, false},
		{"one filter", a, []uint32{0x144, 0x182}, true},
		{"filters combined: union, sorted", Guards(a, b), []uint32{0x137, 0x144, 0x182}, true},
		{"a combination with one that sees everything", Guards(a, plain), nil, false},
	}
	for _, tt := range tests {
		got, ok := CommandsOf(tt.g)
		if ok != tt.ok || !slices.Equal(got, tt.want) {
			t.Errorf("%s: %x %v, want %x %v", tt.name, got, ok, tt.want, tt.ok)
		}
	}
}
