package bench

import (
	"math/rand/v2"
	"slices"
	"testing"
	"time"
)

// ratioInterval is a 90% bootstrap interval of p50(num) / p50(den) (the
// nearest-rank p50, as stats has it): the cycles are resampled with
// replacement, each cycle's two samples together, since a row's cycles
// alternate with the other's and share the machine's load. It says how far
// a ratio of one run could have come out otherwise by chance. The seed is
// fixed: the same cycles give the same interval.
func ratioInterval(num, den []time.Duration) (lo, hi float64) {
	n := min(len(num), len(den))
	if n == 0 {
		return 0, 0
	}
	const resamples = 2000
	rng := rand.New(rand.NewPCG(1, 2))
	a, b := make([]time.Duration, n), make([]time.Duration, n)
	ratios := make([]float64, resamples)
	for r := range ratios {
		for i := range n {
			j := rng.IntN(n)
			a[i], b[i] = num[j], den[j]
		}
		ratios[r] = float64(nearestRankP50(a)) / float64(nearestRankP50(b))
	}
	slices.Sort(ratios)
	return ratios[resamples*5/100], ratios[resamples*95/100-1]
}

// nearestRankP50 sorts s and returns its nearest-rank median.
func nearestRankP50(s []time.Duration) time.Duration {
	slices.Sort(s)
	return s[(len(s)+1)/2-1]
}

func TestRatioInterval(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	den := make([]time.Duration, 200)
	for i := range den {
		den[i] = 18*time.Millisecond + time.Duration(rng.Int64N(int64(20*time.Millisecond)))
	}
	// A row exactly 1.1 times the other, cycle by cycle: no room for chance.
	same := make([]time.Duration, len(den))
	for i, d := range den {
		same[i] = d * 11 / 10
	}
	if lo, hi := ratioInterval(same, den); lo < 1.0999 || hi > 1.1001 {
		t.Errorf("scaled row: interval %.4f to %.4f, want 1.1", lo, hi)
	}
	// The same scale with noise of its own: the interval holds 1.1 and is
	// some hundredths wide.
	noisy := make([]time.Duration, len(den))
	for i, d := range den {
		noisy[i] = d*11/10 + time.Duration(rng.Int64N(int64(4*time.Millisecond))) - 2*time.Millisecond
	}
	lo, hi := ratioInterval(noisy, den)
	if lo > 1.1 || hi < 1.1 || hi-lo < 0.01 || hi-lo > 0.3 {
		t.Errorf("noisy row: interval %.3f to %.3f, want about 1.1 and some hundredths wide", lo, hi)
	}
	if lo2, hi2 := ratioInterval(noisy, den); lo2 != lo || hi2 != hi {
		t.Errorf("the same cycles gave %.3f-%.3f, then %.3f-%.3f", lo, hi, lo2, hi2)
	}
	if lo, hi := ratioInterval(nil, den); lo != 0 || hi != 0 {
		t.Errorf("no cycles: %v %v", lo, hi)
	}
}
