package replication

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
)

// persisted is the state file: the epoch and the epoch history, so that
// a restarted director still tells a lagging peer from a diverged one.
type persisted struct {
	Epoch   uint64      `json:"epoch"`
	History [][2]uint64 `json:"history"` // (epoch, first revision)
}

func (r *Replicator) saveState() {
	if r.cfg.StatePath == "" {
		return
	}
	s := persisted{Epoch: r.epoch}
	for _, h := range r.history {
		s.History = append(s.History, [2]uint64{h.epoch, h.first})
	}
	b, _ := json.Marshal(s)
	tmp := r.cfg.StatePath + ".tmp"
	err := os.WriteFile(tmp, b, 0o600)
	if err == nil {
		err = os.Rename(tmp, r.cfg.StatePath)
	}
	if err != nil {
		r.lastErr = fmt.Sprintf("save replication state %s: %v", r.cfg.StatePath, err)
		r.log.Error("save replication state", "path", r.cfg.StatePath, "err", err)
	}
}

func (r *Replicator) loadState() error {
	if r.cfg.StatePath == "" {
		return nil
	}
	b, err := os.ReadFile(r.cfg.StatePath)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("load replication state: %w", err)
	}
	var s persisted
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("load replication state %s: %w", r.cfg.StatePath, err)
	}
	r.epoch = max(r.epoch, s.Epoch)
	r.history = r.history[:0]
	for _, h := range s.History {
		if h[1] <= r.rev {
			r.history = append(r.history, epochStart{h[0], h[1]})
		}
	}
	if len(r.history) == 0 {
		r.history = []epochStart{{0, 0}}
	}
	return nil
}
