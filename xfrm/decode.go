package xfrm

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"unsafe"

	mdnl "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"
)

// attr is one netlink attribute of a message.
type attr struct {
	typ uint16
	val []byte
}

// parseAttrs splits a message's attributes with mdlayher/netlink's
// decoder, which checks every length (nl.ParseRouteAttr panics on an
// unpadded last attribute: the fuzz test found it). The type loses the
// nested and byte-order flag bits.
func parseAttrs(b []byte) ([]attr, error) {
	as, err := mdnl.UnmarshalAttributes(b)
	if err != nil {
		return nil, err
	}
	out := make([]attr, len(as))
	for i, a := range as {
		out[i] = attr{typ: a.Type & 0x3fff, val: a.Data}
	}
	return out, nil
}

// The XFRM messages are decoded here rather than through
// vishvananda/netlink's XfrmStateList/XfrmPolicyList parsers, on the
// library's own wire structs (package nl) and sockets, for three reasons
// checked on the host kernel and the library's v1.3.1 source:
//   - the library guesses an address's family from its bytes, so IPv6
//     selectors whose last 96 bits are zero come back as IPv4
//     (fd00::/8 as 253.0.0.0/8, 2001:db8::/32 as 32.1.13.184/32) and ::/0
//     as 0.0.0.0/0; the messages carry the family, and this decoder uses it;
//   - it drops XFRMA_LASTUSED, the kernel's "last used" time (the
//     lifetime's use_time is the first use; Debian's 6.x kernel in the VM
//     sets only the latter for outbound traffic, so both are read);
//   - its XfrmMonitor passes on expire messages only, while live changes
//     come as NEWSA/DELSA/UPDSA/NEWPOLICY/... on the SA and policy groups,
//     with the same bodies a dump has: one decoder serves both.

// xfrmaLastUsed is XFRMA_LASTUSED (u64 seconds); nl names the value but
// the attribute constants stop being iota-friendly past XFRMA_SEC_CTX.
const xfrmaLastUsed = 15

// sizeofUserPolexpire is xfrm_user_polexpire, which nl has no constant
// for: the policy info plus "hard", padded to 8 bytes.
const sizeofUserPolexpire = nl.SizeofXfrmUserpolicyInfo + 8

// load copies the first unsafe.Sizeof(*v) bytes of b into v. Copying (not
// casting, as nl's Deserialize functions do) keeps the value aligned
// whatever b's offset and lets the race detector's pointer checks pass.
func load[T any](v *T, b []byte, what string) error {
	n := int(unsafe.Sizeof(*v))
	if len(b) < n {
		return fmt.Errorf("%s: %d bytes, want at least %d", what, len(b), n)
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(v)), n), b[:n])
	return nil
}

// addr decodes an xfrm_address_t of the given address family.
func addr(a *nl.XfrmAddress, family uint16) (netip.Addr, error) {
	switch family {
	case unix.AF_INET:
		return netip.AddrFrom4([4]byte(a[:4])), nil
	case unix.AF_INET6:
		return netip.AddrFrom16(*a).Unmap(), nil
	}
	return netip.Addr{}, fmt.Errorf("address family %d is neither AF_INET nor AF_INET6", family)
}

// selector decodes a selector's remote and local prefixes. A selector of
// family AF_UNSPEC (states of some IKE daemons) has none.
func selector(s *nl.XfrmSelector) (src, dst netip.Prefix, err error) {
	if s.Family == unix.AF_UNSPEC {
		return netip.Prefix{}, netip.Prefix{}, nil
	}
	sa, err := addr(&s.Saddr, s.Family)
	if err != nil {
		return src, dst, fmt.Errorf("selector: %w", err)
	}
	da, _ := addr(&s.Daddr, s.Family)
	if int(s.PrefixlenS) > sa.BitLen() || int(s.PrefixlenD) > da.BitLen() {
		return src, dst, fmt.Errorf("selector: prefix lengths /%d and /%d exceed %d bits", s.PrefixlenS, s.PrefixlenD, sa.BitLen())
	}
	return netip.PrefixFrom(sa, int(s.PrefixlenS)).Masked(), netip.PrefixFrom(da, int(s.PrefixlenD)).Masked(), nil
}

