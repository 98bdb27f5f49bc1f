package provision

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

// SignToken signs an HS256 export name for one attachment.
func SignToken(secret []byte, image ImageConfig, clientID string, now time.Time) (string, error) {
	claims := TokenClaims{
		ImageID:      image.ImageID,
		ImageSize:    image.ImageSize,
		PageSizeBits: PageSizeBits,
		ClientID:     clientID,
		RegisteredClaims: jwt.RegisteredClaims{
			IssuedAt:  jwt.NewNumericDate(now),
			ExpiresAt: jwt.NewNumericDate(now.Add(TokenLifetime)),
		},
	}
	s, err := jwt.NewWithClaims(jwt.SigningMethodHS256, claims).SignedString(secret)
	if err != nil {
		return "", fmt.Errorf("sign token: %w", err)
	}
	return s, nil
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

// NewSecret returns 32 random bytes, hex encoded, for an engine started
// without MVPS_TE_JWT_SECRET.
func NewSecret() (string, error) {
	var b [32]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("generate secret: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}
