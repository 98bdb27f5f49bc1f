package imageconfig

import (
	"os"
	"path/filepath"
	"testing"
)

const benchConfig = `{"image_id": "bench.mvps-image", "image_size": 1073741824, "allowed_uids": [0, 1000], "modes": ["fd", "mount"]}`

// BenchmarkParse decodes a config already in memory.
func BenchmarkParse(b *testing.B) {
	data := []byte(benchConfig)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Parse(data); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkLoad opens, checks and parses a config file, as a request does
// for a file just written.
func BenchmarkLoad(b *testing.B) { benchmarkLoad(b) }

// BenchmarkLoadUnchanged looks up a config whose file has not changed since
// it was parsed: what most requests do.
func BenchmarkLoadUnchanged(b *testing.B) {
	old := settleTime
	settleTime = 0
	b.Cleanup(func() { settleTime = old })
	benchmarkLoad(b)
}

func benchmarkLoad(b *testing.B) {
	dir := b.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "bench"), []byte(benchConfig), 0o644); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Load(dir, "bench"); err != nil {
			b.Fatal(err)
		}
	}
}
