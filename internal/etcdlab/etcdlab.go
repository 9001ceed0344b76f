// Package etcdlab runs real etcd members for tests: in-process (server/v3's
// embed package) for the store's unit tests, or as separate processes
// (the etcdmember command) for the namespace tests, where a member is
// killed and partitioned like any other process.
package etcdlab

import (
	"fmt"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Member configures one etcd member.
type Member struct {
	Name string
	Dir  string
	// Client and Peer are host:port to listen on and advertise.
	Client, Peer string
	// Cluster is the initial cluster: name=http://host:port,...
	// (empty: this member alone).
	Cluster string
	// TLS, when CertFile is set, serves clients over TLS; with
	// ClientCertAuth it demands a client certificate signed by
	// TrustedCAFile.
	TLS transport.TLSInfo
	// MaxTxnOps and MaxRequestBytes: 0 keeps etcd's defaults (128 ops,
	// 1.5 MiB), which the store must live within.
	MaxTxnOps       uint
	MaxRequestBytes uint
}

// Start starts a member and waits until it serves (a member of a cluster
// serves once a quorum is up).
func Start(m Member) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name = m.Name
	cfg.Dir = m.Dir
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zap.NewNop())
	cfg.UnsafeNoFsync = true // tests: speed over durability of a tmpfs
	scheme := "http"
	if m.TLS.CertFile != "" {
		scheme = "https"
		cfg.ClientTLSInfo = m.TLS
	}
	cu := url.URL{Scheme: scheme, Host: m.Client}
	pu := url.URL{Scheme: "http", Host: m.Peer}
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{cu}, []url.URL{cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{pu}, []url.URL{pu}
	cfg.InitialCluster = m.Cluster
	if cfg.InitialCluster == "" {
		cfg.InitialCluster = m.Name + "=" + pu.String()
	}
	cfg.InitialClusterToken = "tunneldirector-lab"
	if m.MaxTxnOps > 0 {
		cfg.MaxTxnOps = m.MaxTxnOps
	}
	if m.MaxRequestBytes > 0 {
		cfg.MaxRequestBytes = m.MaxRequestBytes
	}
	// Fast elections: the lab's members share one machine.
	cfg.TickMs = 50
	cfg.ElectionMs = 500
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("start etcd member %s: %w", m.Name, err)
	}
	select {
	case <-e.Server.ReadyNotify():
		return e, nil
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("etcd member %s: %w", m.Name, err)
	case <-time.After(60 * time.Second):
		e.Close()
		return nil, fmt.Errorf("etcd member %s: not ready after 60s", m.Name)
	}
}

// FreePorts returns n loopback host:port pairs that were free a moment
// ago.
func FreePorts(t testing.TB, n int) []string {
	t.Helper()
	var out []string
	var ls []net.Listener
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		ls = append(ls, l)
		out = append(out, l.Addr().String())
	}
	for _, l := range ls {
		l.Close()
	}
	return out
}

// Single starts one in-process member with etcd's default limits for the
// test's lifetime and returns its client endpoint (host:port).
func Single(t testing.TB) string {
	t.Helper()
	ports := FreePorts(t, 2)
	e, err := Start(Member{Name: "lab", Dir: t.TempDir(), Client: ports[0], Peer: ports[1]})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(e.Close)
	return ports[0]
}

// ClusterString builds the initial-cluster value for names and peers.
func ClusterString(names, peers []string) string {
	var parts []string
	for i := range names {
		parts = append(parts, names[i]+"=http://"+peers[i])
	}
	return strings.Join(parts, ",")
}
