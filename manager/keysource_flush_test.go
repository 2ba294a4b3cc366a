package manager

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// TestKeysFlushReportsTheLastVersion: the keys a vTPM gets from the manager come with a Flush
// that returns only once the versions recorded so far reached the manager, so that a vTPM
// that stops (backend.Run flushes at exit) leaves the manager's record at its last version.
// Before the fix Keys returned no Flush: the versions written since the last report were lost
// at every stop, and the record lagged behind the state (a wider rollback window).
func TestKeysFlushReportsTheLastVersion(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "m.sock")
	var mu sync.Mutex
	var got uint64
	mux := http.NewServeMux()
	mux.HandleFunc("POST "+pathKey, func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(KeyResponse{VM: "vm", Key: make([]byte, stateKeySize)})
	})
	mux.HandleFunc("POST "+pathVersion, func(w http.ResponseWriter, r *http.Request) {
		var rep VersionReport
		json.NewDecoder(r.Body).Decode(&rep)
		time.Sleep(20 * time.Millisecond) // a manager that takes its time (a hardware NV increment)
		mu.Lock()
		got = max(got, rep.Version)
		mu.Unlock()
		json.NewEncoder(w).Encode(VMStatus{Version: rep.Version})
	})
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: mux}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	state := filepath.Join(dir, "state")
	os.Mkdir(state, 0o700)

	ks := &KeySource{Client: NewClient(sock), StateURI: "dir://" + state, TPM2: true, Required: true}
	keys, err := ks.Keys(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	defer keys.Zero()
	if keys.RecordVersion == nil || keys.Flush == nil {
		t.Fatalf("keys from the manager: RecordVersion %v, Flush %v: the last versions would be lost when the vTPM stops",
			keys.RecordVersion != nil, keys.Flush != nil)
	}
	for v := uint64(1); v <= 5; v++ {
		keys.RecordVersion(v)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	keys.Flush(ctx)
	mu.Lock()
	defer mu.Unlock()
	if got != 5 || ctx.Err() != nil {
		t.Fatalf("after Flush the manager has version %d (want 5); %v", got, ctx.Err())
	}
}
