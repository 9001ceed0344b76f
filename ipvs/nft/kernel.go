package nft

import (
	"fmt"
	"net/netip"
	"time"

	"github.com/google/nftables"
	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Kernel is the director's table in one network namespace.
type Kernel interface {
	// Read dumps the table.
	Read() (*State, error)
	// ReadMeta reads the table without the elements of the peer and
	// subnet maps (a million tunnels' worth takes minutes to dump): their
	// Digest as the director last committed it is in State.Stored.
	ReadMeta() (*State, error)
	// ReadInBackground dumps the table on connections of its own, so
	// transactions go on while a million elements are read; the result
	// arrives on the channel.
	ReadInBackground() <-chan ReadResult
	// Confirm asks for the given peers and subnets one by one (a dump
	// that ran across transactions, State.Interrupted, may have missed
	// some) and returns the ones the kernel holds, with their values.
	Confirm(peers []netip.Addr, subnets []netip.Prefix) (PeerMap, SubnetMap, error)
	// Apply runs p as one transaction.
	Apply(p *Plan) error
	// DeleteTable removes the table (and nothing else); no table is fine.
	DeleteTable() error
	// Gen returns the ruleset generation (NFT_MSG_GETGEN): every
	// committed nftables transaction in the namespace, anyone's, moves it
	// on, so an unchanged generation proves the table unchanged without
	// reading it.
	Gen() (uint32, error)
	Close() error
}

// ReadResult is what a background read found.
type ReadResult struct {
	State *State
	Err   error
	// Took is how long the read ran.
	Took time.Duration
}

type kernel struct {
	table string
	ns    netns.NsHandle
	nft   *nftables.Conn // reads (dumps)
	tx    *transport
	wr    *nftables.Conn // table deletion, through tx
}

// batchBuf is the socket buffer for batches: a full load of 200,000
// elements is one sendmsg of several MB, which the kernel refuses
// (EMSGSIZE) above the socket's send buffer.
const batchBuf = 256 << 20

func forceBuffers(c *mdnl.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	err = rc.Control(func(fd uintptr) {
		if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, batchBuf); e != nil {
			serr = fmt.Errorf("SO_SNDBUFFORCE: %w", e)
			return
		}
		if e := unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 32<<20); e != nil {
			serr = fmt.Errorf("SO_RCVBUFFORCE: %w", e)
		}
	})
	if err != nil {
		return err
	}
	return serr
}

// Open connects to nftables in network namespace ns (0: the caller's) for
// the table named table (family inet).
func Open(table string, ns netns.NsHandle) (Kernel, error) {
	k := &kernel{table: table, ns: ns}
	opts := []nftables.ConnOption{nftables.AsLasting(), nftables.WithSockOptions(forceBuffers)}
	fd := 0
	if ns > 0 {
		opts = append(opts, nftables.WithNetNSFd(int(ns)))
		fd = int(ns)
	}
	var err error
	if k.nft, err = nftables.New(opts...); err != nil {
		return nil, fmt.Errorf("open nftables connection: %w", err)
	}
	if k.tx, err = dialTransport(fd); err != nil {
		k.Close()
		return nil, err
	}
	if k.wr, err = k.tx.conn(); err != nil {
		k.Close()
		return nil, err
	}
	return k, nil
}

func (k *kernel) Close() error {
	var err error
	if k.nft != nil {
		err = k.nft.CloseLasting()
	}
	if k.tx != nil {
		if e := k.tx.close(); err == nil {
			err = e
		}
	}
	return err
}

func (k *kernel) Read() (*State, error) { return k.read(true) }

func (k *kernel) ReadMeta() (*State, error) { return k.read(false) }

func (k *kernel) ReadInBackground() <-chan ReadResult {
	ch := make(chan ReadResult, 1)
	go func() {
		start := time.Now()
		r, err := Open(k.table, k.ns)
		if err != nil {
			ch <- ReadResult{Err: fmt.Errorf("background read: %w", err), Took: time.Since(start)}
			return
		}
		defer r.Close()
		s, err := r.Read()
		ch <- ReadResult{State: s, Err: err, Took: time.Since(start)}
	}()
	return ch
}

func (k *kernel) read(withMaps bool) (*State, error) {
	k.tx.interrupted = false
	s, err := read(k.nft, k.table, withMaps, func(s *nftables.Set) ([]nftables.SetElement, error) {
		return k.tx.dumpElems(s.Table.Name, s.Name)
	})
	if err != nil {
		return nil, fmt.Errorf("read nftables table %s: %w", k.table, err)
	}
	s.Interrupted = k.tx.interrupted
	return s, nil
}

func (k *kernel) Confirm(peers []netip.Addr, subnets []netip.Prefix) (PeerMap, SubnetMap, error) {
	var pm PeerMap
	var sm SubnetMap
	byPeerSet := map[bool][][]byte{}
	for _, a := range peers {
		byPeerSet[a.Is6()] = append(byPeerSet[a.Is6()], a.AsSlice())
	}
	n := newNames(k.table)
	for v6, keys := range byPeerSet {
		name := n.fams[b2i(v6)].peers.Name
		found, err := k.tx.getElems(k.table, name, keys)
		if err != nil {
			return pm, sm, fmt.Errorf("confirm peers in map %s: %w", name, err)
		}
		for key, val := range found {
			if a, ok := netip.AddrFromSlice([]byte(key)); ok {
				pm.Set(a, markOf(val))
			}
		}
	}
	byLen := map[Len][][]byte{}
	for _, p := range subnets {
		byLen[LenOf(p)] = append(byLen[LenOf(p)], p.Addr().AsSlice())
	}
	for l, keys := range byLen {
		found, err := k.tx.getElems(k.table, l.SetName(), keys)
		if err != nil {
			return pm, sm, fmt.Errorf("confirm subnets in map %s: %w", l.SetName(), err)
		}
		for key, val := range found {
			if a, ok := netip.AddrFromSlice([]byte(key)); ok {
				sm.Set(netip.PrefixFrom(a, l.Bits), markOf(val))
			}
		}
	}
	return pm, sm, nil
}

func (k *kernel) Apply(p *Plan) error {
	// A fresh connection per transaction: a half-built batch (build
	// failed) is then dropped with it instead of being sent later.
	c, err := k.tx.conn()
	if err != nil {
		return err
	}
	var h *chainHandles
	if len(p.AddLens)+len(p.DelLens) > 0 && !p.Chain && !p.Recreate {
		if h, err = k.chainHandles(); err != nil {
			return err
		}
	}
	tail, err := build(c, k.table, p, h)
	if err != nil {
		return err
	}
	if err := k.tx.flush(c, tail); err != nil {
		return fmt.Errorf("nftables transaction on table %s: %w", k.table, err)
	}
	return nil
}

// chainHandles reads the handles of the chain's rules: a length that
// appears gets its rule before the last rule and one that goes takes its
// rule with it, and rules are placed and deleted by handle, which only the
// kernel knows (a few dozen rules to read).
func (k *kernel) chainHandles() (*chainHandles, error) {
	n := newNames(k.table)
	rules, err := k.nft.GetRules(n.table, n.chain)
	if err != nil {
		return nil, fmt.Errorf("list rules of chain %s: %w", chainName, err)
	}
	return handlesOf(rules), nil
}

func (k *kernel) DeleteTable() error {
	tables, err := k.nft.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return err
	}
	for _, t := range tables {
		if t.Name == k.table {
			k.wr.DelTable(t)
			return k.wr.Flush()
		}
	}
	return nil
}

func (k *kernel) Gen() (uint32, error) { return k.tx.gen() }
