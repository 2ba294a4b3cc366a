package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Linear store layout (swtpm's file:// backend), all little endian.
const (
	linearMagic      = 0x737774706d6c696e // "nilmptws" on disk
	linearVersion    = 1
	linearHeaderSize = 192
	linearEntries    = 15
)

var linearNames = []string{"permall", "volatilestate", "savestate"}

// ErrLinearHeader is wrapped when a linear store's header is inconsistent.
var ErrLinearHeader = errors.New("store: bad linear store header")

type linearEntry struct{ offset, length, section uint32 }

// LinearImage is a parsed linear store.
type LinearImage struct {
	blobs map[string][]byte
}

// ParseLinear parses a linear store image. An image without the magic (or empty) is a new,
// empty store, as swtpm formats it.
func ParseLinear(img []byte) (*LinearImage, error) {
	li := &LinearImage{blobs: map[string][]byte{}}
	if len(img) < 8 || binary.LittleEndian.Uint64(img) != linearMagic {
		return li, nil
	}
	if len(img) < linearHeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, header needs %d", ErrLinearHeader, len(img), linearHeaderSize)
	}
	if v := img[8]; v != linearVersion {
		return nil, fmt.Errorf("%w: version %d", ErrLinearHeader, v)
	}
	if hs := binary.LittleEndian.Uint16(img[10:]); hs != linearHeaderSize {
		return nil, fmt.Errorf("%w: header size %d", ErrLinearHeader, hs)
	}
	for i := 0; i < linearEntries; i++ {
		off := 12 + 12*i
		e := linearEntry{binary.LittleEndian.Uint32(img[off:]), binary.LittleEndian.Uint32(img[off+4:]), binary.LittleEndian.Uint32(img[off+8:])}
		if e.offset == 0 {
			continue
		}
		if e.offset < linearHeaderSize || e.length > e.section || uint64(e.offset)+uint64(e.length) > uint64(len(img)) {
			return nil, fmt.Errorf("%w: entry %d (offset %d, length %d, section %d) outside the %d-byte store",
				ErrLinearHeader, i, e.offset, e.length, e.section, len(img))
		}
		if i < len(linearNames) {
			li.blobs[linearNames[i]] = append([]byte(nil), img[e.offset:e.offset+e.length]...)
		}
	}
	return li, nil
}

func roundPow2(n uint32) uint32 {
	p := uint32(1)
	for p < n {
		p <<= 1
	}
	return p
}

// Marshal lays the blobs out compactly after the header.
func (li *LinearImage) Marshal() []byte {
	hdr := make([]byte, linearHeaderSize)
	binary.LittleEndian.PutUint64(hdr, linearMagic)
	hdr[8] = linearVersion
	binary.LittleEndian.PutUint16(hdr[10:], linearHeaderSize)
	img := hdr
	for i, name := range linearNames {
		b, ok := li.blobs[name]
		if !ok {
			continue
		}
		sec := roundPow2(uint32(max(len(b), 1)))
		off := 12 + 12*i
		binary.LittleEndian.PutUint32(img[off:], uint32(len(img)))
		binary.LittleEndian.PutUint32(img[off+4:], uint32(len(b)))
		binary.LittleEndian.PutUint32(img[off+8:], sec)
		section := make([]byte, sec)
		copy(section, b)
		img = append(img, section...)
	}
	return img
}

// linearBackend keeps the store in one file or block device.
type linearBackend struct {
	path  string
	opts  Options
	block bool
}

func openLinear(path string, o Options) (*linearBackend, error) {
	if path == "" {
		return nil, errors.New("store: empty file:// path")
	}
	st, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if _, err := os.Stat(filepath.Dir(path)); err != nil {
			return nil, fmt.Errorf("store: directory of %s: %w", path, err)
		}
		return &linearBackend{path: path, opts: o}, nil
	case err != nil:
		return nil, fmt.Errorf("store: %s: %w", path, err)
	}
	lb := &linearBackend{path: path, opts: o, block: st.Mode()&fs.ModeDevice != 0}
	if !st.Mode().IsRegular() && !lb.block {
		return nil, fmt.Errorf("store: %s is neither a regular file nor a block device", path)
	}
	return lb, nil
}

func (l *linearBackend) lockPath() string { return l.path }
func (l *linearBackend) close() error     { return nil }

func (l *linearBackend) image() (*LinearImage, error) {
	f, err := os.Open(l.path)
	if errors.Is(err, fs.ErrNotExist) {
		return &LinearImage{blobs: map[string][]byte{}}, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	img, err := io.ReadAll(io.LimitReader(f, maxBlob*4))
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", l.path, err)
	}
	li, err := ParseLinear(img)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l.path, err)
	}
	return li, nil
}

func (l *linearBackend) read(name string) ([]byte, error) {
	li, err := l.image()
	if err != nil {
		return nil, err
	}
	b, ok := li.blobs[name]
	if !ok {
		return nil, fs.ErrNotExist
	}
	return b, nil
}

func (l *linearBackend) update(f func(*LinearImage) error) error {
	li, err := l.image()
	if err != nil {
		return err
	}
	if err := f(li); err != nil {
		return err
	}
	return l.writeImage(li.Marshal())
}

func (l *linearBackend) write(name string, data []byte) error {
	return l.update(func(li *LinearImage) error { li.blobs[name] = data; return nil })
}

func (l *linearBackend) remove(name string) error {
	return l.update(func(li *LinearImage) error {
		if _, ok := li.blobs[name]; !ok {
			return fs.ErrNotExist
		}
		delete(li.blobs, name)
		return nil
	})
}

// writeImage replaces the store durably: temp file + rename for regular files (so a crash
// leaves the old or the new image), in place + fsync for block devices.
func (l *linearBackend) writeImage(img []byte) error {
	if l.block {
		f, err := os.OpenFile(l.path, os.O_WRONLY, 0)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(img, 0); err != nil {
			return fmt.Errorf("write %s: %w", l.path, err)
		}
		if l.opts.NoFsync {
			return nil
		}
		return f.Sync()
	}
	if l.opts.Lock {
		// The lock lives on the file itself, so it must not be replaced: write in place.
		f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE, os.FileMode(l.opts.Mode))
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := f.WriteAt(img, 0); err != nil {
			return fmt.Errorf("write %s: %w", l.path, err)
		}
		if err := f.Truncate(int64(len(img))); err != nil {
			return err
		}
		if l.opts.NoFsync {
			return nil
		}
		return f.Sync()
	}
	d := &dirBackend{dir: filepath.Dir(l.path), opts: l.opts}
	tmp := l.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|unix.O_NOFOLLOW, os.FileMode(l.opts.Mode))
	if err != nil {
		return err
	}
	if _, err := f.Write(img); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if !l.opts.NoFsync {
		if err := f.Sync(); err != nil {
			f.Close()
			os.Remove(tmp)
			return err
		}
	}
	f.Close()
	if err := os.Rename(tmp, l.path); err != nil {
		os.Remove(tmp)
		return err
	}
	return d.syncDir()
}
