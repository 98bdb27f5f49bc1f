package imageconfig

import (
	"slices"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// fileIdentity is what tells one version of a config file from another
// without reading it: any write changes its ctime (and a rename, a chmod),
// and a ConfigMap's swap puts a new file, a new inode, in its place.
type fileIdentity struct {
	dev, ino     uint64
	size         int64
	mtime, ctime unix.Timespec
}

func identityOf(st *unix.Stat_t) fileIdentity {
	return fileIdentity{dev: uint64(st.Dev), ino: st.Ino, size: st.Size, mtime: st.Mtim, ctime: st.Ctim}
}

// configCache keeps what Load parsed, by the identity of the file it read,
// so that a request for an unchanged config is answered from its fstat
// alone. Parsing is the costly part of a lookup: the strict decoder takes
// several times a file's read, on every request's path.
type configCache struct {
	mu sync.Mutex
	m  map[fileIdentity]Config
}

// parsed is Load's cache. It is bounded by the config files there are
// (Load puts only what it read from one), and cleared when it reaches
// maxCachedConfigs, which only a directory whose files are replaced
// again and again reaches.
var parsed = configCache{m: make(map[fileIdentity]Config)}

const maxCachedConfigs = 4096

// settleTime is how old a file's last change must be for its parsed
// config to be kept. File times come from a clock that ticks every few
// milliseconds, so a write in the same tick as the one before it, of the
// same length, could leave the file's identity as it was; a change that
// comes after a file has been still for this long gets a later time.
var settleTime = time.Second

func (c *configCache) get(id fileIdentity) (Config, bool) {
	c.mu.Lock()
	cfg, ok := c.m[id]
	c.mu.Unlock()
	if !ok {
		return Config{}, false
	}
	// The caller's own copy: nothing it does to the lists reaches the
	// next request's.
	return cfg.clone(), true
}

// put keeps cfg, parsed from the file st describes, if that file has been
// still for settleTime.
func (c *configCache) put(id fileIdentity, st *unix.Stat_t, cfg Config) {
	if time.Since(time.Unix(st.Ctim.Unix())) < settleTime {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.m) >= maxCachedConfigs {
		clear(c.m)
	}
	c.m[id] = cfg.clone()
}

// clone is c with lists of its own (nil stays nil: it means "any").
func (c Config) clone() Config {
	c.AllowedUIDs = slices.Clone(c.AllowedUIDs)
	c.AllowedGIDs = slices.Clone(c.AllowedGIDs)
	c.Modes = slices.Clone(c.Modes)
	c.MountOptions = slices.Clone(c.MountOptions)
	return c
}