// saFromInfo fills the fixed part of an SA from xfrm_usersa_info.
func saFromInfo(info *nl.XfrmUsersaInfo) (SA, error) {
	src, err := addr(&info.Saddr, info.Family)
	if err != nil {
		return SA{}, fmt.Errorf("state: %w", err)
	}
	dst, _ := addr(&info.Id.Daddr, info.Family)
	return SA{
		Src: src, Dst: dst, Proto: Proto(info.Id.Proto), SPI: nl.Swap32(info.Id.Spi),
		Reqid: info.Reqid, Mode: Mode(info.Mode), Larval: true,
		Bytes: info.Curlft.Bytes, Packets: info.Curlft.Packets, AddTime: info.Curlft.AddTime, UseTime: info.Curlft.UseTime,
	}, nil
}

// stateAttrs applies a state message's attributes to sa. family is the
// state's, for the NAT-OA address.
func stateAttrs(sa *SA, attrs []byte, family uint16) error {
	as, err := parseAttrs(attrs)
	if err != nil {
		return fmt.Errorf("state attributes: %w", err)
	}
	for _, a := range as {
		switch a.typ {
		case nl.XFRMA_ALG_AUTH, nl.XFRMA_ALG_CRYPT, nl.XFRMA_ALG_AEAD, nl.XFRMA_ALG_AUTH_TRUNC, nl.XFRMA_ALG_COMP:
			sa.Larval = false
		case nl.XFRMA_ENCAP:
			var e nl.XfrmEncapTmpl
			if err := load(&e, a.val, "XFRMA_ENCAP"); err != nil {
				return err
			}
			sa.Encap = Encap{Type: e.EncapType, SrcPort: nl.Swap16(e.EncapSport), DstPort: nl.Swap16(e.EncapDport)}
			if oa, err := addr(&e.EncapOa, family); err == nil && !oa.IsUnspecified() {
				sa.Encap.OriginalAddress = oa
			}
		case nl.XFRMA_MARK, nl.XFRMA_IF_ID:
			if err := markAttr(a, &sa.Mark, &sa.Ifid); err != nil {
				return err
			}
		case xfrmaLastUsed:
			if len(a.val) < 8 {
				return fmt.Errorf("XFRMA_LASTUSED: %d bytes, want 8", len(a.val))
			}
			sa.UseTime = max(sa.UseTime, binary.NativeEndian.Uint64(a.val))
		}
	}
	return nil
}

// markAttr decodes the attributes states and policies share, XFRMA_MARK
// into mark and XFRMA_IF_ID into ifid.
func markAttr(a attr, mark *Mark, ifid *uint32) error {
	switch a.typ {
	case nl.XFRMA_MARK:
		var m nl.XfrmMark
		if err := load(&m, a.val, "XFRMA_MARK"); err != nil {
			return err
		}
		*mark = Mark{Value: m.Value, Mask: m.Mask}
	case nl.XFRMA_IF_ID:
		if len(a.val) < 4 {
			return fmt.Errorf("XFRMA_IF_ID: %d bytes, want 4", len(a.val))
		}
		*ifid = binary.NativeEndian.Uint32(a.val)
	}
	return nil
}

// decodeState decodes a NEWSA/UPDSA message body or a state dump entry.
func decodeState(b []byte) (SA, error) {
	var info nl.XfrmUsersaInfo
	if err := load(&info, b, "xfrm_usersa_info"); err != nil {
		return SA{}, err
	}
	sa, err := saFromInfo(&info)
	if err != nil {
		return SA{}, err
	}
	return sa, stateAttrs(&sa, b[nl.SizeofXfrmUsersaInfo:], info.Family)
}

// policyFromInfo fills the fixed part of a policy from xfrm_userpolicy_info.
func policyFromInfo(info *nl.XfrmUserpolicyInfo) (Policy, error) {
	src, dst, err := selector(&info.Sel)
	if err != nil {
		return Policy{}, fmt.Errorf("policy: %w", err)
	}
	return Policy{Index: info.Index, Dir: Dir(info.Dir), Src: src, Dst: dst, Action: info.Action}, nil
}

