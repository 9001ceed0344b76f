package netlab

import (
	"fmt"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// lossTable is the nftables table (family inet) that holds loss rules.
const lossTable = "netlab_loss"

// Nft opens an nftables connection bound to the namespace.
func (n *NS) Nft() (*nftables.Conn, error) {
	c, err := nftables.New(nftables.WithNetNSFd(int(n.h)))
	if err != nil {
		return nil, fmt.Errorf("netns %s: nftables connection: %w", n.Name, err)
	}
	return c, nil
}

// SetLoss drops percent % of the packets that cross interface ifname of the
// namespace, at random and in each direction (packets received on it in
// prerouting, packets sent through it in postrouting), with the nftables
// rule "numgen random mod 100 < percent drop". netem would be the usual tool,
// but the build machines' kernel has no sch_netem. percent 0 removes the
// loss again. Calling it again for the same interface replaces its rules.
func (n *NS) SetLoss(ifname string, percent int) error {
	if percent < 0 || percent > 100 {
		return fmt.Errorf("netns %s: loss on %s: percent %d out of range 0..100", n.Name, ifname, percent)
	}
	c, err := n.Nft()
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: lossTable})
	// Chains are per interface so that SetLoss on one link leaves others.
	for _, dir := range []struct {
		hook  *nftables.ChainHook
		meta  expr.MetaKey
		chain string
	}{
		{nftables.ChainHookPrerouting, expr.MetaKeyIIFNAME, "in_" + ifname},
		{nftables.ChainHookPostrouting, expr.MetaKeyOIFNAME, "out_" + ifname},
	} {
		ch := c.AddChain(&nftables.Chain{
			Name: dir.chain, Table: t, Type: nftables.ChainTypeFilter,
			Hooknum: dir.hook, Priority: nftables.ChainPriorityRef(-300),
		})
		c.FlushChain(ch)
		if percent == 0 {
			continue
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: dir.meta, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifnameBytes(ifname)},
			&expr.Numgen{Register: 1, Modulus: 100, Type: unix.NFT_NG_RANDOM},
			// numgen leaves a host-order value and cmp compares bytes, so
			// convert to network order first, as nft(8) itself does.
			&expr.Byteorder{SourceRegister: 1, DestRegister: 1, Op: expr.ByteorderHton, Len: 4, Size: 4},
			&expr.Cmp{Op: expr.CmpOpLt, Register: 1, Data: binaryutil.BigEndian.PutUint32(uint32(percent))},
			&expr.Verdict{Kind: expr.VerdictDrop},
		}})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("netns %s: set loss %d%% on %s: nftables: %w", n.Name, percent, ifname, err)
	}
	return nil
}

// ifnameBytes pads an interface name to IFNAMSIZ as nftables compares it.
func ifnameBytes(name string) []byte {
	b := make([]byte, 16)
	copy(b, name)
	return b
}
