package devengine

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var testSecret = []byte("token test secret")

func sign(header, claims string) string {
	enc := base64.RawURLEncoding
	msg := enc.EncodeToString([]byte(header)) + "." + enc.EncodeToString([]byte(claims))
	mac := hmac.New(sha256.New, testSecret)
	mac.Write([]byte(msg))
	return msg + "." + enc.EncodeToString(mac.Sum(nil))
}

const hdr = `{"alg":"HS256","typ":"JWT"}`

func ptr(s string) *string { return &s }

// The exp boundary, with a fixed clock: jsonwebtoken refuses when
// exp < now - 60, in whole seconds.
func TestTokenExpiryLeeway(t *testing.T) {
	now := time.Unix(1_800_000_000, 999_000_000)
	tests := []struct {
		exp    string
		accept bool
	}{
		{"1800000000", true},
		{"1799999941", true},
		{"1799999940", true}, // exactly now - 60
		{"1799999939", false},
		{"1799999939.4", false}, // rounds to ...39
		{"1799999939.5", true},  // rounds to ...40
		{"0", false},
		{"-0", false}, // a float 0.0 to serde: parsed, and long expired
	}
	for _, tt := range tests {
		t.Run(tt.exp, func(t *testing.T) {
			token := sign(hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":`+tt.exp+`}`)
			_, err := verifyToken(token, testSecret, now)
			if tt.accept && err != nil {
				t.Fatalf("refused: %v", err)
			}
			if !tt.accept && err == nil {
				t.Fatal("accepted")
			}
		})
	}
}

func TestTokenClaims(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tests := []struct {
		name   string
		claims string
		want   Claims
	}{
		{
			"minimal",
			`{"image_id":"a.mvps-image","image_size":0,"page_size_bits":12,"exp":1800000000}`,
			Claims{ImageID: "a.mvps-image", PageSizeBits: 12, Exp: 1800000000},
		},
		{
			"everything, u64 max size, whitespace",
			` { "client_id" : "vm-1" , "image_id":"a.mvps-image","image_size":18446744073709551615,
			    "page_size_bits":4294967295,"exp":1.9e9,"iat":1,"nbf":{},"iss":["x",1],"aud":{"a":1},"sub":3 } `,
			Claims{ImageID: "a.mvps-image", ImageSize: 1<<64 - 1, PageSizeBits: 1<<32 - 1, ClientID: ptr("vm-1"), Exp: 1900000000},
		},
		{
			"escapes in names and values",
			`{"image_\u0069d":"a\u002emvps-image","image_size":1,"page_size_bits":12,"exp":1800000000,"client_id":"\ud83d\ude00"}`,
			Claims{ImageID: "a.mvps-image", ImageSize: 1, PageSizeBits: 12, ClientID: ptr("😀"), Exp: 1800000000},
		},
		{
			"empty client_id is a client id",
			`{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000,"client_id":""}`,
			Claims{ImageID: "a.mvps-image", ImageSize: 1, PageSizeBits: 12, ClientID: ptr(""), Exp: 1800000000},
		},
		{
			"repeated unknown claim and lone surrogate in an unknown claim",
			`{"x":1,"x":"\udc00","image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000}`,
			Claims{ImageID: "a.mvps-image", ImageSize: 1, PageSizeBits: 12, Exp: 1800000000},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := verifyToken(sign(hdr, tt.claims), testSecret, now)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Fatalf("claims (-want +got):\n%s", diff)
			}
		})
	}
}

