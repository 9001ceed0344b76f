package director

import (
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync/atomic"

	"github.com/tunneldirector/tunneldirector/ipvs"
)

// bulkElements is the size of a kernel change (elements added, removed
// and reloaded with a recreated table) after which the daemon hands its
// free heap back to the operating system. Changed elements do not count:
// moves (a node down) leave the table its size, and the next change of
// the kind needs the same memory again, which a release would make it
// fault back in.
const bulkElements = 100_000

// releaseMin is the least reclaimable heap worth a release.
const releaseMin = 64 << 20

// reclaimable returns the resident heap memory a collection and a
// release would hand back (the free heap plus the heap objects that were
// not live at the last collection) and the live heap.
func reclaimable() (free, live uint64) {
	m := []metrics.Sample{{Name: "/memory/classes/heap/free:bytes"}, {Name: "/memory/classes/heap/objects:bytes"}, {Name: "/gc/heap/live:bytes"}}
	metrics.Read(m)
	for _, v := range m {
		if v.Value.Kind() != metrics.KindUint64 {
			return 0, 0
		}
	}
	objects, live := m[1].Value.Uint64(), m[2].Value.Uint64()
	return m[0].Value.Uint64() + objects - min(objects, live), live
}

// releasing is set while a release runs (one at a time, process-wide).
var releasing atomic.Bool

// noteBulk remembers that a kernel change was a bulk one, for
// releaseAfterBulk once the change's own data is garbage.
func (d *Daemon) noteBulk(st ipvs.Stats) {
	if st.Added+st.Removed+st.Reloaded >= bulkElements {
		d.bulk = true
	}
}

// releaseAfterBulk returns the heap freed by a bulk change to the
// operating system, in the background. An import of a million tunnels
// or a first sync leaves the heap at twice what the daemon keeps (the
// collector's goal while the change was built), and the runtime gives
// that back only slowly: the resident memory stayed near 2.8 GB for a
// table the daemon holds in 0.7 GB. The cost is one extra collection
// (about a second of CPU at a million tunnels), after changes that took
// many seconds themselves; small changes never pay it. It is called
// from the event loop after the reconcile returned, so that the
// change's batches and delta are no longer on any stack.
func (d *Daemon) releaseAfterBulk() {
	if !d.bulk || !releasing.CompareAndSwap(false, true) {
		return
	}
	d.bulk = false
	// Only when there is enough to hand back. The live heap the
	// runtime reports is that of its last collection, which may have
	// run in the middle of the change (a million-tunnel import: 1.4 GB
	// "live" of which most was the change's own data), so it is no
	// measure of what is garbage now: the release's own collection
	// finds that out.
	if free, _ := reclaimable(); free < releaseMin {
		releasing.Store(false)
		return
	}
	go func() {
		defer releasing.Store(false)
		debug.FreeOSMemory()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		d.log.Debug("memory returned to the system after a bulk change", "heap_in_use_MB", m.HeapInuse>>20, "released_MB", m.HeapReleased>>20)
	}()
}
