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

// The token is what golang-jwt itself makes of the session's TokenClaims:
// the engine's JWT library reads the same bytes.
func TestSignTokenIsJWTsOwn(t *testing.T) {
	secret := []byte("0123456789abcdef0123456789abcdef")
	now := time.Unix(1_800_000_000, 500_000_000)
	for _, s := range []Session{
		{ImageID: "vol.mvps-image", ImageSize: 1 << 30, ClientID: ClientID("node-1", "vol.mvps-image")},
		{ImageID: "a_b-c.mvps-image", ImageSize: 1<<64 - 1},
		{ImageID: "q.mvps-image", ImageSize: 4096, ClientID: "host \"quoted\" <&> é \u2028"},
	} {
		got, err := SignToken(secret, s, now)
		if err != nil {
			t.Fatal(err)
		}
		want, err := jwt.NewWithClaims(jwt.SigningMethodHS256, TokenClaims{
			ImageID: s.ImageID, ImageSize: s.ImageSize, PageSizeBits: PageSizeBits, ClientID: s.ClientID,
			RegisteredClaims: jwt.RegisteredClaims{IssuedAt: jwt.NewNumericDate(now), ExpiresAt: jwt.NewNumericDate(now.Add(TokenLifetime))},
		}).SignedString(secret)
		if err != nil {
			t.Fatal(err)
		}
		if got != want {
			t.Errorf("session %+v:\n got %s\nwant %s", s, got, want)
		}
	}
}
