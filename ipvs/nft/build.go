package nft

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"
	mdnl "github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Names of the director's nftables objects.
const (
	chainName   = "prerouting"
	hashMapName = "nodehash"
	// digestSetName holds the maps' Digest (a table without it, from a
	// director before it, is recreated in one transaction).
	digestSetName = "digest"
)

// LearnInterval is how often the classifier logs the same unknown peer: its
// first packet, then at most one per interval while it stays unknown (the
// daemon pins it at the first, so normally once).
const LearnInterval = 5 * time.Second

// LogSnaplen is how much of a logged packet the kernel copies: an IPv6
// header and the UDP ports.
const LogSnaplen = 48

// windowSize bounds each family's map of unknown peers seen in the last
// LearnInterval; when it is full, further unknown peers are still steered
// by their bucket but neither kept in it nor logged until entries expire.
const windowSize = 65536

// MaxHash bounds the unknown-peer hash map (the bucket count).
const MaxHash = 65536

// elemChunk bounds the elements per NEWSETELEM message: the element list is
// one netlink attribute, whose length is 16 bits, so 100,000 elements must
// be spread over many messages (all in the same batch).
const elemChunk = 1000

type famSets struct {
	v6          bool
	vips, peers *nftables.Set
	// window maps the unknown peers logged in the last LearnInterval to
	// the mark their first packet got: a peer is logged once per
	// interval, not once per packet, and until its pin reaches the peer
	// map its packets keep the first one's node even when its bucket
	// changes meanwhile (the pin window, closed in the kernel).
	window *nftables.Set
}

type nftNames struct {
	table  *nftables.Table
	fams   [2]famSets
	hash   *nftables.Set
	digest *nftables.Set
	chain  *nftables.Chain
}

// newNames returns fresh set descriptors: google/nftables assigns batch IDs
// into them, so they must not be shared between transactions.
func newNames(name string) *nftNames {
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: name}
	n := &nftNames{table: t}
	for i, v6 := range []bool{false, true} {
		kt, sfx := nftables.TypeIPAddr, "4"
		if v6 {
			kt, sfx = nftables.TypeIP6Addr, "6"
		}
		n.fams[i] = famSets{
			v6:    v6,
			vips:  &nftables.Set{Table: t, Name: "vips" + sfx, KeyType: kt, KeyByteOrder: binaryutil.BigEndian},
			peers: &nftables.Set{Table: t, Name: peerSetName(v6), IsMap: true, KeyType: kt, KeyByteOrder: binaryutil.BigEndian, DataType: nftables.TypeMark},
			window: &nftables.Set{Table: t, Name: "window" + sfx, IsMap: true, KeyType: kt, KeyByteOrder: binaryutil.BigEndian,
				DataType: nftables.TypeMark, Dynamic: true, HasTimeout: true, Timeout: LearnInterval, Size: windowSize},
		}
	}
	// The hash map's key is the hash register (host order); typed as a
	// mark so nft(8) can print it.
	n.hash = &nftables.Set{Table: t, Name: hashMapName, IsMap: true, KeyType: nftables.TypeMark,
		KeyByteOrder: binaryutil.NativeEndian, DataType: nftables.TypeMark}
	// The digest set holds one element, the Digest of the peer and
	// subnet maps as of the director's last transaction; a 16-byte key
	// type, so nft(8) lists it as an IPv6 address.
	n.digest = &nftables.Set{Table: t, Name: digestSetName, KeyType: nftables.TypeIP6Addr, KeyByteOrder: binaryutil.BigEndian}
	n.chain = &nftables.Chain{Name: chainName, Table: t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle}
	return n
}

// fam returns the sets of a's family.
func (n *nftNames) fam(a netip.Addr) *famSets {
	if a.Is4() {
		return &n.fams[0]
	}
	return &n.fams[1]
}

func (n *nftNames) allSets() []*nftables.Set {
	var out []*nftables.Set
	for _, f := range n.fams {
		out = append(out, f.vips, f.peers, f.window)
	}
	return append(out, n.hash, n.digest)
}

// subnetSet describes the exact-match map of one prefix length: key the
// masked destination (network order), data the owner's mark.
func (n *nftNames) subnetSet(l Len) *nftables.Set {
	kt := nftables.TypeIPAddr
	if l.V6 {
		kt = nftables.TypeIP6Addr
	}
	return &nftables.Set{Table: n.table, Name: l.SetName(), IsMap: true, KeyType: kt,
		KeyByteOrder: binaryutil.BigEndian, DataType: nftables.TypeMark}
}

