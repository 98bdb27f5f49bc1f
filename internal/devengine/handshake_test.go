package devengine_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/golang-jwt/jwt/v5"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine"
	"github.com/mvps-provisioner/mvps-provisioner/internal/devengine/devenginetest"
)

const testImage = "conformance-1.mvps-image"

func validToken(e *devenginetest.Engine) string {
	return e.Token(devenginetest.Claims{ImageID: testImage, ImageSize: 1 << 20, PageSizeBits: 12})
}

func TestGreetingBytes(t *testing.T) {
	e := devenginetest.New(t)
	c := dial(t, e)
	c.expectHex("greeting", hexGreeting)
}

func TestClientFlags(t *testing.T) {
	e := devenginetest.New(t)
	for _, flags := range []string{"00000000", "00000001", "00000002", "00000007", "80000003", "00010003"} {
		t.Run(flags, func(t *testing.T) {
			c := dial(t, e)
			c.expectHex("greeting", hexGreeting)
			c.sendHex(flags)
			c.expectClosed("after client flags " + flags)
		})
	}
	t.Run("00000003", func(t *testing.T) {
		c := dial(t, e)
		c.handshake(validToken(e), 1<<20)
	})
}

func TestOptionFraming(t *testing.T) {
	e := devenginetest.New(t)
	t.Run("bad IHAVEOPT", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex("49484156454f5055" + "00000007" + "00000000")
		c.expectClosed("after a bad option magic")
	})
	t.Run("option length 65537", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(hexIHAVEOPT + "00000007" + "00010001")
		c.expectClosed("after an option of 65537 bytes")
	})
	t.Run("export name length 65537", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(hexIHAVEOPT + "00000001" + "00010001")
		c.expectClosed("after an export name of 65537 bytes")
	})
	t.Run("option length 65536 accepted", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(optionHex(7, make([]byte, 65536)))
		c.expectHex("ERR_UNSUP for a 64 KiB NBD_OPT_GO", optionReplyHex(7, 0x80000001))
		c.sendExportName(validToken(e))
		c.expectHex("export info", exportInfoHex(1<<20))
	})
	t.Run("export name not UTF-8", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(optionHex(1, []byte("a.b\xff.c")))
		c.expectClosed("after an export name that is not UTF-8")
	})
	t.Run("empty export name", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(optionHex(1, nil))
		c.expectClosed("after an empty export name")
	})
}

// Every option but EXPORT_NAME and ABORT gets ERR_UNSUP, with its data read
// and ignored, and negotiation goes on.
func TestUnsupportedOptions(t *testing.T) {
	e := devenginetest.New(t)
	// NBD_OPT_GO/INFO data: export name length, name, zero info requests.
	goData := []byte("\x00\x00\x00\x03abc\x00\x00")
	options := []struct {
		name string
		opt  uint32
		data []byte
	}{
		{"GO", 7, goData},
		{"INFO", 6, goData},
		{"LIST", 3, nil},
		{"STRUCTURED_REPLY", 8, nil},
		{"STARTTLS", 5, nil},
		{"PEEK_EXPORT", 4, nil},
		{"LIST_META_CONTEXT", 9, []byte("whatever")},
		{"SET_META_CONTEXT", 10, nil},
		{"zero", 0, nil},
		{"unknown 99", 99, []byte{1, 2, 3}},
		{"unknown 0xffffffff", 0xffffffff, nil},
	}
	for _, o := range options {
		t.Run(o.name, func(t *testing.T) {
			c := dial(t, e)
			c.greet()
			c.sendHex(optionHex(o.opt, o.data))
			c.expectHex("reply", optionReplyHex(o.opt, 0x80000001))
			c.sendExportName(validToken(e))
			c.expectHex("export info", exportInfoHex(1<<20))
		})
	}
	t.Run("all in a row", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		var send, want string
		for _, o := range options {
			send += optionHex(o.opt, o.data)
			want += optionReplyHex(o.opt, 0x80000001)
		}
		c.sendHex(send)
		c.expectHex("replies", want)
		c.sendExportName(validToken(e))
		c.expectHex("export info", exportInfoHex(1<<20))
	})
}

