package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash"
	"hash/fnv"
	"io"
	"os"
	"runtime/debug"
	"syscall"
)

// A damaged store (a truncated file, a flipped bit in a meta or tree page)
// must be reported as such, never crash the daemon or the CLI: bbolt maps
// the file and trusts its pages, so a page beyond the end of a truncated
// file faults (SIGBUS/SIGSEGV) and an inconsistent page trips one of its
// assertions (a panic). Open therefore checks the meta pages and the
// file's length and walks the page structure before bbolt maps it, and
// turns any fault or panic that still happens into an error that names
// what was being read. bbolt's own consistency check then runs inside
// bolt.Open for every store opened for writing (without a stored
// freelist, bbolt finds the free pages by checking the whole tree), and
// in full in `store check` (Check).

// ErrDamaged marks a store file that is damaged: restore it from a backup.
var ErrDamaged = errors.New("damaged")

// damaged formats a damaged-store error.
func damaged(path, format string, args ...any) error {
	return fmt.Errorf("store %s is %w: %s; restore it from a backup ('tunneldirector store backup' makes them)", path, ErrDamaged, fmt.Sprintf(format, args...))
}

// The bbolt meta page, as bbolt lays it out after the 16-byte page
// header: magic, version, page size, flags, root bucket (page, sequence),
// freelist page, high-water page id, transaction id, checksum (FNV-64a of
// everything before it).
const (
	bboltMagic    = 0xED0CDAED
	metaOff       = 16
	metaMagicOff  = metaOff + 0
	metaVerOff    = metaOff + 4
	metaPSizeOff  = metaOff + 8
	metaRootOff   = metaOff + 16
	metaFreeOff   = metaOff + 32
	metaPgidOff   = metaOff + 40
	metaTxidOff   = metaOff + 48
	metaSumOff    = metaOff + 56
	metaEnd       = metaOff + 64
	bboltVersion  = 2
	noFreelist    = 0xffffffffffffffff
	minPageSize   = 512
	maxPageSize   = 1 << 20
	defaultPageSz = 4096
)

type metaPage struct {
	pageSize uint32
	root     uint64
	freelist uint64
	pgid     uint64
	txid     uint64
}

// readMeta decodes the meta page at b, or says what is wrong with it.
func readMeta(b []byte) (metaPage, string) {
	if len(b) < metaEnd {
		return metaPage{}, "cut short"
	}
	if binary.LittleEndian.Uint32(b[metaMagicOff:]) != bboltMagic {
		return metaPage{}, "no bbolt magic number"
	}
	if v := binary.LittleEndian.Uint32(b[metaVerOff:]); v != bboltVersion {
		return metaPage{}, fmt.Sprintf("bbolt format version %d, want %d", v, bboltVersion)
	}
	h := newFNV()
	h.Write(b[metaOff:metaSumOff])
	if h.Sum64() != binary.LittleEndian.Uint64(b[metaSumOff:]) {
		return metaPage{}, "checksum mismatch"
	}
	m := metaPage{
		pageSize: binary.LittleEndian.Uint32(b[metaPSizeOff:]),
		root:     binary.LittleEndian.Uint64(b[metaRootOff:]),
		freelist: binary.LittleEndian.Uint64(b[metaFreeOff:]),
		pgid:     binary.LittleEndian.Uint64(b[metaPgidOff:]),
		txid:     binary.LittleEndian.Uint64(b[metaTxidOff:]),
	}
	switch {
	case m.pageSize < minPageSize || m.pageSize > maxPageSize || m.pageSize&(m.pageSize-1) != 0:
		return metaPage{}, fmt.Sprintf("page size %d", m.pageSize)
	case m.pgid < 2 || m.root < 2 || m.root >= m.pgid:
		return metaPage{}, fmt.Sprintf("root page %d outside the file's %d pages", m.root, m.pgid)
	case m.freelist != noFreelist && (m.freelist < 2 || m.freelist >= m.pgid):
		return metaPage{}, fmt.Sprintf("freelist page %d outside the file's %d pages", m.freelist, m.pgid)
	}
	return m, ""
}