// legacySets are the interval maps of the layout before per-length maps; a
// table that still has them is recreated (in one transaction) so no stale
// map is left behind.
var legacySets = []string{"subnets4", "subnets6"}

// prefixMask returns the netmask of l as a byte string of the address
// length.
func prefixMask(l Len) []byte {
	n := 4
	if l.V6 {
		n = 16
	}
	m := make([]byte, n)
	for i := 0; i < l.Bits; i++ {
		m[i/8] |= 0x80 >> (i % 8)
	}
	return m
}

// ipHeader is where a family's packet header keeps what the classifier
// reads: the nfproto value and the offsets of the source and destination
// addresses, and their length.
func ipHeader(v6 bool) (nfproto byte, soff, doff, alen uint32) {
	if v6 {
		return unix.NFPROTO_IPV6, 8, 24, 16
	}
	return unix.NFPROTO_IPV4, 12, 16, 4
}

// markOf decodes a map's data: a mark as the kernel's meta mark register
// holds it, in host byte order (elemWriter writes it so).
func markOf(b []byte) uint32 {
	if len(b) != 4 {
		return 0
	}
	return binaryutil.NativeEndian.Uint32(b)
}

// chainHandles are the handles of the chain's rules that a plan adding or
// deleting subnet lengths without a rebuild needs: the last rule (new
// lengths' rules go before it) and each length's rule. ok says the chain
// is wholly the director's (chainSignature); otherwise, or when a handle
// is missing, the chain is rebuilt.
type chainHandles struct {
	ok   bool
	last uint64
	lens map[Len]uint64
}

// handlesOf reads chainHandles from the chain's rules.
func handlesOf(rules []*nftables.Rule) *chainHandles {
	h := &chainHandles{ok: chainSignature(rules).Version != 0, lens: map[Len]uint64{}}
	for _, r := range rules {
		if t, ok := ruleTagOf(r); ok && t.Len != nil {
			h.lens[*t.Len] = r.Handle
		}
	}
	if len(rules) > 0 {
		h.last = rules[len(rules)-1].Handle
	}
	return h
}

// usable reports whether h has every handle p needs, and no rule yet for a
// length p adds (the kernel holding what the model lacks is drift: the
// chain is rebuilt rather than given a second rule for the length).
func (h *chainHandles) usable(p *Plan) bool {
	if h == nil || !h.ok || h.last == 0 && len(p.AddLens) > 0 {
		return false
	}
	for _, l := range p.AddLens {
		if h.lens[l] != 0 {
			return false
		}
	}
	for _, l := range p.DelLens {
		if h.lens[l] == 0 {
			return false
		}
	}
	return true
}

