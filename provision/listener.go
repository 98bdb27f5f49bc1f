package provision

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"strconv"
	"syscall"
	"time"
)

// ListenConfig says where and for whom the provisioner listens.
type ListenConfig struct {
	Path string
	// Mode is the socket's permission bits; connecting needs write access.
	Mode fs.FileMode
	// Group, a name or a numeric id, owns the socket when set.
	Group string
}

// Listen opens the SEQPACKET socket. A socket file left by a dead instance
// is replaced; one that a live instance answers on is left alone and is an
// error, as is any other kind of file at the path.
func Listen(cfg ListenConfig) (*net.UnixListener, error) {
	gid := -1
	if cfg.Group != "" {
		var err error
		if gid, err = lookupGroup(cfg.Group); err != nil {
			return nil, err
		}
	}
	if err := removeStaleSocket(cfg.Path); err != nil {
		return nil, err
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: cfg.Path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listen on %s: %w", cfg.Path, err)
	}
	if gid >= 0 {
		if err := os.Chown(cfg.Path, -1, gid); err != nil {
			ln.Close()
			return nil, fmt.Errorf("set group of %s: %w", cfg.Path, err)
		}
	}
	if err := os.Chmod(cfg.Path, cfg.Mode); err != nil {
		ln.Close()
		return nil, fmt.Errorf("set mode of %s: %w", cfg.Path, err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("check %s: %w", path, err)
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("%s exists and is not a socket; not replacing it", path)
	}
	c, err := net.DialTimeout("unixpacket", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%s: another provisioner is listening there", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether another provisioner listens there: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove stale socket %s: %w", path, err)
	}
	return nil
}

func lookupGroup(group string) (int, error) {
	if gid, err := strconv.Atoi(group); err == nil && gid >= 0 {
		return gid, nil
	}
	g, err := user.LookupGroup(group)
	if err != nil {
		return -1, fmt.Errorf("socket group %q: %w", group, err)
	}
	gid, err := strconv.Atoi(g.Gid)
	if err != nil {
		return -1, fmt.Errorf("socket group %q has gid %q: %w", group, g.Gid, err)
	}
	return gid, nil
}
