package libvirt

import (
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestRegistry(t *testing.T) {
	reg := NewRegistry(t.TempDir() + "/reg")
	if _, err := reg.Get(testUUID); !errors.Is(err, ErrNotFound) {
		t.Fatalf("err = %v", err)
	}
	if _, err := reg.Append("../../etc/passwd", Event{Op: "x"}, nil); !errors.Is(err, ErrInvalid) {
		t.Fatalf("err = %v", err)
	}
	rec, err := reg.Append(strings.ToUpper(testUUID), Event{Op: OpPrepare, SubOp: "begin"}, func(r *Record) {
		r.Name, r.Backend, r.PID = "vm1", BackendExternal, 42
	})
	if err != nil {
		t.Fatal(err)
	}
	if rec.UUID != testUUID || len(rec.Events) != 1 || rec.Events[0].Time.IsZero() {
		t.Fatalf("rec %+v", rec)
	}
	got, err := reg.Get(testUUID)
	if err != nil || got.Name != "vm1" || got.PID != 42 || got.Events[0].Op != OpPrepare {
		t.Fatalf("got %+v %v", got, err)
	}
	for i := 0; i < maxEvents+10; i++ {
		if _, err := reg.Append(testUUID, Event{Op: OpStarted}, nil); err != nil {
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
	// junk files do not break List
	os.WriteFile(reg.Dir+"/notes.txt", []byte("x"), 0o600)
	os.WriteFile(reg.Dir+"/5b1e7c3a-1111-4c1e-9d3b-0000000000ff.json", []byte("{broken"), 0o600)
	recs, errs := reg.List()
	if len(recs) != 1 || len(errs) != 1 {
		t.Fatalf("recs %d errs %v", len(recs), errs)
	}
}

func TestRegistryConcurrent(t *testing.T) {
	reg := NewRegistry(t.TempDir())
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 10; j++ {
				if _, err := reg.Append(testUUID, Event{Op: OpStart}, nil); err != nil {
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
	t.Setenv(RegistryEnv, "/tmp/x/reg")
	if NewRegistry("").Dir != "/tmp/x/reg" {
		t.Fatal("env ignored")
	}
	if NewRegistry("/a").Dir != "/a" {
		t.Fatal("explicit dir ignored")
	}
	t.Setenv(RegistryEnv, "")
	if NewRegistry("").Dir != DefaultRegistryDir {
		t.Fatal("default")
	}
}

func TestRegistryLockTimeout(t *testing.T) {
	reg := NewRegistry(t.TempDir())
	unlock, err := reg.lock()
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	old := lockTimeout
	lockTimeout = 50 * time.Millisecond
	defer func() { lockTimeout = old }()
	if _, err := reg.Append(testUUID, Event{Op: OpStart}, nil); !errors.Is(err, ErrLocked) {
		t.Fatalf("err = %v", err)
	}
}
