package nms

import (
	"fmt"
	"io"
	"strconv"
)

// genLine is tunnel i of a synthetic farm: a unique IPv4 peer in
// 100.64.0.0/10 and one to four /27 subnets in 10.0.0.0/8.
func genLine(i int) string {
	return string(appendGenLine(nil, i))
}

func appendGenLine(b []byte, i int) []byte {
	b = append(b, 't')
	b = strconv.AppendInt(b, int64(i), 10)
	p := 100<<24 | 64<<16 + uint32(i)
	b = fmt.Appendf(b, ",%d.%d.%d.%d,", p>>24, p>>16&0xff, p>>8&0xff, p&0xff)
	n := 1 + i%4
	for k := range n {
		if k > 0 {
			b = append(b, ' ')
		}
		// Four /27s per tunnel slot keep subnets disjoint.
		s := uint32(10<<24) + uint32(i)*128 + uint32(k)*32
		b = fmt.Appendf(b, "%d.%d.%d.%d/27", s>>24, s>>16&0xff, s>>8&0xff, s&0xff)
	}
	b = append(b, ",,,\n"...)
	return b
}

// genReader produces a tunnels CSV of n lines on the fly, so a huge file
// costs no memory and no disk. It counts what was read.
type genReader struct {
	n, i    int
	buf     []byte
	header  bool
	read    int64
	onChunk func()
}

func (g *genReader) Read(p []byte) (int, error) {
	if !g.header {
		g.header = true
		g.buf = append(g.buf, tunnelHeader...)
	}
	for len(g.buf) < len(p) && g.i < g.n {
		g.buf = appendGenLine(g.buf, g.i)
		g.i++
		if g.onChunk != nil && g.i%10000 == 0 {
			g.onChunk()
		}
	}
	if len(g.buf) == 0 {
		return 0, io.EOF
	}
	n := copy(p, g.buf)
	g.buf = g.buf[:copy(g.buf, g.buf[n:])]
	g.read += int64(n)
	return n, nil
}
