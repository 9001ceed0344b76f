// Package nsdo runs a function with the calling thread inside a network
// namespace: sockets opened there, and /proc/sys or /proc/thread-self/net
// files opened there, belong to that namespace afterwards.
package nsdo

import (
	"fmt"
	"runtime"

	"github.com/vishvananda/netns"
)

// Do runs f in namespace h; with h <= 0 it runs f where the caller is.
func Do(h netns.NsHandle, f func() error) (err error) {
	if h <= 0 {
		return f()
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("get current network namespace: %w", err)
	}
	if err := netns.Set(h); err != nil {
		orig.Close()
		runtime.UnlockOSThread()
		return fmt.Errorf("enter network namespace: %w", err)
	}
	defer func() {
		if rerr := netns.Set(orig); rerr != nil {
			// Keep the thread locked: the runtime ends it with the
			// goroutine instead of reusing a thread in the wrong namespace.
			orig.Close()
			if err == nil {
				err = fmt.Errorf("restore network namespace: %w", rerr)
			}
			return
		}
		orig.Close()
		runtime.UnlockOSThread()
	}()
	return f()
}
