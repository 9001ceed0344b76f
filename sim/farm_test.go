package sim

import "testing"

// TestFarmSubnetLength checks that the generator picks a subnet length
// that fits every tunnel's subnets: a million tunnels of up to four
// subnets need /29 in 10.0.0.0/7 (at /27 they refused: "2251402 IPv4
// subnets do not fit").
func TestFarmSubnetLength(t *testing.T) {
	for _, c := range []struct{ tunnels, max, want int }{
		{10_000, 4, 27}, {1_000_000, 1, 27}, {1_000_000, 2, 28}, {1_000_000, 4, 29}, {4_000_000, 4, 31},
	} {
		if got := autoSubnet4Bits(c.tunnels, c.max); got != c.want {
			t.Errorf("%d tunnels of up to %d subnets: /%d, want /%d", c.tunnels, c.max, got, c.want)
		}
	}
	f, err := GenerateFarm(FarmSpec{Seed: 1, Nodes: 4, Tunnels: 2000, MaxSubnets: 4})
	if err != nil {
		t.Fatal(err)
	}
	if b := f.Tunnels[0].Subnets[0].Bits(); b != 27 {
		t.Errorf("small farm: /%d subnets, want /27", b)
	}
	if testing.Short() {
		return
	}
	// The farm the scale script imports.
	f, err = GenerateFarm(FarmSpec{Seed: 1, Nodes: 16, Tunnels: 1_000_000, MaxSubnets: 4, IPv6Share: 0.1})
	if err != nil {
		t.Fatal(err)
	}
	if n := len(f.Tunnels); n != 1_000_000 {
		t.Fatalf("%d tunnels", n)
	}
}
