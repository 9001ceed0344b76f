package director

import (
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/affinity"
	"github.com/tunneldirector/tunneldirector/ipvs"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "config.yaml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestConfigExampleIsValid(t *testing.T) {
	b, err := os.ReadFile("../examples/config.yaml")
	if err != nil {
		t.Fatal(err)
	}
	// The example names interfaces this machine may lack.
	body := strings.NewReplacer("outside: eth0", "outside: lo", "inside: eth1", "inside: lo").Replace(string(b))
	c, err := LoadConfig(writeConfig(t, body))
	if err != nil {
		t.Fatal(err)
	}
	if len(c.Nodes) != 3 || c.Nodes[2].Forward == nil || *c.Nodes[2].Forward != ipvs.ForwardTunnel || c.Marks.Base != 0x7d000000 {
		t.Fatalf("parsed %+v", c)
	}
}

// TestConfigBucketsAndScheduler: the sections reach the table's and the
// buckets' options; every bad value of one file is named at once.
func TestConfigBucketsAndScheduler(t *testing.T) {
	c, err := LoadConfig(writeConfig(t, "vips: [192.0.2.1]\nscheduler: {choices: 2}\nunknown_peers: {buckets: 1024, interval: 5s, max_changes: 32, quiet: 1m, horizon: 0.01}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if c.TableOptions().Choices != 2 {
		t.Errorf("table options %+v", c.TableOptions())
	}
	want := affinity.BucketOptions{Count: 1024, Interval: 5 * time.Second, MaxChanges: 32, Quiet: time.Minute, Horizon: 0.01}
	if got := c.UnknownPeers.Options(); got != want {
		t.Errorf("bucket options %+v, want %+v", got, want)
	}
	_, err = LoadConfig(writeConfig(t, "vips: [192.0.2.1]\nunknown_peers: {buckets: 0, max_changes: -1, horizon: -1}\n"))
	for _, key := range []string{"unknown_peers.max_changes: -1", "unknown_peers.horizon: -1"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("error %v does not name %s", err, key)
		}
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	tests := []struct{ body, want string }{
		{"vips: [192.0.2.1]\nvipz: []\n", "vipz (line 2): unknown key"},
		{"vips: [192.0.2.1]\napi: {sockett: /x}\n", "api.sockett (line 2): unknown key"},
		{"vips: [192.0.2.300]\n", "vips[0] (line 1): \"192.0.2.300\" is not an IP address"},
		{"vips: []\n", "vips: no VIP"},
		{"vips: [192.0.2.1]\nmode: fast\n", "mode (line 2): \"fast\" (want auto, ipvs or route-only)"},
		{"vips: [192.0.2.1]\nnodes: [{name: a, address: 10.0.0.1}, {name: a, address: 10.0.0.2}]\n", "nodes[1].name: \"a\" already at nodes[0]"},
		{"vips: [192.0.2.1]\nnodes: [{name: a, address: nope}]\n", "nodes[0].address"},
		{"vips: [192.0.2.1]\ninterfaces: {inside: no-such-if0}\n", "interfaces.inside: interface \"no-such-if0\" does not exist"},
		{"vips: [192.0.2.1]\nmarks: {base: 0x7d000001}\n", "marks: base 0x7d000001"},
		{"vips: [192.0.2.1]\napi: {tcp: \"192.0.2.1:7410\"}\n", "api.token_file: required"},
		{"vips: [192.0.2.1]\nverify_interval: soon\n", "not a duration"},
		{"health: {intervall: 1s}\nvips: [192.0.2.1]\n", "health.intervall (line 1): unknown key"},
		{"health: {interval: soon}\nvips: [192.0.2.1]\n", `health.interval (line 1): "soon" is not a duration`},
		{"vips: [192.0.2.1]\nscheduler: {choices: -1}\n", "scheduler.choices: -1 out of range 0..4095"},
		{"vips: [192.0.2.1]\nscheduler: {choise: 2}\n", "scheduler.choise (line 2): unknown key"},
		{"vips: [192.0.2.1]\nunknown_peers: {buckets: 70000}\n", "unknown_peers.buckets: 70000 out of range 1..65536"},
		{"vips: [192.0.2.1]\nunknown_peers: {buckets: -4}\n", "unknown_peers.buckets: -4 out of range"},
		{"vips: [192.0.2.1]\nunknown_peers: {interval: 10ms}\n", "unknown_peers.interval: 10ms out of range 100ms..24h"},
		{"vips: [192.0.2.1]\nunknown_peers: {interval: often}\n", "unknown_peers.interval (line 2): \"often\" is not a duration"},
		{"vips: [192.0.2.1]\nunknown_peers: {buckets: 1024, max_changes: 2000}\n", "unknown_peers.max_changes: 2000 out of range 1..1024"},
		{"vips: [192.0.2.1]\nunknown_peers: {quiet: 500ms}\n", "unknown_peers.quiet: 500ms out of range 1s..1h"},
		{"vips: [192.0.2.1]\nunknown_peers: {horizon: 1.5}\n", "unknown_peers.horizon: 1.5 out of range (0, 1]"},
	}
	for _, tc := range tests {
		_, err := LoadConfig(writeConfig(t, tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want %q", tc.body, err, tc.want)
		}
	}
}

func FuzzLoadConfig(f *testing.F) {
	if b, err := os.ReadFile("../examples/config.yaml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("vips: [192.0.2.1]\n"))
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, b []byte) {
		p := filepath.Join(dir, "c.yaml")
		os.WriteFile(p, b, 0o600)
		c, err := LoadConfig(p)
		if err == nil {
			if len(c.VIPs) == 0 {
				t.Fatal("accepted a configuration without VIPs")
			}
			if err := c.CheckAgainst(nil); err != nil {
				t.Fatalf("accepted a configuration the daemon would refuse: %v", err)
			}
		}
	})
}

// TestConfigCheckRefusesWhatRunRefuses: files that `config check` used to
// pass and `run` then refused at start (the table's rules, the replication
// link's bounds) are refused by LoadConfig, which both call.
func TestConfigCheckRefusesWhatRunRefuses(t *testing.T) {
	key := filepath.Join(t.TempDir(), "key")
	os.WriteFile(key, []byte(strings.Repeat("k", 32)), 0o600)
	repl := func(extra string) string {
		return "vips: [192.0.2.1]\nreplication: {id: 1, local: \"10.9.0.1:7411\", peer: \"10.9.0.2:7411\", key_file: " + key + extra + "}\n"
	}
	tests := []struct{ name, body, want string }{
		{"duplicate node addresses", "vips: [192.0.2.1]\nnodes: [{name: a, address: 10.0.0.1}, {name: b, address: 10.0.0.1}]\n", "nodes[1].address: 10.0.0.1 is already the address of nodes[0]"},
		{"node address is a VIP", "vips: [192.0.2.1]\nnodes: [{name: a, address: 192.0.2.1}]\n", "nodes[0].address: 192.0.2.1 is a director VIP (vips[0])"},
		{"duplicate VIP", "vips: [192.0.2.1, 192.0.2.1]\n", "vips[1]: 192.0.2.1 already at vips[0]"},
		{"mtu 10", repl(", mtu: 10"), "replication.mtu: 10 out of range 576..65507"},
		{"mtu 100000", repl(", mtu: 100000"), "replication.mtu: 100000 out of range 576..65507"},
		{"loopback VIP", "vips: [127.0.0.1]\n", "vips[0]: address 127.0.0.1 is loopback"},
		{"loopback node", "vips: [192.0.2.1]\nnodes: [{name: a, address: \"::1\"}]\n", "nodes[0].address: address ::1 is loopback"},
		{"bidi override in a node name", "vips: [192.0.2.1]\nnodes: [{name: \"vpn\\u202Ea\", address: 10.0.0.1}]\n", "nodes[0].name"},
		{"relative backup_dir", "vips: [192.0.2.1]\nbackup_dir: backups\n", "backup_dir: \"backups\" is not an absolute path"},
		{"multicast peer not a group", repl(", multicast: true"), "replication.peer: 10.9.0.2:7411 is not a multicast group"},
		{"tiny body limit", "vips: [192.0.2.1]\napi: {max_body: 10}\n", "api.max_body: 10 below 1 MiB"},
		{"health timeout not below interval", "vips: [192.0.2.1]\nhealth: {interval: 1s, timeout: 1s}\n", "health.timeout: 1s is not below interval 1s"},
		{"health rise 0", "vips: [192.0.2.1]\nhealth: {rise: 0}\n", "health.rise: 0: must be at least 1"},
		{"health node override", "vips: [192.0.2.1]\nhealth: {nodes: {vpn-a: {fall: 0}}}\n", "health.nodes.vpn-a.fall: 0: must be at least 1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := LoadConfig(writeConfig(t, tc.body))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want %q", err, tc.want)
			}
			if ExitCode(err) != 2 {
				t.Errorf("exit status %d for a refused configuration, want 2", ExitCode(err))
			}
		})
	}
}

