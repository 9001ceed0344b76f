package nms

import (
	"bytes"
	"runtime"
	"strings"
	"testing"
	"time"
)

// A runaway file is refused as soon as it passes MaxRecords, with memory
// bounded by the records read, not by the file. How long it takes is logged,
// not asserted: the lines read before refusing are the proof.
func TestHugeFileRefusedFast(t *testing.T) {
	if testing.Short() {
		t.Skip("reads 100,001 generated lines")
	}
	const lines = 10_000_000
	const limit = 100_000
	const heapBound = 200 << 20
	runtime.GC()
	var peak uint64
	var ms runtime.MemStats
	sample := func() {
		runtime.ReadMemStats(&ms)
		peak = max(peak, ms.HeapAlloc)
	}
	g := &genReader{n: lines, onChunk: sample}
	start := time.Now()
	recs, err := ReadTunnels(g, Options{Name: "huge.csv", MaxRecords: limit})
	elapsed := time.Since(start)
	sample()
	if err == nil || recs != nil {
		t.Fatalf("huge file accepted: %d records", len(recs))
	}
	if !strings.Contains(err.Error(), "huge.csv:100002: more than 100000 records") {
		t.Fatalf("error: %v", err)
	}
	// The reader stops within a buffer or two of the limit.
	if g.i > limit+20_000 {
		t.Errorf("generated %d lines of %d before refusing", g.i, lines)
	}
	if peak > heapBound {
		t.Errorf("heap peaked at %d MiB, bound %d MiB", peak>>20, heapBound>>20)
	}
	t.Logf("refused after %d lines (%d MiB read) in %v, heap peak %d MiB", g.i, g.read>>20, elapsed, peak>>20)
}

func genFile(n int) []byte {
	var b bytes.Buffer
	b.WriteString(tunnelHeader)
	var line []byte
	for i := range n {
		line = appendGenLine(line[:0], i)
		b.Write(line)
	}
	return b.Bytes()
}

// 100,000 tunnels import into a fresh table well within the time budget.
func TestImport100k(t *testing.T) {
	if testing.Short() {
		t.Skip("imports 100,000 tunnels")
	}
	data := genFile(100_000)
	tab := newTable(t)
	start := time.Now()
	recs, err := ReadTunnels(bytes.NewReader(data), Options{Name: "100k.csv"})
	if err != nil {
		t.Fatal(err)
	}
	parsed := time.Since(start)
	d := Plan(tab, recs, true)
	apply(t, tab, d)
	total := time.Since(start)
	if tab.Len() != 100_000 {
		t.Fatalf("%d tunnels", tab.Len())
	}
	t.Logf("parse %v, parse+plan+apply %v", parsed, total)
	// Generous for -race and slow machines; the benchmark has the real
	// numbers.
	if limit := 20 * time.Second; total > limit {
		t.Errorf("import took %v", total)
	}
	var buf bytes.Buffer
	if err := WriteTunnels(&buf, FormatJSON, tab.Tunnels()); err != nil {
		t.Fatal(err)
	}
	recs, err = ReadTunnels(&buf, Options{Name: "100k.json"})
	if err != nil {
		t.Fatal(err)
	}
	if d := Plan(tab, recs, true); !d.Empty() {
		t.Fatalf("JSON export re-import: %s", d.Summary(5))
	}
}

func BenchmarkReadTunnelsCSV100k(b *testing.B) {
	data := genFile(100_000)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		recs, err := ReadTunnels(bytes.NewReader(data), Options{Name: "100k.csv"})
		if err != nil || len(recs) != 100_000 {
			b.Fatal(err)
		}
	}
}

// BenchmarkImportTunnelsCSV100k is the whole import path into an empty
// table: parse, plan, apply.
func BenchmarkImportTunnelsCSV100k(b *testing.B) {
	data := genFile(100_000)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		tab := newTable(b)
		b.StartTimer()
		recs, err := ReadTunnels(bytes.NewReader(data), Options{Name: "100k.csv"})
		if err != nil {
			b.Fatal(err)
		}
		d := Plan(tab, recs, false)
		if _, err := tab.Apply(d.Batch); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReadTunnelsJSON100k(b *testing.B) {
	recs, err := ReadTunnels(bytes.NewReader(genFile(100_000)), Options{Name: "100k.csv"})
	if err != nil {
		b.Fatal(err)
	}
	var buf bytes.Buffer
	WriteTunnels(&buf, FormatJSON, tunnelsOf(recs))
	data := buf.Bytes()
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ReadTunnels(bytes.NewReader(data), Options{Name: "100k.json"}); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkWriteTunnelsCSV100k(b *testing.B) {
	recs, err := ReadTunnels(bytes.NewReader(genFile(100_000)), Options{Name: "100k.csv"})
	if err != nil {
		b.Fatal(err)
	}
	ts := tunnelsOf(recs)
	for i := range ts {
		ts[i].Node = "vpn-a"
	}
	b.ReportAllocs()
	var buf bytes.Buffer
	for b.Loop() {
		buf.Reset()
		WriteTunnels(&buf, FormatCSV, ts)
	}
}
