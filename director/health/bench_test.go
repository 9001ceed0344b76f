package health

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/internal/cputime"
	"github.com/tunneldirector/tunneldirector/internal/ikeresponder"
)

// TestMain doubles as the responder process of BenchmarkProbeCost: with
// TD_HEALTH_RESPONDERS=N:PORT it answers IKE on 127.0.1.1..N:PORT until its
// stdin closes, then prints how many requests it answered.
func TestMain(m *testing.M) {
	if spec := os.Getenv("TD_HEALTH_RESPONDERS"); spec != "" {
		os.Exit(serveResponders(spec))
	}
	os.Exit(m.Run())
}

func serveResponders(spec string) int {
	n, port, _ := strings.Cut(spec, ":")
	count, _ := strconv.Atoi(n)
	p, _ := strconv.Atoi(port)
	var rs []*ikeresponder.Responder
	for i := 1; i <= count; i++ {
		r, err := ikeresponder.Listen(netip.AddrPortFrom(loopbackNode(1, i), uint16(p)))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		rs = append(rs, r.Start())
	}
	fmt.Println("ready")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	var total int64
	for _, r := range rs {
		total += r.Requests()
		r.Close()
	}
	fmt.Println(total)
	return 0
}

// loopbackNode is the i-th node address 127.0.<net>.<i>: every address
// of 127/8 is local, so many nodes need no namespace and no root.
func loopbackNode(net, i int) netip.Addr { return netip.AddrFrom4([4]byte{127, 0, byte(net), byte(i)}) }

type nullSink struct{}

func (nullSink) Apply(Decision) error { return nil }

