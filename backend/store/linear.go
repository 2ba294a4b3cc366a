package store

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"slices"

	"golang.org/x/sys/unix"

	"github.com/vtpmd/vtpmd/internal/atomicfile"
)

// Linear store layout (swtpm's file:// backend), all little endian: u64 magic, u8 version,
// u8 pad, u16 header size, then 15 entries {u32 offset, u32 data length, u32 section
// length}; entry 0 is permall, 1 volatilestate, 2 savestate; offset 0 means absent.
const (
	linearMagic      = 0x737774706d6c696e // "nilmptws" on disk
	linearVersion    = 1
	linearHeaderSize = 192
	linearEntries    = 15
	linearEntryBase  = 12
	// maxLinearImage bounds how much of a linear store is read.
	maxLinearImage = 64 << 20
)

// ErrLinearHeader is wrapped when a linear store's header is inconsistent.
var ErrLinearHeader = errors.New("bad linear store header")

// LinearEntry is one header entry.
type LinearEntry struct {
	Offset, DataLength, SectionLength uint32
}

func (e LinearEntry) end() uint64 { return uint64(e.Offset) + uint64(e.SectionLength) }

// LinearImage is a linear store held in memory and changed the way swtpm changes it: a new
// blob is appended after the last section in a section of the next power of two, a blob that
// outgrows its section is removed and appended again, and removing a blob moves the following
// sections forward. Regular files are resized to the image; a fixed-size image (a block
// device) never is.
type LinearImage struct {
	data     []byte // the image from offset 0; for a fixed-size store only up to the used end
	capacity int64  // size of a fixed-size store, 0 for a resizable one
	fresh    bool   // the magic was missing: formatted in memory, not yet on disk
}

// linearIndex maps a blob name to its entry, as swtpm's SWTPM_NVRAM_Linear_GetFileNr.
func linearIndex(name string) (int, error) {
	if i := slices.Index(blobNames, name); i >= 0 {
		return i, nil
	}
	return 0, fmt.Errorf("store: no linear store entry for %q", name)
}

func newLinearHeader(dst []byte) {
	clear(dst[:linearHeaderSize])
	binary.LittleEndian.PutUint64(dst, linearMagic)
	dst[8] = linearVersion
	binary.LittleEndian.PutUint16(dst[10:], linearHeaderSize)
}

// ParseLinearHeader checks the first bytes of a store of size bytes (size is the file or
// device size; hdr holds at least its first min(size, 192) bytes). A store without the magic
// (an empty or new file, a zeroed device) reports fresh: swtpm formats it. Entries must lie
// inside the store, after the header, without overlapping.
func ParseLinearHeader(hdr []byte, size int64) (entries [linearEntries]LinearEntry, fresh bool, err error) {
	if len(hdr) < 8 || binary.LittleEndian.Uint64(hdr) != linearMagic {
		return entries, true, nil
	}
	if len(hdr) < linearHeaderSize || size < linearHeaderSize {
		return entries, false, fmt.Errorf("%w: the magic is there, but the store has only %d bytes (header needs %d)", ErrLinearHeader, min(int64(len(hdr)), size), linearHeaderSize)
	}
	if v := hdr[8]; v > linearVersion {
		return entries, false, fmt.Errorf("%w: format version %d is newer than %d", ErrLinearHeader, v, linearVersion)
	}
	if hs := binary.LittleEndian.Uint16(hdr[10:]); hs != linearHeaderSize {
		return entries, false, fmt.Errorf("%w: header size %d != %d", ErrLinearHeader, hs, linearHeaderSize)
	}
	var used []LinearEntry
	for i := range entries {
		off := linearEntryBase + 12*i
		e := LinearEntry{binary.LittleEndian.Uint32(hdr[off:]), binary.LittleEndian.Uint32(hdr[off+4:]), binary.LittleEndian.Uint32(hdr[off+8:])}
		entries[i] = e
		if e.Offset == 0 {
			continue
		}
		if e.Offset < linearHeaderSize || e.DataLength > e.SectionLength || e.end() > uint64(size) {
			return entries, false, fmt.Errorf("%w: entry %d (offset %d, data %d, section %d) does not fit a %d-byte store after its header",
				ErrLinearHeader, i, e.Offset, e.DataLength, e.SectionLength, size)
		}
		used = append(used, e)
	}
	// by offset, then by end, so an empty section sharing an offset with a full one (swtpm
	// gives a zero-length blob a zero-length section) does not count as an overlap
	slices.SortFunc(used, func(a, b LinearEntry) int {
		if a.Offset != b.Offset {
			return cmp.Compare(a.Offset, b.Offset)
		}
		return cmp.Compare(a.SectionLength, b.SectionLength)
	})
	for i := 1; i < len(used); i++ {
		if used[i-1].end() > uint64(used[i].Offset) {
			return entries, false, fmt.Errorf("%w: sections at %d and %d overlap", ErrLinearHeader, used[i-1].Offset, used[i].Offset)
		}
	}
	return entries, false, nil
}

