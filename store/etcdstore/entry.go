package etcdstore

import (
	"encoding/binary"
	"errors"
	"fmt"
	"strings"
)

// The values the table keeps in etcd besides the encoded changes
// (affinity.MarshalChanges), each with a magic prefix so that a value
// that is not ours is named, not misread.

const (
	magicEntry = "TDL1" // a log entry
	magicSnap  = "TDS1" // the snapshot pointer
)

// maxStageChunks bounds the chunks one staged entry or snapshot may name
// (1M tunnels at the default chunk size need about 80).
const maxStageChunks = 1 << 20

// entry is one committed change, the value of log/<prev>: the batch
// itself when it is small, else the name of its staged chunks.
type entry struct {
	Prev   uint64 // the table revision the change was planned on
	Inline []byte // encoded changes, when small enough
	Stage  string // otherwise: the stage id (stage/<id>/<n>)
	Chunks int    // and how many chunks it has
}

func (e *entry) marshal() []byte {
	b := []byte(magicEntry)
	b = binary.AppendUvarint(b, e.Prev)
	if e.Stage == "" {
		b = append(b, 0)
		return append(b, e.Inline...)
	}
	b = append(b, 1)
	b = binary.AppendUvarint(b, uint64(len(e.Stage)))
	b = append(b, e.Stage...)
	return binary.AppendUvarint(b, uint64(e.Chunks))
}

var errNotOurs = errors.New("not a tunneldirector value")

func unmarshalEntry(b []byte) (entry, error) {
	var e entry
	if !strings.HasPrefix(string(b), magicEntry) {
		return e, fmt.Errorf("log entry: %w (no %s prefix)", errNotOurs, magicEntry)
	}
	b = b[len(magicEntry):]
	prev, n := uvarint(b)
	if n <= 0 || len(b) == n {
		return e, errors.New("log entry: truncated")
	}
	e.Prev = prev
	b = b[n:]
	switch b[0] {
	case 0:
		e.Inline = b[1:]
		if len(e.Inline) == 0 {
			return e, errors.New("log entry: no changes")
		}
		return e, nil
	case 1:
		id, rest, err := readString(b[1:])
		if err != nil || id == "" || strings.Contains(id, "/") {
			return e, errors.New("log entry: bad stage id")
		}
		c, n := uvarint(rest)
		if n <= 0 || n != len(rest) || c == 0 || c > maxStageChunks {
			return e, errors.New("log entry: bad chunk count")
		}
		e.Stage, e.Chunks = id, int(c)
		return e, nil
	}
	return e, fmt.Errorf("log entry: unknown kind %d", b[0])
}

// snapPtr names the newest snapshot of the whole table: its revision and
// its chunks (snapdata/<id>/<n>).
type snapPtr struct {
	Rev    uint64
	ID     string
	Chunks int
}

func (p *snapPtr) marshal() []byte {
	b := []byte(magicSnap)
	b = binary.AppendUvarint(b, p.Rev)
	b = binary.AppendUvarint(b, uint64(len(p.ID)))
	b = append(b, p.ID...)
	return binary.AppendUvarint(b, uint64(p.Chunks))
}

func unmarshalSnap(b []byte) (snapPtr, error) {
	var p snapPtr
	if !strings.HasPrefix(string(b), magicSnap) {
		return p, fmt.Errorf("snapshot pointer: %w (no %s prefix)", errNotOurs, magicSnap)
	}
	b = b[len(magicSnap):]
	rev, n := uvarint(b)
	if n <= 0 {
		return p, errors.New("snapshot pointer: truncated")
	}
	id, rest, err := readString(b[n:])
	if err != nil || id == "" || strings.Contains(id, "/") {
		return p, errors.New("snapshot pointer: bad id")
	}
	c, n := uvarint(rest)
	if n <= 0 || n != len(rest) || c > maxStageChunks {
		return p, errors.New("snapshot pointer: bad chunk count")
	}
	p.Rev, p.ID, p.Chunks = rev, id, int(c)
	return p, nil
}

func readString(b []byte) (string, []byte, error) {
	l, n := uvarint(b)
	if n <= 0 || l > uint64(len(b)-n) || l > 256 {
		return "", nil, errors.New("bad string")
	}
	return string(b[n : n+int(l)]), b[n+int(l):], nil
}

// uvarint reads a uvarint in its shortest form only: one value, one
// encoding, so a decoded value re-encodes to the bytes it came from.
func uvarint(b []byte) (uint64, int) {
	v, n := binary.Uvarint(b)
	if n > 0 && n != len(binary.AppendUvarint(nil, v)) {
		return 0, -1
	}
	return v, n
}
