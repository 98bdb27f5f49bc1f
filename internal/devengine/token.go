package devengine

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"
)

// Claims are the claims of an export-name token that mvps-te acts on.
type Claims struct {
	ImageID      string
	ImageSize    uint64
	PageSizeBits uint32
	// ClientID is nil when the claim is missing or null: such a connection
	// neither fences nor is fenced.
	ClientID *string
	// Exp is the expiry, in seconds since the Unix epoch.
	Exp uint64
}

// TokenLeeway is how far past exp a token is still accepted: jsonwebtoken's
// default Validation, which mvps-te uses unchanged.
const TokenLeeway = 60 * time.Second

// ErrTokenRefused wraps every reason verifyToken refuses a token.
var ErrTokenRefused = errors.New("token refused")

// verifyToken checks a token the way mvps-te 0.1.x does: jsonwebtoken 9.3
// decode::<HandshakeClaims> with Validation::default(). That means HS256 and
// nothing else, the signature compared as canonical base64url, exp required
// and checked with 60 s of leeway, nbf and iat not checked, and any aud
// claim refused because no audience is configured. The claims must also
// pass serde's derived deserializers of jsonwebtoken's Header and
// ClaimsForValidation and of mvps-te's HandshakeClaims, whose rules
// parseClaims and checkHeader reproduce.
//
// Errors never quote the token: it is a bearer credential.
func verifyToken(token string, secret []byte, now time.Time) (Claims, error) {
	c, err := verifyTokenInner(token, secret, now)
	if err != nil {
		return Claims{}, fmt.Errorf("%w: %w", ErrTokenRefused, err)
	}
	return c, nil
}

func verifyTokenInner(token string, secret []byte, now time.Time) (Claims, error) {
	// jsonwebtoken splits at the last two dots; a header with a dot in it
	// then fails to decode, so in effect there must be exactly three parts.
	message, signature, ok := cutLast(token, '.')
	if !ok {
		return Claims{}, errors.New("not a JWT: want header.payload.signature")
	}
	headerPart, payloadPart, ok := cutLast(message, '.')
	if !ok {
		return Claims{}, errors.New("not a JWT: want header.payload.signature")
	}
	header, err := decodeSegment(headerPart)
	if err != nil {
		return Claims{}, fmt.Errorf("header: %w", err)
	}
	if err := checkHeader(header); err != nil {
		return Claims{}, fmt.Errorf("header: %w", err)
	}
	mac := hmac.New(sha256.New, secret)
	mac.Write([]byte(message))
	want := base64.RawURLEncoding.EncodeToString(mac.Sum(nil))
	// jsonwebtoken re-signs and compares the base64 text, so a signature
	// with non-zero padding bits is refused too.
	if !hmac.Equal([]byte(signature), []byte(want)) {
		return Claims{}, errors.New("signature does not match the engine's secret")
	}
	payload, err := decodeSegment(payloadPart)
	if err != nil {
		return Claims{}, fmt.Errorf("payload: %w", err)
	}
	claims, err := parseClaims(payload)
	if err != nil {
		return Claims{}, err
	}
	// Validation::default(): expired when exp < now - leeway, in whole
	// seconds (reject_tokens_expiring_in_less_than is 0).
	nowSec := uint64(max(now.Unix(), 0))
	leeway := uint64(TokenLeeway / time.Second)
	if nowSec >= leeway && claims.Exp < nowSec-leeway {
		return Claims{}, fmt.Errorf("expired %ds ago (leeway %ds)", nowSec-claims.Exp, leeway)
	}
	return claims, nil
}

func cutLast(s string, sep byte) (before, after string, ok bool) {
	i := strings.LastIndexByte(s, sep)
	if i < 0 {
		return s, "", false
	}
	return s[:i], s[i+1:], true
}

// decodeSegment decodes base64url without padding as the base64 crate's
// URL_SAFE_NO_PAD engine does: no '=', no line breaks (which Go's decoder
// would skip), no non-zero trailing bits.
func decodeSegment(s string) ([]byte, error) {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('A' <= c && c <= 'Z' || 'a' <= c && c <= 'z' || '0' <= c && c <= '9' || c == '-' || c == '_') {
			return nil, fmt.Errorf("invalid base64url byte at offset %d", i)
		}
	}
	b, err := base64.RawURLEncoding.Strict().DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("invalid base64url: %w", err)
	}
	return b, nil
}