// ParseLinear parses a whole resizable (regular file) store image. An image without the magic
// is a new, empty store.
func ParseLinear(img []byte) (*LinearImage, error) {
	_, fresh, err := ParseLinearHeader(img, int64(len(img)))
	if err != nil {
		return nil, err
	}
	li := &LinearImage{data: bytes.Clone(img), fresh: fresh}
	if fresh {
		li.format()
	}
	return li, nil
}

// format writes a new header over the image, keeping its size, as swtpm does: magic, version,
// header size and empty entries; swtpm leaves the padding byte after the version as it was.
func (li *LinearImage) format() {
	if len(li.data) < linearHeaderSize {
		li.data = append(li.data, make([]byte, linearHeaderSize-len(li.data))...)
	}
	pad := li.data[9]
	newLinearHeader(li.data)
	li.data[9] = pad
	li.fresh = true
}

// Bytes returns the image (for a fixed-size store: up to its used end).
func (li *LinearImage) Bytes() []byte { return li.data }

// Entry returns header entry i (0 permall, 1 volatilestate, 2 savestate).
func (li *LinearImage) Entry(i int) LinearEntry {
	off := linearEntryBase + 12*i
	return LinearEntry{binary.LittleEndian.Uint32(li.data[off:]), binary.LittleEndian.Uint32(li.data[off+4:]), binary.LittleEndian.Uint32(li.data[off+8:])}
}

func (li *LinearImage) setEntry(i int, e LinearEntry) {
	off := linearEntryBase + 12*i
	binary.LittleEndian.PutUint32(li.data[off:], e.Offset)
	binary.LittleEndian.PutUint32(li.data[off+4:], e.DataLength)
	binary.LittleEndian.PutUint32(li.data[off+8:], e.SectionLength)
}

// Get returns a copy of the blob of entry i.
func (li *LinearImage) Get(i int) ([]byte, bool) {
	e := li.Entry(i)
	if e.Offset == 0 {
		return nil, false
	}
	return bytes.Clone(li.data[e.Offset : e.Offset+e.DataLength]), true
}

// pow2 rounds up to a power of two, 0 staying 0 (swtpm's ROUND_TO_NEXT_POWER_OF_2_32).
func pow2(n uint32) uint32 {
	if n == 0 {
		return 0
	}
	p := uint32(1)
	for p < n {
		p <<= 1
	}
	return p
}

// resize makes the image newSize bytes long; a fixed-size store only checks it fits.
func (li *LinearImage) resize(newSize uint64) error {
	if li.capacity > 0 {
		if newSize > uint64(li.capacity) {
			return fmt.Errorf("store: the linear store needs %d bytes, the block device has %d and cannot grow", newSize, li.capacity)
		}
		if newSize > uint64(len(li.data)) {
			li.data = append(li.data, make([]byte, newSize-uint64(len(li.data)))...)
		}
		return nil
	}
	if newSize > maxLinearImage {
		return fmt.Errorf("store: a linear store of %d bytes is larger than any TPM state needs", newSize)
	}
	if newSize <= uint64(len(li.data)) {
		li.data = li.data[:newSize]
	} else {
		li.data = append(li.data, make([]byte, newSize-uint64(len(li.data)))...)
	}
	return nil
}