// BenchmarkProbeCost runs the Monitor with the default settings against 64
// nodes (IKE responders in a child process, on loopback) for 10 s per
// iteration, and reports the director's CPU (ms of CPU per second of wall
// time, i.e. thousandths of a core) and the datagrams per second it sent.
//
//	go test -run X -bench ProbeCost -benchtime 3x ./director/health/
func BenchmarkProbeCost(b *testing.B) {
	const nodes, port = 64, 45500
	for range b.N {
		child := exec.Command(os.Args[0], "-test.run=^$")
		child.Env = append(os.Environ(), fmt.Sprintf("TD_HEALTH_RESPONDERS=%d:%d", nodes, port))
		stdin, _ := child.StdinPipe()
		stdout, _ := child.StdoutPipe()
		child.Stderr = os.Stderr
		if err := child.Start(); err != nil {
			b.Fatal(err)
		}
		out := bufio.NewReader(stdout)
		if l, err := out.ReadString('\n'); err != nil || l != "ready\n" {
			b.Fatalf("responders: %q %v", l, err)
		}
		cfg := DefaultConfig()
		cfg.IKE.Port = port
		m := New(Options{Config: cfg, Sink: nullSink{}, Log: quiet()})
		var ns []Node
		for i := 1; i <= nodes; i++ {
			ns = append(ns, Node{Name: fmt.Sprintf("n%d", i), Addr: loopbackNode(1, i), State: affinity.NodeActive})
		}
		m.SetNodes(1, ns)
		m.SetRole(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { m.Run(ctx); close(done) }()
		time.Sleep(2 * time.Second) // let the staggered schedule settle
		c0, r0, w0 := cputime.Process(), m.Status().Counters.Rounds, time.Now()
		time.Sleep(10 * time.Second)
		c1, r1, w1 := cputime.Process(), m.Status().Counters.Rounds, time.Now()
		st := m.Status()
		cancel()
		<-done
		stdin.Close()
		l, _ := out.ReadString('\n')
		requests, _ := strconv.Atoi(strings.TrimSpace(l))
		_ = child.Wait()
		wall := w1.Sub(w0).Seconds()
		b.ReportMetric(float64((c1-c0).Milliseconds())/wall, "cpu-ms/s")
		b.ReportMetric(float64(r1-r0)/wall, "rounds/s")
		b.ReportMetric(float64(requests)/(wall+2), "requests/s")
		if st.Counters.Failed != 0 {
			b.Fatalf("%d failed rounds against live responders", st.Counters.Failed)
		}
	}
}

// BenchmarkDetectionDelay measures, with the default settings, the time
// from a node's IKE responder dying to the decision "down": 48 nodes on
// loopback, 20 of them killed at random moments over 2 s, three times per
// iteration (60 samples); reports the median, 90th percentile and maximum.
//
//	go test -run X -bench DetectionDelay -benchtime 1x ./director/health/
func BenchmarkDetectionDelay(b *testing.B) {
	const nodes, killed, port = 48, 20, 45600
	for range b.N {
		cfg := DefaultConfig()
		cfg.IKE.Port = port
		rs := make([]*ikeresponder.Responder, nodes)
		start := func(i int) {
			r, err := ikeresponder.Listen(netip.AddrPortFrom(loopbackNode(2, i+1), port))
			if err != nil {
				b.Fatal(err)
			}
			rs[i] = r.Start()
		}
		for i := range nodes {
			start(i)
		}
		var mu sync.Mutex
		decided := map[string]time.Time{}
		ups := 0
		sink := sinkFunc(func(d Decision) error {
			mu.Lock()
			defer mu.Unlock()
			if d.State == affinity.NodeDown {
				decided[d.Node] = time.Now()
			} else {
				ups++
			}
			return nil
		})
		m := New(Options{Config: cfg, Sink: sink, Log: quiet()})
		var ns []Node
		for i := range nodes {
			ns = append(ns, Node{Name: fmt.Sprintf("n%d", i), Addr: loopbackNode(2, i+1), State: affinity.NodeActive})
		}
		m.SetNodes(1, ns)
		m.SetRole(true)
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() { m.Run(ctx); close(done) }()
		time.Sleep(3 * time.Second)
		var delays []time.Duration
		for round := range 3 {
			victims := rand.Perm(nodes)[:killed]
			killedAt := map[string]time.Time{}
			var wg sync.WaitGroup
			var kmu sync.Mutex
			for _, v := range victims {
				wg.Add(1)
				go func() {
					defer wg.Done()
					time.Sleep(rand.N(2 * time.Second))
					kmu.Lock()
					killedAt[fmt.Sprintf("n%d", v)] = time.Now()
					kmu.Unlock()
					rs[v].Close()
				}()
			}
			wg.Wait()
			time.Sleep(5 * time.Second)
			mu.Lock()
			for name, at := range killedAt {
				d, ok := decided[name]
				if !ok {
					mu.Unlock()
					b.Fatalf("round %d: %s killed but not taken down; status panic %q", round, name, m.Status().Panic)
				}
				delays = append(delays, d.Sub(at))
				delete(decided, name)
			}
			mu.Unlock()
			for _, v := range victims {
				start(v)
			}
			time.Sleep(4 * time.Second) // rise, and settle
		}
		cancel()
		<-done
		for _, r := range rs {
			r.Close()
		}
		slices.Sort(delays)
		q := func(p float64) float64 { return delays[int(p*float64(len(delays)-1))].Seconds() }
		b.ReportMetric(q(0.5), "p50-s")
		b.ReportMetric(q(0.9), "p90-s")
		b.ReportMetric(delays[len(delays)-1].Seconds(), "max-s")
		b.ReportMetric(delays[0].Seconds(), "min-s")
		b.ReportMetric(float64(len(delays)), "samples")
	}
}

type sinkFunc func(Decision) error

func (f sinkFunc) Apply(d Decision) error { return f(d) }

// BenchmarkIKEProbe is one IKE probe (socket, request, answer, checks)
// against the test responder on loopback, in the same process: an upper
// bound of the director's work per probe.
//
//	go test -run X -bench IKEProbe ./director/health/
func BenchmarkIKEProbe(b *testing.B) {
	r := startResponder(b, "127.0.0.1:0")
	c := &checker{dial: dialKernel}
	b.ReportAllocs()
	for b.Loop() {
		ctx, cancel := context.WithTimeout(context.Background(), 800*time.Millisecond)
		res := c.ike(ctx, r.Addr(), 250*time.Millisecond)
		cancel()
		if !res.OK {
			b.Fatal(res.Err)
		}
	}
}