// TestConfigErrorsQuoteAShortPrefix: a runaway value is not echoed whole.
func TestConfigErrorsQuoteAShortPrefix(t *testing.T) {
	long := strings.Repeat("9", 100000)
	_, err := LoadConfig(writeConfig(t, "vips: ["+long+"]\nmode: "+long+"\nlog_level: "+long+"\n"))
	if err == nil {
		t.Fatal("accepted")
	}
	if len(err.Error()) > 1000 {
		t.Fatalf("error is %d bytes", len(err.Error()))
	}
}

func TestConfigWarnings(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	os.WriteFile(tok, []byte("secret"), 0o644)
	key := filepath.Join(dir, "key")
	os.WriteFile(key, []byte(strings.Repeat("k", 32)), 0o640)
	c, err := LoadConfig(writeConfig(t, "vips: [192.0.2.1]\napi: {tcp: \"127.0.0.1:7410\", token_file: "+tok+"}\n"+
		"replication: {id: 1, local: \"10.9.0.1:7411\", peer: \"10.9.0.1:7411\", key_file: "+key+"}\nverify_interval: 876000h\n"))
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Join(c.Warnings(), "\n")
	for _, want := range []string{"api.token_file: " + tok + " has mode 0644", "replication.key_file: " + key + " has mode 0640",
		"replication.peer: 10.9.0.1:7411 is replication.local", "verify_interval: 876000h0m0s"} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings lack %q:\n%s", want, got)
		}
	}
	os.Chmod(tok, 0o600)
	os.Chmod(key, 0o600)
	c, _ = LoadConfig(writeConfig(t, "vips: [192.0.2.1]\napi: {tcp: \"127.0.0.1:7410\", token_file: "+tok+"}\n"))
	if w := c.Warnings(); len(w) != 0 {
		t.Errorf("warnings for a sound file: %v", w)
	}
}

