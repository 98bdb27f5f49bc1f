package engine

import (
	"testing"
	"time"
)

// BenchmarkSignToken signs one export name, as every attach does.
func BenchmarkSignToken(b *testing.B) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	s := Session{ImageID: "bench.mvps-image", ImageSize: 1 << 30, ClientID: ClientID("host", "bench.mvps-image")}
	now := time.Now()
	b.ReportAllocs()
	for b.Loop() {
		if _, err := SignToken(secret, s, now); err != nil {
			b.Fatal(err)
		}
	}
}
