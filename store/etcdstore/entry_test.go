package etcdstore

import (
	"bytes"
	"testing"
)

// FuzzEntry decodes arbitrary log entries and snapshot pointers (what a
// foreign writer or a damaged key could hold): never a panic, and what
// decodes re-encodes to the same bytes.
func FuzzEntry(f *testing.F) {
	for _, e := range []entry{{Prev: 7, Inline: []byte{1, 2, 3}}, {Prev: 1 << 40, Stage: "00000000000000000042-abcdef", Chunks: 3}} {
		f.Add(e.marshal())
	}
	p := snapPtr{Rev: 99, ID: "00000000000000000099-abc", Chunks: 2}
	f.Add(p.marshal())
	f.Add([]byte("TDL1"))
	f.Add([]byte("TDS1\x00\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if e, err := unmarshalEntry(b); err == nil && !bytes.Equal(e.marshal(), b) {
			t.Fatalf("entry %x decodes to %+v, which encodes to %x", b, e, e.marshal())
		}
		if p, err := unmarshalSnap(b); err == nil && !bytes.Equal(p.marshal(), b) {
			t.Fatalf("snapshot pointer %x decodes to %+v, which encodes to %x", b, p, p.marshal())
		}
	})
}

// FuzzParseURL: a store location never panics the parser, and what parses
// prints back to a location that parses the same.
func FuzzParseURL(f *testing.F) {
	for _, s := range []string{"etcd://10.0.0.1:2379,10.0.0.2:2379/tunneldirector/farm1", "etcd://[2001:db8::1]:2379/x", "etcd://h:0/x", "etcd:///x", "etcd://h:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseURL(s)
		if err != nil {
			return
		}
		again, err := ParseURL(l.String())
		if err != nil || again.String() != l.String() {
			t.Fatalf("%q parses to %q, which parses to %q (%v)", s, l.String(), again.String(), err)
		}
	})
}

func TestParseURL(t *testing.T) {
	l, err := ParseURL("etcd://10.0.0.1:2379,etcd-b:2379/tunneldirector/farm1/")
	if err != nil || len(l.Endpoints) != 2 || l.Prefix != "/tunneldirector/farm1/" {
		t.Fatalf("%+v %v", l, err)
	}
	for _, bad := range []string{"etcd://10.0.0.1:2379", "etcd://10.0.0.1/x", "etcd://10.0.0.1:99999/x", "http://x:1/y", "etcd://a:1/x y"} {
		if _, err := ParseURL(bad); err == nil {
			t.Errorf("%q accepted", bad)
		}
	}
	var c Config
	if errs := c.Validate("/var/lib/td.db"); len(errs) != 0 {
		t.Fatal(errs)
	}
	c.Cache = "/x"
	if errs := c.Validate("/var/lib/td.db"); len(errs) != 1 {
		t.Fatalf("an etcd section with a bbolt store: %v", errs)
	}
	c = Config{CertFile: "/nonexistent.crt"}
	errs := c.Validate("etcd://h:1/x")
	if len(errs) != 2 {
		t.Fatalf("cert without key: %v", errs)
	}
}
