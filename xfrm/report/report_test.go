package report

import (
	"bytes"
	"errors"
	"fmt"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/tunneldirector/tunneldirector/xfrm"
)

const session = "0123456789abcdef0123456789abcdef"

func tunnel(peer string, subnets ...string) xfrm.Tunnel {
	t := xfrm.Tunnel{Peer: netip.MustParseAddr(peer), SAs: 2, Bytes: 100, Packets: 3, LastUse: 1764410400,
		SPIs: []xfrm.SPI{{SPI: 0xc0000001, Reqid: 1, Dir: xfrm.In, Proto: "esp"}, {SPI: 0xc0000002, Reqid: 1, Dir: xfrm.Out, Proto: "esp"}}}
	t.Subnets = []netip.Prefix{}
	for _, s := range subnets {
		t.Subnets = append(t.Subnets, netip.MustParsePrefix(s))
	}
	return t
}

func full(node string, seq uint64, ts ...xfrm.Tunnel) *Report {
	r := &Report{Version: Version, Kind: KindFull, Node: node, Session: session, Seq: seq,
		Sent: time.Date(2026, 11, 29, 10, 0, 0, 500, time.UTC), Tunnels: append([]xfrm.Tunnel{}, ts...)}
	for _, t := range ts {
		r.Summary.SAs += t.SAs
	}
	r.Summary.Tunnels = len(ts)
	return r
}

