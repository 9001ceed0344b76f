package conntrack

import (
	"context"
	"testing"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// BenchmarkCommit100k commits 100,000 established TCP entries into an
// empty table of a fresh namespace, per iteration (root):
//
//	go test -run '^$' -bench Commit100k -benchtime 3x ./ipvs/conntrack/
func BenchmarkCommit100k(b *testing.B) {
	flows := make([]Flow, 0, 100_000)
	for _, f := range testFlows(100_000) {
		f.Orig.Proto, f.Reply.Proto = ProtoTCP, ProtoTCP
		if f.Orig.SrcPort == 0 {
			f.Orig.SrcPort, f.Orig.DstPort = 9, 9
		}
		f.Reply = f.Orig.Inverse()
		flows = append(flows, f)
	}
	b.ResetTimer()
	for b.Loop() {
		b.StopTimer()
		l := netlab.New(b)
		ns, err := l.AddNS("bench")
		if err != nil {
			b.Fatal(err)
		}
		k, err := Open(ns.NsHandle())
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		res, err := k.Commit(context.Background(), flows, CommitOptions{})
		b.StopTimer()
		if err != nil || res.Failed != 0 {
			b.Fatalf("%+v %v", res, err)
		}
		k.Close()
		l.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/1e6, "ms/100k")
}
