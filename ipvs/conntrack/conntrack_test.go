package conntrack

import (
	"context"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/tunneldirector/tunneldirector/internal/netlab"
)

// TestNSWatchNew makes conntrack track a namespace (one ct rule) and sends
// a datagram through it: the NEW event arrives with its tuple.
func TestNSWatchNew(t *testing.T) {
	top := netlab.BuildTopology(t, netlab.TopologyOptions{Peers: 1, Directors: 1, Nodes: 1, VIPOnDirectors: true})
	a, b := top.Peers[0], top.Directors[0]
	src, dst := a.If(netlab.IfOutside).Addr4, top.VIP4
	// Conntrack runs in a namespace only once something there uses it.
	c, err := b.Nft()
	if err != nil {
		t.Fatal(err)
	}
	tbl := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "ct"})
	ch := c.AddChain(&nftables.Chain{Name: "in", Table: tbl, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: nftables.ChainPriorityFilter})
	c.AddRule(&nftables.Rule{Table: tbl, Chain: ch, Exprs: []expr.Any{&expr.Ct{Register: 1, Key: expr.CtKeySTATE}, &expr.Counter{}}})
	if err := c.Flush(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	var got []Flow
	done := make(chan error, 1)
	go func() {
		done <- WatchNew(ctx, b.NsHandle(), func(f Flow) { mu.Lock(); got = append(got, f); mu.Unlock() })
	}()
	time.Sleep(100 * time.Millisecond)
	if err := a.SendUDP(netip.AddrPortFrom(src, 500), netip.AddrPortFrom(dst, 500), []byte("x")); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(3 * time.Second)
	for {
		mu.Lock()
		n := len(got)
		mu.Unlock()
		if n > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	if len(got) != 1 || got[0].Orig.SrcAddr() != src || got[0].Orig.DstPort != 500 || got[0].Orig.Proto != ProtoUDP {
		t.Fatalf("NEW events %+v", got)
	}
	mu.Unlock()
	cancel()
	if err := <-done; err != context.Canceled {
		t.Fatalf("watch ended with %v", err)
	}
}