// mvps-te ACKs NBD_OPT_ABORT and then keeps reading options; a real client
// closes, but one that goes on is still served.
func TestAbort(t *testing.T) {
	e := devenginetest.New(t)
	t.Run("ACK then close", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(optionHex(2, nil))
		c.expectHex("ACK", optionReplyHex(2, 1))
		c.conn.Close()
	})
	t.Run("ACK then export name", func(t *testing.T) {
		c := dial(t, e)
		c.greet()
		c.sendHex(optionHex(2, []byte("ignored")))
		c.expectHex("ACK", optionReplyHex(2, 1))
		c.sendExportName(validToken(e))
		c.expectHex("export info", exportInfoHex(1<<20))
	})
}

// claims builds a claims object from the base claims with some replaced
// or removed: override maps a claim to its literal JSON, "" removes it.
func claims(override map[string]string) string {
	base := []struct{ name, value string }{
		{"image_id", `"` + testImage + `"`},
		{"image_size", "1048576"},
		{"page_size_bits", "12"},
		{"exp", fmt.Sprint(time.Now().Add(10 * time.Minute).Unix())},
	}
	var parts []string
	seen := map[string]bool{}
	for _, b := range base {
		seen[b.name] = true
		v, ok := override[b.name]
		if !ok {
			v = b.value
		}
		if v != "" {
			parts = append(parts, fmt.Sprintf("%q:%s", b.name, v))
		}
	}
	for name, v := range override {
		if !seen[name] && v != "" {
			parts = append(parts, fmt.Sprintf("%q:%s", name, v))
		}
	}
	return "{" + strings.Join(parts, ",") + "}"
}

