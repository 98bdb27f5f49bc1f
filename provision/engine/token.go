package engine

import (
	"crypto/rand"
	"encoding/hex"
	"fmt"
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

// SignToken signs an HS256 export name for a session.
func SignToken(secret []byte, s Session, now time.Time) (string, error) {
	claims := TokenClaims{
		ImageID:      s.ImageID,
		ImageSize:    s.ImageSize,
		PageSizeBits: PageSizeBits,
		ClientID:     s.ClientID,
		RegisteredClaims: jwt.RegisteredClaims{
			IssuedAt:  jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(TokenLifetime)),
		},
	}
	tok, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return tok, nil
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