// build queues plan p's structure (table, maps, chain) on c for table and
// returns its element changes, set flushes and deletions as the messages
// that follow c's in the same transaction (elemWriter). h holds the
// chain's handles when p adds or deletes lengths without rebuilding the
// chain (kernel.Apply reads them); without them the chain is rebuilt.
func build(c *nftables.Conn, table string, p *Plan, h *chainHandles) ([]mdnl.Message, error) {
	n := newNames(table)
	if p.Recreate {
		// add+delete+add: delete fails on a missing table, and the
		// whole batch must stay atomic.
		c.AddTable(n.table)
		c.DelTable(n.table)
		c.AddTable(n.table)
		for _, s := range n.allSets() {
			if size, ok := p.Sizes[s.Name]; ok {
				s.Size = size
			}
			if err := c.AddSet(s, nil); err != nil {
				return nil, fmt.Errorf("add set %s: %w", s.Name, err)
			}
		}
		c.AddChain(n.chain)
	}
	// Subnet maps: new ones before the rules that look them up (the rules
	// refer to them by the batch IDs AddSet assigns).
	subs := map[Len]*nftables.Set{}
	sub := func(l Len) *nftables.Set {
		if subs[l] == nil {
			subs[l] = n.subnetSet(l)
		}
		return subs[l]
	}
	for _, l := range p.AddLens {
		sub(l).Size = p.Sizes[l.SetName()]
		if err := c.AddSet(sub(l), nil); err != nil {
			return nil, fmt.Errorf("add set %s: %w", l.SetName(), err)
		}
	}
	switch {
	case p.Chain || len(p.AddLens)+len(p.DelLens) > 0 && !h.usable(p):
		if !p.Recreate {
			c.FlushChain(n.chain)
		}
		fixed := chainRules(p.Sig, n)
		base := p.Sig
		base.Lens = nil
		tag := func(i int) []byte {
			return userdata.AppendString(nil, userdata.TypeComment, ruleTag{Sig: base, I: i, N: len(fixed)}.encode())
		}
		// The last rule (the ct mark copy) goes after the subnet rules.
		for i, ex := range fixed[:len(fixed)-1] {
			c.AddRule(&nftables.Rule{Table: n.table, Chain: n.chain, Exprs: ex, UserData: tag(i)})
		}
		for _, l := range p.Sig.Lens {
			c.AddRule(lenRule(n, l, sub(l)))
		}
		c.AddRule(&nftables.Rule{Table: n.table, Chain: n.chain, Exprs: fixed[len(fixed)-1], UserData: tag(len(fixed) - 1)})
	default:
		// Lengths that appear get a rule of their own before the last
		// rule (subnets never overlap, so the order of the subnet rules
		// does not matter); those that go lose theirs, before their map
		// is deleted below. The other rules stay as they are.
		for _, l := range p.AddLens {
			r := lenRule(n, l, sub(l))
			r.Position = h.last
			c.InsertRule(r)
		}
		for _, l := range p.DelLens {
			if err := c.DelRule(&nftables.Rule{Table: n.table, Chain: n.chain, Handle: h.lens[l]}); err != nil {
				return nil, fmt.Errorf("delete the rule of map %s: %w", l.SetName(), err)
			}
		}
	}
	// Deletions before additions: a changed element is a delete and an add
	// of the same key in the same transaction.
	gone := map[Len]bool{}
	for _, l := range p.DelLens {
		gone[l] = true
	}
	w := &elemWriter{}
	key := newKeyBuf()
	// The peers' and subnets' elements, most of a large plan, are encoded
	// by elemWorkers writers side by side (see halves).
	var mu sync.Mutex
	hv := halves(p, n, gone, func(l Len) *nftables.Set { mu.Lock(); defer mu.Unlock(); return sub(l) })
	for _, a := range p.DelVIPs {
		w.elem(delSetElemType, n.fam(a).vips, key(a), 0, false)
	}
	var hk [4]byte
	for _, k := range p.DelHash {
		binary.NativeEndian.PutUint32(hk[:], k)
		w.elem(delSetElemType, n.hash, hk[:], 0, false)
	}
	w.end()
	parts := hv.wait()
	for _, part := range parts {
		w.msgs = append(w.msgs, part.dels...)
	}
	for _, a := range p.AddVIPs {
		w.elem(newSetElemType, n.fam(a).vips, key(a), 0, false)
	}
	for k, m := range p.AddHash {
		binary.NativeEndian.PutUint32(hk[:], k)
		w.elem(newSetElemType, n.hash, hk[:], m, true)
	}
	w.end()
	for _, part := range parts {
		w.msgs = append(w.msgs, part.adds...)
	}
	if p.Digest != nil {
		if !p.Recreate {
			w.setOp(delSetElemType, n.digest)
		}
		w.elem(newSetElemType, n.digest, p.Digest.bytes(), 0, false)
	}
	// Maps whose last subnet went: after the rules that used them went
	// above (the kernel refuses to delete a map in use).
	for _, l := range p.DelLens {
		w.setOp(delSetType, sub(l))
	}
	return w.done(), nil
}