// alloc places entry i at the end of the used sections (swtpm's AllocFile).
func (li *LinearImage) alloc(i int, size uint32) error {
	section := pow2(size)
	newOff := uint64(linearHeaderSize)
	for j := range linearEntries {
		if e := li.Entry(j); e.Offset != 0 {
			newOff = max(newOff, e.end())
		}
	}
	end := newOff + uint64(section)
	if end > math.MaxUint32 {
		return fmt.Errorf("store: linear store offset %d overflows", end)
	}
	if err := li.resize(end); err != nil {
		return err
	}
	li.setEntry(i, LinearEntry{Offset: uint32(newOff), DataLength: size, SectionLength: section})
	return nil
}

// remove drops entry i and moves the following sections forward (swtpm's RemoveFile).
func (li *LinearImage) remove(i int, shrink bool) error {
	old := li.Entry(i)
	if old.Offset == 0 {
		return nil
	}
	li.setEntry(i, LinearEntry{})
	// Everything after the removed section moves forward by its length, gaps included, so
	// every later entry's offset and data move together (in swtpm's own images the sections
	// are contiguous and this is its RemoveFile; a crafted image may have gaps).
	stateEnd := uint64(0)
	for j := range linearEntries {
		e := li.Entry(j)
		if e.Offset == 0 || e.Offset <= old.Offset {
			continue
		}
		stateEnd = max(stateEnd, e.end())
		e.Offset -= old.SectionLength
		li.setEntry(j, e)
	}
	if stateEnd > 0 {
		copy(li.data[old.Offset:], li.data[old.end():stateEnd])
	}
	if shrink && li.capacity == 0 {
		return li.resize(uint64(len(li.data)) - uint64(old.SectionLength))
	}
	return nil
}

// Put stores blob b as entry i (swtpm's StoreData_Linear).
func (li *LinearImage) Put(i int, b []byte) error {
	if uint64(len(b)) > maxLinearImage {
		return fmt.Errorf("store: blob of %d bytes is too large for a linear store", len(b))
	}
	e := li.Entry(i)
	switch {
	case e.Offset == 0:
		if err := li.alloc(i, uint32(len(b))); err != nil {
			return err
		}
	case uint32(len(b)) > e.SectionLength:
		if err := li.remove(i, false); err != nil {
			return err
		}
		if err := li.alloc(i, uint32(len(b))); err != nil {
			return err
		}
	}
	e = li.Entry(i)
	e.DataLength = uint32(len(b))
	li.setEntry(i, e)
	copy(li.data[e.Offset:], b)
	return nil
}

// Remove deletes entry i, compacting and shrinking the store (swtpm's DeleteName_Linear).
func (li *LinearImage) Remove(i int) error { return li.remove(i, true) }

// linearBackend keeps the store in one regular file or block device.
type linearBackend struct {
	path string
	opts Options
	// fixed is the size of a store that cannot be resized (a block device); tests set it on
	// a regular file to exercise the block-device path.
	fixed int64
}

func openLinear(path string, o Options) (*linearBackend, error) {
	if path == "" {
		return nil, errors.New("store: empty file:// path")
	}
	lb := &linearBackend{path: path, opts: o}
	// swtpm opens the store O_NOFOLLOW: a symbolic link is refused, and so is anything but a
	// regular file or a block device, at once (openFile does not block on a FIFO)
	fd, st, err := openFile(path, unix.O_RDONLY, 0, false, true)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if st, err := os.Stat(filepath.Dir(path)); err != nil || !st.IsDir() {
			return nil, fmt.Errorf("store: directory of %s: %w", path, errors.Join(err, fs.ErrNotExist))
		}
		return lb, nil
	case errors.Is(err, ErrNotRegular):
		return nil, err
	case err != nil:
		return nil, fmt.Errorf("store: %w", err)
	}
	defer unix.Close(fd)
	if st.Mode&unix.S_IFMT == unix.S_IFBLK {
		n, err := unix.Seek(fd, 0, io.SeekEnd)
		if err != nil {
			return nil, fmt.Errorf("store: size of block device %s: %w", path, err)
		}
		if n < linearHeaderSize {
			return nil, fmt.Errorf("store: block device %s has %d bytes, too small for the %d-byte header", path, n, linearHeaderSize)
		}
		lb.fixed = n
	}
	return lb, nil
}