// headerFields are the fields of jsonwebtoken's Header. serde refuses a
// duplicate of any of them; other names are ignored.
var headerFields = map[string]bool{
	"typ": true, "alg": true, "cty": true, "jku": true, "jwk": true, "kid": true,
	"x5u": true, "x5c": true, "x5t": true, "x5t#S256": true,
}

func checkHeader(doc []byte) error {
	m, err := parseObject(doc, headerFields)
	if err != nil {
		return err
	}
	alg, ok := m["alg"]
	if !ok {
		return errors.New("alg missing")
	}
	name, err := serdeString(alg)
	if err != nil {
		return fmt.Errorf("alg: %w", err)
	}
	if name != "HS256" {
		return fmt.Errorf("alg %s not allowed, only HS256", strconv.QuoteToASCII(truncate(name, 16)))
	}
	for _, f := range []string{"typ", "cty", "jku", "kid", "x5u", "x5t", "x5t#S256"} {
		if v, ok := m[f]; ok && kind(v) != 'n' {
			if _, err := serdeString(v); err != nil {
				return fmt.Errorf("%s: %w", f, err)
			}
		}
	}
	if v, ok := m["x5c"]; ok && kind(v) != 'n' {
		if err := checkStringArray(v); err != nil {
			return fmt.Errorf("x5c: %w", err)
		}
	}
	// A JWK is a large tagged structure; the stand-in only requires an
	// object where jsonwebtoken would parse a full key. Tokens for mvps-te
	// never carry one.
	if v, ok := m["jwk"]; ok && kind(v) != 'n' && kind(v) != '{' {
		return errors.New("jwk: want an object")
	}
	return nil
}

// claimFields are the fields of mvps-te's HandshakeClaims and of
// jsonwebtoken's ClaimsForValidation: the claims serde looks at.
var claimFields = map[string]bool{
	"client_id": true, "image_id": true, "image_size": true, "page_size_bits": true,
	"exp": true, "nbf": true, "sub": true, "iss": true, "aud": true,
}

// parseClaims applies serde's rules: image_id a string, image_size a u64
// and page_size_bits a u32 (integer literals in range: no sign, fraction or
// exponent), client_id a string, null or missing; exp a number jsonwebtoken
// can coerce to u64. The quirks of jsonwebtoken's lenient parse of nbf, sub,
// iss and aud are reproduced where they refuse a token.
func parseClaims(doc []byte) (Claims, error) {
	m, err := parseObject(doc, claimFields)
	if err != nil {
		return Claims{}, fmt.Errorf("claims: %w", err)
	}
	var c Claims
	v, ok := m["image_id"]
	if !ok {
		return Claims{}, errors.New("claim image_id missing")
	}
	if c.ImageID, err = serdeString(v); err != nil {
		return Claims{}, fmt.Errorf("claim image_id: %w", err)
	}
	v, ok = m["image_size"]
	if !ok {
		return Claims{}, errors.New("claim image_size missing")
	}
	if c.ImageSize, err = serdeUint(v, 64); err != nil {
		return Claims{}, fmt.Errorf("claim image_size: %w", err)
	}
	v, ok = m["page_size_bits"]
	if !ok {
		return Claims{}, errors.New("claim page_size_bits missing")
	}
	bits, err := serdeUint(v, 32)
	if err != nil {
		return Claims{}, fmt.Errorf("claim page_size_bits: %w", err)
	}
	c.PageSizeBits = uint32(bits)
	if v, ok := m["client_id"]; ok && kind(v) != 'n' {
		id, err := serdeString(v)
		if err != nil {
			return Claims{}, fmt.Errorf("claim client_id: %w", err)
		}
		c.ClientID = &id
	}

	// ClaimsForValidation. exp is required: anything that does not parse
	// as a number counts as missing.
	v, ok = m["exp"]
	if !ok {
		return Claims{}, errors.New("claim exp missing (required)")
	}
	if c.Exp, err = numericDate(v); err != nil {
		return Claims{}, fmt.Errorf("claim exp: %w", err)
	}
	// nbf is parsed leniently and never checked. serde_json leaves a
	// non-empty array or object half-read after the failed parse, and the
	// rest of the document then fails.
	if v, ok := m["nbf"]; ok {
		if (kind(v) == '[' || kind(v) == '{') && !emptyCompound(v) {
			return Claims{}, errors.New("claim nbf: a non-empty array or object breaks jsonwebtoken's parse")
		}
	}
	// sub is parsed as a string; an array or object is not consumed on
	// failure and breaks the parse, other types are skipped.
	if v, ok := m["sub"]; ok && (kind(v) == '[' || kind(v) == '{') {
		return Claims{}, errors.New("claim sub: an array or object breaks jsonwebtoken's parse")
	}
	// No audience is configured, and jsonwebtoken 9 then refuses any
	// token whose aud parses: a string or an array of strings.
	if v, ok := m["aud"]; ok {
		if _, err := serdeString(v); err == nil || (kind(v) == '[' && checkStringArray(v) == nil) {
			return Claims{}, errors.New("claim aud present, but no audience is configured (jsonwebtoken refuses it)")
		}
	}
	// iss and aud are parsed through serde's buffered Content, which
	// recurses: serde_json's limit of 128 nested arrays and objects, the
	// claims object included, fails the whole decode.
	for _, f := range []string{"iss", "aud"} {
		if v, ok := m[f]; ok && 1+nestingDepth(v) >= 128 {
			return Claims{}, fmt.Errorf("claim %s: nested too deeply for serde_json", f)
		}
	}
	for _, f := range []string{"nbf", "sub", "iss", "aud"} {
		if v, ok := m[f]; ok {
			if err := checkStrings(v); err != nil {
				return Claims{}, fmt.Errorf("claim %s: %w", f, err)
			}
		}
	}
	return c, nil
}

