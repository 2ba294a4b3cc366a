package registry

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

const testUUID = "5b1e7c3a-1111-4c1e-9d3b-000000000001"

func TestRegistry(t *testing.T) {
	ctx := context.Background()
	reg := New(t.TempDir() + "/reg")
	if _, err := reg.Get(testUUID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v", err)
	}
	for _, key := range []string{"../../etc/passwd", "", testUUID + ".json", strings.Repeat("x", 1000)} {
		if _, err := reg.Append(ctx, key, Event{Op: "x"}, nil); !errors.Is(err, ErrBadUUID) {
			t.Fatalf("key %q: err = %v", key, err)
		}
		if _, err := reg.Get(key); !errors.Is(err, ErrBadUUID) {
			t.Fatalf("key %q: err = %v", key, err)
		}
	}
	rec, err := reg.Append(ctx, strings.ToUpper(testUUID), Event{Op: "prepare", SubOp: "begin"}, func(r *Record) {
		r.Name, r.Backend, r.PID = "vm1", "external", 42
	})
	if err != nil {
		t.Fatal(err)
	}
	if rec.UUID != testUUID || len(rec.Events) != 1 || rec.Events[0].Time.IsZero() {
		t.Fatalf("rec %+v", rec)
	}
	got, err := reg.Get(testUUID)
	if err != nil || got.Name != "vm1" || got.PID != 42 || got.Events[0].Op != "prepare" {
		t.Fatalf("got %+v %v", got, err)
	}
	for i := 0; i < maxEvents+10; i++ {
		if _, err := reg.Append(ctx, testUUID, Event{Op: "started"}, nil); err != nil {
			t.Fatal(err)
		}
	}
	got, _ = reg.Get(testUUID)
	if len(got.Events) != maxEvents {
		t.Fatalf("%d events", len(got.Events))
	}
	entries, _ := os.ReadDir(reg.Dir)
	for _, e := range entries {
		if strings.Contains(e.Name(), ".tmp") {
			t.Fatalf("temp file left: %s", e.Name())
		}
	}
	for _, p := range []string{reg.Dir, reg.Dir + "/" + testUUID + ".json"} {
		if fi, err := os.Stat(p); err != nil || fi.Mode().Perm()&0o077 != 0 {
			t.Fatalf("%s: mode %v, %v", p, fi.Mode(), err)
		}
	}
	// junk files do not break List
	os.WriteFile(reg.Dir+"/notes.txt", []byte("x"), 0o600)
	os.WriteFile(reg.Dir+"/5b1e7c3a-1111-4c1e-9d3b-0000000000ff.json", []byte("{broken"), 0o600)
	recs, errs := reg.List()
	if len(recs) != 1 || len(errs) != 1 {
		t.Fatalf("recs %d errs %v", len(recs), errs)
	}
}

func TestRegistryConcurrent(t *testing.T) {
	reg := New(t.TempDir())
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				if _, err := reg.Append(context.Background(), testUUID, Event{Op: "start"}, nil); err != nil {
					t.Error(err)
				}
			}
		}()
	}
	wg.Wait()
	got, err := reg.Get(testUUID)
	if err != nil || len(got.Events) != 80 {
		t.Fatalf("%v events, %v", len(got.Events), err)
	}
}

func TestRegistryEnv(t *testing.T) {
	t.Setenv(DirEnv, "/tmp/x/reg")
	if New("").Dir != "/tmp/x/reg" {
		t.Fatal("env ignored")
	}
	if New("/a").Dir != "/a" {
		t.Fatal("explicit dir ignored")
	}
	t.Setenv(DirEnv, "")
	if New("").Dir != DefaultDir {
		t.Fatal("default")
	}
}

func TestRegistryLockWait(t *testing.T) {
	reg := New(t.TempDir())
	unlock, err := reg.lock(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	old := lockTimeout
	lockTimeout = 50 * time.Millisecond
	defer func() { lockTimeout = old }()
	if _, err := reg.Append(context.Background(), testUUID, Event{Op: "start"}, nil); !errors.Is(err, ErrLocked) {
		t.Fatalf("err = %v", err)
	}
	lockTimeout = time.Minute
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	start := time.Now()
	if _, err := reg.Append(ctx, testUUID, Event{Op: "start"}, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Fatalf("waited %v past the context's end", d)
	}
}

func TestPolicyKeep(t *testing.T) {
	no, yes := false, true
	for _, tt := range []struct {
		p    *Policy
		want bool
	}{
		{nil, true},
		{&Policy{}, true},
		{&Policy{KeepState: &yes}, true},
		{&Policy{KeepState: &no}, false},
	} {
		if got := tt.p.Keep(); got != tt.want {
			t.Errorf("%+v: Keep() = %v", tt.p, got)
		}
	}
}