func mustMarshal(t *testing.T, r *Report) []byte {
	t.Helper()
	b, err := Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTrip(t *testing.T) {
	nat := tunnel("203.0.113.5", "192.168.7.0/24")
	nat.NATT = []xfrm.NATT{{Port: 31337, LocalPort: 4500}, {Port: 1024, LocalPort: 4500, OriginalAddress: netip.MustParseAddr("10.9.9.9")}}
	reports := []*Report{
		full("node-1", 1, tunnel("198.51.100.1", "172.16.1.0/24", "172.16.2.0/24"), tunnel("2001:db8:100::1", "fd00::/8"), nat),
		full("node-1", 1),
		{Version: Version, Kind: KindDelta, Node: "node-1", Session: session, Seq: 2, Sent: time.Unix(1764410400, 0).UTC(),
			Tunnels: []xfrm.Tunnel{tunnel("198.51.100.9")}, Removed: []netip.Addr{netip.MustParseAddr("198.51.100.1")}},
		{Version: Version, Kind: KindDelta, Node: "node-1", Session: session, Seq: 3, Sent: time.Unix(1764410401, 0).UTC(),
			Removed: []netip.Addr{netip.MustParseAddr("2001:db8:100::1")}},
		{Version: Version, Kind: KindHeartbeat, Node: "node-1", Session: session, Seq: 3, Sent: time.Unix(1764410402, 0).UTC(),
			Summary: xfrm.Summary{SAs: 2, Tunnels: 1, Unattributed: 1, Ignored: 4}},
	}
	for _, r := range reports {
		if err := Validate(r, Limits{}); err != nil {
			t.Fatalf("%s report invalid: %v", r.Kind, err)
		}
		b := mustMarshal(t, r)
		got, err := Decode(bytes.NewReader(b), Limits{})
		if err != nil {
			t.Fatalf("%s: decode %s: %v", r.Kind, b, err)
		}
		if !reflect.DeepEqual(got, r) {
			t.Fatalf("%s round trip:\n got %+v\nwant %+v", r.Kind, got, r)
		}
	}
}

// TestDecodeRefuses lists bad reports and the field and message each must
// be refused with.
func TestDecodeRefuses(t *testing.T) {
	good := string(mustMarshal(t, full("node-1", 1, tunnel("198.51.100.1", "172.16.1.0/24"))))
	hb := string(mustMarshal(t, &Report{Version: Version, Kind: KindHeartbeat, Node: "n", Session: session, Seq: 1, Sent: time.Unix(0, 0)}))
	sub := func(s, old, new string) string {
		if !strings.Contains(s, old) {
			t.Fatalf("test bug: %q not in %s", old, s)
		}
		return strings.Replace(s, old, new, 1)
	}
	cases := []struct {
		name, body, field, msg string
	}{
		{"empty", ``, "", "ends too early"},
		{"not an object", `[1]`, "", "want an object"},
		{"truncated", good[:len(good)-20], "tunnels[0].spis[1].dir", "ends too early"},
		{"trailing data", good + `{}`, "", "data after"},
		{"unknown key", sub(good, `"version":1`, `"version":1,"extra":2`), "extra", `unknown key "extra"`},
		{"duplicate key", sub(good, `"version":1`, `"version":1,"version":1`), "version", "duplicate key"},
		{"duplicate nested key", sub(good, `"sas":2,"bytes"`, `"sas":2,"sas":3,"bytes"`), "tunnels[0].sas", "duplicate key"},
		{"missing key", sub(good, `"seq":1,`, ``), "", `missing key "seq"`},
		{"missing tunnel key", sub(good, `"bytes":100,`, ``), "tunnels[0]", `missing key "bytes"`},
		{"null", sub(good, `"node":"node-1"`, `"node":null`), "node", "want a string, got null"},
		{"wrong type", sub(good, `"seq":1`, `"seq":"1"`), "seq", "want a number, got a string"},
		{"negative seq", sub(good, `"seq":1`, `"seq":-1`), "seq", "not an integer from 0"},
		{"fraction", sub(good, `"sas":2,"bytes"`, `"sas":2.5,"bytes"`), "tunnels[0].sas", "not an integer from 0 to 2147483647"},
		{"huge", sub(good, `"sas":2,"bytes"`, `"sas":2e99,"bytes"`), "tunnels[0].sas", "not an integer"},
		{"version", sub(good, `"version":1`, `"version":2`), "version", "not supported"},
		{"kind", sub(good, `"kind":"full"`, `"kind":"partial"`), "kind", "not full, delta or heartbeat"},
		{"node", sub(good, `"node":"node-1"`, `"node":"a b"`), "node", "contains"},
		{"session", sub(good, session, "XYZ"), "session", "32 lower-case hex"},
		{"seq 0", sub(good, `"seq":1`, `"seq":0`), "seq", "start at 1"},
		{"sent", sub(good, `"sent":"`, `"sent":"yesterday`), "sent", "RFC 3339"},
		{"peer", sub(good, `"peer":"198.51.100.1"`, `"peer":"198.51.100"`), "tunnels[0].peer", "not an IP address"},
		{"mapped peer", sub(good, `"peer":"198.51.100.1"`, `"peer":"::ffff:198.51.100.1"`), "tunnels[0].peer", "IPv4-mapped"},
		{"host bits", sub(good, `"172.16.1.0/24"`, `"172.16.1.1/24"`), "tunnels[0].subnets[0]", "host bits"},
		{"bad prefix", sub(good, `"172.16.1.0/24"`, `"172.16.1.0/33"`), "tunnels[0].subnets[0]", "not a prefix"},
		{"dup subnet", sub(good, `"172.16.1.0/24"`, `"172.16.1.0/24","172.16.1.0/24"`), "tunnels[0].subnets[1]", "twice"},
		{"sas vs spis", sub(good, `"sas":2,"bytes"`, `"sas":3,"bytes"`), "tunnels[0].spis", "3 SAs"},
		{"spi dir", sub(good, `"dir":"in"`, `"dir":"sideways"`), "tunnels[0].spis[0].dir", "not in or out"},
		{"spi proto", sub(good, `"proto":"esp"`, `"proto":"comp"`), "tunnels[0].spis[0].proto", "not esp or ah"},
		{"spi 0", sub(good, `"spi":3221225473`, `"spi":0`), "tunnels[0].spis[0].spi", "SPI 0"},
		{"spi overflow", sub(good, `"spi":3221225473`, `"spi":4294967296`), "tunnels[0].spis[0].spi", "from 0 to 4294967295"},
		{"summary", sub(good, `"tunnels":1`, `"tunnels":2`), "summary", "says 2 tunnels"},
		{"full with removed", sub(good, `"tunnels":[`, `"removed":["198.51.100.2"],"tunnels":[`), "removed", "full report carries no removed"},
		{"heartbeat with tunnels", sub(hb, `"summary"`, `"tunnels":[],"summary"`), "tunnels", "heartbeat carries no tunnels"},
		{"full without tunnels", sub(hb, `"heartbeat"`, `"full"`), "tunnels", "must carry tunnels"},
		{"empty delta", sub(hb, `"heartbeat"`, `"delta"`), "tunnels", "empty delta"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode(strings.NewReader(c.body), Limits{})
			var e *Error
			if !errors.As(err, &e) {
				t.Fatalf("got %v, want an *Error", err)
			}
			if e.Field != c.field || !strings.Contains(e.Msg, c.msg) {
				t.Fatalf("got field %q msg %q (%v); want field %q and %q", e.Field, e.Msg, err, c.field, c.msg)
			}
		})
	}
}

