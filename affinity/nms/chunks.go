package nms

// chunkLen is the records per chunk: big enough that chunk bookkeeping is
// nothing, small enough that the last chunk's slack is nothing either.
const chunkLen = 4096

// chunks collects records without the repeated copying (and the garbage
// that peaks at several times the data) of one ever-growing slice; the
// result is assembled once, in a slice of the exact size.
type chunks[T any] struct {
	list [][]T
	n    int
}

// reserve sizes the first chunk for the expected number of records, so
// that when the estimate holds, the records are never copied at all.
func (c *chunks[T]) reserve(n int) {
	if len(c.list) == 0 && n > chunkLen {
		c.list = append(c.list, make([]T, 0, n))
	}
}

func (c *chunks[T]) add(v T) {
	if len(c.list) == 0 || len(c.list[len(c.list)-1]) == cap(c.list[len(c.list)-1]) {
		c.list = append(c.list, make([]T, 0, chunkLen))
	}
	last := &c.list[len(c.list)-1]
	*last = append(*last, v)
	c.n++
}

func (c *chunks[T]) len() int { return c.n }

func (c *chunks[T]) at(i int) *T {
	// Only the first chunk may differ in size.
	if first := cap(c.list[0]); i >= first {
		i -= first
		return &c.list[1+i/chunkLen][i%chunkLen]
	}
	return &c.list[0][i]
}

// flatten returns all records in one slice and drops the chunks.
func (c *chunks[T]) flatten() []T {
	if len(c.list) == 1 {
		out := c.list[0]
		c.list = nil
		return out
	}
	out := make([]T, 0, c.n)
	for i, ch := range c.list {
		out = append(out, ch...)
		c.list[i] = nil
	}
	c.list = nil
	return out
}