// TestTokens: a refused token closes the connection with no reply at all;
// an accepted one gets exactly the 10 bytes of export info.
func TestTokens(t *testing.T) {
	e := devenginetest.New(t)
	now := time.Now()
	otherSecret := []byte("not the engine's secret")
	sign := func(header, claims string) string { return signRaw(e.Secret, header, claims) }
	jwtToken := func(method jwt.SigningMethod, key any, c jwt.MapClaims) string {
		s, err := jwt.NewWithClaims(method, c).SignedString(key)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	libClaims := jwt.MapClaims{
		"image_id": testImage, "image_size": 1 << 20, "page_size_bits": 12,
		"client_id": "golang-jwt", "exp": now.Add(time.Hour).Unix(),
	}
	valid := sign(hs256Header, claims(nil))
	tests := []struct {
		name   string
		token  string
		accept bool
	}{
		{"valid", valid, true},
		{"valid, signed by golang-jwt", jwtToken(jwt.SigningMethodHS256, e.Secret, libClaims), true},
		{"valid, header without typ", sign(`{"alg":"HS256"}`, claims(nil)), true},
		{"valid, header with kid and unknown fields", sign(`{"alg":"HS256","kid":"k1","foo":[1,{}]}`, claims(nil)), true},
		{"valid, client_id", sign(hs256Header, claims(map[string]string{"client_id": `"vm-1"`})), true},
		{"valid, client_id null", sign(hs256Header, claims(map[string]string{"client_id": "null"})), true},
		{"valid, unknown claims", sign(hs256Header, claims(map[string]string{"foo": `{"bar":[1,2]}`, "iss": `"me"`, "sub": `"you"`})), true},
		{"valid, exp as a float", sign(hs256Header, claims(map[string]string{"exp": fmt.Sprintf("%d.5", now.Add(time.Hour).Unix())})), true},
		{"valid, exp in exponent form", sign(hs256Header, claims(map[string]string{"exp": "9.9e9"})), true},
		{"valid, expired within the 60 s leeway", sign(hs256Header, claims(map[string]string{"exp": fmt.Sprint(now.Add(-30 * time.Second).Unix())})), true},
		{"valid, nbf in the future (not checked)", sign(hs256Header, claims(map[string]string{"nbf": fmt.Sprint(now.Add(time.Hour).Unix())})), true},
		{"valid, iat in the future (not checked)", sign(hs256Header, claims(map[string]string{"iat": fmt.Sprint(now.Add(time.Hour).Unix())})), true},
		{"valid, nbf a string (parsed leniently)", sign(hs256Header, claims(map[string]string{"nbf": `"soon"`})), true},
		{"valid, aud a number (does not parse as an audience)", sign(hs256Header, claims(map[string]string{"aud": "5"})), true},
		{"valid, aud null", sign(hs256Header, claims(map[string]string{"aud": "null"})), true},

		{"bad signature", signRaw(otherSecret, hs256Header, claims(nil)), false},
		{"signature of another token", valid[:strings.LastIndexByte(valid, '.')] + sign(hs256Header, claims(map[string]string{"x": "1"}))[strings.LastIndexByte(valid, '.'):], false},
		{"no signature", valid[:strings.LastIndexByte(valid, '.')+1], false},
		{"signature with padding", valid + "=", false},
		{"golang-jwt HS512", jwtToken(jwt.SigningMethodHS512, e.Secret, libClaims), false},
		{"golang-jwt HS384", jwtToken(jwt.SigningMethodHS384, e.Secret, libClaims), false},
		{"HS512", sign(`{"alg":"HS512","typ":"JWT"}`, claims(nil)), false},
		{"alg none", sign(`{"alg":"none","typ":"JWT"}`, claims(nil)), false},
		{"alg none with an HS256 signature", signHS256(e.Secret, `{"alg":"none"}`, claims(nil)), false},
		{"alg RS256 with an HS256 signature", signHS256(e.Secret, `{"alg":"RS256"}`, claims(nil)), false},
		{"alg hs256 (case)", sign(`{"alg":"hs256"}`, claims(nil)), false},
		{"alg missing", sign(`{"typ":"JWT"}`, claims(nil)), false},
		{"header typ a number", sign(`{"alg":"HS256","typ":1}`, claims(nil)), false},
		{"header duplicate alg", sign(`{"alg":"HS256","alg":"HS256"}`, claims(nil)), false},
		{"header not an object", sign(`["HS256"]`, claims(nil)), false},
		{"two parts", strings.Join(strings.Split(valid, ".")[:2], "."), false},
		{"four parts", valid + ".x", false},
		{"line break in the payload", strings.Replace(valid, ".", ".\n", 1), false},
		{"expired beyond the leeway", sign(hs256Header, claims(map[string]string{"exp": fmt.Sprint(now.Add(-2 * time.Minute).Unix())})), false},
		{"exp missing", sign(hs256Header, claims(map[string]string{"exp": ""})), false},
		{"exp a string", sign(hs256Header, claims(map[string]string{"exp": fmt.Sprintf(`"%d"`, now.Add(time.Hour).Unix())})), false},
		{"exp null", sign(hs256Header, claims(map[string]string{"exp": "null"})), false},
		{"exp negative", sign(hs256Header, claims(map[string]string{"exp": "-1"})), false},
		{"exp beyond u64", sign(hs256Header, claims(map[string]string{"exp": "18446744073709551616"})), false},
		{"image_id missing", sign(hs256Header, claims(map[string]string{"image_id": ""})), false},
		{"image_id a number", sign(hs256Header, claims(map[string]string{"image_id": "7"})), false},
		{"image_id null", sign(hs256Header, claims(map[string]string{"image_id": "null"})), false},
		{"image_id lone surrogate", sign(hs256Header, claims(map[string]string{"image_id": `"\ud800.mvps-image"`})), false},
		{"image_size missing", sign(hs256Header, claims(map[string]string{"image_size": ""})), false},
		{"image_size a string", sign(hs256Header, claims(map[string]string{"image_size": `"1048576"`})), false},
		{"image_size negative", sign(hs256Header, claims(map[string]string{"image_size": "-1048576"})), false},
		{"image_size -0", sign(hs256Header, claims(map[string]string{"image_size": "-0"})), false},
		{"image_size fractional", sign(hs256Header, claims(map[string]string{"image_size": "1048576.0"})), false},
		{"image_size exponent", sign(hs256Header, claims(map[string]string{"image_size": "1e6"})), false},
		{"image_size beyond u64", sign(hs256Header, claims(map[string]string{"image_size": "18446744073709551616"})), false},
		{"page_size_bits missing", sign(hs256Header, claims(map[string]string{"page_size_bits": ""})), false},
		{"page_size_bits a string", sign(hs256Header, claims(map[string]string{"page_size_bits": `"12"`})), false},
		{"page_size_bits beyond u32", sign(hs256Header, claims(map[string]string{"page_size_bits": "4294967296"})), false},
		{"page_size_bits fractional", sign(hs256Header, claims(map[string]string{"page_size_bits": "12.5"})), false},
		{"client_id a number", sign(hs256Header, claims(map[string]string{"client_id": "1"})), false},
		{"client_id an object", sign(hs256Header, claims(map[string]string{"client_id": `{}`})), false},
		{"aud a string", sign(hs256Header, claims(map[string]string{"aud": `"mvps-te"`})), false},
		{"aud an array of strings", sign(hs256Header, claims(map[string]string{"aud": `["mvps-te"]`})), false},
		{"aud an empty array", sign(hs256Header, claims(map[string]string{"aud": `[]`})), false},
		{"sub an array", sign(hs256Header, claims(map[string]string{"sub": `[]`})), false},
		{"nbf a non-empty array", sign(hs256Header, claims(map[string]string{"nbf": `[1]`})), false},
		{"duplicate image_id", sign(hs256Header, strings.Replace(claims(nil), "{", `{"image_id":"x.mvps-image",`, 1)), false},
		{"duplicate exp", sign(hs256Header, strings.Replace(claims(nil), "{", `{"exp":1,`, 1)), false},
		{"claims an array", sign(hs256Header, `[null,"`+testImage+`",1048576,12]`), false},
		{"claims trailing data", sign(hs256Header, claims(nil)+"{}"), false},
		{"claims not JSON", sign(hs256Header, "image_id="+testImage), false},
		{"garbage", "hello", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := dial(t, e)
			c.greet()
			c.sendExportName(tt.token)
			if tt.accept {
				c.expectHex("export info", exportInfoHex(1<<20))
			} else {
				c.expectClosed("after the token")
			}
		})
	}
}

