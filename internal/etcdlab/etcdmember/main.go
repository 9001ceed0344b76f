// Command etcdmember runs one etcd member (server/v3's embed package) for
// the namespace tests: a real process the tests start in a namespace,
// kill and partition. It is not part of the director.
package main

import (
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/tunneldirector/tunneldirector/internal/etcdlab"
)

func main() {
	var m etcdlab.Member
	flag.StringVar(&m.Name, "name", "", "member name")
	flag.StringVar(&m.Dir, "data-dir", "", "data directory")
	flag.StringVar(&m.Client, "client", "", "client host:port")
	flag.StringVar(&m.Peer, "peer", "", "peer host:port")
	flag.StringVar(&m.Cluster, "initial-cluster", "", "name=http://host:port,...")
	roleFile := flag.String("role-file", "", "kept at leader or follower (tests find the Raft leader by it)")
	flag.Parse()
	e, err := etcdlab.Start(m)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	last := ""
	for {
		select {
		case <-sig:
			e.Close()
			return
		case err := <-e.Err():
			fmt.Fprintln(os.Stderr, err)
			e.Close()
			os.Exit(1)
		case <-tick.C:
			role := "follower"
			if e.Server.Leader() == e.Server.MemberID() {
				role = "leader"
			}
			if *roleFile != "" && role != last {
				if err := os.WriteFile(*roleFile+".tmp", []byte(role), 0o644); err == nil {
					os.Rename(*roleFile+".tmp", *roleFile)
					last = role
				}
			}
		}
	}
}
