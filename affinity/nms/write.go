package nms

import (
	"bufio"
	"cmp"
	"fmt"
	"io"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"unicode/utf8"

	"github.com/tunneldirector/tunneldirector/affinity"
)

// WriteTunnels exports tunnels in the given format (FormatCSV or
// FormatJSON), sorted by id with subnets in table order, so that equal
// tables export byte for byte equal files. Node is the current owner and
// pinned is written explicitly, so that importing the file again keeps
// every owner and every pin.
func WriteTunnels(w io.Writer, format Format, tunnels []affinity.Tunnel) error {
	if format != FormatCSV && format != FormatJSON {
		return fmt.Errorf("export tunnels: unsupported format %v", format)
	}
	order := sortedOrder(len(tunnels), func(i, j int) int { return cmp.Compare(tunnels[i].ID, tunnels[j].ID) })
	bw := bufio.NewWriterSize(w, 64<<10)
	b := exportHead(format, tunnelColumns[:])
	for k, i := range order {
		t := &tunnels[i]
		ps := t.Subnets
		if !slices.IsSortedFunc(ps, affinity.ComparePrefix) {
			ps = slices.Clone(ps)
			slices.SortFunc(ps, affinity.ComparePrefix)
		}
		if format == FormatCSV {
			b = appendCSV(b, t.ID, false)
			b = append(b, ',')
			b = appendAddr(b, t.Peer)
			// Prefixes never need quoting, so they go straight in.
			b = append(b, ',')
			for j, p := range ps {
				if j > 0 {
					b = append(b, ' ')
				}
				b = p.AppendTo(b)
			}
			b = appendCSV(b, t.Node, true)
			b = appendCSV(b, strconv.FormatBool(t.Pinned), true)
			b = appendCSV(b, t.Comment, true)
			b = append(b, '\n')
		} else {
			b = append(b, `{"id":`...)
			b = appendJSONString(b, t.ID)
			b = append(b, `,"peer":"`...)
			b = appendAddr(b, t.Peer)
			b = append(b, `","subnets":[`...)
			for j, p := range ps {
				if j > 0 {
					b = append(b, ',')
				}
				b = append(b, '"')
				b = p.AppendTo(b)
				b = append(b, '"')
			}
			b = append(b, `],"node":`...)
			b = appendJSONString(b, t.Node)
			b = append(b, `,"pinned":`...)
			b = strconv.AppendBool(b, t.Pinned)
			if t.Comment != "" {
				b = append(b, `,"comment":`...)
				b = appendJSONString(b, t.Comment)
			}
			b = endObject(b, k == len(order)-1)
		}
		if len(b) >= 32<<10 {
			if _, err := bw.Write(b); err != nil {
				return fmt.Errorf("export tunnels: %w", err)
			}
			b = b[:0]
		}
	}
	if format == FormatJSON {
		b = append(b, "]\n"...)
	}
	if _, err := bw.Write(b); err != nil {
		return fmt.Errorf("export tunnels: %w", err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("export tunnels: %w", err)
	}
	return nil
}

// WriteNodes exports nodes in the given format, sorted by name, marks
// included so that a re-import keeps them.
func WriteNodes(w io.Writer, format Format, nodes []affinity.Node) error {
	if format != FormatCSV && format != FormatJSON {
		return fmt.Errorf("export nodes: unsupported format %v", format)
	}
	order := sortedOrder(len(nodes), func(i, j int) int { return cmp.Compare(nodes[i].Name, nodes[j].Name) })
	b := exportHead(format, nodeColumns[:])
	for k, i := range order {
		n := &nodes[i]
		addr, addr6 := "", ""
		if n.Addr.IsValid() {
			addr = n.Addr.String()
		}
		if n.Addr6.IsValid() {
			addr6 = n.Addr6.String()
		}
		if format == FormatCSV {
			b = appendCSV(b, n.Name, false)
			b = appendCSV(b, addr, true)
			b = appendCSV(b, addr6, true)
			b = append(b, ',')
			b = strconv.AppendUint(b, uint64(n.Weight), 10)
			b = append(b, ',')
			b = strconv.AppendInt(b, int64(n.Capacity), 10)
			b = appendCSV(b, n.State.String(), true)
			b = append(b, ',')
			b = strconv.AppendUint(b, uint64(n.Mark), 10)
			b = appendCSV(b, n.Comment, true)
			b = append(b, '\n')
		} else {
			b = append(b, `{"name":`...)
			b = appendJSONString(b, n.Name)
			b = append(b, `,"address":`...)
			b = appendJSONString(b, addr)
			if addr6 != "" {
				b = append(b, `,"address6":`...)
				b = appendJSONString(b, addr6)
			}
			b = append(b, `,"weight":`...)
			b = strconv.AppendUint(b, uint64(n.Weight), 10)
			b = append(b, `,"capacity":`...)
			b = strconv.AppendInt(b, int64(n.Capacity), 10)
			b = append(b, `,"state":`...)
			b = appendJSONString(b, n.State.String())
			b = append(b, `,"mark":`...)
			b = strconv.AppendUint(b, uint64(n.Mark), 10)
			if n.Comment != "" {
				b = append(b, `,"comment":`...)
				b = appendJSONString(b, n.Comment)
			}
			b = endObject(b, k == len(order)-1)
		}
	}
	if format == FormatJSON {
		b = append(b, "]\n"...)
	}
	if _, err := w.Write(b); err != nil {
		return fmt.Errorf("export nodes: %w", err)
	}
	return nil
}

// exportHead starts an export: the CSV header line, or the opening of the
// JSON array.
func exportHead(format Format, columns []string) []byte {
	if format == FormatCSV {
		return append([]byte(strings.Join(columns, ",")), '\n')
	}
	return []byte("[\n")
}

// endObject closes a JSON record, with the comma that separates it from
// the next unless it is the last.
func endObject(b []byte, last bool) []byte {
	b = append(b, '}')
	if !last {
		b = append(b, ',')
	}
	return append(b, '\n')
}

// appendAddr appends an address, or nothing for the zero Addr (whose
// String is "invalid IP").
func appendAddr(b []byte, a netip.Addr) []byte {
	if !a.IsValid() {
		return b
	}
	return a.AppendTo(b)
}

// sortedOrder returns the indexes 0..n-1 in the order cmp gives, leaving
// the caller's slice as it is.
func sortedOrder(n int, cmp func(i, j int) int) []int {
	order := make([]int, n)
	for i := range order {
		order[i] = i
	}
	sorted := true
	for i := 1; i < n && sorted; i++ {
		sorted = cmp(i-1, i) <= 0
	}
	if !sorted {
		slices.SortStableFunc(order, cmp)
	}
	return order
}

// appendCSV appends one field, quoted when a reader would otherwise split
// it, trim it, or take the line for a comment.
func appendCSV(b []byte, s string, sep bool) []byte {
	if sep {
		b = append(b, ',')
	}
	if !needsQuotes(s) {
		return append(b, s...)
	}
	b = append(b, '"')
	for {
		i := strings.IndexByte(s, '"')
		if i < 0 {
			break
		}
		b = append(b, s[:i+1]...)
		b = append(b, '"')
		s = s[i+1:]
	}
	b = append(b, s...)
	return append(b, '"')
}

func needsQuotes(s string) bool {
	if s == "" {
		return false
	}
	if s[0] == '#' || s[0] == ' ' || s[0] == '\t' || s[len(s)-1] == ' ' {
		return true
	}
	return strings.ContainsAny(s, ",\"\r\n")
}

const hexDigits = "0123456789abcdef"

// appendJSONString appends s as a JSON string. Only what JSON requires is
// escaped, so comments stay readable in the file.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' && c < utf8.RuneSelf {
			i++
			continue
		}
		if c >= utf8.RuneSelf {
			r, size := utf8.DecodeRuneInString(s[i:])
			if r == utf8.RuneError && size == 1 {
				b = append(b, s[start:i]...)
				b = append(b, `\ufffd`...)
				i++
				start = i
				continue
			}
			i += size
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"', '\\':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		case '\t':
			b = append(b, '\\', 't')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		i++
		start = i
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
