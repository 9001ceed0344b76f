package sim

import (
	"bytes"
	"os"
	"testing"
)

func FuzzParseScenario(f *testing.F) {
	if b, err := os.ReadFile("examples/scenario.yaml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("seed: 3\nduration: 2d\nevents:\n  - {at: 1d, kind: node-down, node: vpn-01}\n"))
	f.Add([]byte("director: {choices: 3}\nunknown: {share: 0.5, buckets: 64, interval: 1m, max_changes: 8, quiet: 5s, horizon: 0.1, learn_delay: 2s}\ndataplane: {connection_entries: true}\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		// Never panic; an accepted scenario has a positive duration.
		s, err := ParseScenario("fuzz.yaml", b)
		if err == nil && s == nil {
			t.Fatal("nil scenario without error")
		}
	})
}

func FuzzParseEvent(f *testing.F) {
	f.Add("10d node-down vpn-03")
	f.Add("25d failover crash")
	f.Add("1h rebalance 500")
	f.Fuzz(func(t *testing.T, s string) { ParseEvent(s) })
}

func FuzzReadTrace(f *testing.F) {
	var buf bytes.Buffer
	if s, err := ParseScenario("seed.yaml", []byte("seed: 1\nduration: 10d\nnodes: {count: 3}\ntunnels: {count: 20}\nunknown: {share: 0.5}\n")); err == nil {
		if steps, err := Workload(s); err == nil {
			WriteTrace(&buf, steps)
		}
	}
	f.Add(buf.Bytes())
	f.Fuzz(func(t *testing.T, b []byte) {
		steps, err := ReadTrace("fuzz.csv", bytes.NewReader(b))
		if err != nil {
			return
		}
		// What reads must write and read back the same.
		var out bytes.Buffer
		if err := WriteTrace(&out, steps); err != nil {
			t.Fatalf("write back: %v", err)
		}
		again, err := ReadTrace("again.csv", &out)
		if err != nil || len(again) != len(steps) {
			t.Fatalf("round trip: %d steps, then %d: %v", len(steps), len(again), err)
		}
	})
}
