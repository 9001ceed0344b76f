package nms

import "testing"

func TestChunks(t *testing.T) {
	for _, reserve := range []int{0, 5000, 20000} {
		var c chunks[int]
		c.reserve(reserve)
		for i := range 15000 {
			c.add(i)
		}
		for i := range 15000 {
			if *c.at(i) != i {
				t.Fatalf("reserve %d: at(%d) = %d", reserve, i, *c.at(i))
			}
		}
		out := c.flatten()
		if len(out) != 15000 || out[14999] != 14999 || out[4096] != 4096 {
			t.Fatalf("reserve %d: flatten %d", reserve, len(out))
		}
	}
}
