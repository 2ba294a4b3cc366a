package seam

import (
	"bytes"
	"errors"
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