// chainRules builds the classifier but for its subnet rules (lenRule), which
// go before its last rule (the copy of a new flow's mark to its ct mark,
// which packets a rule accepted do not reach). Per family, for each tunnel
// selector (ESP, AH, UDP 500, UDP 4500) to a VIP: a known peer gets its owner's mark from the
// peer map, an unknown one in its pin window the mark its first packet
// got, any other unknown one its bucket's node. In IPVS mode the IKE and
// NAT-T marks carry IKEBit so the fwmark rules leave them to the IPVS
// services.
func chainRules(sig Signature, n *nftNames) [][]expr.Any {
	var rules [][]expr.Any
	// Any ct expression makes the table depend on conntrack, which the NEW
	// event watcher needs; counting new flows is useful on its own.
	rules = append(rules, []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Counter{},
	})
	type sel struct {
		ike bool
		ex  []expr.Any
	}
	proto := func(p byte) []expr.Any {
		return []expr.Any{&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}}}
	}
	udp := func(port uint16) []expr.Any {
		return append(proto(unix.IPPROTO_UDP),
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)})
	}
	sels := []sel{{false, proto(unix.IPPROTO_ESP)}, {false, proto(unix.IPPROTO_AH)}, {true, udp(500)}, {true, udp(4500)}}
	for _, f := range n.fams {
		nfproto, soff, doff, alen := ipHeader(f.v6)
		head := func(s sel) []expr.Any {
			ex := []expr.Any{
				&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
				&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
			}
			ex = append(ex, s.ex...)
			return append(ex,
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: alen},
				&expr.Lookup{SourceRegister: 1, SetName: f.vips.Name, SetID: f.vips.ID},
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: soff, Len: alen},
			)
		}
		// tail sets the packet's mark from the node's fwmark in register
		// reg, with IKEBit for IKE and NAT-T in IPVS mode (computed into
		// register out, so reg keeps the plain fwmark).
		tail := func(s sel, reg, out uint32) []expr.Any {
			if !s.ike || sig.IKEBit == 0 {
				return []expr.Any{&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg}}
			}
			return []expr.Any{
				&expr.Bitwise{SourceRegister: reg, DestRegister: out, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(0xffffffff), Xor: binaryutil.NativeEndian.PutUint32(sig.IKEBit)},
				&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: out},
			}
		}
		for _, s := range sels {
			// A known peer gets its owner's mark and leaves the chain
			// (accept ends this base chain only): a map lookup that misses
			// ends the rule, so the next rule sees unknown peers only, and
			// no "not in map" test is needed (lookups on a map without a
			// destination register are refused by older kernels, such as
			// Debian's 6.12).
			ex := head(s)
			ex = append(ex, &expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: f.peers.Name, SetID: f.peers.ID})
			ex = append(ex, tail(s, 1, 1)...)
			rules = append(rules, append(ex, &expr.Verdict{Kind: expr.VerdictAccept}))
			if sig.HashN > 0 {
				// An unknown peer in its pin window (its first packet
				// less than LearnInterval ago): the first packet's
				// node, whatever its bucket says now.
				ex := head(s)
				ex = append(ex, &expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: f.window.Name, SetID: f.window.ID})
				ex = append(ex, tail(s, 1, 1)...)
				rules = append(rules, append(ex, &expr.Verdict{Kind: expr.VerdictAccept}))
				// An unknown peer's first packet: its bucket's node
				// (jhash of the address into HashN buckets, then the
				// bucket map), kept in the window map with its address,
				// and the packet goes to the NFLOG group the learner
				// reads. The mark is set before the window map is
				// filled: a full map still steers.
				ex = head(s)
				ex = append(ex,
					&expr.Hash{SourceRegister: 1, DestRegister: 2, Length: alen, Modulus: uint32(sig.HashN),
						Seed: EffectiveSeed(sig.Seed), Type: expr.HashTypeJenkins},
					&expr.Lookup{SourceRegister: 2, DestRegister: 2, IsDestRegSet: true, SetName: n.hash.Name, SetID: n.hash.ID},
				)
				ex = append(ex, tail(s, 2, 3)...)
				// The window keeps the plain fwmark, read back from
				// the packet: nft 1.0.6 (Debian 12) aborts listing
				// the chain when a dynset's data register holds a
				// map lookup's result.
				ex = append(ex, &expr.Meta{Key: expr.MetaKeyMARK, Register: 3})
				if s.ike && sig.IKEBit != 0 {
					ex = append(ex, &expr.Bitwise{SourceRegister: 3, DestRegister: 3, Len: 4,
						Mask: binaryutil.NativeEndian.PutUint32(^sig.IKEBit), Xor: binaryutil.NativeEndian.PutUint32(0)})
				}
				ex = append(ex,
					&expr.Dynset{SrcRegKey: 1, SrcRegData: 3, SetName: f.window.Name, SetID: f.window.ID, Operation: unix.NFT_DYNSET_OP_ADD},
					// Queue threshold 1: nfnetlink_log batches up to 100
					// packets or 1 s by default; the learner wants each
					// first packet at once.
					&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_SNAPLEN | 1<<unix.NFTA_LOG_QTHRESHOLD,
						Group: sig.LogGroup, Snaplen: LogSnaplen, QThreshold: 1},
				)
				rules = append(rules, ex)
			}
		}
	}
	// A new flow the classifier marked keeps the mark as its ct mark, so a
	// conntrack NEW event tells the director which node the kernel picked
	// for an unknown peer. Flows with other marks keep their ct mark.
	return append(rules, []expr.Any{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(expr.CtStateBitNEW), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 2, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(sig.RangeMask), Xor: binaryutil.NativeEndian.PutUint32(0)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 2, Data: binaryutil.NativeEndian.PutUint32(sig.MarkBase)},
		&expr.Ct{Key: expr.CtKeyMARK, SourceRegister: true, Register: 1},
	})
}