// parseObject splits a JSON object into its members. It refuses what
// serde_json refuses while deserializing a struct from it: invalid JSON or
// trailing data, a member name that is not valid UTF-8 or holds a lone
// surrogate escape, and a repeated known field. Unknown fields are ignored,
// as serde does without deny_unknown_fields; for a repeated unknown name the
// last value is kept, which does not matter because it is never read.
func parseObject(doc []byte, known map[string]bool) (map[string][]byte, error) {
	if !json.Valid(doc) {
		return nil, errors.New("not valid JSON")
	}
	dec := json.NewDecoder(bytes.NewReader(doc))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, errors.New("not a JSON object")
	}
	m := make(map[string][]byte)
	for dec.More() {
		start := dec.InputOffset()
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		name, _ := tok.(string)
		rawName := bytes.TrimLeft(doc[start:dec.InputOffset()], " \t\r\n,")
		if err := checkStringLiteral(rawName); err != nil {
			return nil, fmt.Errorf("member name: %w", err)
		}
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, err
		}
		if _, dup := m[name]; dup && known[name] {
			return nil, fmt.Errorf("duplicate field %s", strconv.Quote(name))
		}
		m[name] = raw
	}
	if _, err := dec.Token(); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("trailing data after the JSON object")
	}
	return m, nil
}

// kind is the first byte of a JSON value: '"', '{', '[', 't', 'f', 'n', or
// '-' or a digit for a number.
func kind(v []byte) byte {
	v = bytes.TrimLeft(v, " \t\r\n")
	if len(v) == 0 {
		return 0
	}
	return v[0]
}

func isNumber(v []byte) bool {
	k := kind(v)
	return k == '-' || '0' <= k && k <= '9'
}

// serdeString decodes a JSON string the way serde_json does for a String:
// it must be a string, valid UTF-8, without lone surrogate escapes (Go
// would quietly replace both with U+FFFD).
func serdeString(v []byte) (string, error) {
	if kind(v) != '"' {
		return "", errors.New("want a string")
	}
	if err := checkStringLiteral(v); err != nil {
		return "", err
	}
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return "", err
	}
	return s, nil
}

// serdeUint decodes an unsigned integer of the given size as serde_json
// does: only an integer literal in range. "-0", "1.0" and "1e3" parse as
// floats there and are refused.
func serdeUint(v []byte, bits int) (uint64, error) {
	if !isNumber(v) || bytes.ContainsAny(v, "-.eE") {
		return 0, fmt.Errorf("want an unsigned integer (u%d)", bits)
	}
	n, err := strconv.ParseUint(string(bytes.TrimSpace(v)), 10, bits)
	if err != nil {
		return 0, fmt.Errorf("out of range for u%d", bits)
	}
	return n, nil
}

