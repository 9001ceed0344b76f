module github.com/tunneldirector/tunneldirector

go 1.26.0

require (
	github.com/cloudflare/ipvs v0.12.0
	github.com/gaissmai/bart v0.30.0
	github.com/go-json-experiment/json v1.27.2
	github.com/google/nftables v0.3.0
	github.com/schollz/progressbar/v3 v3.19.1
	github.com/spf13/cobra v1.10.2
	github.com/ti-mo/conntrack v0.6.0
	github.com/ti-mo/netfilter v0.5.3
	github.com/vishvananda/netlink v1.3.1
	github.com/vishvananda/netns v0.0.5
	go.etcd.io/bbolt v1.5.0
	golang.org/x/sys v0.49.0
	golang.org/x/term v0.44.0
)

require github.com/strongswan/govici v0.8.0

require (
	github.com/mdlayher/genetlink v1.3.2 // indirect
	github.com/pkg/errors v0.9.1 // indirect
)

require (
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/mdlayher/netlink v1.8.0
	github.com/mdlayher/socket v0.5.1 // indirect
	github.com/mitchellh/colorstring v0.0.0-20190213212951-d06e56a500db // indirect
	github.com/rivo/uniseg v0.4.7 // indirect
	github.com/spf13/pflag v1.0.10
	golang.org/x/net v0.53.0
	golang.org/x/sync v0.20.0 // indirect
	gopkg.in/yaml.v3 v3.0.1
)
