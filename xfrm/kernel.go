package xfrm

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Kernel is a node's XFRM database as the agent needs it: a full read, and
// the changes from a point on. New wires the real one.
type Kernel interface {
	// Read dumps every state and policy and the node's own addresses.
	Read() (Snapshot, error)
	// Watch subscribes to the database's changes and delivers them on the
	// returned channel until ctx ends or the subscription fails; then the
	// channel is closed (after an EventResync naming the failure). Events
	// that happen after Watch returns are never missed silently: a lost
	// event (a full socket buffer) arrives as EventResync. Subscribe
	// first, then Read, and apply the events after the read.
	Watch(ctx context.Context) (<-chan Event, error)
	// Close releases the kernel sockets.
	Close() error
}

// Options configure New.
type Options struct {
	// Netns is the network namespace to read; a closed handle (the
	// default, netns.None()) means the calling process's own.
	Netns netns.NsHandle
	// EventBuffer is the receive buffer of the event socket in bytes
	// (default 8 MiB): a burst of rekeys larger than it costs a full read.
	EventBuffer int
}

// New opens the real kernel's XFRM database over netlink.
func New(o Options) (Kernel, error) {
	if o.Netns == 0 {
		o.Netns = netns.None()
	}
	if o.EventBuffer <= 0 {
		o.EventBuffer = 8 << 20
	}
	h, err := netlink.NewHandleAt(o.Netns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("xfrm: open route netlink handle: %w", err)
	}
	s, err := nl.GetNetlinkSocketAt(o.Netns, netns.None(), unix.NETLINK_XFRM)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("xfrm: open XFRM netlink socket: %w", err)
	}
	return &nlKernel{opts: o, route: h, xfrm: &nl.SocketHandle{Socket: s}}, nil
}

type nlKernel struct {
	opts  Options
	route *netlink.Handle
	mu    sync.Mutex // one dump at a time on the XFRM socket
	xfrm  *nl.SocketHandle
}

// dumpAttempts bounds the retries of a dump the kernel marked interrupted
// (the database changed while it was read).
const dumpAttempts = 5

func (k *nlKernel) Read() (Snapshot, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	var s Snapshot
	var err error
	for attempt := 1; ; attempt++ {
		s, err = k.read()
		if !errors.Is(err, nl.ErrDumpInterrupted) || attempt == dumpAttempts {
			return s, err
		}
	}
}

func (k *nlKernel) read() (Snapshot, error) {
	var s Snapshot
	addrs, err := k.route.AddrList(nil, netlink.FAMILY_ALL)
	if err != nil {
		return s, fmt.Errorf("xfrm: list the node's addresses: %w", err)
	}
	for _, a := range addrs {
		if ip := addrFrom(a.IP); ip.IsValid() {
			s.Local = append(s.Local, ip)
		}
	}
	var derr error
	s.States, err = dump(k, nl.XFRM_MSG_GETSA, nl.XFRM_MSG_NEWSA, decodeState, &derr)
	if err != nil {
		return s, fmt.Errorf("xfrm: dump states: %w", err)
	}
	s.Policies, err = dump(k, nl.XFRM_MSG_GETPOLICY, nl.XFRM_MSG_NEWPOLICY, decodePolicy, &derr)
	if err != nil {
		return s, fmt.Errorf("xfrm: dump policies: %w", err)
	}
	if derr != nil {
		return s, fmt.Errorf("xfrm: decode the dump: %w", derr)
	}
	return s, nil
}

// dump reads every object of one kind and decodes each entry; decoding
// errors are joined into *derr, so one bad entry neither stops the dump
// nor hides the others.
func dump[T any](k *nlKernel, req, resp int, decode func([]byte) (T, error), derr *error) ([]T, error) {
	r := nl.NewNetlinkRequest(req, unix.NLM_F_DUMP)
	r.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_XFRM: k.xfrm}
	var out []T
	err := r.ExecuteIter(unix.NETLINK_XFRM, uint16(resp), func(b []byte) bool {
		v, err := decode(b)
		if err != nil {
			*derr = errors.Join(*derr, err)
		} else {
			out = append(out, v)
		}
		return true
	})
	return out, err
}

func (k *nlKernel) Watch(ctx context.Context) (<-chan Event, error) {
	s, err := nl.SubscribeAt(k.opts.Netns, netns.None(), unix.NETLINK_XFRM,
		nl.XFRMNLGRP_SA, nl.XFRMNLGRP_POLICY, nl.XFRMNLGRP_EXPIRE, nl.XFRMNLGRP_MIGRATE)
	if err != nil {
		return nil, fmt.Errorf("xfrm: subscribe to XFRM events: %w", err)
	}
	if err := s.SetReceiveBufferSize(k.opts.EventBuffer, true); err != nil {
		// Without CAP_NET_ADMIN the forced size is refused; the default
		// buffer still works, it only overflows sooner (and then resyncs).
		_ = s.SetReceiveBufferSize(k.opts.EventBuffer, false)
	}
	ch := make(chan Event, 1024)
	stop := context.AfterFunc(ctx, s.Close)
	go func() {
		defer close(ch)
		defer stop()
		send := func(e Event) bool {
			select {
			case ch <- e:
				return true
			case <-ctx.Done():
				return false
			}
		}
		for {
			msgs, from, err := s.Receive()
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, unix.ENOBUFS) {
				if !send(Event{Kind: EventResync, Reason: "events were lost (socket buffer full)"}) {
					return
				}
				continue
			}
			if err != nil {
				send(Event{Kind: EventResync, Reason: fmt.Sprintf("event socket failed: %v", err)})
				s.Close()
				return
			}
			if from.Pid != nl.PidKernel {
				continue // only the kernel speaks on these groups
			}
			for _, m := range msgs {
				ev, ok, err := decodeEvent(m.Header.Type, m.Data)
				if err != nil {
					ev, ok = Event{Kind: EventResync, Reason: fmt.Sprintf("undecodable event %d: %v", m.Header.Type, err)}, true
				}
				if ok && !send(ev) {
					return
				}
			}
		}
	}()
	return ch, nil
}

func (k *nlKernel) Close() error {
	k.route.Close()
	k.xfrm.Close()
	return nil
}
