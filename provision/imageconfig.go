package provision

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
)

// ImageConfig is the content of one file in the image config directory.
type ImageConfig struct {
	// ImageID is the engine's image id, suffix included.
	ImageID string `json:"image_id"`
	// ImageSize is the device size in bytes.
	ImageSize uint64 `json:"image_size"`
	// TEMPORARY until the parser lands.
	AllowedUIDs, AllowedGIDs []uint32
	Modes, MountOptions      []string
}

func (c ImageConfig) AllowsCaller(uid, gid uint32) bool {
	if c.AllowedUIDs == nil && c.AllowedGIDs == nil {
		return true
	}
	return slices.Contains(c.AllowedUIDs, uid) || slices.Contains(c.AllowedGIDs, gid)
}

func (c ImageConfig) AllowsMode(mode string) bool {
	return c.Modes == nil || slices.Contains(c.Modes, mode)
}

func (c ImageConfig) AllowsMountOption(opt string) bool {
	return slices.Contains(c.MountOptions, opt)
}

// imageIDPattern is mvps-te's own check; an id it would refuse after the
// handshake is refused here before anything is attached.
var imageIDPattern = regexp.MustCompile(`^[0-9a-zA-Z_-]{1,64}\.mvps-image$`)

// PageSizeBits is the page size the provisioner asks the engine for, and
// the device's block size: smaller writes cost the engine a
// read-modify-write.
const PageSizeBits = 12

// BlockSize is 1 << PageSizeBits.
const BlockSize = 1 << PageSizeBits

// maxConfigFileSize bounds what is read from a config file: a real one is
// a few dozen bytes.
const maxConfigFileSize = 64 << 10

// LoadImageConfig reads the file named key in dir. It is called for every
// request, so edits and a ConfigMap's atomic "..data" swap take effect at
// once. The key must have passed ValidateKey.
func LoadImageConfig(dir, key string) (ImageConfig, error) {
	if err := ValidateKey(key); err != nil {
		return ImageConfig{}, replyErrorf(CodeBadRequest, "%v", err)
	}
	f, err := os.Open(filepath.Join(dir, key))
	if errors.Is(err, fs.ErrNotExist) {
		return ImageConfig{}, replyErrorf(CodeNotFound, "no image config for key %q", key)
	}
	if err != nil {
		return ImageConfig{}, replyErrorf(CodeInternal, "open image config %q: %v", key, err)
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return ImageConfig{}, replyErrorf(CodeInternal, "stat image config %q: %v", key, err)
	} else if !st.Mode().IsRegular() {
		return ImageConfig{}, replyErrorf(CodeInvalidConfig, "image config %q is not a regular file", key)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxConfigFileSize+1))
	if err != nil {
		return ImageConfig{}, replyErrorf(CodeInternal, "read image config %q: %v", key, err)
	}
	if len(data) > maxConfigFileSize {
		return ImageConfig{}, replyErrorf(CodeInvalidConfig, "image config %q is larger than %d bytes", key, maxConfigFileSize)
	}
	cfg, err := ParseImageConfig(data)
	if err != nil {
		return ImageConfig{}, replyErrorf(CodeInvalidConfig, "image config %q: %v", key, err)
	}
	return cfg, nil
}

// ParseImageConfig decodes strict JSON: one object with exactly the known
// fields, both present, nothing after it.
func ParseImageConfig(data []byte) (ImageConfig, error) {
	var raw struct {
		ImageID   *string          `json:"image_id"`
		ImageSize *json.RawMessage `json:"image_size"`
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		return ImageConfig{}, fmt.Errorf("not a JSON object with image_id and image_size: %w", err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return ImageConfig{}, errors.New("trailing data after the JSON object")
	}
	if raw.ImageID == nil {
		return ImageConfig{}, errors.New("image_id is missing")
	}
	if raw.ImageSize == nil {
		return ImageConfig{}, errors.New("image_size is missing")
	}
	cfg := ImageConfig{ImageID: *raw.ImageID}
	if !imageIDPattern.MatchString(cfg.ImageID) {
		return ImageConfig{}, fmt.Errorf("image_id %q does not match %s", cfg.ImageID, imageIDPattern)
	}
	// Decode the size as an integer literal: json would accept 4096.0 or
	// 1e6 into a float first and lose precision above 2^53.
	if err := json.Unmarshal(*raw.ImageSize, &cfg.ImageSize); err != nil {
		return ImageConfig{}, fmt.Errorf("image_size %s is not a whole number of bytes", *raw.ImageSize)
	}
	if cfg.ImageSize == 0 {
		return ImageConfig{}, errors.New("image_size must be positive")
	}
	if cfg.ImageSize%BlockSize != 0 {
		return ImageConfig{}, fmt.Errorf("image_size %d is not a multiple of %d", cfg.ImageSize, BlockSize)
	}
	if cfg.ImageSize > 1<<62 {
		return ImageConfig{}, fmt.Errorf("image_size %d is too large", cfg.ImageSize)
	}
	return cfg, nil
}
