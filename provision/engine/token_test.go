package engine

import (
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/google/go-cmp/cmp"
)

func TestSignToken(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1_800_000_000, 0)
	tok, err := SignToken(secret, Session{ImageID: "vol.mvps-image", ImageSize: 1 << 30, ClientID: "host-abc"}, now)
	if err != nil {
		t.Fatal(err)
	}
	// Decode the claims generically, the way the engine sees JSON.
	claims := jwt.MapClaims{}
	parsed, err := jwt.ParseWithClaims(tok, claims, func(*jwt.Token) (any, error) { return secret, nil },
		jwt.WithValidMethods([]string{"HS256"}), jwt.WithTimeFunc(func() time.Time { return now }))
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if parsed.Header["alg"] != "HS256" {
		t.Errorf("alg = %v", parsed.Header["alg"])
	}
	want := jwt.MapClaims{
		"image_id":       "vol.mvps-image",
		"image_size":     float64(1 << 30),
		"page_size_bits": float64(12),
		"client_id":      "host-abc",
		"iat":            float64(now.Unix()),
		"exp":            float64(now.Add(TokenLifetime).Unix()),
	}
	if diff := cmp.Diff(want, claims); diff != "" {
		t.Fatalf("claims (-want +got):\n%s", diff)
	}
	if _, err := jwt.Parse(tok, func(*jwt.Token) (any, error) { return []byte("other"), nil }); err == nil {
		t.Fatal("token verifies with another secret")
	}
}

func TestClientIDIsOnePerHostAndImage(t *testing.T) {
	a := ClientID("node1", "a.mvps-image")
	if b := ClientID("node1", "a.mvps-image"); a != b {
		t.Fatalf("two attachments of one image get client ids %q and %q", a, b)
	}
	if ClientID("node1", "b.mvps-image") == a || ClientID("node2", "a.mvps-image") == a {
		t.Fatal("client id does not tell images or hosts apart")
	}
	s, err := NewSecret()
	if err != nil || len(s) != 64 {
		t.Fatalf("secret %q: %v", s, err)
	}
}
