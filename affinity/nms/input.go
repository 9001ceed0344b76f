package nms

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"strings"
	"unicode/utf8"
)

// Kind says what a file lists.
type Kind uint8

// The kinds of file.
const (
	// KindAuto asks the reader to tell from the file's header or first
	// object.
	KindAuto Kind = iota
	KindTunnels
	KindNodes
)

func (k Kind) String() string {
	switch k {
	case KindAuto:
		return "auto"
	case KindTunnels:
		return "tunnels"
	case KindNodes:
		return "nodes"
	}
	return fmt.Sprintf("Kind(%d)", uint8(k))
}

// MarshalText writes the kind's name, for --json output.
func (k Kind) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText parses the kind's name, for API clients.
func (k *Kind) UnmarshalText(b []byte) error {
	v, err := ParseKind(string(b))
	*k = v
	return err
}

// ParseKind parses "tunnels", "nodes" or "auto" (or "").
func ParseKind(s string) (Kind, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return KindAuto, nil
	case "tunnels", "tunnel":
		return KindTunnels, nil
	case "nodes", "node":
		return KindNodes, nil
	}
	return 0, fmt.Errorf("unknown file kind %q (want tunnels, nodes or auto)", s)
}

// Format is the syntax of a file.
type Format uint8

// The formats.
const (
	// FormatAuto asks the reader to tell from the file name's extension
	// or, failing that, the first byte.
	FormatAuto Format = iota
	FormatCSV
	FormatJSON
)

func (f Format) String() string {
	switch f {
	case FormatAuto:
		return "auto"
	case FormatCSV:
		return "csv"
	case FormatJSON:
		return "json"
	}
	return fmt.Sprintf("Format(%d)", uint8(f))
}

// MarshalText writes the format's name.
func (f Format) MarshalText() ([]byte, error) { return []byte(f.String()), nil }

// UnmarshalText parses the format's name, for API clients.
func (f *Format) UnmarshalText(b []byte) error {
	if string(b) == "auto" {
		*f = FormatAuto
		return nil
	}
	v, err := ParseFormat(string(b))
	*f = v
	return err
}

// ParseFormat parses "csv", "json" or "auto" (or "").
func ParseFormat(s string) (Format, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "", "auto":
		return FormatAuto, nil
	case "csv":
		return FormatCSV, nil
	case "json":
		return FormatJSON, nil
	}
	return 0, fmt.Errorf("unknown file format %q (want csv, json or auto)", s)
}

// DefaultMaxRecords is the MaxRecords used when Options.MaxRecords is zero.
const DefaultMaxRecords = 2_000_000

// Options configures a read.
type Options struct {
	// Name is the file name used in messages and record positions.
	Name string
	// Format overrides format detection.
	Format Format
	// Kind overrides kind detection in Read; ReadTunnels and ReadNodes
	// ignore it.
	Kind Kind
	// MaxRecords aborts the read as soon as the file holds more records,
	// without reading the rest; 0 means DefaultMaxRecords, negative
	// means no limit.
	MaxRecords int
	// MaxErrors caps the errors listed; the rest are counted. 0 means
	// DefaultMaxErrors.
	MaxErrors int
	// Progress, when set, is called with the bytes read so far, at most
	// once per progressStep bytes and once at the end.
	Progress func(bytesRead int64)
}

func (o *Options) maxRecords() int {
	switch {
	case o.MaxRecords == 0:
		return DefaultMaxRecords
	case o.MaxRecords < 0:
		return int(^uint(0) >> 1)
	}
	return o.MaxRecords
}

func (o *Options) maxErrors() int {
	if o.MaxErrors <= 0 {
		return DefaultMaxErrors
	}
	return o.MaxErrors
}

// progressStep is how often Progress is called, in bytes: often enough for
// a smooth bar, rarely enough to cost nothing.
const progressStep = 64 << 10

// sniffLen is how much of the file is inspected before parsing: for
// binary content, the format and the kind.
const sniffLen = 64 << 10