// numericDate is jsonwebtoken's numeric_type: a u64, or a float that is
// finite, non-negative and below 2^64, rounded. A negative integer, a
// string, null and so on count as not present.
func numericDate(v []byte) (uint64, error) {
	if !isNumber(v) {
		return 0, errors.New("missing: not a number (required)")
	}
	s := string(bytes.TrimSpace(v))
	if !strings.ContainsAny(s, "-.eE") {
		n, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			// serde_json parses it as a float >= 2^64, which is refused.
			return 0, errors.New("missing: does not fit u64 (required)")
		}
		return n, nil
	}
	if s[0] == '-' && !strings.ContainsAny(s, ".eE") {
		// A negative integer is an i64, which numeric_type does not take.
		return 0, errors.New("missing: negative (required)")
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil || f < 0 || f >= 0x1p64 {
		return 0, errors.New("missing: not representable as u64 (required)")
	}
	return uint64(math.Round(f)), nil
}

func checkStringArray(v []byte) error {
	var elems []json.RawMessage
	if kind(v) != '[' || json.Unmarshal(v, &elems) != nil {
		return errors.New("want an array of strings")
	}
	for _, e := range elems {
		if _, err := serdeString(e); err != nil {
			return err
		}
	}
	return nil
}

func emptyCompound(v []byte) bool {
	v = bytes.TrimSpace(v)
	return len(bytes.TrimSpace(v[1:len(v)-1])) == 0
}

// checkStringLiteral refuses a JSON string literal (or any JSON text) with
// invalid UTF-8 or a lone surrogate escape.
func checkStringLiteral(lit []byte) error {
	if !utf8.Valid(lit) {
		return errors.New("invalid UTF-8")
	}
	if hasLoneSurrogate(lit) {
		return errors.New("lone surrogate escape")
	}
	return nil
}

// checkStrings refuses strings in a value that jsonwebtoken parses leniently
// (nbf, sub, iss, aud) where serde_json's failure leaves the document
// half-read, so that the whole decode fails: a lone surrogate escape
// anywhere (an approximation: serde_json's exact position after that error
// varies), and invalid UTF-8 inside an array or object. A top-level string
// with invalid UTF-8 is consumed before the check fails, and is skipped.
// (Backslashes occur only inside strings in valid JSON, so the value can
// be scanned as a whole.)
func checkStrings(v []byte) error {
	if hasLoneSurrogate(v) {
		return errors.New("lone surrogate escape")
	}
	if kind(v) != '"' && !utf8.Valid(v) {
		return errors.New("invalid UTF-8 in a string")
	}
	return nil
}

// nestingDepth is the deepest nesting of arrays and objects in a valid JSON
// value.
func nestingDepth(v []byte) int {
	depth, deepest := 0, 0
	inString := false
	for i := 0; i < len(v); i++ {
		switch c := v[i]; {
		case inString && c == '\\':
			i++
		case c == '"':
			inString = !inString
		case inString:
		case c == '[' || c == '{':
			depth++
			deepest = max(deepest, depth)
		case c == ']' || c == '}':
			depth--
		}
	}
	return deepest
}

func hasLoneSurrogate(lit []byte) bool {
	hex4 := func(b []byte) rune {
		if len(b) < 4 {
			return -1
		}
		n, err := strconv.ParseUint(string(b[:4]), 16, 16)
		if err != nil {
			return -1
		}
		return rune(n)
	}
	for i := 0; i < len(lit); i++ {
		if lit[i] != '\\' {
			continue
		}
		i++
		if i >= len(lit) || lit[i] != 'u' {
			continue
		}
		r := hex4(lit[i+1:])
		i += 4
		switch {
		case 0xDC00 <= r && r <= 0xDFFF:
			return true
		case 0xD800 <= r && r <= 0xDBFF:
			if i+2 >= len(lit) || lit[i+1] != '\\' || lit[i+2] != 'u' {
				return true
			}
			if lo := hex4(lit[i+3:]); lo < 0xDC00 || lo > 0xDFFF {
				return true
			}
			i += 6
		}
	}
	return false
}

// truncate shortens s for a log line.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}