// storedTable is a table holding node (at 10.0.0.9) and its tunnel t1
// (peer 203.0.113.1) protecting subnets.
func storedTable(t *testing.T, node string, subnets ...netip.Prefix) *affinity.Table {
	t.Helper()
	tb, err := affinity.New(affinity.Options{})
	if err != nil {
		t.Fatal(err)
	}
	_, err = tb.Apply([]affinity.Change{
		{Kind: affinity.PutNode, Node: &affinity.Node{Name: node, Addr: netip.MustParseAddr("10.0.0.9")}},
		{Kind: affinity.PutTunnel, Tunnel: &affinity.Tunnel{ID: "t1", Peer: netip.MustParseAddr("203.0.113.1"), Subnets: subnets}},
	})
	if err != nil {
		t.Fatal(err)
	}
	return tb
}

// TestConfigCheckAgainstStoredTable: the stored table adds what the file
// alone cannot show (a VIP inside a stored tunnel's subnet, a configured
// node taking a stored node's address).
func TestConfigCheckAgainstStoredTable(t *testing.T) {
	tb := storedTable(t, "old", netip.MustParsePrefix("198.51.100.0/24"))
	c, err := ParseConfig([]byte("vips: [198.51.100.10]\n"))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.CheckAgainst(tb); err == nil || !strings.Contains(err.Error(), "198.51.100.10 lies inside protected subnet 198.51.100.0/24 of tunnel t1") {
		t.Errorf("VIP in a stored subnet: %v", err)
	}
	c, _ = ParseConfig([]byte("vips: [192.0.2.1]\nnodes: [{name: new, address: 10.0.0.9}]\n"))
	if err := c.CheckAgainst(tb); err == nil {
		t.Error("a configured node with a stored node's address passed")
	}
	if len(tb.VIPs()) != 0 {
		t.Errorf("CheckAgainst left VIPs %v in the table", tb.VIPs())
	}
}

