package nms

import (
	"fmt"
	"strconv"
	"strings"
)

// DefaultMaxErrors is how many errors a read lists when Options.MaxErrors
// is zero; the rest are only counted.
const DefaultMaxErrors = 50

// Pos is where a record came from: the file, its line and, for JSON, its
// position in the top-level array.
type Pos struct {
	// File is the name given in Options.Name.
	File string `json:"file,omitempty"`
	// Line is the 1-based line of the record (of its first byte for a
	// JSON object); 0 when unknown.
	Line int `json:"line,omitempty"`
	// Index is the 0-based position in the JSON array, or -1 for CSV and
	// for things that are not in the file at all.
	Index int `json:"index"`
}

// String formats the position as "file:line" or "file:line: element N",
// the prefix of every message about the record.
func (p Pos) String() string {
	var b strings.Builder
	p.write(&b)
	return b.String()
}

func (p Pos) write(b *strings.Builder) {
	file := p.File
	if file == "" {
		file = "<input>"
	}
	b.WriteString(file)
	if p.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(p.Line))
	}
	if p.Index >= 0 {
		b.WriteString(": element ")
		b.WriteString(strconv.Itoa(p.Index))
	}
}

// FieldError is one problem found in a file, with enough context to find
// and fix it: where, which field, and the offending value.
type FieldError struct {
	Pos
	// Field is the column or JSON key; empty when the problem is the
	// record or the file as a whole.
	Field string `json:"field,omitempty"`
	// Value is the offending value as written in the file.
	Value string `json:"value,omitempty"`
	// Msg says what is wrong with it.
	Msg string `json:"msg"`
}

// maxShownValue bounds how much of an offending value a message quotes, so
// a runaway field does not flood the terminal.
const maxShownValue = 80

func (e *FieldError) Error() string {
	var b strings.Builder
	e.Pos.write(&b)
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString("field ")
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	if e.Value != "" {
		v := e.Value
		if len(v) > maxShownValue {
			b.WriteString(strconv.Quote(v[:maxShownValue]))
			b.WriteString("...")
		} else {
			b.WriteString(strconv.Quote(v))
		}
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Errors is every problem found in a file (up to the MaxErrors option) and
// how many there were in all. Nothing from a file with errors should be
// applied.
type Errors struct {
	List  []*FieldError `json:"errors"`
	Total int           `json:"total"`
}

// Error prints one problem per line and, when the list was capped, how many
// more there were.
func (e *Errors) Error() string {
	var b strings.Builder
	for i, fe := range e.List {
		if i > 0 {
			b.WriteByte('\n')
		}
		b.WriteString(fe.Error())
	}
	if more := e.Total - len(e.List); more > 0 {
		if len(e.List) > 0 {
			b.WriteByte('\n')
		}
		fmt.Fprintf(&b, "... and %d more", more)
	}
	return b.String()
}

// Unwrap lets errors.As reach the individual problems.
func (e *Errors) Unwrap() []error {
	out := make([]error, len(e.List))
	for i, fe := range e.List {
		out[i] = fe
	}
	return out
}

// collector gathers the problems of one read.
type collector struct {
	max   int
	list  []*FieldError
	total int
	// aborted says the read stopped before the end of the file, so the
	// records read are not the file's.
	aborted bool
}

func (c *collector) add(e *FieldError) {
	c.total++
	if len(c.list) < c.max {
		c.list = append(c.list, e)
	}
}

func (c *collector) addf(pos Pos, field, value, format string, args ...any) {
	c.total++
	if len(c.list) < c.max {
		c.list = append(c.list, &FieldError{Pos: pos, Field: field, Value: value, Msg: fmt.Sprintf(format, args...)})
	}
}

func (c *collector) err() error {
	if c.total == 0 {
		return nil
	}
	return &Errors{List: c.list, Total: c.total}
}