// countReader counts the bytes that pass for Progress and, for JSON,
// remembers where the newlines not yet asked about are, so that a decoder
// offset turns into a line number without keeping the file.
type countReader struct {
	r        io.Reader
	n        int64
	next     int64
	progress func(int64)
	done     bool

	trackLines bool
	nl         []int64 // offsets of newlines at or after the last query
	nlHead     int
	lines      int // newlines before the last query offset
	last       byte

	// mark is the offset where the current record started: the reader
	// refuses to read more than recordWindow bytes past it, so a runaway
	// line or value costs a bounded amount of memory before it is
	// refused, whatever the parser above would buffer.
	mark int64
}

// MaxRecordBytes is the longest record (a CSV line, a JSON object with the
// white space before it) a file may hold. The longest valid tunnel (a
// 128-byte id, 64 IPv6 subnets, a 1024-byte comment, all escaped) is a
// fraction of it.
const MaxRecordBytes = 64 << 10

// recordWindow is how far past a record's start the reader goes: the
// record, plus what the buffers above it read ahead.
const recordWindow = MaxRecordBytes + 2*sniffLen

// errRecordTooLong stops a read at a record longer than MaxRecordBytes.
var errRecordTooLong = fmt.Errorf("record longer than %d bytes", MaxRecordBytes)

func (c *countReader) Read(p []byte) (int, error) {
	if c.n-c.mark > recordWindow {
		return 0, errRecordTooLong
	}
	if room := c.mark + recordWindow + 1 - c.n; int64(len(p)) > room {
		p = p[:room]
	}
	n, err := c.r.Read(p)
	if n > 0 {
		if c.trackLines {
			c.noteNewlines(p[:n], c.n)
		}
		c.last = p[n-1]
		c.n += int64(n)
		if c.progress != nil && c.n >= c.next {
			c.progress(c.n)
			c.next = c.n + progressStep
		}
	}
	return n, err
}

// noteNewlines records the offsets of the newlines in b, which starts at
// offset off of the input.
func (c *countReader) noteNewlines(b []byte, off int64) {
	for {
		i := bytes.IndexByte(b, '\n')
		if i < 0 {
			return
		}
		c.nl = append(c.nl, off+int64(i))
		off += int64(i) + 1
		b = b[i+1:]
	}
}

// finish reports the final count once.
func (c *countReader) finish() {
	if c.progress != nil && !c.done {
		c.done = true
		c.progress(c.n)
	}
}

// lineAt returns the 1-based line of the byte at offset off. Offsets must
// not decrease from one call to the next; that is what keeps the newline
// list short.
func (c *countReader) lineAt(off int64) int {
	for c.nlHead < len(c.nl) && c.nl[c.nlHead] < off {
		c.nlHead++
		c.lines++
	}
	if c.nlHead > 1024 && c.nlHead*2 > len(c.nl) {
		c.nl = append(c.nl[:0], c.nl[c.nlHead:]...)
		c.nlHead = 0
	}
	return c.lines + 1
}

// input is an opened file: buffered, sniffed and past any BOM.
type input struct {
	cr     *countReader
	br     *bufio.Reader
	head   []byte // up to sniffLen bytes, still unread in br
	bom    int    // bytes of UTF-8 BOM skipped
	format Format
	name   string
	size   int64 // total input size when the reader knows it, else -1
}

var errBinary = errors.New("binary file, not CSV or JSON")

// open wraps r, rejects binary content and settles the format.
func open(r io.Reader, o *Options) (*input, error) {
	in := &input{name: o.Name, size: sizeOf(r)}
	in.cr = &countReader{r: r, progress: o.Progress}
	in.br = bufio.NewReaderSize(in.cr, sniffLen)
	head, err := in.br.Peek(sniffLen)
	if err != nil && err != io.EOF && err != bufio.ErrBufferFull {
		return nil, fmt.Errorf("read %s: %w", in.displayName(), err)
	}
	if bytes.HasPrefix(head, []byte("\xef\xbb\xbf")) {
		// Spreadsheets write a BOM; it is not part of the first column's name.
		in.br.Discard(3)
		in.bom = 3
		head = head[3:]
	}
	if msg := binaryReason(head, len(head)+in.bom == sniffLen); msg != "" {
		return nil, &Errors{Total: 1, List: []*FieldError{{Pos: Pos{File: in.name, Index: -1}, Msg: msg}}}
	}
	in.head = head
	in.format = o.Format
	if in.format == FormatAuto {
		in.format = DetectFormat(o.Name, head)
	}
	if ra, ok := r.(io.ReaderAt); ok && in.size > 0 {
		if pos, over := precount(ra, in.size, in.format, o.maxRecords()); over {
			c := &collector{max: 1}
			pos.File = in.name
			tooMany(c, pos, o.maxRecords())
			return nil, c.err()
		}
	}
	return in, nil
}

