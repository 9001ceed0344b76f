package conntrack

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/tunneldirector/tunneldirector/ipvs/internal/nsdo"
)

// Kernel is the conntrack table of one network namespace, read and
// written over ctnetlink: events, dumps, and batched commits and
// deletions. The sockets come from github.com/mdlayher/netlink (so they
// sit in Go's poller and honour deadlines); the messages are read and
// written raw, many to a system call, with the codec in this package.
type Kernel struct {
	ns netns.NsHandle

	mu sync.Mutex // one request at a time on req
	// sockMu guards replacing req and raw (under mu too, by redial)
	// against Close, which does not wait for a request to end.
	sockMu sync.Mutex
	closed bool
	req    *netlink.Conn
	raw    syscall.RawConn
	enc    encoder
	seq    uint32
	buf    []byte
}

// Open returns the conntrack table of network namespace ns (0: the
// caller's).
func Open(ns netns.NsHandle) (*Kernel, error) {
	c, raw, err := dial(ns, 0, requestBuf)
	if err != nil {
		return nil, err
	}
	return &Kernel{ns: ns, req: c, raw: raw, buf: make([]byte, 1<<16), seq: uint32(time.Now().UnixNano())}, nil
}

// Close closes the table's request socket.
func (k *Kernel) Close() error {
	k.sockMu.Lock()
	defer k.sockMu.Unlock()
	k.closed = true
	return k.req.Close()
}

// Socket buffers: a commit batch's errors and a dump need little; a
// burst of events (100,000 new entries created as fast as the kernel
// can, each event taking about 700 bytes of buffer) needs much. Set with
// SO_RCVBUFFORCE (root) so net.core.rmem_max does not cap them; the
// plain option is the fallback. Memory is only used while events wait.
const (
	requestBuf = 4 << 20
	eventsBuf  = 128 << 20
)

func dial(ns netns.NsHandle, groups uint32, sockBuf int) (*netlink.Conn, syscall.RawConn, error) {
	var c *netlink.Conn
	err := nsdo.Do(ns, func() (err error) {
		c, err = netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{Groups: groups})
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("conntrack: open ctnetlink socket: %w", err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		c.Close()
		return nil, nil, fmt.Errorf("conntrack: ctnetlink socket: %w", err)
	}
	// Errors carry only the header of the request they answer, not the
	// request: a failed batch does not fill the buffer with echoes.
	_ = c.SetOption(netlink.CapAcknowledge, true)
	raw.Control(func(fd uintptr) {
		for _, o := range [][2]int{{unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}, {unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}} {
			if unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[0], sockBuf) != nil {
				_ = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, o[1], sockBuf)
			}
		}
	})
	return c, raw, nil
}

var kernelAddr = &unix.SockaddrNetlink{Family: unix.AF_NETLINK}

func send(raw syscall.RawConn, b []byte) error {
	var err error
	werr := raw.Write(func(fd uintptr) bool {
		err = unix.Sendto(int(fd), b, 0, kernelAddr)
		return err != unix.EAGAIN
	})
	if werr != nil {
		return werr
	}
	return err
}

// recv reads one datagram into buf (growing it when the kernel's was
// larger) and returns it.
func recv(raw syscall.RawConn, buf *[]byte) ([]byte, error) {
	for {
		var n int
		var err error
		rerr := raw.Read(func(fd uintptr) bool {
			n, _, err = unix.Recvfrom(int(fd), *buf, unix.MSG_TRUNC)
			return err != unix.EAGAIN
		})
		if rerr != nil {
			return nil, rerr
		}
		if err != nil {
			return nil, err
		}
		if n > len(*buf) {
			// Truncated: the kernel dropped the rest of this datagram.
			// Grow for the next one and say so.
			*buf = make([]byte, n)
			return nil, malformed("datagram of %d bytes truncated", n)
		}
		return (*buf)[:n], nil
	}
}

// ErrEventsLost is reported (as an EventLost event) when the events
// socket overflowed: the kernel dropped events the reader was too slow
// to take, and whoever mirrors the table must read it again.
var ErrEventsLost = errors.New("conntrack events lost: the reader was too slow")