func TestDecodeLimits(t *testing.T) {
	many := full("n", 1, tunnel("198.51.100.1"), tunnel("198.51.100.2"), tunnel("198.51.100.3"))
	b := mustMarshal(t, many)
	if _, err := Decode(bytes.NewReader(b), Limits{MaxBytes: int64(len(b) - 1)}); !errors.Is(err, ErrTooLarge) {
		t.Fatalf("body over the limit: %v", err)
	}
	_, err := Decode(bytes.NewReader(b), Limits{MaxTunnels: 2})
	var e *Error
	if !errors.As(err, &e) || e.Field != "tunnels[2]" || e.Offset <= 0 || !strings.Contains(e.Msg, "more than 2") {
		t.Fatalf("three tunnels with a limit of two: %v", err)
	}
	if !strings.HasPrefix(string(b[e.Offset:]), `{"peer":"198.51.100.3"`) {
		t.Fatalf("offset %d points at %.30q, want the third tunnel", e.Offset, b[e.Offset:])
	}
	if _, err := Decode(bytes.NewReader(b), Limits{MaxSAs: 1}); err == nil || !strings.Contains(err.Error(), "tunnels[0].spis[1]") {
		t.Fatalf("SA limit: %v", err)
	}
}

// TestInbox steps a node's inbox through a session, a lost delta, a
// retry, a restart of the agent and a report for another node.
func TestInbox(t *testing.T) {
	in := NewInbox()
	now := time.Unix(1000, 0)
	a, b := tunnel("198.51.100.1", "172.16.1.0/24"), tunnel("198.51.100.2", "172.16.2.0/24")
	delta := func(seq uint64, ts []xfrm.Tunnel, removed ...string) *Report {
		r := &Report{Version: Version, Kind: KindDelta, Node: "n1", Session: session, Seq: seq, Sent: now, Tunnels: ts}
		for _, s := range removed {
			r.Removed = append(r.Removed, netip.MustParseAddr(s))
		}
		return r
	}
	hb := func(sess string, seq uint64) *Report {
		return &Report{Version: Version, Kind: KindHeartbeat, Node: "n1", Session: sess, Seq: seq, Sent: now}
	}
	step := func(name string, r *Report, wantAck Ack, wantUp, wantRm int) Change {
		t.Helper()
		ack, ch, err := in.Accept("n1", r, now)
		if err != nil || ack != wantAck || len(ch.Upserts) != wantUp || len(ch.Removed) != wantRm {
			t.Fatalf("%s: ack %+v change %+v err %v; want ack %+v, %d upserts, %d removed", name, ack, ch, err, wantAck, wantUp, wantRm)
		}
		return ch
	}
	step("heartbeat before any full", hb(session, 1), Ack{NeedFull: true}, 0, 0)
	step("delta before any full", delta(1, []xfrm.Tunnel{a}), Ack{NeedFull: true}, 0, 0)
	if ch := step("full", full("n1", 1, a), Ack{}, 1, 0); !ch.Full {
		t.Fatal("full report change not marked Full")
	}
	step("delta 2", delta(2, []xfrm.Tunnel{b}), Ack{}, 1, 0)
	step("delta 2 again (retry)", delta(2, []xfrm.Tunnel{b}), Ack{}, 0, 0)
	step("heartbeat in step", hb(session, 2), Ack{}, 0, 0)
	step("delta 4 (3 was lost)", delta(4, nil, "198.51.100.1"), Ack{NeedFull: true}, 0, 0)
	step("heartbeat behind", hb(session, 4), Ack{NeedFull: true}, 0, 0)
	n, _ := in.Node("n1")
	if len(n.Tunnels) != 2 || n.Seq != 2 {
		t.Fatalf("after the refused delta: %d tunnels at seq %d, want 2 at 2", len(n.Tunnels), n.Seq)
	}
	// The agent restarted: new session, full report without a.
	restarted := full("n1", 1, b)
	restarted.Session = strings.Repeat("f", 32)
	ch := step("full of a new session", restarted, Ack{}, 1, 1)
	if ch.Removed[0] != a.Peer {
		t.Fatalf("removed %v, want %v", ch.Removed, a.Peer)
	}
	step("old session's heartbeat", hb(session, 2), Ack{NeedFull: true}, 0, 0)
	if _, _, err := in.Accept("n2", full("n1", 1, a), now); !errors.Is(err, ErrWrongNode) {
		t.Fatalf("report for n1 with n2's token: %v", err)
	}
	if n, _ := in.Node("n1"); len(n.Tunnels) != 1 || n.LastSeen != now {
		t.Fatalf("n1 after n2's attempt: %+v", n)
	}
}