// A client that connects and then stalls is dropped once the handshake
// deadline passes, at any point of the handshake, so idle connections
// cannot pile up in the engine.
func TestHandshakeDeadline(t *testing.T) {
	_, d, _ := start(t, devengine.Config{Secret: []byte("k"), ImageDir: t.TempDir(), HandshakeTimeout: 100 * time.Millisecond})
	t.Run("silent", func(t *testing.T) {
		c := dial(t, d)
		c.expectHex("greeting", hexGreeting)
		c.expectClosed("after the greeting")
	})
	t.Run("stalls in an option", func(t *testing.T) {
		c := dial(t, d)
		c.greet()
		c.sendHex(hexIHAVEOPT + be32(1) + be32(100) + "00")
		c.expectClosed("in the middle of an option")
	})
	t.Run("served after the handshake", func(t *testing.T) {
		c := dial(t, d)
		c.handshake(signHS256([]byte("k"), hs256Header,
			`{"image_id":"slow.mvps-image","image_size":4096,"page_size_bits":12,"exp":4102444800}`), 4096)
		// Idle past the handshake deadline: a connection that made its
		// handshake is not bound by it any more.
		idle := time.NewTimer(300 * time.Millisecond)
		<-idle.C
		c.readAt(1, 0, make([]byte, 512))
	})
}
