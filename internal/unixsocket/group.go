// Package unixsocket makes the daemon's Unix sockets: created with their
// final owner and mode, never through a symlink, and replacing only the
// socket of an instance that is gone.
package unixsocket

import (
	"fmt"
	"os/user"
	"strconv"
)

// LookupGroup resolves a group given by name or number to its gid.
func LookupGroup(group string) (int, error) {
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
