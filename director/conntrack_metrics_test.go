package director

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tunneldirector/tunneldirector/director/ctsync"
	"github.com/tunneldirector/tunneldirector/director/replication"
)

// TestConntrackCollector checks that every counter of the syncer's status
// reaches its family and label, each value distinct so that a family
// reading the wrong field shows.
func TestConntrackCollector(t *testing.T) {
	st := ctsync.Status{Enabled: true, Cached: 11, CacheMax: 12,
		Counters: ctsync.Counters{Sent: 21, Received: 22, Filtered: 23, EventsLost: 24, QueueFull: 25, Malformed: 26,
			ResyncsSent: 27, ResyncsReceived: 28, Commits: 29, Committed: 30, CommitFailed: 31},
		Cache:      ctsync.CacheCounters{Destroys: 41, Expired: 42, Evicted: 43, Swept: 44},
		Stream:     replication.CTStreamCounters{DatagramsSent: 51, DatagramsReceived: 52, Resent: 53, Lost: 54, Malformed: 55},
		LastCommit: &ctsync.CommitReport{Took: 1500 * time.Millisecond},
	}
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(newConntrackCollector(func() ctsync.Status { return st }))
	want := `
tunneldirector_conntrack_cached_flows 11
tunneldirector_conntrack_cache_max_flows 12
tunneldirector_conntrack_records_total{kind="sent"} 21
tunneldirector_conntrack_records_total{kind="received"} 22
tunneldirector_conntrack_filtered_total 23
tunneldirector_conntrack_lost_total{kind="events"} 24
tunneldirector_conntrack_lost_total{kind="queue"} 25
tunneldirector_conntrack_lost_total{kind="datagrams"} 54
tunneldirector_conntrack_malformed_total{kind="records"} 26
tunneldirector_conntrack_malformed_total{kind="datagram"} 55
tunneldirector_conntrack_resyncs_total{kind="sent"} 27
tunneldirector_conntrack_resyncs_total{kind="received"} 28
tunneldirector_conntrack_commits_total 29
tunneldirector_conntrack_committed_flows_total{result="ok"} 30
tunneldirector_conntrack_committed_flows_total{result="failed"} 31
tunneldirector_conntrack_cache_removed_total{reason="destroyed"} 41
tunneldirector_conntrack_cache_removed_total{reason="expired"} 42
tunneldirector_conntrack_cache_removed_total{reason="evicted"} 43
tunneldirector_conntrack_cache_removed_total{reason="swept"} 44
tunneldirector_conntrack_datagrams_sent_total 51
tunneldirector_conntrack_datagrams_received_total 52
tunneldirector_conntrack_datagrams_resent_total 53
tunneldirector_conntrack_last_commit_duration_seconds 1.5
`
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			k := mf.GetName()
			if l := m.GetLabel(); len(l) == 1 {
				k += "{" + l[0].GetName() + `="` + l[0].GetValue() + `"}`
			}
			v := m.GetGauge().GetValue() + m.GetCounter().GetValue()
			got[k] = v
		}
	}
	lines := strings.Fields(strings.TrimSpace(want))
	if len(got) != len(lines)/2 {
		t.Errorf("%d series, want %d: %v", len(got), len(lines)/2, got)
	}
	for i := 0; i < len(lines); i += 2 {
		w, _ := strconv.ParseFloat(lines[i+1], 64)
		if v, ok := got[lines[i]]; !ok || v != w {
			t.Errorf("%s = %v (present %v), want %v", lines[i], v, ok, w)
		}
	}
}