func (l *linearBackend) String() string { return "file://" + l.path }

func (l *linearBackend) lockFile() (string, int, uint32, bool) {
	return l.path, unix.O_RDWR, l.opts.Mode, true
}

// image reads the store. A missing or empty file, or one without the magic, is a new store.
func (l *linearBackend) image() (*LinearImage, error) {
	fd, st, err := openFile(l.path, unix.O_RDONLY, 0, false, l.fixed != 0)
	if errors.Is(err, fs.ErrNotExist) && l.fixed == 0 {
		li := &LinearImage{}
		li.format()
		return li, nil
	}
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	if l.fixed == 0 {
		img, err := readFD(fd, l.path, st.Size, maxLinearImage)
		if err != nil {
			return nil, err
		}
		li, err := ParseLinear(img)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", l.path, err)
		}
		return li, nil
	}
	// fixed size: read the header, then only the used sections
	hdr := make([]byte, linearHeaderSize)
	if err := preadFull(fd, l.path, hdr, 0); err != nil {
		return nil, err
	}
	entries, fresh, err := ParseLinearHeader(hdr, l.fixed)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", l.path, err)
	}
	li := &LinearImage{data: hdr, capacity: l.fixed}
	if fresh {
		li.format()
		return li, nil
	}
	used := uint64(linearHeaderSize)
	for _, e := range entries {
		if e.Offset != 0 {
			used = max(used, e.end())
		}
	}
	if used > maxLinearImage {
		return nil, fmt.Errorf("%s: %d used bytes is more than any linear TPM store (%d)", l.path, used, maxLinearImage)
	}
	li.data = make([]byte, used)
	copy(li.data, hdr)
	if err := preadFull(fd, l.path, li.data[linearHeaderSize:], linearHeaderSize); err != nil {
		return nil, err
	}
	return li, nil
}

func (l *linearBackend) read(name string) ([]byte, error) {
	i, err := linearIndex(name)
	if err != nil {
		return nil, err
	}
	li, err := l.image()
	if err != nil {
		return nil, err
	}
	b, ok := li.Get(i)
	if !ok {
		return nil, fs.ErrNotExist
	}
	return b, nil
}

func (l *linearBackend) size(name string) (int64, error) {
	i, err := linearIndex(name)
	if err != nil {
		return 0, err
	}
	li, err := l.image()
	if err != nil {
		return 0, err
	}
	e := li.Entry(i)
	if e.Offset == 0 {
		return 0, fs.ErrNotExist
	}
	return int64(e.DataLength), nil
}

// loaded applies an explicit mode to a regular file, as swtpm does when it opens the store.
func (l *linearBackend) loaded(string) error {
	if !l.opts.ModeSet || l.fixed != 0 {
		return nil
	}
	fd, st, err := openFile(l.path, unix.O_RDONLY, 0, false, false)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if permBits(st.Mode) != l.opts.Mode {
		return fchmod(fd, l.path, l.opts.Mode)
	}
	return nil
}

// prepare is swtpm's SWTPM_NVRAM_Prepare_Linear: a store without the magic (a missing, empty
// or foreign regular file, a zeroed block device) is formatted on disk as a new, empty store
// when it is opened: a regular file is created (Options.Mode, as for a write) or grown to the
// 192-byte header, or its first 192 bytes are replaced, keeping its size; a block device gets
// the header. It reports whether it formatted.
func (l *linearBackend) prepare() (bool, error) {
	li, err := l.image()
	if err != nil {
		return false, err
	}
	if !li.fresh {
		return false, nil
	}
	if err := l.commit(bytes.Clone(li.data), li, true); err != nil {
		return false, fmt.Errorf("store: format %s as a new linear store: %w", l, err)
	}
	return true, nil
}