// lenRule is the classifier's rule of subnet length l, whose map is set:
// mask the destination to the length and look the network up in the map,
// so a packet to a protected subnet, unless it is addressed to the
// director itself, gets the owner's mark. Subnets never overlap, so at most
// one of these rules matches.
func lenRule(n *nftNames, l Len, set *nftables.Set) *nftables.Rule {
	nfproto, _, doff, alen := ipHeader(l.V6)
	ex := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: doff, Len: alen},
	}
	if l.Bits < int(alen)*8 {
		ex = append(ex, &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: alen,
			Mask: prefixMask(l), Xor: make([]byte, alen)})
	}
	ex = append(ex,
		&expr.Lookup{SourceRegister: 1, DestRegister: 1, IsDestRegSet: true, SetName: set.Name, SetID: set.ID},
		// Never the director's own addresses: a sync link or management
		// address inside a protected subnet would otherwise be
		// policy-routed to a node as return traffic. The kernel's fib
		// knows the local addresses as they change, so there is no set
		// to keep current; the lookup runs only for packets the map
		// matched.
		&expr.Fib{Register: 2, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 2, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: 1},
	)
	tag := ruleTag{Sig: Signature{Version: Layout}, Len: &l}
	return &nftables.Rule{Table: n.table, Chain: n.chain, Exprs: ex,
		UserData: userdata.AppendString(nil, userdata.TypeComment, tag.encode())}
}

// elemWorkers is how many writers encode a plan's peer and subnet
// elements side by side. A node failure at a million tunnels changes
// 437,000 elements (a delete and an add of each peer and subnet moved):
// 0.3 s of encoding on one core, while the director's other core idled.
const elemWorkers = 2

// elemHalf is what one writer encoded: its element deletions and its
// additions, kept apart so that every writer's deletions go before any
// writer's additions.
type elemHalf struct{ dels, adds []mdnl.Message }

// elemHalves are the writers encoding a plan's peers and subnets.
type elemHalves struct {
	wg    sync.WaitGroup
	parts [elemWorkers]elemHalf
}

func (h *elemHalves) wait() []elemHalf { h.wg.Wait(); return h.parts[:] }

// halves starts the writers of p's peer and subnet elements. Writer i
// takes the deletions at positions i, i+elemWorkers, ... and the
// additions whose key hashes to i (a map has no positions). sub returns
// a length's map and must be safe for concurrent use; the elements of
// the maps in gone are not deleted (the map goes with them).
func halves(p *Plan, n *nftNames, gone map[Len]bool, sub func(Len) *nftables.Set) *elemHalves {
	h := &elemHalves{}
	for i := range elemWorkers {
		h.wg.Go(func() {
			var dels, adds elemWriter
			key := newKeyBuf()
			for j, a := range p.DelPeers {
				if j%elemWorkers == i {
					dels.elem(delSetElemType, n.fam(a).peers, key(a), 0, false)
				}
			}
			for j, pf := range p.DelSubnets {
				if l := LenOf(pf); j%elemWorkers == i && !gone[l] {
					dels.elem(delSetElemType, sub(l), key(pf.Addr()), 0, false)
				}
			}
			for a, m := range p.AddPeers.All() {
				if k := key(a); keyWorker(k) == i {
					adds.elem(newSetElemType, n.fam(a).peers, k, m, true)
				}
			}
			for pf, m := range p.AddSubnets.All() {
				if k := key(pf.Addr()); keyWorker(k) == i {
					adds.elem(newSetElemType, sub(LenOf(pf)), k, m, true)
				}
			}
			h.parts[i] = elemHalf{dels.done(), adds.done()}
		})
	}
	return h
}

// keyWorker spreads keys over the writers by a hash of their bytes: the
// low bits of a subnet's address are zero, its high bits shared.
func keyWorker(k []byte) int {
	x := uint32(2166136261)
	for _, b := range k {
		x = (x ^ uint32(b)) * 16777619
	}
	return int(x % elemWorkers)
}

// newKeyBuf returns a function that writes an address as a set key (4 or
// 16 bytes) into a buffer of its own, valid until its next call.
func newKeyBuf() func(netip.Addr) []byte {
	var kb [16]byte
	return func(a netip.Addr) []byte {
		if a.Is4() {
			v := a.As4()
			copy(kb[:], v[:])
			return kb[:4]
		}
		kb = a.As16()
		return kb[:]
	}
}
