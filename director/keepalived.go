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
	State    string // MASTER, BACKUP, FAULT, STOP, DELETED
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
// BACKUP follows, anything else (FAULT, STOP, DELETED) is fault: it
// neither writes nor may be trusted to hold the VIPs.
func (ev NotifyEvent) RoleOf() string {
	switch ev.State {
	case "MASTER":
		return "master"
	case "BACKUP":
		return "backup"
	}
	return "fault"
}
