package e2e

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/ikeresponder"
	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// BenchmarkHealthFailover measures, with the real daemon in namespaces
// and the default health settings, the time from a node's death to the
// first ESP packet of one of its tunnels at the new owner, with 10,000
// tunnels on the dead node (40,000 in the table, 4 nodes):
//
//	go test -run '^$' -bench HealthFailover -benchtime 5x ./internal/e2e/
//
// Each run pins 10,000 tunnels and one real peer to the next node (so
// flap damping never holds a node), lets that peer send ESP to the VIP
// every millisecond, and silences the node's IKE responder (a dead box:
// no ICMP). Reported as medians of the runs: death-to-esp (the whole
// outage), detect (death to the deciding round's end, fall x interval
// plus up to a timeout and an interval of phase), commit (the store
// transaction moving 10,000 tunnels) and kernel (commit to the first ESP
// at the new owner: the reconcile and the packet's way).
func BenchmarkHealthFailover(b *testing.B) {
	const nodes, perNode = 4, 10_000
	e := newE2EWith(b, netlab.TopologyOptions{Peers: nodes, Directors: 1, Nodes: nodes, VIPOnDirectors: true}, func(cfg string) string {
		return strings.Replace(cfg, "health: {enabled: false}\n", "interfaces: {inside: in0}\n", 1)
	})
	resp := make([]*ikeresponder.Responder, nodes)
	for i := range resp {
		resp[i] = e.responder(i)
	}
	var csv strings.Builder
	csv.WriteString("id,peer,subnets,node\n")
	for i, p := range e.top.Peers {
		fmt.Fprintf(&csv, "peer%d,%s,10.200.%d.0/24,node%d\n", i, p.If(netlab.IfOutside).Addr4, i, i)
	}
	for i := range nodes * perNode {
		fmt.Fprintf(&csv, "t%05d,100.%d.%d.%d,10.%d.%d.%d/27,node%d\n", i, 64+i>>16, i>>8&255, i&255,
			i>>11, i>>3&255, i&7*32, i%nodes)
	}
	file := filepath.Join(e.dir, "farm.csv")
	if err := os.WriteFile(file, []byte(csv.String()), 0o600); err != nil {
		b.Fatal(err)
	}
	e.start()
	var total, detect, commit, kernel []time.Duration
	b.ResetTimer()
	for iter := range b.N {
		b.StopTimer()
		v := iter % nodes
		// Every node up and passing, then the farm pinned again: node v
		// holds 10,000 tunnels and peer v.
		e.waitFor("every node active", 30*time.Second, func() bool {
			for _, nv := range e.status().Health.Nodes {
				if nv.State != affinity.NodeActive {
					return false
				}
			}
			return true
		})
		e.cli("import", file)
		e.waitKernel()
		start := time.Now()
		e.waitFor("every node passing", 15*time.Second, func() bool { return e.allPassing(start) })
		tag := fmt.Sprintf("failover-%d", iter)
		stop := make(chan struct{})
		sent := make(chan struct{})
		peer := e.top.Peers[v]
		src := peer.If(netlab.IfOutside).Addr4
		go func() {
			defer close(sent)
			for seq := uint32(1); ; seq++ {
				select {
				case <-stop:
					return
				default:
				}
				peer.SendESP(src, e.top.VIP4, 0xfa110000+uint32(iter), seq, tag)
				time.Sleep(time.Millisecond)
			}
		}()
		if _, ok := e.caps[v].Wait(3*time.Second, netlab.Tagged(tag)); !ok {
			b.Fatalf("peer%d's ESP does not reach node%d before the failure", v, v)
		}
		b.StartTimer()
		died := time.Now()
		resp[v].SetMode(ikeresponder.Silent)
		first := make(chan netlab.Packet, nodes)
		for i, c := range e.caps {
			if i != v {
				go func() {
					if p, ok := c.Wait(30*time.Second, netlab.Tagged(tag)); ok {
						first <- p
					}
				}()
			}
		}
		var p netlab.Packet
		select {
		case p = <-first:
		case <-time.After(30 * time.Second):
			b.Fatalf("no ESP of peer%d at another node within 30 s of node%d's death\n%s", v, v, e.cli("status"))
		}
		b.StopTimer()
		close(stop)
		<-sent
		resp[v].SetMode(ikeresponder.LikeStrongSwan)
		s := e.status()
		l := s.HealthLast
		if l == nil || l.Node != fmt.Sprintf("node%d", v) || l.State != affinity.NodeDown || l.Moved < perNode {
			b.Fatalf("last health transition %+v, want node%d down moving %d", l, v, perNode)
		}
		total = append(total, p.Time.Sub(died))
		detect = append(detect, l.Decided.Sub(died))
		commit = append(commit, l.Took)
		kernel = append(kernel, p.Time.Sub(l.Committed))
		b.Logf("run %d: node%d died; its %d tunnels moved: detect %s, commit %s, kernel %s (last reconcile %s): first ESP at the new owner %s after the death",
			iter, v, l.Moved, detect[iter].Round(time.Millisecond), commit[iter].Round(time.Millisecond),
			kernel[iter].Round(time.Millisecond), s.LastReconcileTook.Round(time.Millisecond), total[iter].Round(time.Millisecond))
	}
	med := func(d []time.Duration) float64 {
		s := slices.Clone(d)
		slices.Sort(s)
		return float64(s[len(s)/2]) / float64(time.Millisecond)
	}
	b.ReportMetric(med(total), "death-to-esp-ms")
	b.ReportMetric(med(detect), "detect-ms")
	b.ReportMetric(med(commit), "commit-ms")
	b.ReportMetric(med(kernel), "kernel-ms")
}