func (in *input) displayName() string {
	if in.name == "" {
		return "<input>"
	}
	return in.name
}

// bboltMagic is the magic number of a bbolt meta page (the director's
// store), which sits right after the 16-byte page header.
const bboltMagic = 0xED0CDAED

// binaryReason says why head is not text, or "" when it is. full tells
// that head was cut at sniffLen, so a rune split at its end is fine.
func binaryReason(head []byte, full bool) string {
	if len(head) >= 20 && binary.LittleEndian.Uint32(head[16:20]) == bboltMagic {
		return errBinary.Error() + " (it is a bbolt database, probably the director's store: export from it with the CLI instead)"
	}
	if len(head) >= 2 && head[0] == 0x1f && head[1] == 0x8b {
		return errBinary.Error() + " (it is gzip-compressed: decompress it first)"
	}
	if i := bytes.IndexByte(head, 0); i >= 0 {
		return fmt.Sprintf("%v (NUL byte at offset %d)", errBinary, i)
	}
	b := head
	if full {
		// Drop a rune cut in half by the sniff window.
		for i := 0; i < utf8.UTFMax && i < len(b); i++ {
			if utf8.RuneStart(b[len(b)-1-i]) {
				if !utf8.FullRune(b[len(b)-1-i:]) {
					b = b[:len(b)-1-i]
				}
				break
			}
		}
	}
	if !utf8.Valid(b) {
		for i := 0; i < len(b); {
			r, n := utf8.DecodeRune(b[i:])
			if r == utf8.RuneError && n == 1 {
				return fmt.Sprintf("%v (invalid UTF-8 at offset %d)", errBinary, i)
			}
			i += n
		}
	}
	return ""
}

// DetectFormat tells the format from the file name's extension (.csv,
// .json) or, failing that, from the first byte that is not white space:
// '[' or '{' means JSON, anything else CSV.
func DetectFormat(name string, head []byte) Format {
	switch strings.ToLower(filepath.Ext(name)) {
	case ".csv":
		return FormatCSV
	case ".json":
		return FormatJSON
	}
	head = bytes.TrimPrefix(head, []byte("\xef\xbb\xbf"))
	for _, c := range head {
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		case '[', '{':
			return FormatJSON
		}
		return FormatCSV
	}
	return FormatCSV
}

// Keys that tell the kinds apart; "comment" belongs to both.
var (
	tunnelKeys = []string{"peer", "subnets", "id", "pinned", "node"}
	nodeKeys   = []string{"address", "weight", "capacity", "state", "mark", "name"}
)

// kindOfKeys decides from column names or JSON keys: "peer" means tunnels
// and "address" nodes; failing both, any other key of one kind only.
func kindOfKeys(keys []string) Kind {
	has := func(k string) bool {
		for _, key := range keys {
			if strings.EqualFold(strings.TrimSpace(key), k) {
				return true
			}
		}
		return false
	}
	peer, addr := has("peer"), has("address")
	switch {
	case peer && !addr:
		return KindTunnels
	case addr && !peer:
		return KindNodes
	case peer && addr:
		return KindAuto
	}
	var t, n bool
	for _, k := range tunnelKeys {
		t = t || has(k)
	}
	for _, k := range nodeKeys {
		n = n || has(k)
	}
	switch {
	case t && !n:
		return KindTunnels
	case n && !t:
		return KindNodes
	}
	return KindAuto
}