// Events calls fn for every new, updated and destroyed entry until ctx
// ends, and with an EventLost event when the socket overflowed (the
// events dropped are gone: dump the table). The Event passed is reused:
// fn copies what it keeps. It returns ctx's error when ctx ends, or the
// socket's.
func (k *Kernel) Events(ctx context.Context, fn func(*Event)) error {
	// NFNLGRP_CONNTRACK_NEW, _UPDATE and _DESTROY are groups 1, 2, 3.
	c, raw, err := dial(k.ns, 1<<0|1<<1|1<<2, eventsBuf)
	if err != nil {
		return err
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	br := newBatchReader(128, 8<<10)
	var ev Event
	for {
		n, err := br.read(raw)
		switch {
		case ctx.Err() != nil:
			return ctx.Err()
		case errors.Is(err, unix.ENOBUFS):
			fn(&Event{Type: EventLost})
			continue
		case err != nil:
			return fmt.Errorf("conntrack: read events: %w", err)
		}
		for i := range n {
			b, truncated := br.datagram(i)
			if truncated {
				// An event larger than any entry the codec reads
				// (labels, security contexts): lost like an overflow.
				fn(&Event{Type: EventLost})
				continue
			}
			// Events come one to a datagram.
			if DecodeEvent(b, &ev) == nil {
				fn(&ev)
			}
		}
	}
}

// Dump calls fn for every entry of the table, as the kernel streams them
// (the Flow is reused: fn copies what it keeps); fn's error stops the
// dump and is returned.
func (k *Kernel) Dump(ctx context.Context, fn func(*Flow) error) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	req := k.req
	stop := context.AfterFunc(ctx, func() { req.SetReadDeadline(time.Unix(1, 0)) })
	defer func() {
		if !stop() {
			req.SetReadDeadline(time.Time{})
		}
	}()
	k.seq++
	seq := k.seq
	k.enc.b = k.enc.b[:0]
	start := k.enc.msg(msgCTGet, nlmFRequest|nlmFDump, seq, afUnspec)
	k.enc.end(start)
	if err := send(k.raw, k.enc.b); err != nil {
		return fmt.Errorf("conntrack: dump request: %w", err)
	}
	var f Flow
	var stopErr error
	err := k.readMessages(func(m *message) (bool, error) {
		if m.seq != seq {
			return false, nil // a late answer to an earlier request
		}
		switch m.typ {
		case nlmsgDone:
			return true, nil
		case nlmsgError:
			if code, _, _ := m.errno(); code != 0 {
				return true, syscall.Errno(code)
			}
			return false, nil
		}
		if stopErr == nil && DecodeFlow(m.data, &f) == nil {
			stopErr = fn(&f) // after an error, drain the dump so the socket is clean
		}
		return false, nil
	})
	if err != nil || ctx.Err() != nil {
		// The kernel holds the dump open on this socket until its last
		// message is read, and refuses every later dump there with
		// EBUSY: the next request goes out on a fresh socket.
		if rerr := k.redial(); rerr != nil {
			err = errors.Join(err, rerr)
		}
	}
	switch {
	case ctx.Err() != nil:
		return ctx.Err()
	case err != nil:
		return fmt.Errorf("conntrack: dump: %w", err)
	}
	return stopErr
}

// redial replaces the request socket, whose answers were left half read.
func (k *Kernel) redial() error {
	k.sockMu.Lock()
	defer k.sockMu.Unlock()
	if k.closed {
		return nil
	}
	c, raw, err := dial(k.ns, 0, requestBuf)
	if err != nil {
		return fmt.Errorf("replace the request socket: %w", err)
	}
	k.req.Close()
	k.req, k.raw = c, raw
	return nil
}

// readMessages reads datagrams from the request socket and hands each
// netlink message in them to fn, until fn reports it is done or fails,
// or the socket fails.
func (k *Kernel) readMessages(fn func(m *message) (done bool, err error)) error {
	for {
		b, err := recv(k.raw, &k.buf)
		if err != nil {
			return err
		}
		for len(b) > 0 {
			var m message
			if m, b, err = nextMessage(b); err != nil {
				return err
			}
			if done, err := fn(&m); done || err != nil {
				return err
			}
		}
	}
}

// CommitOptions tune a commit.
type CommitOptions struct {
	// Liberal marks committed TCP entries "be liberal" in both
	// directions (conntrackd's TCPWindowTracking off): the new master has
	// not seen the window, so it does not judge sequence numbers.
	Liberal bool
}

// CommitResult counts what a commit did.
type CommitResult struct {
	// Committed entries were created or updated.
	Committed int
	// Retried entries existed with a state a create cannot overwrite
	// (their status, their NAT) and were updated in a second pass.
	Retried int
	// Failed entries were refused; Errors counts them by errno.
	Failed int
	Errors map[syscall.Errno]int
	Took   time.Duration
}

// batchBytes bounds one sendmsg of a batch.
const batchBytes = 48 << 10

