package store

import (
	"fmt"
	"net/netip"
	"strings"

	bolt "go.etcd.io/bbolt"
)

// The store remembers the director's VIPs, so that the invariant "no
// protected subnet contains a VIP" holds on every path that changes the
// table: the daemon (which knows them from its configuration and stores
// them with SetVIPs) and the offline CLI (--db), which has no
// configuration and takes them from the store. Without them an offline
// import could accept a subnet containing a VIP that the daemon would
// then refuse to load.

var keyVIPs = []byte("vips")

// storedVIPs reads the VIPs the daemon last stored (none for a store no
// daemon has run on).
func storedVIPs(tx *bolt.Tx) ([]netip.Addr, error) {
	v := tx.Bucket(bucketMeta).Get(keyVIPs)
	if len(v) == 0 {
		return nil, nil
	}
	var out []netip.Addr
	for _, f := range strings.Fields(string(v)) {
		a, err := netip.ParseAddr(f)
		if err != nil {
			return nil, fmt.Errorf("bucket meta: stored VIP %q: %v", shortKey([]byte(f)), err)
		}
		out = append(out, a)
	}
	return out, nil
}

// SetVIPs sets the table's VIPs (refused when a stored tunnel conflicts
// with one) and stores them for the offline CLI.
func (s *Store) SetVIPs(vips []netip.Addr) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.table.SetVIPs(vips); err != nil {
		return err
	}
	if s.readOnly {
		return nil
	}
	var b strings.Builder
	for _, v := range vips {
		b.WriteString(v.String())
		b.WriteByte('\n')
	}
	err := s.db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketMeta).Put(keyVIPs, []byte(b.String())) })
	if err != nil {
		return fmt.Errorf("store VIPs in %s: %w", s.path, err)
	}
	return nil
}
