package director

import (
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
)

// systemd tells systemd (Type=notify) how the daemon is, through
// $NOTIFY_SOCKET: READY=1 once the kernel is fully synced (units ordered
// after the director, keepalived, then start on a steering kernel),
// STATUS= lines with the mode, revision and role, WATCHDOG=1 from the
// reconcile loop (a wedged loop stops the pings and systemd restarts the
// daemon), STOPPING=1 at the end. Not under systemd, it does nothing.
type systemd struct {
	log *slog.Logger
	// watchdog is the interval systemd expects pings in (WatchdogSec);
	// 0: no watchdog.
	watchdog time.Duration

	mu         sync.Mutex
	lastStatus string
}

func newSystemd(log *slog.Logger) *systemd {
	s := &systemd{log: log}
	w, err := daemon.SdWatchdogEnabled(false)
	if err != nil {
		log.Warn("systemd watchdog settings unreadable; not pinging it", "err", err)
	}
	s.watchdog = w
	return s
}

// pingEvery is how often the loop pings the watchdog: half its interval,
// as sd_watchdog_enabled(3) advises.
func (s *systemd) pingEvery() time.Duration { return s.watchdog / 2 }

func (s *systemd) notify(state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		s.log.Warn("systemd notify", "state", state, "err", err)
	}
}

// ready says the kernel is programmed, with the first status line.
func (s *systemd) ready(status string) {
	s.mu.Lock()
	s.lastStatus = status
	s.mu.Unlock()
	s.notify("READY=1\nSTATUS=" + status)
}

// status sends a status line when it changed.
func (s *systemd) status(status string) {
	s.mu.Lock()
	same := status == s.lastStatus
	s.lastStatus = status
	s.mu.Unlock()
	if !same {
		s.notify("STATUS=" + status)
	}
}

func (s *systemd) ping()     { s.notify("WATCHDOG=1") }
func (s *systemd) stopping() { s.notify("STOPPING=1\nSTATUS=stopping; the kernel stays programmed") }

// statusLine is the daemon's one-line state for systemctl status.
func (d *Daemon) statusLine() string {
	s := d.Status()
	role := "alone"
	if r := s.Replication; r != nil {
		role = fmt.Sprintf("%s of a pair (%s)", r.Role, r.State)
	}
	line := fmt.Sprintf("%s mode, %s, revision %d (kernel at %d), %d tunnels on %d nodes", s.Mode, role, s.Revision, s.KernelRevision, s.Tunnels, s.Nodes)
	if n := len(s.KernelProblems); n > 0 {
		line += fmt.Sprintf(", %d kernel objects not programmed", n)
	}
	return line
}
