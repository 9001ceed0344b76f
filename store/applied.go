package store

import "github.com/tunneldirector/tunneldirector/affinity"

// CommitApplied persists a batch already applied to this store's table
// (Table().Apply, then Applied.Restamp to the revision another store gave
// it): the etcd backend keeps its local cache this way, planning on the
// cache's table, so a large import is applied once. On failure the batch
// is rolled back.
func (s *Store) CommitApplied(a *affinity.Applied) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, err := s.commitLocked(true, func() (*affinity.Applied, error) { return a, nil })
	return err
}
