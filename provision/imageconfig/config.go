// Package imageconfig is the image configuration: what an image key
// stands for (the engine's image id and size) and what it grants (which
// callers, which modes, which mount options), parsed strictly, and the
// directory source that reads one file per key.
package imageconfig

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// Config is the content of one file in the image config directory.
// The JSON tags give the file's field names; Parse does not use
// them, it decodes the file more strictly than encoding/json would.
type Config struct {
	// ImageID is the engine's image id, suffix included.
	ImageID string `json:"image_id"`
	// ImageSize is the device size in bytes.
	ImageSize uint64 `json:"image_size"`
	// AllowedUIDs and AllowedGIDs, when not nil, list the callers (by
	// SO_PEERCRED uid and primary gid) that may attach the image. nil
	// means any caller.
	AllowedUIDs []uint32 `json:"allowed_uids,omitempty"`
	AllowedGIDs []uint32 `json:"allowed_gids,omitempty"`
	// Modes, when not nil, lists the modes ("fd", "mount") the image may
	// be attached in. nil means both.
	Modes []string `json:"modes,omitempty"`
	// MountOptions lists what a mount may have beyond nosuid,nodev
	// ("suid", "dev"). nil means nothing.
	MountOptions []string `json:"mount_options,omitempty"`
	// DiscloseExistence answers a caller that allowed_uids or
	// allowed_gids leaves out with forbidden. By default it gets what a
	// key with no config gets, not_found, so that no caller can learn
	// which keys exist by trying them.
	DiscloseExistence bool `json:"disclose_existence,omitempty"`
}

// The values "modes" and "mount_options" may hold.
var (
	imageConfigModes        = []string{"fd", "mount"}
	imageConfigMountOptions = []string{"suid", "dev"}
)

// AllowsCaller reports whether a caller with this uid and primary gid may
// attach the image. Each list that is present must contain the caller.
func (c Config) AllowsCaller(uid, gid uint32) bool {
	return (c.AllowedUIDs == nil || slices.Contains(c.AllowedUIDs, uid)) &&
		(c.AllowedGIDs == nil || slices.Contains(c.AllowedGIDs, gid))
}

// AllowsMode reports whether the image may be attached in mode, "fd" or
// "mount".
func (c Config) AllowsMode(mode string) bool {
	if c.Modes == nil {
		return slices.Contains(imageConfigModes, mode)
	}
	return slices.Contains(c.Modes, mode)
}

// AllowsMountOption reports whether the config lifts the default nosuid
// ("suid") or nodev ("dev") of a mount.
func (c Config) AllowsMountOption(opt string) bool {
	return slices.Contains(c.MountOptions, opt)
}

// imageIDPattern is mvps-te's own check; an id it would refuse after the
// handshake is refused here before anything is attached.
var imageIDPattern = regexp.MustCompile(`^[0-9a-zA-Z_-]{1,64}\.mvps-image$`)

// Errors of Load, answered with CodeNotFound and CodeInvalidConfig; and
// of a source that cannot say yet (a ConfigMap not synced since start),
// which is worth asking again.
var (
	ErrNotFound    = errors.New("no such image")
	ErrInvalid     = errors.New("invalid image config")
	ErrUnavailable = errors.New("image configs unavailable")
)

// Dir is the image config directory: one file per key, read at every
// lookup, so that edits and a ConfigMap volume's atomic "..data" swap apply
// at once.
type Dir string

// Lookup loads the config of key.
func (d Dir) Lookup(key string) (Config, error) { return Load(string(d), key) }

// maxConfigFileSize bounds what is read from a config file: a real one is
// a few dozen bytes.
const maxConfigFileSize = 64 << 10