// TestSelfInSubnetsWarns: the director's own addresses (sync, API, the
// machine's) inside a stored protected subnet are warned about, naming
// the key, the subnet and the tunnel; VIPs, loopback and addresses
// outside every subnet are not.
func TestSelfInSubnetsWarns(t *testing.T) {
	tb := storedTable(t, "n1", netip.MustParsePrefix("10.9.0.0/24"), netip.MustParsePrefix("2001:db8:9::/64"))
	dir := t.TempDir()
	tok, key := filepath.Join(dir, "token"), filepath.Join(dir, "key")
	os.WriteFile(tok, []byte("secret"), 0o600)
	os.WriteFile(key, []byte(strings.Repeat("k", 32)), 0o600)
	c, err := LoadConfig(writeConfig(t, "vips: [192.0.2.1]\napi: {tcp: \"[2001:db8:9::7]:7410\", token_file: "+tok+"}\n"+
		"replication: {id: 1, local: \"10.9.0.1:7411\", peer: \"10.9.0.2:7411\", key_file: "+key+"}\n"))
	if err != nil {
		t.Fatal(err)
	}
	local := []netip.Addr{netip.MustParseAddr("10.9.0.1"), netip.MustParseAddr("10.9.0.55"), netip.MustParseAddr("127.0.0.1"),
		netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("10.8.0.1")}
	w := c.SelfInSubnets(tb, local)
	got := strings.Join(w, "\n")
	for _, want := range []string{
		"replication.local: 10.9.0.1 lies inside protected subnet 10.9.0.0/24 of tunnel t1",
		"api.tcp: 2001:db8:9::7 lies inside protected subnet 2001:db8:9::/64 of tunnel t1",
		"local address: 10.9.0.55 lies inside protected subnet 10.9.0.0/24 of tunnel t1",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings lack %q:\n%s", want, got)
		}
	}
	if len(w) != 3 {
		t.Errorf("%d warnings, want 3 (each address once; no VIP, loopback or outside address):\n%s", len(w), got)
	}
	if w := c.SelfInSubnets(nil, local); len(w) != 0 {
		t.Errorf("warnings without a table: %v", w)
	}
}

// TestConntrackConfig: the replication.conntrack section is typed once
// (protocols, TCP states, prefixes, durations) and every bad value is
// named by its key path.
func TestConntrackConfig(t *testing.T) {
	key := filepath.Join(t.TempDir(), "k")
	os.WriteFile(key, []byte("0123456789abcdef0123456789abcdef"), 0o600)
	pair := "vips: [192.0.2.1]\nreplication:\n  id: 1\n  local: \"198.18.0.1:7788\"\n  peer: \"198.18.0.2:7788\"\n  key_file: " + key + "\n"
	c, err := LoadConfig(writeConfig(t, pair+"  conntrack:\n    ignore_protocols: [udp, 47]\n    tcp_states: [established, time_wait]\n    include: [100.64.0.0/10]\n    commit_timeout: 3s\n"))
	if err != nil {
		t.Fatal(err)
	}
	ct := c.Replication.Conntrack
	if !ct.Enabled || len(ct.IgnoreProtocols) != 2 || ct.IgnoreProtocols[1] != 47 || len(ct.TCPStates) != 2 || ct.CommitTimeout != 3e9 || ct.CacheMax != 2_000_000 {
		t.Fatalf("parsed %+v", ct)
	}
	for _, tc := range []struct{ body, want string }{
		{"  conntrack: {tcp_states: [estab]}\n", "replication.conntrack.tcp_states[0] (line 7): unknown TCP state \"estab\""},
		{"  conntrack: {ignore_protocols: [tcpp]}\n", "replication.conntrack.ignore_protocols[0] (line 7): unknown protocol \"tcpp\""},
		{"  conntrack: {cache_max: 5}\n", "replication.conntrack.cache_max: 5 below 1000"},
		{"  conntrack: {bogus: 1}\n", "replication.conntrack.bogus (line 7): unknown key"},
		{"  conntrack: {include: [10.0.0.300/8]}\n", "replication.conntrack.include[0] (line 7)"},
		{"  conntrack: {tcp_states: []}\n", "replication.conntrack.tcp_states: empty"},
	} {
		_, err := LoadConfig(writeConfig(t, pair+tc.body))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("config %q: error %v, want %q", tc.body, err, tc.want)
		}
	}
}
