package replication_test

import (
	"context"
	"log"
	"log/slog"
	"net/netip"

	"github.com/tunneldirector/tunneldirector/director/replication"
	"github.com/tunneldirector/tunneldirector/store"
)

// Wiring a director's store to its peer over the sync link; keepalived's
// notify script then calls SetRole.
func Example() {
	st, err := store.Open(store.Options{Path: "/var/lib/tunneldirector/table.db"})
	if err != nil {
		log.Fatal(err)
	}
	defer st.Close()
	link, err := replication.ListenUDP(replication.UDPConfig{
		Local: netip.MustParseAddrPort("192.0.2.1:7788"),
		Peer:  netip.MustParseAddrPort("192.0.2.2:7788"),
	})
	if err != nil {
		log.Fatal(err)
	}
	defer link.Close()
	r, err := replication.New(replication.Config{
		ID: 1, Key: []byte("shared secret of at least 16 bytes"),
		Store: st, Transport: link, Logger: slog.Default(),
	})
	if err != nil {
		log.Fatal(err)
	}
	go r.Run(context.Background())

	r.SetRole(replication.RoleMaster) // from `tunneldirector ctl role master`
	// Writes go to st.Commit on the master; the backup follows.
	s := r.Status()
	log.Printf("%s epoch %d: peer %d at revision %d, lag %d revisions, %s, tables equal: %v",
		s.Role, s.Epoch, s.Peer.ID, s.Peer.Revision, s.LagRevisions, s.State, s.TablesEqual)
}