// Commit creates every flow in the table, or updates it where an entry
// with its original tuple exists, in batches of many messages per system
// call. An entry the kernel refuses is counted in the result, not an
// error; the error is for the socket failing or ctx ending (what was sent
// before stays committed).
func (k *Kernel) Commit(ctx context.Context, flows []Flow, o CommitOptions) (CommitResult, error) {
	start := time.Now()
	res := CommitResult{Errors: map[syscall.Errno]int{}}
	var retry []int
	err := k.batches(ctx, len(flows), func(i int, seq uint32) {
		k.enc.commitMsg(&flows[i], seq, o.Liberal, false)
	}, func(i int, code syscall.Errno) {
		if code == unix.EBUSY || code == unix.EOPNOTSUPP {
			retry = append(retry, i)
			return
		}
		res.Failed++
		res.Errors[code]++
	})
	if err == nil && len(retry) > 0 {
		ok := make([]bool, len(retry))
		for i := range ok {
			ok[i] = true
		}
		err = k.batches(ctx, len(retry), func(j int, seq uint32) {
			k.enc.commitMsg(&flows[retry[j]], seq, o.Liberal, true)
		}, func(j int, code syscall.Errno) {
			ok[j] = false
			res.Failed++
			res.Errors[code]++
		})
		for _, v := range ok {
			if v {
				res.Retried++
			}
		}
	}
	res.Committed = len(flows) - res.Failed
	res.Took = time.Since(start)
	return res, err
}

// Delete deletes the entries with the flows' original tuples and reports
// how many the kernel held.
func (k *Kernel) Delete(ctx context.Context, flows []Flow) (int, error) {
	gone := 0
	err := k.batches(ctx, len(flows), func(i int, seq uint32) {
		k.enc.deleteMsg(&flows[i], seq)
	}, func(i int, code syscall.Errno) {
		if code == unix.ENOENT {
			gone++
		}
	})
	return len(flows) - gone, err
}

// SetTimeout sets the timeout of the entries with the flows' original
// tuples, and nothing else of them (conntrackd -t: a director becoming
// backup lets the entries it no longer needs run out, while packets
// still in flight through it refresh theirs). It reports how many the
// kernel held.
func (k *Kernel) SetTimeout(ctx context.Context, flows []Flow, timeout uint32) (int, error) {
	gone := 0
	err := k.batches(ctx, len(flows), func(i int, seq uint32) {
		k.enc.timeoutMsg(&flows[i], seq, timeout)
	}, func(i int, code syscall.Errno) {
		gone++
	})
	return len(flows) - gone, err
}

// batches sends n requests, built by put, many per system call; failures come back as
// error messages naming their sequence number, handed to fail with the
// request's index.
func (k *Kernel) batches(ctx context.Context, n int, put func(i int, seq uint32), fail func(i int, code syscall.Errno)) error {
	k.mu.Lock()
	defer k.mu.Unlock()
	for i := 0; i < n; {
		if err := ctx.Err(); err != nil {
			return err
		}
		k.enc.b = k.enc.b[:0]
		first := k.seq + 1
		j, last := i, 0
		for ; j < n && len(k.enc.b) < batchBytes; j++ {
			k.seq++
			last = len(k.enc.b)
			put(j, k.seq)
		}
		// Only the batch's last request asks for an acknowledgement:
		// when it comes, the kernel has processed all of them.
		h := k.enc.b[last+6:]
		binary.NativeEndian.PutUint16(h, binary.NativeEndian.Uint16(h)|nlmFAck)
		if err := send(k.raw, k.enc.b); err != nil {
			return fmt.Errorf("conntrack: send batch: %w", err)
		}
		if err := k.acks(first, k.seq, func(seq uint32, code syscall.Errno) { fail(i+int(seq-first), code) }); err != nil {
			return err
		}
		i = j
	}
	return nil
}

// acks reads answers until the acknowledgement of last, handing every
// error of a request between first and last to fail.
func (k *Kernel) acks(first, last uint32, fail func(seq uint32, code syscall.Errno)) error {
	k.req.SetReadDeadline(time.Now().Add(30 * time.Second))
	defer k.req.SetReadDeadline(time.Time{})
	err := k.readMessages(func(m *message) (bool, error) {
		if m.typ != nlmsgError {
			return false, nil
		}
		code, seq, err := m.errno()
		if err != nil || seq-first > last-first {
			return false, nil // not ours (an earlier request's late answer)
		}
		if code != 0 {
			fail(seq, syscall.Errno(code))
		}
		return seq == last, nil
	})
	switch {
	case errors.Is(err, os.ErrDeadlineExceeded):
		return fmt.Errorf("conntrack: no acknowledgement of requests %d..%d in 30 s", first, last)
	case err != nil:
		return fmt.Errorf("conntrack: read acknowledgements: %w", err)
	}
	return nil
}
