package wire

// Replay protection: a sliding window of the last WindowBits sequence
// numbers per (sender, epoch), as IPsec's anti-replay window (RFC 4303
// section 3.4.3). Senders start their sequence at the boot time in
// nanoseconds, so a restarted sender is ahead of everything it sent
// before; a restarted receiver is protected by the session binding
// (TPeerSession), since its windows start empty.

// WindowBits is the width of one replay window.
const WindowBits = 1024

type replayKey struct {
	sender uint32
	epoch  uint64
}

type replayWindow struct {
	top  uint64
	bits [WindowBits / 64]uint64
}

// check reports whether seq is new, and records it if so.
func (w *replayWindow) check(seq uint64) bool {
	if seq == 0 {
		return false
	}
	if seq > w.top {
		shift := seq - w.top
		if shift >= WindowBits {
			w.bits = [WindowBits / 64]uint64{}
		} else {
			for i := w.top + 1; i <= seq; i++ {
				w.bits[(i%WindowBits)/64] &^= 1 << (i % 64)
			}
		}
		w.top = seq
		w.bits[(seq%WindowBits)/64] |= 1 << (seq % 64)
		return true
	}
	if w.top-seq >= WindowBits {
		return false
	}
	word, bit := (seq%WindowBits)/64, uint64(1)<<(seq%64)
	if w.bits[word]&bit != 0 {
		return false
	}
	w.bits[word] |= bit
	return true
}

// ReplayTable holds the windows of the few (sender, epoch) pairs alive at
// once; the oldest epochs are forgotten first. The zero value is ready.
type ReplayTable struct {
	m map[replayKey]*replayWindow
	// floor is, per sender, the highest epoch whose window was
	// forgotten: datagrams of that epoch or older are refused rather than
	// given a fresh window an old capture could replay into.
	floor map[uint32]uint64
}

// MaxReplayWindows bounds the windows a table keeps.
const MaxReplayWindows = 16

// Check reports whether (sender, epoch, seq) is new, and records it if so.
func (t *ReplayTable) Check(sender uint32, epoch, seq uint64) bool {
	if t.m == nil {
		t.m = make(map[replayKey]*replayWindow)
		t.floor = make(map[uint32]uint64)
	}
	if f, ok := t.floor[sender]; ok && epoch <= f {
		return false
	}
	k := replayKey{sender, epoch}
	w := t.m[k]
	if w == nil {
		if len(t.m) >= MaxReplayWindows {
			var oldest replayKey
			first := true
			for kk := range t.m {
				if first || kk.epoch < oldest.epoch || (kk.epoch == oldest.epoch && kk.sender < oldest.sender) {
					oldest, first = kk, false
				}
			}
			delete(t.m, oldest)
			if oldest.epoch > t.floor[oldest.sender] || t.floor[oldest.sender] == 0 {
				t.floor[oldest.sender] = oldest.epoch
			}
		}
		w = &replayWindow{}
		t.m[k] = w
	}
	return w.check(seq)
}