func (l *linearBackend) apply(changes []change) error {
	li, err := l.image()
	if err != nil {
		return err
	}
	orig := bytes.Clone(li.data)
	wasFresh := li.fresh
	for _, c := range changes {
		i, err := linearIndex(c.name)
		if err != nil {
			return err
		}
		if c.del {
			err = li.Remove(i)
		} else {
			err = li.Put(i, c.data)
		}
		if err != nil {
			return err
		}
	}
	return l.commit(orig, li, wasFresh)
}

// commit makes the image li durable on disk, where orig is what is there (apart from a fresh
// image's header); an unchanged image that is not fresh is not written.
func (l *linearBackend) commit(orig []byte, li *LinearImage, fresh bool) error {
	if !fresh && bytes.Equal(orig, li.data) {
		return nil
	}
	if l.fixed == 0 && !l.opts.Lock {
		done, err := l.replace(li.data)
		if done || err != nil {
			return err
		}
	}
	return l.writeInPlace(orig, li.data)
}

// replace writes a regular file's new image to <path>.tmp, fsyncs it, renames it over the
// store and fsyncs the directory. It does so only when the new file is indistinguishable from
// the old one apart from its contents: same mode (or the explicit one), owner, security labels
// and ACLs (the security.* and system.posix_acl_* extended attributes, which libvirt sets on
// a VM's files). When any of that cannot be reproduced, or the directory does not let us
// create the temporary file (a confinement profile may allow only the store file itself), it
// reports done=false having changed nothing, and the caller writes in place.
func (l *linearBackend) replace(img []byte) (done bool, err error) {
	err = atomicfile.Write(l.path, img, atomicfile.Options{
		Perm:      os.FileMode(l.opts.Mode),
		ExactPerm: l.opts.ModeSet,
		Keep:      atomicfile.KeepAll,
		TempName:  filepath.Base(l.path) + ".tmp",
		NoFsync:   l.opts.NoFsync,
		Trace:     hook,
	})
	switch {
	case err == nil:
		return true, nil
	case errors.Is(err, atomicfile.ErrCannotKeep),
		errors.Is(err, atomicfile.ErrCreateTemp) && (errors.Is(err, fs.ErrPermission) || errors.Is(err, unix.EROFS)):
		return false, nil
	}
	return false, err
}

// writeInPlace updates the store where it is (block devices, and regular files whose lock is
// on the file itself): the changed data after the header first, fsync, then the header,
// the new length of a regular file, fsync.
func (l *linearBackend) writeInPlace(orig, img []byte) error {
	flags := unix.O_WRONLY
	if l.fixed == 0 {
		flags |= unix.O_CREAT
	}
	fd, st, err := openFile(l.path, flags, l.opts.Mode, false, l.fixed != 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if l.fixed == 0 && l.opts.ModeSet && permBits(st.Mode) != l.opts.Mode {
		if err := fchmod(fd, l.path, l.opts.Mode); err != nil {
			return err
		}
	}
	hook("write-in-place", l.path)
	if lo, hi, ok := changedSpan(orig, img, linearHeaderSize); ok {
		if err := pwriteFull(fd, l.path, img[lo:hi], int64(lo)); err != nil {
			return err
		}
		if err := fsyncFD(fd, l.path, l.opts.NoFsync); err != nil {
			return err
		}
	}
	if err := pwriteFull(fd, l.path, img[:linearHeaderSize], 0); err != nil {
		return err
	}
	if l.fixed == 0 {
		if err := unix.Ftruncate(fd, int64(len(img))); err != nil {
			return fmt.Errorf("resize %s: %w", l.path, err)
		}
	}
	return fsyncFD(fd, l.path, l.opts.NoFsync)
}

// changedSpan finds the bytes from start on where img differs from orig (or extends it).
func changedSpan(orig, img []byte, start int) (lo, hi int, ok bool) {
	lo, hi = -1, -1
	for i := start; i < len(img); i++ {
		if i >= len(orig) || orig[i] != img[i] {
			if lo < 0 {
				lo = i
			}
			hi = i + 1
		}
	}
	return lo, hi, lo >= 0
}
