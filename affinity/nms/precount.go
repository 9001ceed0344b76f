package nms

import (
	"bufio"
	"bytes"
	"encoding/csv"
	"io"
)

// A file with more records than Options.MaxRecords is refused as soon as
// the limit is passed, but by then the records up to the limit have been
// read, validated and kept: for the default limit of 2,000,000, about a
// gigabyte and half a minute. When the input is a file large enough to
// hold that many records, its records are first counted in a pass that
// keeps nothing (a newline count settles most files; an exact CSV or JSON
// scan the rest), so an oversized file is refused in bounded memory
// before the real read starts.

// minRecordBytes is the shortest a tunnel or node record can be, with its
// separator: below limit*minRecordBytes bytes a file cannot hold too many
// records and is not counted first.
const minRecordBytes = 12

// precount returns the position of the first record past max, or ok
// false when the file holds at most max records (or cannot be counted
// cheaply; the real read then decides).
func precount(ra io.ReaderAt, size int64, format Format, max int) (pos Pos, over bool) {
	if size <= int64(max)*minRecordBytes {
		return Pos{}, false
	}
	sec := io.NewSectionReader(ra, 0, size)
	if format == FormatJSON {
		return precountJSON(sec, max)
	}
	// Every record ends a line: few enough lines settle it at once.
	lines, buf := 0, make([]byte, 1<<20)
	for {
		n, err := sec.Read(buf)
		lines += bytes.Count(buf[:n], []byte{'\n'})
		if err != nil {
			break
		}
	}
	if lines <= max+1 { // the header, then at most max records
		return Pos{}, false
	}
	// Comments, blank lines and quoted line breaks: count exactly.
	cr := &countReader{r: io.NewSectionReader(ra, 0, size)}
	r := csv.NewReader(bufio.NewReaderSize(cr, sniffLen))
	r.Comment = '#'
	r.FieldsPerRecord = -1
	r.ReuseRecord = true
	r.TrimLeadingSpace = true
	n := -1 // the header
	for {
		cr.mark = cr.n
		if _, err := r.Read(); err != nil {
			return Pos{}, false
		}
		if n++; n > max {
			line, _ := r.FieldPos(0)
			return Pos{Line: line, Index: -1}, true
		}
	}
}

// precountJSON counts the elements of a top-level array without decoding
// them: strings, nesting and line breaks are all it follows.
func precountJSON(r io.Reader, max int) (Pos, bool) {
	br := bufio.NewReaderSize(r, 1<<20)
	depth, count, line := 0, 0, 1
	inString, escaped, expectValue := false, false, false
	for {
		c, err := br.ReadByte()
		if err != nil {
			return Pos{}, false
		}
		if c == '\n' {
			line++
		}
		if inString {
			switch {
			case escaped:
				escaped = false
			case c == '\\':
				escaped = true
			case c == '"':
				inString = false
			}
			continue
		}
		switch c {
		case ' ', '\t', '\r', '\n':
			continue
		case ',':
			if depth == 1 {
				expectValue = true
			}
			continue
		}
		if depth == 1 && expectValue && c != ']' {
			expectValue = false
			if count++; count > max {
				return Pos{Line: line, Index: count - 1}, true
			}
		}
		switch c {
		case '"':
			inString = true
		case '[', '{':
			depth++
			if depth == 1 {
				expectValue = true
			}
		case ']', '}':
			depth--
			if depth <= 0 {
				return Pos{}, false
			}
		}
	}
}