// Load reads the file named key in dir. It is called for every
// request, so edits and a ConfigMap's atomic "..data" swap take effect at
// once: the file is checked every time, and opened, read and parsed
// unless what was parsed of it is kept (configCache). The key must have
// passed ValidateKey.
//
// Symlinks are followed, since a ConfigMap volume is made of them, but
// what is read must be a regular file: it is opened without blocking (a
// FIFO would otherwise hang the request) and checked on the open
// descriptor, so a swap between check and read cannot change what is read.
func Load(dir, key string) (Config, error) {
	if err := protocol.ValidateKey(key); err != nil {
		return Config{}, fmt.Errorf("%w: %v", protocol.ErrBadRequest, err)
	}
	path := filepath.Join(dir, key)
	// A config unchanged since it was parsed is told by a stat of its
	// path: one system call, where the open, fstat and close below are
	// three, and a file that is no regular one is never opened. The
	// identity stat and fstat give of one file is the same, and nothing is
	// read on this path, so a swap after the stat changes nothing.
	var st unix.Stat_t
	switch err := ignoringEINTR(func() error { return unix.Stat(path, &st) }); {
	case err == nil:
		if st.Mode&unix.S_IFMT != unix.S_IFREG {
			return Config{}, fmt.Errorf("%w: image config %q is not a regular file", ErrInvalid, key)
		}
		if cfg, ok := parsed.get(identityOf(&st)); ok {
			return cfg, nil
		}
	case errors.Is(err, fs.ErrNotExist):
		return Config{}, NotFound(key)
	}
	// Read: the checks again on the descriptor, which is what is read.
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC|unix.O_NOCTTY, 0)
	if errors.Is(err, fs.ErrNotExist) {
		return Config{}, NotFound(key)
	}
	if errors.Is(err, unix.ENXIO) { // a socket, or a device without its driver
		return Config{}, fmt.Errorf("%w: image config %q is not a regular file", ErrInvalid, key)
	}
	if err != nil {
		return Config{}, fmt.Errorf("open image config %q: %w", key, err)
	}
	// The descriptor is used as it is, without an *os.File, whose set-up
	// (the descriptor's flags, an attempt to register it with the poller)
	// costs two more system calls on the path of every request.
	defer unix.Close(fd)
	if err := ignoringEINTR(func() error { return unix.Fstat(fd, &st) }); err != nil {
		return Config{}, fmt.Errorf("stat image config %q: %w", key, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFREG {
		return Config{}, fmt.Errorf("%w: image config %q is not a regular file", ErrInvalid, key)
	}
	id := identityOf(&st)
	data, err := readAtMost(fd, st.Size, maxConfigFileSize)
	if err != nil {
		return Config{}, fmt.Errorf("read image config %q: %w", key, err)
	}
	if len(data) > maxConfigFileSize {
		return Config{}, fmt.Errorf("%w: image config %q is larger than %d bytes", ErrInvalid, key, maxConfigFileSize)
	}
	cfg, err := Parse(data)
	if err != nil {
		return Config{}, fmt.Errorf("%w: image config %q: %v", ErrInvalid, key, err)
	}
	parsed.put(id, &st, cfg)
	return cfg, nil
}

// readAtMost reads fd to its end, or to limit+1 bytes if it is longer, in
// one read of sizeHint+1 bytes (and the one that finds the end) when the
// file is as long as its fstat said.
func readAtMost(fd int, sizeHint int64, limit int) ([]byte, error) {
	buf := make([]byte, min(max(sizeHint, 0), int64(limit))+1)
	n := 0
	for {
		if n == len(buf) {
			if n > limit {
				return buf, nil
			}
			buf = append(buf, make([]byte, min(len(buf), limit+1-len(buf)))...)
		}
		var m int
		err := ignoringEINTR(func() error {
			var err error
			m, err = unix.Read(fd, buf[n:])
			return err
		})
		if err != nil {
			return nil, err
		}
		if m == 0 {
			return buf[:n], nil
		}
		n += m
	}
}

func ignoringEINTR(fn func() error) error {
	for {
		if err := fn(); err != unix.EINTR {
			return err
		}
	}
}

// Parse decodes strict JSON: one object whose field names are
// exactly the known ones, each at most once, image_id and image_size
// present, nothing after the object.
//
// A config file can be a symlink to any file root can read, so no error
// repeats any of data: errors name the field and say what is wrong, or
// give a byte offset, and never wrap encoding/json's errors, which quote
// the offending character or value.
func Parse(data []byte) (Config, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err == io.EOF {
		return Config{}, errors.New("not a JSON object: the file is empty")
	} else if err != nil {
		return Config{}, jsonError(dec, err)
	} else if tok != json.Delim('{') {
		return Config{}, errors.New("not a JSON object")
	}
	var cfg Config
	seen := make(map[string]bool)
	present := make(map[string]bool) // and not null
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return Config{}, jsonError(dec, err)
		}
		// Inside an object a token here is always a name (a string).
		name, _ := tok.(string)
		var value json.RawMessage
		if err := dec.Decode(&value); err != nil {
			return Config{}, jsonError(dec, err)
		}
		if !slices.Contains(imageConfigFields, name) {
			return Config{}, fmt.Errorf("unknown field before byte %d (field names are case-sensitive: %s)",
				dec.InputOffset(), strings.Join(imageConfigFields, ", "))
		}
		if seen[name] {
			return Config{}, fmt.Errorf("field %s appears twice", name)
		}
		seen[name] = true
		present[name] = string(value) != "null"
		if err := cfg.setField(name, value); err != nil {
			return Config{}, err
		}
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return Config{}, jsonError(dec, err)
	}
	if _, err := dec.Token(); err != io.EOF {
		return Config{}, errors.New("trailing data after the JSON object")
	}
	if !present["image_id"] {
		return Config{}, errors.New("image_id is missing")
	}
	if !present["image_size"] {
		return Config{}, errors.New("image_size is missing")
	}
	if err := cfg.validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

var imageConfigFields = []string{"image_id", "image_size", "allowed_uids", "allowed_gids", "modes", "mount_options", "disclose_existence"}