// checkFile checks an existing store file before bbolt maps it: not
// empty, a valid meta page, and as long as that meta page says. It
// returns nil for a file that does not exist.
func checkFile(path string) error {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("open store %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("open store %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("open store %s: not a regular file", path)
	}
	size := fi.Size()
	if size == 0 {
		return fmt.Errorf("open store %s: the file is empty (zero length), not a store: a crash or a full disk while it was created? Remove it to start an empty store, or restore from a backup", path)
	}
	var hdr [metaEnd]byte
	n, _ := io.ReadFull(f, hdr[:])
	// Not bbolt at all: say so (an import file given as the store).
	if n < 20 || binary.LittleEndian.Uint32(hdr[metaMagicOff:]) != bboltMagic {
		if looksDamagedBbolt(f, size) {
			return damaged(path, "meta page 0 has no bbolt magic number, meta page 1 has")
		}
		return fmt.Errorf("open store %s: not a tunneldirector store (no bbolt header; is it an import file?)", path)
	}
	m0, why0 := readMeta(hdr[:n])
	psize := int64(defaultPageSz)
	if why0 == "" {
		psize = int64(m0.pageSize)
	}
	if size < 2*psize {
		return damaged(path, "truncated to %d bytes, shorter than its two %d-byte meta pages", size, psize)
	}
	b1 := make([]byte, metaEnd)
	if _, err := f.ReadAt(b1, psize); err != nil {
		return damaged(path, "meta page 1 unreadable: %v", err)
	}
	m1, why1 := readMeta(b1)
	var m metaPage
	switch {
	case why0 != "" && why1 != "":
		return damaged(path, "both meta pages are invalid (page 0: %s; page 1: %s)", why0, why1)
	case why0 != "":
		m = m1
	case why1 != "":
		m = m0
	case m1.txid > m0.txid:
		m = m1
	default:
		m = m0
	}
	if want := int64(m.pgid) * int64(m.pageSize); size < want {
		return damaged(path, "truncated to %d bytes: its meta page (transaction %d) says %d pages of %d bytes (%d bytes)", size, m.txid, m.pgid, m.pageSize, want)
	}
	return walkTree(path, f, m, size)
}

// looksDamagedBbolt tells a bbolt file whose first meta page is damaged
// from a file that is something else: the second meta page, at one of
// the usual page sizes, is intact.
func looksDamagedBbolt(f *os.File, size int64) bool {
	b := make([]byte, metaEnd)
	for _, ps := range []int64{4096, 8192, 16384, 65536} {
		if size < ps+metaEnd {
			return false
		}
		if _, err := f.ReadAt(b, ps); err == nil {
			if _, why := readMeta(b); why == "" {
				return true
			}
		}
	}
	return false
}

// guard runs fn, turning a memory fault or a panic (bbolt asserting on a
// damaged page) into an error that says what was being done.
func guard(path, what string, fn func() error) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = damaged(path, "%s failed: %v", what, r)
		}
	}()
	return fn()
}

// shortKey cuts a stored key for quoting in a message.
func shortKey(k []byte) string {
	if len(k) > 64 {
		return string(k[:64]) + "..."
	}
	return string(k)
}

func newFNV() hash.Hash64 { return fnv.New64a() }

// Page layout, as bbolt writes it: a 16-byte header (id, flags, count,
// overflow), then count elements of 16 bytes: a branch element is (pos,
// key size, child page), a leaf element (flags, pos, key size, value
// size); pos counts from the element itself. A leaf element with flag 1
// is a bucket: its value starts with the bucket's root page, 0 for an
// inline bucket whose page follows in the value.
const (
	pageBranch   = 0x01
	pageLeaf     = 0x02
	pageFreelist = 0x10
	pageHeader   = 16
	elemSize     = 16
	leafBucket   = 0x01
	maxTreeDepth = 64
)

// walkTree checks the structure of every page reachable from the meta
// page before bbolt maps the file: page ids and types, element offsets
// and sizes inside their pages, child pages inside the file and reached
// once. bbolt follows these blindly (and, opening a store without a
// stored freelist, walks the whole tree in a goroutine of its own, where
// a panic cannot be caught), so a damaged page must be found here.
func walkTree(path string, f *os.File, m metaPage, size int64) (err error) {
	if size == 0 || int64(m.pgid)*int64(m.pageSize) > size {
		return nil // checkFile reported it
	}
	data, err := syscall.Mmap(int(f.Fd()), 0, int(size), syscall.PROT_READ, syscall.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("open store %s: map for checking: %w", path, err)
	}
	defer syscall.Munmap(data)
	w := pageWalker{path: path, data: data, ps: int(m.pageSize), hw: m.pgid, seen: make([]uint64, (m.pgid+63)/64)}
	return guard(path, "checking its pages", func() error {
		if m.freelist != noFreelist {
			p, err := w.page(m.freelist, "the freelist")
			if err != nil {
				return err
			}
			if p.flags != pageFreelist {
				return damaged(path, "page %d: the freelist page has type %#x", m.freelist, p.flags)
			}
		}
		return w.walk(m.root, "the root bucket", 0)
	})
}

