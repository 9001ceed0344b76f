package director

import (
	"fmt"
	"strings"
)

// NotifyEvent is one line keepalived writes to its notify_fifo, such as
//
//	INSTANCE "VI_outside" MASTER 100
//	GROUP "VG_director" BACKUP
type NotifyEvent struct {
	Kind     string // INSTANCE or GROUP
	Name     string
	State    string // MASTER, BACKUP, FAULT, STOP, DELETED, or an event such as MASTER_RX_LOWER_PRI
	Priority int    // INSTANCE lines only
}

// ParseNotifyLine parses one notify_fifo line.
func ParseNotifyLine(line string) (NotifyEvent, error) {
	var ev NotifyEvent
	f := strings.Fields(strings.TrimSpace(line))
	if len(f) < 3 {
		return ev, fmt.Errorf("notify line %q: want TYPE \"NAME\" STATE [PRIORITY]", line)
	}
	ev.Kind, ev.State = f[0], f[2]
	name, ok := strings.CutPrefix(f[1], `"`)
	if !ok || !strings.HasSuffix(name, `"`) || len(name) < 2 {
		return ev, fmt.Errorf("notify line %q: name %s is not quoted", line, f[1])
	}
	ev.Name = strings.TrimSuffix(name, `"`)
	if len(f) > 3 {
		if _, err := fmt.Sscanf(f[3], "%d", &ev.Priority); err != nil {
			return ev, fmt.Errorf("notify line %q: priority %q", line, f[3])
		}
	}
	return ev, nil
}

// RoleOf maps a keepalived state to the director's role: MASTER writes,
// BACKUP follows, FAULT, STOP and DELETED are fault: it neither writes
// nor may be trusted to hold the VIPs. ok is false for the lines that
// report an event and not a state (MASTER_RX_LOWER_PRI when a master
// hears a lower or equal priority and forces a new election,
// MASTER_PRIORITY and BACKUP_PRIORITY when the priority changes): the
// instance keeps its state, and so does the director.
func (ev NotifyEvent) RoleOf() (role string, ok bool) {
	switch ev.State {
	case "MASTER":
		return "master", true
	case "BACKUP":
		return "backup", true
	case "FAULT", "STOP", "DELETED":
		return "fault", true
	}
	return "", false
}