// jsonError describes a decoding error by position only.
func jsonError(dec *json.Decoder, err error) error {
	var syntax *json.SyntaxError
	switch {
	case errors.As(err, &syntax):
		return fmt.Errorf("not valid JSON: error at byte %d", syntax.Offset)
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return errors.New("not valid JSON: it ends before the object does")
	}
	return fmt.Errorf("not valid JSON: error before byte %d", dec.InputOffset())
}

// setField decodes one field's value into c. A null image_id or image_size
// counts as missing, as it always did.
func (c *Config) setField(name string, value json.RawMessage) error {
	isNull := string(value) == "null"
	switch name {
	case "image_id":
		if isNull {
			return nil
		}
		if value[0] != '"' || json.Unmarshal(value, &c.ImageID) != nil {
			return errors.New("image_id must be a string")
		}
	case "image_size":
		if isNull {
			return nil
		}
		n, ok := parseWholeNumber(value, math.MaxUint64)
		if !ok {
			return errors.New("image_size is not a whole number of bytes")
		}
		c.ImageSize = n
	case "allowed_uids":
		ids, err := parseIDs(name, value)
		c.AllowedUIDs = ids
		return err
	case "allowed_gids":
		ids, err := parseIDs(name, value)
		c.AllowedGIDs = ids
		return err
	case "modes":
		modes, err := parseWords(name, value, imageConfigModes)
		if err == nil && len(modes) == 0 {
			return errors.New("modes is empty: leave it out to allow both \"fd\" and \"mount\"")
		}
		c.Modes = modes
		return err
	case "mount_options":
		opts, err := parseWords(name, value, imageConfigMountOptions)
		if len(opts) > 0 {
			c.MountOptions = opts
		}
		return err
	case "disclose_existence":
		switch string(value) {
		case "true":
			c.DiscloseExistence = true
		case "false":
		default:
			return errors.New("disclose_existence must be true or false")
		}
	}
	return nil
}

// NotFound is the error for a key with no image config, from any source;
// it wraps ErrNotFound and os.ErrNotExist. A caller that an image's config
// refuses gets the same, unless the config discloses the image.
func NotFound(key string) error { return notFoundError{key} }

type notFoundError struct{ key string }

func (e notFoundError) Error() string {
	return fmt.Sprintf("%v: no image config for key %q", ErrNotFound, e.key)
}

func (e notFoundError) Is(target error) bool {
	return target == ErrNotFound || target == os.ErrNotExist
}

// parseWholeNumber accepts only a plain integer literal: encoding/json
// would also take 4096.0 or 1e6 into a float and lose precision above
// 2^53.
func parseWholeNumber(value json.RawMessage, max uint64) (uint64, bool) {
	for _, b := range value {
		if b < '0' || b > '9' {
			return 0, false
		}
	}
	n, err := strconv.ParseUint(string(value), 10, 64)
	return n, err == nil && n <= max
}

// maxID is the largest uid or gid: (uid_t)-1 means "no id" to the kernel.
const maxID = math.MaxUint32 - 1

func parseIDs(name string, value json.RawMessage) ([]uint32, error) {
	var elems []json.RawMessage
	if value[0] != '[' || json.Unmarshal(value, &elems) != nil {
		return nil, fmt.Errorf("%s must be an array of ids", name)
	}
	if len(elems) == 0 {
		return nil, fmt.Errorf("%s is empty: leave it out to allow any caller", name)
	}
	ids := make([]uint32, len(elems))
	for i, e := range elems {
		n, ok := parseWholeNumber(e, maxID)
		if !ok {
			return nil, fmt.Errorf("%s[%d] is not an id from 0 to %d", name, i, uint32(maxID))
		}
		ids[i] = uint32(n)
	}
	return ids, nil
}

func parseWords(name string, value json.RawMessage, valid []string) ([]string, error) {
	var elems []json.RawMessage
	if value[0] != '[' || json.Unmarshal(value, &elems) != nil {
		return nil, fmt.Errorf("%s must be an array of strings", name)
	}
	words := make([]string, len(elems))
	for i, e := range elems {
		if e[0] != '"' || json.Unmarshal(e, &words[i]) != nil || !slices.Contains(valid, words[i]) {
			return nil, fmt.Errorf("%s[%d] is not one of %q", name, i, valid)
		}
	}
	return words, nil
}

// validate checks what a field's type alone does not.
func (c Config) validate() error {
	if !imageIDPattern.MatchString(c.ImageID) {
		return errors.New("image_id does not match the engine's pattern: 1 to 64 of [0-9a-zA-Z_-], then .mvps-image")
	}
	if c.ImageSize == 0 {
		return errors.New("image_size must be positive")
	}
	if c.ImageSize%engine.BlockSize != 0 {
		return fmt.Errorf("image_size is not a multiple of %d", engine.BlockSize)
	}
	if c.ImageSize > 1<<62 {
		return errors.New("image_size is too large (at most 2^62 bytes)")
	}
	return nil
}
