package ipvs

import (
	"cmp"
	"fmt"
	"net/netip"
)

// Config places the director's kernel objects. The zero value of every
// field picks the documented default.
type Config struct {
	// Mode is the requested mode; ModeAuto probes for IPVS.
	Mode Mode
	// Table is the nftables table (family inet) the director owns.
	// Default "tunneldirector".
	Table string
	// MarkBase and MarkMask define the director's fwmark range. A node with
	// affinity mark m gets fwmark MarkBase|m for policy-routed traffic and,
	// in IPVS mode, MarkBase|IKEBit|m for IKE and NAT-T. MarkMask must cover
	// MarkBase and NodeBits (0x1fff); rules match with it, so bits
	// outside the mask do not influence steering. Defaults 0x7d000000 and
	// 0xff001fff.
	MarkBase uint32
	MarkMask uint32
	// TableBase is the routing table of mark 0; node m uses TableBase+m.
	// The director owns tables TableBase+1 .. TableBase+4095. Default 20000.
	TableBase int
	// RulePriority is the preference of the fwmark rules. Default 100.
	RulePriority int
	// LocalRulePriority is where the kernel's "lookup local" rule is moved
	// (from 0) so the fwmark rules win over local delivery of a VIP the
	// director holds. Must be above RulePriority. Default 1000.
	LocalRulePriority int
	// Protocol tags the director's routes and rules (rtm_protocol /
	// FRA_PROTOCOL): that tag is how ownership is recognised after a
	// restart. Default 211.
	Protocol uint8
	// InsideIface, when set, makes the node routes onlink through it.
	InsideIface string
	// LogGroup is the NFLOG group the classifier logs unknown peers'
	// first packets to (FirstPackets reads it). Default DefaultLogGroup.
	LogGroup uint16
}

// DefaultLogGroup is the default NFLOG group of Config.LogGroup.
const DefaultLogGroup = 0x7d1e

// IKEBit is set in the fwmark of IKE and NAT-T packets in IPVS mode, so the
// fwmark rules (which match the mark with this bit clear) leave them to
// IPVS, which owns the fwmark services with the bit set.
const IKEBit = 0x1000

// MaxMark is the largest node affinity mark.
const MaxMark = 0x0fff

// NodeBits are the low bits of every director fwmark: the node mark and
// IKEBit. The rest of a mark is MarkBase, matched under MarkMask. This is
// the one definition of the mark layout: decode marks with NodeOf.
const NodeBits = MaxMark | IKEBit

func (c Config) withDefaults() (Config, error) {
	c.Table = cmp.Or(c.Table, "tunneldirector")
	c.MarkBase = cmp.Or(c.MarkBase, 0x7d000000)
	c.MarkMask = cmp.Or(c.MarkMask, 0xff001fff)
	c.TableBase = cmp.Or(c.TableBase, 20000)
	c.RulePriority = cmp.Or(c.RulePriority, 100)
	c.LocalRulePriority = cmp.Or(c.LocalRulePriority, 1000)
	c.Protocol = cmp.Or(c.Protocol, 211)
	c.LogGroup = cmp.Or(c.LogGroup, DefaultLogGroup)
	switch {
	case c.MarkMask&NodeBits != NodeBits:
		return c, fmt.Errorf("config: mark mask %#x must cover the node mark bits %#x", c.MarkMask, NodeBits)
	case c.MarkBase&NodeBits != 0:
		return c, fmt.Errorf("config: mark base %#x overlaps the node mark bits %#x", c.MarkBase, NodeBits)
	case c.MarkBase&^c.MarkMask != 0:
		return c, fmt.Errorf("config: mark base %#x has bits outside mark mask %#x", c.MarkBase, c.MarkMask)
	case c.LocalRulePriority <= c.RulePriority:
		return c, fmt.Errorf("config: local rule priority %d must be above rule priority %d", c.LocalRulePriority, c.RulePriority)
	case c.TableBase < 256 || c.TableBase+MaxMark > 1<<31-1:
		return c, fmt.Errorf("config: table base %d out of range", c.TableBase)
	}
	return c, nil
}

// Validate checks the configuration as New does (defaults filled in).
func (c Config) Validate() error {
	_, err := c.withDefaults()
	return err
}

// Fwmark is the policy-routed mark of node m.
func (c Config) Fwmark(m uint16) uint32 { return c.MarkBase | uint32(m) }

// IKEMark is the mark of node m's IKE and NAT-T packets in IPVS mode: the
// mark of its IPVS fwmark service.
func (c Config) IKEMark(m uint16) uint32 { return c.MarkBase | IKEBit | uint32(m) }

// NodeOf decodes a fwmark (either kind) to a node mark; false for a mark
// outside the director's range or without a node.
func (c Config) NodeOf(mark uint32) (uint16, bool) {
	if mark&c.MarkMask&^NodeBits != c.MarkBase {
		return 0, false
	}
	m := uint16(mark & MaxMark)
	return m, m != 0
}

// inRange reports whether a fwmark/mask pair overlaps the director's range.
func (c Config) inRange(mark, mask uint32) bool {
	common := mask & c.MarkMask &^ NodeBits
	return mark&common == c.MarkBase&common && mask&NodeBits != 0 && mark&NodeBits != 0
}

func (c Config) routeTable(m uint16) int { return c.TableBase + int(m) }

func (c Config) ownsTable(t int) bool { return t > c.TableBase && t <= c.TableBase+MaxMark }

func fam(a netip.Addr) string {
	if a.Is4() {
		return "ipv4"
	}
	return "ipv6"
}
