package affinity

// CountsWhere returns, by node name, how many of each node's tunnels have
// an id keep accepts: one pass under the read lock, no tunnel copied (the
// metrics split each node's tunnels by source at every scrape).
func (t *Table) CountsWhere(keep func(id string) bool) map[string]int {
	t.mu.RLock()
	defer t.mu.RUnlock()
	byMark := make(map[uint16]int, len(t.nodes))
	for id, o := range t.tunnels {
		if keep(id) {
			byMark[o.mark]++
		}
	}
	out := make(map[string]int, len(t.nodes))
	for _, n := range t.nodes {
		out[n.Name] = byMark[n.Mark]
	}
	return out
}
