// Package conntrack reads the kernel's connection tracking events through
// github.com/ti-mo/conntrack. The director's learner does not depend on it
// (see ipvs.FirstPackets for why); it is here for what needs conntrack
// state: the measurement of conntrack for IPVS flows in ipvs/vmtest, and
// the conntrack replication of a director pair.
package conntrack

import (
	"context"
	"errors"
	"fmt"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/ipvs/internal/nsdo"
)

// Flow is a conntrack entry as github.com/ti-mo/conntrack decodes it.
type Flow = ct.Flow

// WatchNew calls fn for every new conntrack entry in network namespace ns
// (0: the caller's) until ctx ends; it returns ctx's error then, or the
// socket's (ti-mo/conntrack's listener stops at the first error, ENOBUFS
// when fn was too slow included: call again to go on).
func WatchNew(ctx context.Context, ns netns.NsHandle, fn func(Flow)) error {
	var c *ct.Conn
	err := nsdo.Do(ns, func() (err error) {
		c, err = ct.Dial(&netlink.Config{})
		return err
	})
	if err != nil {
		return fmt.Errorf("conntrack: dial: %w", err)
	}
	_ = c.SetReadBuffer(8 << 20)
	events := make(chan ct.Event, 1024)
	errc, err := c.Listen(events, 1, []netfilter.NetlinkGroup{netfilter.GroupCTNew})
	if err != nil {
		c.Close()
		return fmt.Errorf("conntrack: subscribe to NEW events: %w", err)
	}
	stop := make(chan struct{})
	defer func() {
		// The listener may be blocked handing over an event: drain until
		// Close has stopped it.
		go func() {
			for {
				select {
				case <-events:
				case <-errc:
				case <-stop:
					return
				}
			}
		}()
		c.Close()
		close(stop)
	}()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case err := <-errc:
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if errors.Is(err, unix.ENOBUFS) {
				return fmt.Errorf("conntrack: events lost (the reader was too slow): %w", err)
			}
			return fmt.Errorf("conntrack: read events: %w", err)
		case ev := <-events:
			if ev.Flow != nil {
				fn(*ev.Flow)
			}
		}
	}
}
