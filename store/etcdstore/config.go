package etcdstore

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
)

// Scheme starts a store location that names an etcd cluster:
// etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
const Scheme = "etcd://"

// IsURL reports whether a configured store names etcd rather than a file.
func IsURL(s string) bool { return strings.HasPrefix(s, Scheme) }

// Location is a parsed etcd:// store location.
type Location struct {
	// Endpoints are host:port of the cluster's client URLs.
	Endpoints []string
	// Prefix is the key prefix of this farm's table, with a slash at
	// both ends ("/tunneldirector/farm1/").
	Prefix string
}

// ParseURL parses etcd://HOST:PORT[,HOST:PORT...]/PREFIX.
func ParseURL(s string) (Location, error) {
	var l Location
	if !IsURL(s) {
		return l, fmt.Errorf("%q is not an etcd:// URL", short(s))
	}
	rest := strings.TrimPrefix(s, Scheme)
	hosts, path, ok := strings.Cut(rest, "/")
	if !ok || strings.Trim(path, "/") == "" {
		return l, fmt.Errorf("%q names no key prefix (etcd://HOST:PORT,.../PREFIX)", short(s))
	}
	for _, h := range strings.Split(hosts, ",") {
		host, port, err := net.SplitHostPort(h)
		if err != nil || host == "" {
			return l, fmt.Errorf("%q: endpoint %q is not host:port", short(s), short(h))
		}
		if p, err := strconv.Atoi(port); err != nil || p < 1 || p > 65535 {
			return l, fmt.Errorf("%q: endpoint %q has a bad port", short(s), short(h))
		}
		l.Endpoints = append(l.Endpoints, h)
	}
	for _, c := range path {
		if c < 0x21 || c > 0x7e {
			return l, fmt.Errorf("%q: the key prefix may hold printable ASCII only", short(s))
		}
	}
	l.Prefix = "/" + strings.Trim(path, "/") + "/"
	return l, nil
}

func (l Location) String() string {
	return Scheme + strings.Join(l.Endpoints, ",") + strings.TrimSuffix(l.Prefix, "/")
}

// Config is the `etcd:` section of the daemon's configuration, read when
// `store` is an etcd:// URL.
type Config struct {
	// CAFile verifies the members' certificates; with CertFile and
	// KeyFile the client authenticates itself. Any of them set: TLS.
	CAFile   string `yaml:"ca_file"`
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// Cache is a local bbolt copy of the table, kept as the table
	// changes: a director that starts while etcd is unreachable programs
	// its kernel from it and says so.
	Cache string `yaml:"cache"`
	// Name is this director's name in the election (default: the host
	// name).
	Name string `yaml:"name"`
	// ElectionTTL is the lease of the elected director's key in seconds
	// (default 5): how long a dead leader blocks the automatic writes.
	ElectionTTL int `yaml:"election_ttl"`
}

// TLSEnabled reports whether the section asks for TLS.
func (c *Config) TLSEnabled() bool { return c.CAFile != "" || c.CertFile != "" || c.KeyFile != "" }

// Validate checks the section against the store location; every problem
// is named by its key path.
func (c *Config) Validate(store string) []error {
	var errs []error
	bad := func(key, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", key, fmt.Sprintf(format, args...)))
	}
	if !IsURL(store) {
		if *c != (Config{}) {
			bad("etcd", "set, but store %q is not an etcd:// URL", short(store))
		}
		return errs
	}
	if _, err := ParseURL(store); err != nil {
		bad("store", "%v", err)
	}
	if (c.CertFile == "") != (c.KeyFile == "") {
		bad("etcd.cert_file", "cert_file and key_file go together")
	}
	if c.ElectionTTL < 0 || c.ElectionTTL > 600 {
		bad("etcd.election_ttl", "%d seconds (want 1..600, default 5)", c.ElectionTTL)
	}
	if _, err := c.TLS(); err != nil {
		bad("etcd", "%v", err)
	}
	return errs
}

// TLS builds the client's TLS configuration (nil without TLS). A missing
// file, a certificate that does not match its key or a CA file without a
// certificate is named.
func (c *Config) TLS() (*tls.Config, error) {
	if !c.TLSEnabled() {
		return nil, nil
	}
	cfg := &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pem, err := os.ReadFile(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("ca_file %s: no PEM certificate in it", c.CAFile)
		}
		cfg.RootCAs = pool
	}
	if c.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("cert_file %s with key_file %s: %w", c.CertFile, c.KeyFile, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

func short(s string) string {
	if len(s) > 64 {
		return s[:64] + "..."
	}
	return s
}

// errOffline refuses writes while etcd cannot be reached.
var errOffline = errors.New("etcd is unreachable: this director forwards from its last table and makes no writes")
