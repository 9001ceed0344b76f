package conntrack

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// batchReader reads many netlink datagrams per system call with
// recvmmsg(2): the kernel multicasts one event per datagram, and a burst
// of 100,000 new entries read one recvfrom at a time spent half the
// master's CPU in system calls and overflowed the socket (x/sys/unix has
// the types but no wrapper).
type batchReader struct {
	bufs [][]byte
	iovs []unix.Iovec
	msgs []unix.Mmsghdr
}

func newBatchReader(n, size int) *batchReader {
	r := &batchReader{bufs: make([][]byte, n), iovs: make([]unix.Iovec, n), msgs: make([]unix.Mmsghdr, n)}
	for i := range r.bufs {
		r.bufs[i] = make([]byte, size)
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(size)
		r.msgs[i].Hdr.Iov = &r.iovs[i]
		r.msgs[i].Hdr.SetIovlen(1)
	}
	return r
}

// read waits for datagrams and returns how many it read into bufs; a
// datagram larger than its buffer is reported by truncated(i).
func (r *batchReader) read(raw syscall.RawConn) (int, error) {
	var n int
	var errno syscall.Errno
	err := raw.Read(func(fd uintptr) bool {
		for i := range r.msgs {
			r.msgs[i].Hdr.Flags = 0
			r.msgs[i].Len = 0
		}
		v, _, e := unix.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.msgs[0])), uintptr(len(r.msgs)), unix.MSG_DONTWAIT, 0, 0)
		n, errno = int(v), e
		return errno != unix.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	if errno != 0 {
		return 0, errno
	}
	return n, nil
}

// datagram returns the i-th datagram read, and whether it was truncated.
func (r *batchReader) datagram(i int) ([]byte, bool) {
	return r.bufs[i][:r.msgs[i].Len], r.msgs[i].Hdr.Flags&unix.MSG_TRUNC != 0
}
