package engine

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/golang-jwt/jwt/v5"
)

// TokenLifetime is how long a signed export name is valid. The engine
// checks it only at the handshake, which follows within milliseconds, so a
// short lifetime limits what a leaked token is worth.
const TokenLifetime = 30 * time.Second

// TokenClaims are what mvps-te reads from the export name.
type TokenClaims struct {
	ImageID      string `json:"image_id"`
	ImageSize    uint64 `json:"image_size"`
	PageSizeBits uint32 `json:"page_size_bits"`
	ClientID     string `json:"client_id,omitempty"`
	jwt.RegisteredClaims
}

// signedClaims are TokenClaims as SignToken encodes them: the same JSON,
// field for field, with the times as the whole seconds jwt's NumericDate
// writes. Encoding jwt.RegisteredClaims (nine fields, each with its own
// JSON method) cost more than the HMAC; under an emulated CPU every attach
// pays it.
type signedClaims struct {
	ImageID      string `json:"image_id"`
	ImageSize    uint64 `json:"image_size"`
	PageSizeBits uint32 `json:"page_size_bits"`
	ClientID     string `json:"client_id,omitempty"`
	ExpiresAt    int64  `json:"exp"`
	IssuedAt     int64  `json:"iat"`
}

// tokenHeader is the first segment of every token SignToken signs, as jwt
// encodes it, and the dot that ends it.
var tokenHeader = func() string {
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, jwt.MapClaims{}).SigningString()
	if err != nil {
		panic(fmt.Sprintf("engine: jwt header: %v", err))
	}
	return s[:strings.IndexByte(s, '.')+1]
}()

// PageSizeBits is the page size the provisioner asks the engine for, and
// the device's block size: smaller writes cost the engine a
// read-modify-write.
const PageSizeBits = 12

// BlockSize is 1 << PageSizeBits.
const BlockSize = 1 << PageSizeBits

// Session is what a token grants: one image, at one size, for one client.
type Session struct {
	ImageID   string
	ImageSize uint64
	ClientID  string
}

// SignToken signs an HS256 export name for a session. The token is the one
// jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString would
// make of the session's TokenClaims, byte for byte; only the claims'
// encoding is SignToken's own.
func SignToken(secret []byte, s Session, now time.Time) (string, error) {
	payload, err := json.Marshal(signedClaims{
		ImageID:      s.ImageID,
		ImageSize:    s.ImageSize,
		PageSizeBits: PageSizeBits,
		ClientID:     s.ClientID,
		ExpiresAt:    now.Add(TokenLifetime).Unix(),
		IssuedAt:     now.Unix(),
	})
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	enc := base64.RawURLEncoding
	// The header, the claims, the signature, and two dots.
	tok := make([]byte, 0, len(tokenHeader)+enc.EncodedLen(len(payload))+1+enc.EncodedLen(sha256.Size))
	tok = append(tok, tokenHeader...)
	tok = enc.AppendEncode(tok, payload)
	sig, err := jwt.SigningMethodHS256.Sign(string(tok), secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	tok = append(tok, '.')
	return string(enc.AppendEncode(tok, sig)), nil
}

// ClientID is the engine client id of image on this host. It is the same
// for every attachment of the image here, across reconnects and restarts of
// the provisioner: the engine fences a live connection whose client_id a new
// one repeats, so a write the kernel sent on an old connection of the image
// can never land after a newer attachment wrote the same block. The
// provisioner's own exclusivity keeps two live attachments apart.
func ClientID(host, imageID string) string {
	return "mvps-provisioner/" + host + "/" + imageID
}

// BackendPrefix starts the backend identifier of every device attached to
// an mvps image: the kernel shows it in /sys/block/nbdX/backend, and it is
// how a restarted provisioner tells its devices from others'.
const BackendPrefix = "mvps:"

// BackendID is the backend identifier of a device attached to imageID.
func BackendID(imageID string) string { return BackendPrefix + imageID }

// NewSecret returns 32 random bytes, hex encoded, for an engine started
// without MVPS_TE_JWT_SECRET.
func NewSecret() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}
