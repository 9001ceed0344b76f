package nms

import (
	"bytes"
	"encoding/csv"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// File is what Read found in a file of either kind.
type File struct {
	Name    string
	Kind    Kind
	Format  Format
	Tunnels []TunnelRecord // when Kind is KindTunnels
	Nodes   []NodeRecord   // when Kind is KindNodes
}

// Read reads a tunnels or nodes file, telling which from Options.Kind or,
// when that is KindAuto, from the header or first object (see DetectKind).
// When records are refused, the *Errors comes with a File holding the
// tunnels that were valid on their own (nodes files: none).
func Read(r io.Reader, opts Options) (*File, error) {
	in, err := open(r, &opts)
	if err != nil {
		return nil, err
	}
	defer in.cr.finish()
	f := &File{Name: opts.Name, Kind: opts.Kind, Format: in.format}
	if f.Kind == KindAuto {
		k, err := DetectKind(in.head, in.format)
		if err != nil {
			return nil, &Errors{Total: 1, List: []*FieldError{{Pos: Pos{File: in.name, Line: 1, Index: -1}, Msg: err.Error()}}}
		}
		f.Kind = k
	}
	switch f.Kind {
	case KindTunnels:
		f.Tunnels, err = readTunnels(in, &opts)
	case KindNodes:
		f.Nodes, err = readNodes(in, &opts)
	default:
		return nil, fmt.Errorf("read %s: unknown kind %v", in.displayName(), f.Kind)
	}
	if err != nil {
		// The records that were valid on their own come back with the
		// error, so a caller can also check them against the table and
		// report every problem of the file at once.
		return f, err
	}
	return f, nil
}

// wrongKind reports a file of the other kind as one clear error instead
// of a column or field error per record. It is only consulted on the
// first object or header, so a damaged file still gets the full report.
func wrongKind(c *collector, pos Pos, keys []string, want Kind) bool {
	k := kindOfKeys(keys)
	if k == KindAuto || k == want {
		return false
	}
	c.addf(pos, "", "", "this is a %s file, not a %s file (it has the fields %s)", k, want, joinShort(keys))
	return true
}

// recordTooLong stops a read at a runaway record.
func recordTooLong(c *collector, pos Pos) {
	c.aborted = true
	c.addf(pos, "", "", "record longer than %d bytes (a runaway field, or a quote never closed?): file refused without reading the rest", MaxRecordBytes)
}

func tooMany(c *collector, pos Pos, max int) {
	c.aborted = true
	c.addf(pos, "", "", "more than %d records: file refused without reading the rest (raise the record limit if it is genuine)", max)
}

// readCSV reads the header and calls row for every record that has the
// header's number of fields. cols maps each known column to its position
// in the record, -1 when absent.
func readCSV(in *input, opts *Options, c *collector, kind Kind, columns []string, required []bool, row func(pos Pos, cols []int, rec []string)) {
	cr := csv.NewReader(in.br)
	cr.Comment = '#'
	cr.FieldsPerRecord = -1
	cr.ReuseRecord = true
	cr.TrimLeadingSpace = true
	file := in.name
	header, err := cr.Read()
	if err == io.EOF {
		c.addf(Pos{File: file, Index: -1}, "", "", "empty file: no header (want a first line naming the columns: %s)", strings.Join(columns, ","))
		return
	}
	if err != nil {
		csvError(c, file, 1, err)
		return
	}
	hline, _ := cr.FieldPos(0)
	hpos := Pos{File: file, Line: hline, Index: -1}
	header = slices.Clone(header)
	if wrongKind(c, hpos, header, kind) {
		return
	}
	cols := make([]int, len(columns))
	for i := range cols {
		cols[i] = -1
	}
	bad := false
	for hi, h := range header {
		name := strings.ToLower(strings.TrimSpace(h))
		ci := -1
		for i, col := range columns {
			if name == col {
				ci = i
				break
			}
		}
		switch {
		case name == "":
			c.addf(hpos, "", "", "column %d has no name in the header", hi+1)
			bad = true
		case ci < 0:
			c.addf(hpos, "", h, "unknown column (the columns are %s)", strings.Join(columns, ", "))
			bad = true
		case cols[ci] >= 0:
			c.addf(hpos, "", h, "duplicate column (columns %d and %d)", cols[ci]+1, hi+1)
			bad = true
		default:
			cols[ci] = hi
		}
	}
	for i, req := range required {
		if req && cols[i] < 0 {
			c.addf(hpos, "", "", "missing required column %s (the header has %s)", columns[i], joinShort(header))
			bad = true
		}
	}
	if bad {
		return
	}

	max := opts.maxRecords()
	n := 0
	// A short or broken record is reported only when the next read tells
	// whether it was the file's last: then the file was probably cut.
	var pending *FieldError
	var pendingCut string
	flush := func(atEOF bool) {
		if pending == nil {
			return
		}
		if atEOF && in.cr.last != '\n' && pendingCut != "" {
			pending.Msg = pendingCut
		}
		c.add(pending)
		pending = nil
	}
	lastLine := hline
	for {
		in.cr.mark = in.cr.n
		rec, err := cr.Read()
		if err == io.EOF {
			flush(true)
			return
		}
		flush(false)
		if err != nil {
			var pe *csv.ParseError
			if !errors.As(err, &pe) {
				csvError(c, file, lastLine+1, err)
				return
			}
			pending = &FieldError{Pos: Pos{File: file, Line: pe.StartLine, Index: -1}, Msg: fmt.Sprintf("%v (line %d, column %d)", pe.Err, pe.Line, pe.Column)}
			pendingCut = pending.Msg + ": the file is truncated"
			continue
		}
		line, _ := cr.FieldPos(0)
		lastLine = line
		pos := Pos{File: file, Line: line, Index: -1}
		if n >= max {
			tooMany(c, pos, max)
			return
		}
		n++
		if len(rec) != len(header) {
			pending = &FieldError{Pos: pos, Msg: fmt.Sprintf("%d fields, the header has %d", len(rec), len(header))}
			pendingCut = ""
			if len(rec) < len(header) {
				pendingCut = fmt.Sprintf("truncated file: the last line has %d of the header's %d fields", len(rec), len(header))
			}
			continue
		}
		row(pos, cols, rec)
	}
}

// csvError reports an error that ends a CSV read; line is where the
// record being read starts, as far as is known.
func csvError(c *collector, file string, line int, err error) {
	var pe *csv.ParseError
	if errors.Is(err, errRecordTooLong) {
		recordTooLong(c, Pos{File: file, Line: line, Index: -1})
		return
	}
	if errors.As(err, &pe) {
		c.addf(Pos{File: file, Line: pe.StartLine, Index: -1}, "", "", "%v (line %d, column %d)", pe.Err, pe.Line, pe.Column)
		return
	}
	c.aborted = true
	c.addf(Pos{File: file, Index: -1}, "", "", "read: %v", err)
}

// decodeFunc decodes the current array element, which must be an object,
// key by key: the value of keys[i] goes to into[i]. Keys match exactly
// (not regardless of case, as encoding/json would) and a key given twice
// is an error (encoding/json would keep the last). It reports every
// problem and returns false when the element is unusable.
type decodeFunc func(keys []string, into []json.Unmarshaler) bool

// trackLines starts recording newline offsets. The bytes sniffed so far
// are all still in the buffer, so they are scanned here.
func (in *input) trackLines() {
	in.cr.trackLines = true
	in.cr.noteNewlines(in.head, int64(in.bom))
}

// skipSep counts the bytes before the next element in what the decoder
// has buffered: the comma after the previous element and white space. The
// decoder leaves its offset before the comma, and a message should point
// at the element's own line.
func skipSep(r io.Reader) int64 {
	var buf [256]byte
	var n int64
	for {
		m, _ := r.Read(buf[:])
		if m == 0 {
			return n
		}
		for _, c := range buf[:m] {
			switch c {
			case ',', ' ', '\t', '\r', '\n':
				n++
			default:
				return n
			}
		}
	}
}

// readJSON streams a top-level array, calling elem for each element with
// its position. elem decodes it through the given function; a syntax
// error or the end of the input stops the read.
func readJSON(in *input, opts *Options, c *collector, kind Kind, elem func(pos Pos, dec decodeFunc) bool) {
	in.trackLines()
	file := in.name
	filePos := Pos{File: file, Index: -1}
	if keys, err := firstObjectKeys(in.head); err == nil && wrongKind(c, Pos{File: file, Line: 1, Index: -1}, keys, kind) {
		return
	}
	dec := json.NewDecoder(in.br)
	lineOf := func(off int64) int { return in.cr.lineAt(off + int64(in.bom)) }
	index := 0
	truncated := func() {
		if index == 0 {
			c.addf(filePos, "", "", "truncated JSON: the input ends before the first element is complete")
		} else {
			c.addf(Pos{File: file, Line: lineOf(dec.InputOffset()), Index: -1}, "", "", "truncated JSON after element %d", index-1)
		}
	}
	fatal := func(err error) {
		var se *json.SyntaxError
		switch {
		case errors.Is(err, errRecordTooLong):
			recordTooLong(c, Pos{File: file, Line: lineOf(in.cr.mark), Index: index})
		case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
			truncated()
		case errors.As(err, &se):
			c.addf(Pos{File: file, Line: lineOf(se.Offset), Index: -1}, "", "", "JSON syntax error: %v", se)
		default:
			c.addf(filePos, "", "", "read: %v", err)
		}
	}
	tok, err := dec.Token()
	if err == io.EOF {
		c.addf(filePos, "", "", "empty file (nothing but white space): want a JSON array of objects, [] for none")
		return
	}
	if err != nil {
		fatal(err)
		return
	}
	if tok != json.Delim('[') {
		c.addf(Pos{File: file, Line: 1, Index: -1}, "", "", "want a JSON array of objects ([{...}, ...]) at the top level, not %s", jsonTokenKind(tok))
		return
	}
	max := opts.maxRecords()
	for dec.More() {
		start := dec.InputOffset() + skipSep(dec.Buffered())
		pos := Pos{File: file, Line: lineOf(start), Index: index}
		if index >= max {
			tooMany(c, pos, max)
			return
		}
		stop := false
		in.cr.mark = in.cr.n
		elem(pos, func(keys []string, into []json.Unmarshaler) bool {
			ok, err := decodeObject(dec, c, pos, keys, into)
			if err != nil {
				fatal(err)
				stop = true
			}
			return ok
		})
		if stop {
			return
		}
		index++
	}
	if _, err := dec.Token(); err != nil {
		fatal(err)
		return
	}
	if tok, err := dec.Token(); err != io.EOF {
		if err != nil {
			fatal(err)
			return
		}
		c.addf(Pos{File: file, Line: lineOf(dec.InputOffset()), Index: -1}, "", "", "data after the closing ] of the array: %s", jsonTokenKind(tok))
	}
}

// decodeObject decodes one array element as decodeFunc describes. err is
// a syntax or read error that ends the file. The decoder checks the
// element's syntax and hands its bytes to an objectDecoder, which walks
// the members itself: cheaper than the decoder's tokens, and it sees
// every key as written.
func decodeObject(dec *json.Decoder, c *collector, pos Pos, keys []string, into []json.Unmarshaler) (bool, error) {
	o := objectDecoder{keys: keys, into: into, c: c, pos: pos}
	if err := dec.Decode(&o); err != nil {
		return false, err
	}
	return o.good, nil
}

// objectDecoder receives one syntactically valid JSON value.
type objectDecoder struct {
	keys []string
	into []json.Unmarshaler
	c    *collector
	pos  Pos
	good bool
}

// UnmarshalJSON reports problems to the collector and never fails, so
// that one bad record does not hide the next.
func (o *objectDecoder) UnmarshalJSON(b []byte) error {
	b = bytes.TrimLeft(b, " \t\r\n")
	if len(b) == 0 || b[0] != '{' {
		kind := "value"
		if len(b) > 0 {
			kind = map[byte]string{'"': "string", '[': "array", 't': "boolean", 'f': "boolean", 'n': "null"}[b[0]]
			if kind == "" {
				kind = "number"
			}
		}
		o.c.addf(o.pos, "", "", "element is a JSON %s, not an object", kind)
		return nil
	}
	var seen [16]bool
	o.good = true
	i := 1
	for {
		i = skipSpace(b, i)
		if i >= len(b) || b[i] == '}' {
			return nil
		}
		if b[i] == ',' {
			i++
			continue
		}
		end := stringEnd(b, i)
		rawKey := b[i:end]
		i = skipSpace(b, end) + 1 // past ':'
		i = skipSpace(b, i)
		vend := valueEnd(b, i)
		val := b[i:vend]
		i = vend
		k := -1
		for j, want := range o.keys {
			// Comparing a byte slice converted in place allocates nothing.
			if len(rawKey) == len(want)+2 && string(rawKey[1:len(rawKey)-1]) == want {
				k = j
			}
		}
		if k < 0 && bytes.IndexByte(rawKey, '\\') >= 0 {
			k = slices.Index(o.keys, jsonString(rawKey))
		}
		switch {
		case k >= 0 && !seen[k]:
			seen[k] = true
			o.into[k].UnmarshalJSON(val)
			continue
		case k >= 0:
			o.c.addf(o.pos, o.keys[k], "", "key given twice in the same object (which one is meant? a record says each field once)")
		default:
			key := jsonString(rawKey)
			hint := fmt.Sprintf("the fields are %s", strings.Join(o.keys, ", "))
			for _, want := range o.keys {
				if strings.EqualFold(key, want) {
					hint = fmt.Sprintf("keys are case-sensitive: did you mean %q?", want)
				}
			}
			o.c.addf(o.pos, shortText(key), "", "unknown field (%s)", hint)
		}
		o.good = false
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\r' || b[i] == '\n') {
		i++
	}
	return i
}

// stringEnd returns the index after the string literal starting at i.
func stringEnd(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// valueEnd returns the index after the value starting at i (valid JSON).
func valueEnd(b []byte, i int) int {
	if i >= len(b) {
		return i
	}
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = stringEnd(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				depth--
				if depth == 0 {
					return i + 1
				}
			}
		}
		return len(b)
	}
	for ; i < len(b); i++ {
		switch b[i] {
		case ',', '}', ']', ' ', '\t', '\r', '\n':
			return i
		}
	}
	return i
}

func fieldsOf(k Kind) []string {
	if k == KindNodes {
		return nodeColumns[:]
	}
	return tunnelColumns[:]
}

func jsonTokenKind(tok json.Token) string {
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return "an object"
		}
		return string(v)
	case string:
		return "a string"
	case float64, json.Number:
		return "a number"
	case bool:
		return "a boolean"
	case nil:
		return "null"
	}
	return fmt.Sprint(tok)
}