// policyAttrs applies a policy message's attributes (templates, mark,
// interface id) to p.
func policyAttrs(p *Policy, attrs []byte) error {
	as, err := parseAttrs(attrs)
	if err != nil {
		return fmt.Errorf("policy attributes: %w", err)
	}
	for _, a := range as {
		switch a.typ {
		case nl.XFRMA_TMPL:
			if len(a.val)%nl.SizeofXfrmUserTmpl != 0 {
				return fmt.Errorf("XFRMA_TMPL: %d bytes is not a multiple of %d", len(a.val), nl.SizeofXfrmUserTmpl)
			}
			p.Tmpls = p.Tmpls[:0]
			for off := 0; off < len(a.val); off += nl.SizeofXfrmUserTmpl {
				var t nl.XfrmUserTmpl
				_ = load(&t, a.val[off:], "xfrm_user_tmpl")
				src, err := addr(&t.Saddr, t.Family)
				if err != nil {
					return fmt.Errorf("template %d: %w", off/nl.SizeofXfrmUserTmpl, err)
				}
				dst, _ := addr(&t.XfrmId.Daddr, t.Family)
				p.Tmpls = append(p.Tmpls, Template{Src: src, Dst: dst, Proto: Proto(t.XfrmId.Proto),
					Mode: Mode(t.Mode), Reqid: t.Reqid, SPI: nl.Swap32(t.XfrmId.Spi)})
			}
		case nl.XFRMA_MARK, nl.XFRMA_IF_ID:
			if err := markAttr(a, &p.Mark, &p.Ifid); err != nil {
				return err
			}
		}
	}
	return nil
}

// decodePolicy decodes a NEWPOLICY/UPDPOLICY body or a policy dump entry.
func decodePolicy(b []byte) (Policy, error) {
	var info nl.XfrmUserpolicyInfo
	if err := load(&info, b, "xfrm_userpolicy_info"); err != nil {
		return Policy{}, err
	}
	p, err := policyFromInfo(&info)
	if err != nil {
		return Policy{}, err
	}
	return p, policyAttrs(&p, b[nl.SizeofXfrmUserpolicyInfo:])
}

// EventKind says what an Event changes.
type EventKind uint8

// Event kinds.
const (
	// EventState: a state was added or updated (Event.SA).
	EventState EventKind = iota + 1
	// EventStateGone: a state was deleted or hard-expired (Event.SA's
	// identity: destination, SPI, protocol, mark, interface id).
	EventStateGone
	// EventPolicy: a policy was added or updated (Event.Policy).
	EventPolicy
	// EventPolicyGone: a policy was deleted or hard-expired (its index
	// and direction).
	EventPolicyGone
	// EventResync: the change cannot be applied piecemeal (a flush, a
	// migration, lost events): read everything again. Event.Reason says why.
	EventResync
)

// Event is one change of the XFRM database.
type Event struct {
	Kind   EventKind
	SA     SA
	Policy Policy
	Reason string
}

