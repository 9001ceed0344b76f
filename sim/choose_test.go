package sim

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// BenchmarkChoices is the measurement behind the scheduler's defaults: the
// standard scenario's steps, with 0, 50 and 100 % unknown peers, replayed
// through the table with d = 1..4 and d = all, a tighter load bound, and
// the unknown-peer buckets with several horizons. Each sub-benchmark
// reports the balance (mean max/mean; mean CV; the mean max/mean before
// the first event, the steady state), the hours an added and a recovered
// node took to reach 90 % of their share (-1: not before the rebalance or
// the end), the moves on failure above the ideal, and the bucket changes.
//
//	go test -run '^$' -bench Choices -benchtime 1x ./sim/
func BenchmarkChoices(b *testing.B) {
	for _, unknown := range []float64{0, 0.5, 1} {
		s := DefaultScenario()
		s.Unknown.Share = unknown
		steps, err := Workload(s)
		if err != nil {
			b.Fatal(err)
		}
		type variant struct {
			name    string
			choices int
			epsilon float64
			u       UnknownSpec
		}
		vs := []variant{
			{"old:d=1,hash", 1, s.Epsilon, UnknownSpec{}},
			{"d=1,eps=0.05,hash", 1, 0.05, UnknownSpec{}},
			{"d=1", 1, s.Epsilon, s.Unknown},
			{"d=2", 2, s.Epsilon, s.Unknown},
			{"d=3", 3, s.Epsilon, s.Unknown},
			{"d=4", 4, s.Epsilon, s.Unknown},
			{"d=all", 0, s.Epsilon, s.Unknown},
		}
		if unknown > 0 {
			for _, h := range []float64{0.02, 0.002} {
				u := s.Unknown
				u.Horizon = h
				vs = append(vs, variant{fmt.Sprintf("d=all,horizon=%g", h), 0, s.Epsilon, u})
			}
		}
		for _, v := range vs {
			b.Run(fmt.Sprintf("unknown=%g/%s", unknown, v.name), func(b *testing.B) {
				sv := *s
				sv.Epsilon = v.epsilon
				for b.Loop() {
					r, err := newTableReplayer(v.name, &sv, v.choices, v.u)
					if err != nil {
						b.Fatal(err)
					}
					c := compareWith(steps, &sv, []replayer{r})
					res := c.Strategies[0]
					b.ReportMetric(res.MaxOverMean.Mean, "max/mean")
					b.ReportMetric(res.CV.Mean, "cv")
					b.ReportMetric(fillHours(res.FillAdded), "fill-added-h")
					b.ReportMetric(fillHours(res.FillRecovered), "fill-recovered-h")
					b.ReportMetric(float64(res.MovesOnFailure-res.IdealOnFailure+res.MovesOnAddition+res.MovesOnRecovery), "excess-moves")
					b.ReportMetric(float64(r.kernel.changes), "bucket-changes")
					var sum float64
					n := 0
					for i, h := range c.AtHours {
						if h < s.Events[0].At.Hours() && i < len(res.Series) {
							sum += res.Series[i]
							n++
						}
					}
					b.ReportMetric(sum/float64(max(n, 1)), "steady-max/mean")
				}
			})
		}
	}
}

func fillHours(s string) float64 {
	d, err := ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return -1
	}
	return d.Round(time.Minute).Hours()
}
