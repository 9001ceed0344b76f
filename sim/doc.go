// Package sim is the farm simulator: a discrete-event simulation on a
// virtual clock that plays weeks of a farm's life (tunnels coming and
// going, nodes failing, recovering, draining and joining, rebalances,
// director failovers, loss on the sync link) through the director's real
// core: affinity.Table's scheduler and plans, committed through two
// store.Store directors, one following the other.
//
// A run's inputs are a Scenario (from a YAML file, see sim/README.md, or
// built from flags) and a workload of Steps, generated from the scenario's
// seed or replayed from a trace CSV. After every step the simulator sends
// sample packets of the tunnels it touched through the master's table
// (peer to VIP, and into every protected subnet), and every live tunnel's
// at regular full sweeps, and compares the node they reach with the node
// that holds the tunnel's SAs. The Report has the balance over time, the
// moves per event against the ideal minimum, the violations, the
// replication lag, the time each event took to converge, and a comparison
// with round-robin, hash-mod-N and Maglev assignment on the same steps.
//
// Replication sits behind the Pair interface. By default the backup
// follows through the project's director/replication: a Replicator on each
// director over its in-memory FakeNetwork (seeded losses, latency), its
// clock.Manual kept on the virtual clock and stepped only while there is
// something to replicate. The simulator's own journal link (the master's
// change log replayed with store.CommitAt over a lossy link, snapshots
// installed with Table.DiffTo when the log no longer reaches) remains as
// replication.impl "journal". The virtual clock is a clock.Manual too: its
// timers are the simulation's internal events.
package sim
