package main

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/tunneldirector/tunneldirector/director"
)

// Feedback where a person waits: progress on a terminal (standard error),
// nothing for scripts and logs.

// onTerminal reports whether standard error is a terminal.
func onTerminal() bool { return term.IsTerminal(int(os.Stderr.Fd())) }

// newProgress returns a progress bar for reading size bytes, or nil when
// the file is small or nobody watches.
func newProgress(size int64, desc string) *progressbar.ProgressBar {
	if size < 4<<20 || !onTerminal() {
		return nil
	}
	return progressbar.NewOptions64(size,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowBytes(true),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionClearOnFinish(),
	)
}

// newSpinner returns a spinner saying what is being waited for, or nil
// when nobody watches. bytes shows a byte count (an export's).
func newSpinner(desc string, bytes bool) *progressbar.ProgressBar {
	if !onTerminal() {
		return nil
	}
	return progressbar.NewOptions64(-1,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(desc),
		progressbar.OptionShowBytes(bytes),
		progressbar.OptionSpinnerType(14),
		progressbar.OptionSetSpinnerChangeInterval(100*time.Millisecond),
		progressbar.OptionThrottle(100*time.Millisecond),
		progressbar.OptionSetRenderBlankState(true),
		progressbar.OptionClearOnFinish(),
	)
}

// busy runs fn with a spinner saying desc while it runs (a request the
// daemon plans and commits: a node down of thousands of tunnels).
func busy(desc string, fn func() error) error {
	if sp := newSpinner(desc, false); sp != nil {
		defer sp.Finish()
	}
	return fn()
}

// countingWriter counts the bytes written through it into a spinner.
type countingWriter struct {
	w  io.Writer
	sp *progressbar.ProgressBar
}

func (c *countingWriter) Write(b []byte) (int, error) {
	n, err := c.w.Write(b)
	c.sp.Add(n)
	return n, err
}

// withByteCount shows the bytes written to w on a terminal (an export to
// a file) and returns the writer to use and a function that ends it.
func withByteCount(w io.Writer, desc string) (io.Writer, func()) {
	sp := newSpinner(desc, true)
	if sp == nil {
		return w, func() {}
	}
	return &countingWriter{w: w, sp: sp}, func() { sp.Finish() }
}

// kernelWait bounds how long the CLI waits for the daemon's kernel.
const kernelWait = 2 * time.Minute

// kernelFeedback, after a change committed through a running daemon,
// waits until the daemon's kernel holds revision rev and says how long
// that took after the commit, and how long the reconcile that got it there
// spent in the kernel. On a store file (no daemon, no kernel) and in JSON
// mode it does nothing.
func (g *globals) kernelFeedback(s director.Operator, rev uint64) {
	c, ok := s.(*director.Client)
	if !ok || g.json {
		return
	}
	start := time.Now()
	sp := newSpinner(fmt.Sprintf("programming the kernel to revision %d", rev), false)
	var st *director.Status
	var err error
	for {
		st, err = c.Status()
		if err != nil || st.KernelRevision >= rev || time.Since(start) > kernelWait {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if sp != nil {
		sp.Finish()
	}
	switch {
	case err != nil:
		fmt.Fprintf(g.out, "kernel: cannot ask the daemon: %v\n", err)
	case st.KernelRevision < rev:
		fmt.Fprintf(g.out, "kernel: still at revision %d after %s (table at %d): see 'tunneldirector status'\n", st.KernelRevision, kernelWait, rev)
	default:
		fmt.Fprintf(g.out, "kernel: revision %d in place %s after the commit (the reconcile spent %s in the kernel)\n",
			st.KernelRevision, time.Since(start).Round(time.Millisecond), st.LastReconcileTook.Round(time.Microsecond))
	}
}
