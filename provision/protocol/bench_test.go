package protocol

import "testing"

// BenchmarkParseRequest parses a well-formed attach request, as the daemon
// does for every connection.
func BenchmarkParseRequest(b *testing.B) {
	msg := AppendRequest(nil, CommandAttach, "bench-image.key_01")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseRequest(msg); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParseRequestBadKey parses a request whose key is refused.
func BenchmarkParseRequestBadKey(b *testing.B) {
	msg := AppendRequest(nil, CommandAttach, "../etc/passwd")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ParseRequest(msg); err == nil {
			b.Fatal("bad key accepted")
		}
	}
}