// FuzzDecode feeds arbitrary bodies to the strict decoder: it must never
// panic, and what it accepts must pass Validate and survive a round trip
// unchanged.
func FuzzDecode(f *testing.F) {
	nat := tunnel("203.0.113.5", "192.168.7.0/24")
	nat.NATT = []xfrm.NATT{{Port: 31337, LocalPort: 4500}}
	for _, r := range []*Report{
		full("node-1", 1, tunnel("198.51.100.1", "172.16.1.0/24"), tunnel("2001:db8::1", "fd00::/8"), nat),
		{Version: Version, Kind: KindDelta, Node: "n", Session: session, Seq: 2, Sent: time.Unix(5, 0),
			Removed: []netip.Addr{netip.MustParseAddr("198.51.100.1")}},
		{Version: Version, Kind: KindHeartbeat, Node: "n", Session: session, Seq: 2, Sent: time.Unix(5, 0)},
	} {
		b, _ := Marshal(r)
		f.Add(b)
	}
	f.Add([]byte(`{"version":1,"version":1}`))
	f.Add([]byte(`{"tunnels":[{"spis":[{"spi":1e99}]}]}`))
	lim := Limits{MaxBytes: 1 << 16, MaxTunnels: 16, MaxSubnets: 8, MaxSAs: 8, MaxNATT: 4}
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := Decode(bytes.NewReader(b), lim)
		if err != nil {
			var e *Error
			if !errors.As(err, &e) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("error of type %T: %v", err, err)
			}
			if e != nil && e.Offset > int64(len(b)) {
				t.Fatalf("offset %d beyond the body (%d bytes): %v", e.Offset, len(b), err)
			}
			return
		}
		if err := Validate(r, lim); err != nil {
			t.Fatalf("accepted report fails Validate: %v", err)
		}
		again, err := Decode(bytes.NewReader(mustMarshal(t, r)), lim)
		if err != nil {
			t.Fatalf("re-encoded report refused: %v", err)
		}
		if !reflect.DeepEqual(again.Tunnels, r.Tunnels) || again.Seq != r.Seq || !again.Sent.Equal(r.Sent) {
			t.Fatalf("round trip changed the report:\n%+v\n%+v", r, again)
		}
	})
}

