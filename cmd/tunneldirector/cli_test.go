package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tunneldirector/tunneldirector/director"
)

// run executes the CLI in-process against a store and returns its output.
func run(t *testing.T, db string, args ...string) (string, error) {
	t.Helper()
	return runArgs(t, append([]string{"--db", db}, args...)...)
}

// runArgs executes the CLI in-process with exactly these arguments.
func runArgs(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out bytes.Buffer
	g := &globals{out: &out, errOut: &out}
	root := newRoot(g)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func mustRun(t *testing.T, db string, args ...string) string {
	t.Helper()
	out, err := run(t, db, args...)
	if err != nil {
		t.Fatalf("tunneldirector %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func TestImportExportRoundTrip(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "td.db")
	mustRun(t, db, "import", "../../examples/nodes.csv")
	out := mustRun(t, db, "import", "../../examples/tunnels.csv")
	if !strings.Contains(out, "7 added") || !strings.Contains(out, "committed revision 2") {
		t.Fatalf("first import: %s", out)
	}
	// The same file again: nothing changes, no revision bump.
	out = mustRun(t, db, "import", "../../examples/tunnels.csv")
	if !strings.Contains(out, "nothing to change") || !strings.Contains(out, "revision 2") {
		t.Fatalf("re-import: %s", out)
	}
	// The JSON example holds the same tunnels.
	out = mustRun(t, db, "import", "--dry-run", "../../examples/tunnels.json")
	if !strings.Contains(out, "0 added, 0 changed") {
		t.Fatalf("JSON example differs from the CSV one: %s", out)
	}

	// Export, import into a fresh store, export again: byte for byte.
	for _, format := range []string{"csv", "json"} {
		exp := filepath.Join(dir, "export."+format)
		mustRun(t, db, "export", "-o", exp)
		nodesExp := filepath.Join(dir, "nodes."+format)
		mustRun(t, db, "export", "--kind", "nodes", "-o", nodesExp)
		db2 := filepath.Join(dir, "fresh-"+format+".db")
		mustRun(t, db2, "import", nodesExp)
		mustRun(t, db2, "import", exp)
		exp2 := filepath.Join(dir, "export2."+format)
		mustRun(t, db2, "export", "-o", exp2)
		a, _ := os.ReadFile(exp)
		b, _ := os.ReadFile(exp2)
		if !bytes.Equal(a, b) {
			t.Fatalf("%s export does not round-trip:\n%s\n---\n%s", format, a, b)
		}
		// Importing the export into the original store changes nothing.
		out = mustRun(t, db, "import", exp)
		if !strings.Contains(out, "nothing to change") {
			t.Fatalf("import of own %s export changed something: %s", format, out)
		}
	}

	out = mustRun(t, db, "lookup", "10.3.9.1")
	if !strings.Contains(out, "inside 10.3.8.0/21, protected by tunnel ipsec-munich-01") {
		t.Fatalf("lookup: %s", out)
	}
	out = mustRun(t, db, "--json", "lookup", "192.0.2.10")
	var m struct {
		Found bool
		Match struct{ By string }
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil || !m.Found || m.Match.By != "peer" {
		t.Fatalf("lookup --json: %v %s", err, out)
	}
}

func TestImportIsAllOrNothing(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "td.db")
	mustRun(t, db, "import", "../../examples/nodes.csv")
	mustRun(t, db, "import", "../../examples/tunnels.csv")
	before := mustRun(t, db, "export")

	bad := filepath.Join(dir, "bad.csv")
	os.WriteFile(bad, []byte(`id,peer,subnets,node
new-1,192.0.2.200,10.90.0.0/24,
new-2,192.0.2.201,10.1.0.128/25,
new-3,192.0.2.202,10.91.0.1/24,
new-4,192.0.2.203,10.92.0.0/24,vpn-nope
`), 0o600)
	out, err := run(t, db, "import", bad)
	if err == nil {
		t.Fatalf("bad file imported: %s", out)
	}
	msg := err.Error()
	for _, want := range []string{
		"bad.csv:3", "10.1.0.128/25", "ipsec-berlin-01", // overlaps an existing tunnel
		"bad.csv:4", "host bits", "10.91.0.0/24",
		"bad.csv:5", "vpn-nope",
	} {
		if !strings.Contains(msg, want) {
			t.Errorf("error lacks %q:\n%s", want, msg)
		}
	}
	if after := mustRun(t, db, "export"); after != before {
		t.Fatal("a refused import changed the store")
	}
	if director.ExitCode(err) != 2 {
		t.Errorf("exit code %d for refused input, want 2", director.ExitCode(err))
	}
}

func TestReplaceAndNodeActions(t *testing.T) {
	dir := t.TempDir()
	db := filepath.Join(dir, "td.db")
	mustRun(t, db, "gen", "--dir", dir, "--nodes", "4", "--tunnels", "400", "--pinned", "0")
	mustRun(t, db, "import", filepath.Join(dir, "nodes.csv"))
	mustRun(t, db, "import", filepath.Join(dir, "tunnels.csv"))

	out := mustRun(t, db, "--json", "node", "down", "vpn-02")
	var res struct {
		Plan struct {
			Moves []struct{ From, To string }
		}
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil {
		t.Fatal(err)
	}
	if len(res.Plan.Moves) == 0 {
		t.Fatal("node down moved nothing")
	}
	for _, m := range res.Plan.Moves {
		if m.From != "vpn-02" || m.To == "vpn-02" {
			t.Fatalf("node down moved %+v", m)
		}
	}
	if out := mustRun(t, db, "show", "tunnels", "--node", "vpn-02"); !strings.Contains(out, "ID") || strings.Count(out, "\n") != 1 {
		t.Fatalf("down node still has tunnels:\n%s", out)
	}
	// Re-importing the NMS file after the failure changes nothing.
	if out := mustRun(t, db, "import", filepath.Join(dir, "tunnels.csv")); !strings.Contains(out, "nothing to change") {
		t.Fatalf("re-import after node failure: %s", out)
	}

	// Replace with a file of 3 tunnels removes the rest.
	small := filepath.Join(dir, "small.csv")
	os.WriteFile(small, []byte("id,peer,subnets\nsite-0000001,100.64.0.0,10.0.0.0/27\nx,192.0.2.1,10.200.0.0/24\ny,192.0.2.2,10.201.0.0/24\n"), 0o600)
	out = mustRun(t, db, "import", "--replace", "--dry-run", small)
	if !strings.Contains(out, "2 added") || !strings.Contains(out, "removed") || !strings.Contains(out, "dry run") {
		t.Fatalf("dry run replace: %s", out)
	}
	mustRun(t, db, "import", "--replace", small)
	out = mustRun(t, db, "show", "nodes")
	if !strings.Contains(out, "3 tunnels") {
		t.Fatalf("after replace: %s", out)
	}

	out, err := run(t, db, "rebalance")
	if err == nil || !strings.Contains(err.Error(), "--max-moves is required") {
		t.Fatalf("rebalance without budget: %v %s", err, out)
	}
}

func TestStoreErrors(t *testing.T) {
	dir := t.TempDir()
	notStore := filepath.Join(dir, "tunnels.csv")
	os.WriteFile(notStore, []byte("id,peer,subnets\n"), 0o600)
	if _, err := run(t, notStore, "show", "nodes"); err == nil || !strings.Contains(err.Error(), "not a tunneldirector store") {
		t.Fatalf("csv as store: %v", err)
	}
	db := filepath.Join(dir, "td.db")
	mustRun(t, db, "import", "../../examples/nodes.csv")
	out := mustRun(t, db, "store", "check")
	if !strings.Contains(out, "ok") {
		t.Fatalf("check: %s", out)
	}
	backup := filepath.Join(dir, "copy.db")
	mustRun(t, db, "store", "backup", backup)
	if out := mustRun(t, backup, "show", "nodes"); !strings.Contains(out, "vpn-e") {
		t.Fatalf("backup lacks nodes: %s", out)
	}
}
