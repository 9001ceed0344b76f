package health

import (
	"context"
	"fmt"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/vishvananda/netns"
)

// watchLink reports the named interface of the current network namespace
// up or down whenever that changes, until ctx ends.
func watchLink(ctx context.Context, name string, fn func(up bool)) error {
	return watchLinkAt(ctx, nil, name, fn)
}

// watchLinkAt watches the interface in namespace ns (nil: the current
// one) over an rtnetlink subscription. Up means operationally up (carrier
// on both ends of a veth, for example), or administratively up on links
// that report no operational state.
func watchLinkAt(ctx context.Context, ns *netns.NsHandle, name string, fn func(up bool)) error {
	ch := make(chan netlink.LinkUpdate, 64)
	errc := make(chan error, 1)
	done := make(chan struct{})
	defer close(done)
	err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
		Namespace:    ns,
		ListExisting: true,
		ErrorCallback: func(err error) {
			select {
			case errc <- err:
			default:
			}
		},
	})
	if err != nil {
		return fmt.Errorf("watch inside interface %s: subscribe to link changes: %w", name, err)
	}
	known, last := false, false
	for {
		select {
		case <-ctx.Done():
			return nil
		case err := <-errc:
			return fmt.Errorf("watch inside interface %s: %w", name, err)
		case u, ok := <-ch:
			if !ok {
				return fmt.Errorf("watch inside interface %s: link subscription ended", name)
			}
			a := u.Attrs()
			if a == nil || a.Name != name {
				continue
			}
			up := u.Header.Type != unix.RTM_DELLINK &&
				(a.OperState == netlink.OperUp || (a.OperState == netlink.OperUnknown && a.Flags&net.FlagUp != 0))
			if !known || up != last {
				known, last = true, up
				fn(up)
			}
		}
	}
}