type pageWalker struct {
	path string
	data []byte
	ps   int
	hw   uint64   // the file's high-water page id
	seen []uint64 // pages reached, one bit each
}

type rawPage struct {
	b     []byte // the page with its overflow pages
	flags uint16
	count int
}

// page returns page id, checking its header.
func (w *pageWalker) page(id uint64, what string) (rawPage, error) {
	if id < 2 || id >= w.hw {
		return rawPage{}, damaged(w.path, "%s: page %d is outside the file's %d pages", what, id, w.hw)
	}
	off := int(id) * w.ps
	h := w.data[off : off+pageHeader]
	if got := binary.LittleEndian.Uint64(h); got != id {
		return rawPage{}, damaged(w.path, "%s: page %d has the id %d in its header", what, id, got)
	}
	over := uint64(binary.LittleEndian.Uint32(h[12:]))
	if id+over >= w.hw {
		return rawPage{}, damaged(w.path, "%s: page %d runs %d pages past the file's end", what, id, id+over+1-w.hw)
	}
	for p := id; p <= id+over; p++ {
		if w.seen[p/64]&(1<<(p%64)) != 0 {
			return rawPage{}, damaged(w.path, "%s: page %d is reached twice", what, p)
		}
		w.seen[p/64] |= 1 << (p % 64)
	}
	b := w.data[off : off+int(over+1)*w.ps]
	return rawPage{b: b, flags: binary.LittleEndian.Uint16(h[8:]), count: int(binary.LittleEndian.Uint16(h[10:]))}, nil
}

// walk checks the tree of one bucket from its root page.
func (w *pageWalker) walk(id uint64, what string, depth int) error {
	if depth > maxTreeDepth {
		return damaged(w.path, "%s: page %d is %d levels deep", what, id, depth)
	}
	p, err := w.page(id, what)
	if err != nil {
		return err
	}
	return w.elements(p, id, what, depth)
}

// elements checks a branch or leaf page's elements (an inline bucket's
// page too: id is then its bucket's page).
func (w *pageWalker) elements(p rawPage, id uint64, what string, depth int) error {
	if p.flags != pageBranch && p.flags != pageLeaf {
		return damaged(w.path, "%s: page %d has type %#x, not a branch or leaf page", what, id, p.flags)
	}
	if pageHeader+p.count*elemSize > len(p.b) {
		return damaged(w.path, "%s: page %d claims %d elements, more than fit", what, id, p.count)
	}
	for i := 0; i < p.count; i++ {
		e := pageHeader + i*elemSize
		el := p.b[e : e+elemSize]
		if p.flags == pageBranch {
			pos, ksize := int(binary.LittleEndian.Uint32(el)), int(binary.LittleEndian.Uint32(el[4:]))
			if e+pos+ksize > len(p.b) || pos < 0 {
				return damaged(w.path, "%s: branch page %d element %d points past the page", what, id, i)
			}
			if err := w.walk(binary.LittleEndian.Uint64(el[8:]), what, depth+1); err != nil {
				return err
			}
			continue
		}
		flags := binary.LittleEndian.Uint32(el)
		pos, ksize, vsize := int64(binary.LittleEndian.Uint32(el[4:])), int64(binary.LittleEndian.Uint32(el[8:])), int64(binary.LittleEndian.Uint32(el[12:]))
		if int64(e)+pos+ksize+vsize > int64(len(p.b)) {
			return damaged(w.path, "%s: leaf page %d element %d points past the page", what, id, i)
		}
		if flags&leafBucket == 0 {
			continue
		}
		k := p.b[int64(e)+pos : int64(e)+pos+ksize]
		v := p.b[int64(e)+pos+ksize : int64(e)+pos+ksize+vsize]
		name := "bucket " + shortKey(k)
		if len(v) < 16 {
			return damaged(w.path, "%s: leaf page %d: %s has a %d-byte header", what, id, name, len(v))
		}
		if root := binary.LittleEndian.Uint64(v); root != 0 {
			if err := w.walk(root, name, depth+1); err != nil {
				return err
			}
			continue
		}
		// An inline bucket: its page follows the header in the value.
		in := v[16:]
		if len(in) < pageHeader {
			return damaged(w.path, "%s: leaf page %d: the inline page of %s is cut short", what, id, name)
		}
		ip := rawPage{b: in, flags: binary.LittleEndian.Uint16(in[8:]), count: int(binary.LittleEndian.Uint16(in[10:]))}
		if depth > maxTreeDepth {
			return damaged(w.path, "%s: page %d is %d levels deep", what, id, depth)
		}
		if err := w.elements(ip, id, name, depth+1); err != nil {
			return err
		}
	}
	return nil
}