// TestHandlerStatuses checks the endpoint's answers: every refusal has
// its status, its reason in the director API's error shape, and is
// counted through Refused.
func TestHandlerStatuses(t *testing.T) {
	in := NewInbox()
	master := true
	var refused []int
	h := Handler(HandlerOptions{
		Authenticate: Tokens(map[string]string{"n1": "tok1", "n2": "tok2", "gone": "tok4"}),
		Accept: func(node string, r *Report) (Ack, error) {
			if node == "gone" {
				return Ack{}, fmt.Errorf("%w: node gone (remove its token)", ErrUnknownNode)
			}
			if !master {
				return Ack{}, fmt.Errorf("%w: director 2 is the backup", ErrNotMaster)
			}
			ack, _, err := in.Accept(node, r, time.Now())
			return ack, err
		},
		Limits:  Limits{MaxBytes: 4096},
		Refused: func(_ string, status int, _ error) { refused = append(refused, status) },
	})
	good := mustMarshal(t, full("n1", 1, tunnel("198.51.100.1", "172.16.1.0/24")))
	big := mustMarshal(t, full("n1", 1, tunnel("198.51.100.1"), tunnel("198.51.100.2"), tunnel("198.51.100.3"),
		tunnel("198.51.100.4"), tunnel("198.51.100.5"), tunnel("198.51.100.6"), tunnel("198.51.100.7"), tunnel("198.51.100.8"),
		tunnel("198.51.100.9"), tunnel("198.51.100.10"), tunnel("198.51.100.11"), tunnel("198.51.100.12"), tunnel("198.51.100.13"),
		tunnel("198.51.100.14"), tunnel("198.51.100.15"), tunnel("198.51.100.16"), tunnel("198.51.100.17"), tunnel("198.51.100.18"),
		tunnel("198.51.100.19"), tunnel("198.51.100.20")))
	post := func(method, token string, body []byte) (int, string) {
		req := httptest.NewRequest(method, Path, bytes.NewReader(body))
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		w := httptest.NewRecorder()
		h.ServeHTTP(w, req)
		return w.Code, w.Body.String()
	}
	cases := []struct {
		name   string
		method string
		token  string
		body   []byte
		master bool
		status int
		text   string
	}{
		{"accepted", "POST", "tok1", good, true, 200, `"need_full":false`},
		{"no token", "POST", "", good, true, 401, "missing or unknown node token"},
		{"unknown token", "POST", "tok3", good, true, 401, "missing or unknown node token"},
		{"another node's token", "POST", "tok2", good, true, 403, `names node \"n1\", its token belongs to \"n2\"`},
		{"node not in the table", "POST", "tok4", mustMarshal(t, full("gone", 1)), true, 403, "not in the director's table"},
		{"too large", "POST", "tok1", big, true, 413, "too large"},
		{"malformed", "POST", "tok1", []byte(`{"version":1,"version":1}`), true, 422, "duplicate key"},
		{"backup", "POST", "tok1", good, false, 409, "backup"},
		{"GET", "GET", "tok1", nil, true, 405, "POST only"},
	}
	for _, c := range cases {
		master = c.master
		status, body := post(c.method, c.token, c.body)
		if status != c.status || !strings.Contains(body, c.text) {
			t.Errorf("%s: %d %s; want %d and %q", c.name, status, body, c.status, c.text)
		}
		if status != 200 && !strings.Contains(body, `"refused":true`) {
			t.Errorf("%s: error body %s lacks refused:true", c.name, body)
		}
	}
	if len(refused) != len(cases)-1 {
		t.Errorf("Refused called %d times for %d refusals: %v", len(refused), len(cases)-1, refused)
	}
}

// TestInboxHolders: the director's merge reads a peer's holders across
// nodes, a node's peers and its summary without copying its tunnels.
func TestInboxHolders(t *testing.T) {
	in := NewInbox()
	now := time.Now()
	if _, _, err := in.Accept("n2", full("n2", 1, tunnel("198.51.100.1", "172.16.1.0/24"), tunnel("198.51.100.2")), now); err != nil {
		t.Fatal(err)
	}
	if _, _, err := in.Accept("n1", full("n1", 1, tunnel("198.51.100.1", "172.16.9.0/24")), now); err != nil {
		t.Fatal(err)
	}
	h := in.Holders(netip.MustParseAddr("198.51.100.1"))
	if len(h) != 2 || h[0].Node != "n1" || h[1].Node != "n2" || h[0].Tunnel.Subnets[0] != netip.MustParsePrefix("172.16.9.0/24") {
		t.Fatalf("holders %+v", h)
	}
	if h := in.Holders(netip.MustParseAddr("198.51.100.9")); len(h) != 0 {
		t.Fatalf("holders of an unknown peer: %+v", h)
	}
	if p := in.Peers("n2"); len(p) != 2 {
		t.Fatalf("peers of n2: %v", p)
	}
	s, ok := in.Summary("n2")
	if !ok || s.Tunnels != nil || s.Seq != 1 || !s.LastFull.Equal(now) {
		t.Fatalf("summary %+v %v", s, ok)
	}
	in.Reset()
	if len(in.Nodes()) != 0 || in.Peers("n2") != nil {
		t.Fatal("reset kept nodes")
	}
}