// DetectKind tells a tunnels file from a nodes file by the CSV header or
// the keys of the first JSON object: tunnels have "peer", nodes
// "address". head is the start of the file (64 KiB is plenty); format
// may be FormatAuto.
func DetectKind(head []byte, format Format) (Kind, error) {
	head = bytes.TrimPrefix(head, []byte("\xef\xbb\xbf"))
	if format == FormatAuto {
		format = DetectFormat("", head)
	}
	var keys []string
	if format == FormatCSV {
		cr := csv.NewReader(bytes.NewReader(head))
		cr.Comment = '#'
		cr.FieldsPerRecord = -1
		cr.TrimLeadingSpace = true
		rec, err := cr.Read()
		if err == io.EOF {
			return KindAuto, errors.New("empty file (no header line): want a first line naming the columns")
		}
		if err != nil {
			return KindAuto, fmt.Errorf("read header: %w", err)
		}
		keys = rec
	} else {
		var err error
		keys, err = firstObjectKeys(head)
		if err != nil {
			return KindAuto, err
		}
	}
	k := kindOfKeys(keys)
	if k == KindAuto {
		return k, fmt.Errorf("cannot tell tunnels from nodes by the fields %s: tunnels have peer, nodes address; say which", joinShort(keys))
	}
	return k, nil
}

// firstObjectKeys lists the keys of the first object of a JSON array.
func firstObjectKeys(head []byte) ([]string, error) {
	dec := json.NewDecoder(bytes.NewReader(head))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('[') {
		return nil, errors.New("not a JSON array of objects")
	}
	tok, err := dec.Token()
	if err != nil {
		return nil, errors.New("cannot tell tunnels from nodes: JSON cut short in the first object")
	}
	if tok == json.Delim(']') {
		return nil, errors.New("cannot tell tunnels from nodes in an empty array; say which")
	}
	if tok != json.Delim('{') {
		return nil, errors.New("not a JSON array of objects")
	}
	var keys []string
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			break
		}
		k, _ := tok.(string)
		keys = append(keys, k)
		if kindOfKeys(keys) != KindAuto && (strings.EqualFold(k, "peer") || strings.EqualFold(k, "address")) {
			break
		}
		var skip json.RawMessage
		if err := dec.Decode(&skip); err != nil {
			break
		}
	}
	if len(keys) == 0 {
		return nil, errors.New("cannot tell tunnels from nodes: the first object is empty; say which")
	}
	return keys, nil
}

// sizeOf returns the input's size when the reader can tell (files,
// in-memory readers), or -1.
func sizeOf(r io.Reader) int64 {
	switch v := r.(type) {
	case interface{ Len() int }:
		return int64(v.Len())
	case interface{ Size() int64 }:
		return v.Size()
	case interface{ Stat() (fs.FileInfo, error) }:
		if fi, err := v.Stat(); err == nil && fi.Mode().IsRegular() {
			return fi.Size()
		}
	}
	return -1
}

// maxHint caps the records a read sizes its indexes for in advance, so a
// lying size or a huge file costs a bounded allocation before
// MaxRecords stops it.
const maxHint = 1 << 20

// recordHint estimates the records in the input from its size and the
// lines of the sniffed head, so the duplicate indexes are allocated once
// instead of growing (and rehashing) all along. It is 0 when unknown.
func (in *input) recordHint(maxRecords int) int {
	if in.size <= 0 || len(in.head) == 0 {
		return 0
	}
	lines := bytes.Count(in.head, []byte{'\n'})
	if lines < 2 {
		return 0
	}
	// A little over the estimate: the head's lines are not quite
	// typical (header, comments), and overshooting costs less than a
	// second chunk.
	n := int(in.size*int64(lines)/int64(len(in.head))) * 21 / 20
	return min(n, maxRecords, maxHint)
}

// maxShownList bounds how much of a list of names (a header's columns, an
// object's keys) a message quotes.
const maxShownList = 200

// joinShort joins names with commas, cut to a short prefix: a message
// about a 20 MB header must not be 20 MB long.
func joinShort(names []string) string {
	return shortText(strings.Join(names, ","))
}

// shortText cuts a value for a message to maxShownValue bytes (at a rune
// boundary) and says it was cut.
func shortText(s string) string {
	if len(s) <= maxShownValue {
		return s
	}
	cut := maxShownValue
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + fmt.Sprintf("...(%d bytes)", len(s))
}