func TestTokenRefusals(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	base := `"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000`
	tests := []struct {
		name, header, claims string
	}{
		{"image_id invalid UTF-8", hdr, `{"image_id":"a` + "\xff" + `.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000}`},
		{"claim name invalid UTF-8", hdr, `{` + base + `,"` + "\xff" + `":1}`},
		{"claim name lone surrogate", hdr, `{` + base + `,"\ud800":1}`},
		{"sub lone surrogate", hdr, `{` + base + `,"sub":"\ud800"}`},
		{"aud with invalid UTF-8 inside an array", hdr, `{` + base + `,"aud":[1,"` + "\xff" + `"]}`},
		{"nbf non-empty object", hdr, `{` + base + `,"nbf":{"a":1}}`},
		{"sub object", hdr, `{` + base + `,"sub":{}}`},
		{"exp empty array", hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":[]}`},
		{"exp infinite", hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1e400}`},
		{"exp true", hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":true}`},
		{"duplicate nbf", hdr, `{` + base + `,"nbf":1,"nbf":1}`},
		{"duplicate client_id", hdr, `{` + base + `,"client_id":"a","client_id":"a"}`},
		{"x5c not strings", `{"alg":"HS256","x5c":[1]}`, `{` + base + `}`},
		{"jwk a string", `{"alg":"HS256","jwk":"k"}`, `{` + base + `}`},
		{"alg with escapes is still HS256, typ array", `{"alg":"HS\u0032\u0035\u0036","typ":[]}`, `{` + base + `}`},
		{"duplicate typ", `{"alg":"HS256","typ":"JWT","typ":"JWT"}`, `{` + base + `}`},
		{"header trailing data", hdr + " x", `{` + base + `}`},
		{"aud nested 127 deep", hdr, `{` + base + `,"aud":` + strings.Repeat("[", 127) + strings.Repeat("]", 127) + `}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			claims, err := verifyToken(sign(tt.header, tt.claims), testSecret, now)
			if err == nil {
				t.Fatalf("accepted: %+v", claims)
			}
			if !errors.Is(err, ErrTokenRefused) {
				t.Fatalf("error %v does not wrap ErrTokenRefused", err)
			}
		})
	}
	t.Run("escaped alg HS256 accepted", func(t *testing.T) {
		if _, err := verifyToken(sign(`{"alg":"HS\u0032\u0035\u0036"}`, `{`+base+`}`), testSecret, now); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("aud nested 126 deep accepted", func(t *testing.T) {
		aud := strings.Repeat(`{"a":"]\\\"[{","b":[`, 63) + "1" + strings.Repeat("]}", 63)
		if _, err := verifyToken(sign(hdr, `{`+base+`,"aud":`+aud+`}`), testSecret, now); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("empty nbf array accepted", func(t *testing.T) {
		if _, err := verifyToken(sign(hdr, `{`+base+`,"nbf":[]}`), testSecret, now); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("aud with invalid UTF-8 string does not parse, accepted", func(t *testing.T) {
		if _, err := verifyToken(sign(hdr, `{`+base+`,"aud":"`+"\xff"+`"}`), testSecret, now); err != nil {
			t.Fatal(err)
		}
	})
}

// The secret and the token must not show up in errors, which are logged.
func TestTokenErrorsDoNotLeak(t *testing.T) {
	now := time.Unix(1_800_000_000, 0)
	tokens := []string{
		sign(hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1}`),
		sign(hdr, `{"image_id":"a.mvps-image"}`),
		sign(`{"alg":"HS512"}`, `{}`),
		sign(hdr, `not json`),
		"a.b.c",
		sign(hdr, `{}`)[:40] + "." + strings.Repeat("A", 43),
	}
	for _, token := range tokens {
		_, err := verifyToken(token, testSecret, now)
		if err == nil {
			t.Fatalf("accepted %q", token)
		}
		msg := err.Error()
		for _, part := range append(strings.Split(token, "."), string(testSecret)) {
			if len(part) >= 4 && strings.Contains(msg, part) {
				t.Fatalf("error %q contains %q", msg, part)
			}
		}
	}
}

func FuzzVerifyToken(f *testing.F) {
	f.Add(sign(hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000}`))
	f.Add(sign(hdr, `{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1.8e9,"aud":[]}`))
	f.Add("a.b.c")
	f.Add("")
	now := time.Unix(1_800_000_000, 0)
	f.Fuzz(func(t *testing.T, token string) {
		claims, err := verifyToken(token, testSecret, now)
		if err != nil {
			return
		}
		// Whatever is accepted has a signature by the secret, so the fuzzer
		// only gets here through the seeds' structure.
		if claims.Exp+60 < 1_800_000_000 {
			t.Fatalf("accepted an expired token: %+v", claims)
		}
	})
}

// FuzzClaims drives the JSON rules directly, signed, so that the fuzzer
// explores them.
func FuzzClaims(f *testing.F) {
	f.Add(`{"image_id":"a.mvps-image","image_size":1,"page_size_bits":12,"exp":1800000000}`)
	f.Add(`{"image_id":"a","image_size":-1,"page_size_bits":1.5,"exp":"x","aud":["a"],"nbf":[1],"sub":{}}`)
	f.Add(`{"image_id":"\ud800","client_id":null,"exp":1e400}`)
	now := time.Unix(1_800_000_000, 0)
	f.Fuzz(func(t *testing.T, claims string) {
		got, err := verifyToken(sign(hdr, claims), testSecret, now)
		if err != nil {
			return
		}
		var m map[string]any
		if err := json.Unmarshal([]byte(claims), &m); err != nil {
			t.Fatalf("accepted claims that are not JSON: %q: %v", claims, err)
		}
		for _, name := range []string{"image_id", "image_size", "page_size_bits", "exp"} {
			if _, ok := m[name]; !ok {
				t.Fatalf("accepted claims without %s: %q -> %+v", name, claims, got)
			}
		}
	})
}
