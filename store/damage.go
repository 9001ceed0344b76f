package store

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"os"
	"runtime/debug"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// A damaged store (a truncated file, a flipped bit in a meta or tree page)
// must be reported as such, never crash the daemon or the CLI: bbolt maps
// the file and trusts its pages, so a page beyond the end of a truncated
// file faults (SIGBUS/SIGSEGV) and an inconsistent page trips one of its
// assertions (a panic). Open therefore checks the meta pages and the
// file's length before bbolt maps it, runs bbolt's own consistency check
// before the table is read, and turns any fault or panic that still
// happens into an error that names what was being read.

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
	h := fnv.New64a()
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
	return nil
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

// maxPageProblems bounds the problems a damaged-store error lists.
const maxPageProblems = 5

// checkPages runs bbolt's consistency check (every page reachable once,
// free pages not in use, keys in order) before anything walks the tree,
// so a damaged page is reported by number instead of being followed.
func (s *Store) checkPages() error {
	var problems []string
	more := 0
	err := s.db.View(func(tx *bolt.Tx) error {
		for e := range tx.Check() {
			if len(problems) < maxPageProblems {
				problems = append(problems, e.Error())
			} else {
				more++
			}
		}
		return nil
	})
	if err != nil {
		return damaged(s.path, "bbolt's consistency check could not run: %v", err)
	}
	if len(problems) == 0 {
		return nil
	}
	msg := strings.Join(problems, "; ")
	if more > 0 {
		msg += fmt.Sprintf("; and %d more", more)
	}
	return damaged(s.path, "bbolt's consistency check found: %s", msg)
}

// shortKey cuts a stored key for quoting in a message.
func shortKey(k []byte) string {
	if len(k) > 64 {
		return string(k[:64]) + "..."
	}
	return string(k)
}