// decodeEvent decodes one multicast message of the SA, policy, expire or
// migrate groups. ok is false for messages that change nothing the facts
// hold (soft expiries, acquires, NAT mapping notices).
func decodeEvent(typ uint16, b []byte) (ev Event, ok bool, err error) {
	switch typ {
	case nl.XFRM_MSG_NEWSA, nl.XFRM_MSG_UPDSA:
		sa, err := decodeState(b)
		return Event{Kind: EventState, SA: sa}, err == nil, err
	case nl.XFRM_MSG_DELSA:
		// xfrm_usersa_id, then the whole state in XFRMA_SA and the state's
		// own attributes (mark, interface id) at the top level.
		var id nl.XfrmUsersaId
		if err := load(&id, b, "xfrm_usersa_id"); err != nil {
			return ev, false, err
		}
		dst, err := addr(&id.Daddr, id.Family)
		if err != nil {
			return ev, false, fmt.Errorf("deleted state: %w", err)
		}
		sa := SA{Dst: dst, SPI: nl.Swap32(id.Spi), Proto: Proto(id.Proto)}
		rest := b[nl.SizeofXfrmUsersaId:]
		as, err := parseAttrs(rest)
		if err != nil {
			return ev, false, fmt.Errorf("deleted state attributes: %w", err)
		}
		for _, a := range as {
			if a.typ == nl.XFRMA_SA {
				var info nl.XfrmUsersaInfo
				if err := load(&info, a.val, "XFRMA_SA"); err != nil {
					return ev, false, err
				}
				if full, err := saFromInfo(&info); err == nil && full.key() == sa.key() {
					sa = full
				}
			}
		}
		if err := stateAttrs(&sa, rest, id.Family); err != nil {
			return ev, false, err
		}
		return Event{Kind: EventStateGone, SA: sa}, true, nil
	case nl.XFRM_MSG_EXPIRE:
		if len(b) < nl.SizeofXfrmUserExpire {
			return ev, false, fmt.Errorf("xfrm_user_expire: %d bytes, want %d", len(b), nl.SizeofXfrmUserExpire)
		}
		if b[nl.SizeofXfrmUsersaInfo] == 0 {
			return ev, false, nil // soft expiry: the IKE daemon rekeys; nothing is gone yet
		}
		var info nl.XfrmUsersaInfo
		_ = load(&info, b, "xfrm_usersa_info")
		sa, err := saFromInfo(&info)
		if err != nil {
			return ev, false, err
		}
		if err := stateAttrs(&sa, b[nl.SizeofXfrmUserExpire:], info.Family); err != nil {
			return ev, false, err
		}
		return Event{Kind: EventStateGone, SA: sa}, true, nil
	case nl.XFRM_MSG_NEWPOLICY, nl.XFRM_MSG_UPDPOLICY:
		p, err := decodePolicy(b)
		return Event{Kind: EventPolicy, Policy: p}, err == nil, err
	case nl.XFRM_MSG_DELPOLICY:
		// xfrm_userpolicy_id, then the whole policy in XFRMA_POLICY.
		var id nl.XfrmUserpolicyId
		if err := load(&id, b, "xfrm_userpolicy_id"); err != nil {
			return ev, false, err
		}
		p := Policy{Index: id.Index, Dir: Dir(id.Dir)}
		as, err := parseAttrs(b[nl.SizeofXfrmUserpolicyId:])
		if err != nil {
			return ev, false, fmt.Errorf("deleted policy attributes: %w", err)
		}
		for _, a := range as {
			if a.typ == nl.XFRMA_POLICY {
				var info nl.XfrmUserpolicyInfo
				if err := load(&info, a.val, "XFRMA_POLICY"); err != nil {
					return ev, false, err
				}
				p.Index, p.Dir = info.Index, Dir(info.Dir)
			}
		}
		if p.Index == 0 {
			return Event{Kind: EventResync, Reason: "a policy was deleted by selector without its index"}, true, nil
		}
		return Event{Kind: EventPolicyGone, Policy: p}, true, nil
	case nl.XFRM_MSG_POLEXPIRE:
		if len(b) < sizeofUserPolexpire {
			return ev, false, fmt.Errorf("xfrm_user_polexpire: %d bytes, want %d", len(b), sizeofUserPolexpire)
		}
		if b[nl.SizeofXfrmUserpolicyInfo] == 0 {
			return ev, false, nil
		}
		var info nl.XfrmUserpolicyInfo
		_ = load(&info, b, "xfrm_userpolicy_info")
		return Event{Kind: EventPolicyGone, Policy: Policy{Index: info.Index, Dir: Dir(info.Dir)}}, true, nil
	case nl.XFRM_MSG_FLUSHSA:
		return Event{Kind: EventResync, Reason: "states flushed"}, true, nil
	case nl.XFRM_MSG_FLUSHPOLICY:
		return Event{Kind: EventResync, Reason: "policies flushed"}, true, nil
	case nl.XFRM_MSG_MIGRATE:
		return Event{Kind: EventResync, Reason: "states migrated to new addresses"}, true, nil
	}
	return ev, false, nil
}
