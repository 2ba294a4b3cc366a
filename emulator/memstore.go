package emulator

import (
	"fmt"
	"sync"
)

// MemStore is a Store that keeps the blobs in memory: for in-process use (benchmarks, tests,
// tools) where nothing must reach disk. It is safe for concurrent use.
type MemStore struct {
	mu    sync.Mutex
	blobs map[StateType][]byte // guarded by mu
}

// NewMemStore returns an empty MemStore.
func NewMemStore() *MemStore { return &MemStore{blobs: map[StateType][]byte{}} }

// Load implements Store.
func (m *MemStore) Load(t StateType) ([]byte, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	b, ok := m.blobs[t]
	if !ok {
		return nil, fmt.Errorf("load %s: %w", t.Name(), ErrNotExist)
	}
	return append([]byte(nil), b...), nil
}

// Store implements Store.
func (m *MemStore) Store(t StateType, d []byte) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.blobs[t] = append([]byte(nil), d...)
	return nil
}

// Delete implements Store.
func (m *MemStore) Delete(t StateType, mustExist bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.blobs[t]; !ok && mustExist {
		return fmt.Errorf("delete %s: %w", t.Name(), ErrNotExist)
	}
	delete(m.blobs, t)
	return nil
}
