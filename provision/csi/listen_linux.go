package csi

import (
	"fmt"
	"net"

	"github.com/mvps-provisioner/mvps-provisioner/internal/unixsocket"
)

// Listen opens the gRPC endpoint: a Unix socket path, or a unix:// URL as
// the CSI sidecars take it. A socket file left by a dead instance is
// replaced; anything else at the path is an error. The socket is root's
// only, from the moment it appears at its path (whatever the umask):
// whoever can reach it attaches and mounts as root would.
func Listen(endpoint string) (net.Listener, error) {
	path, err := SocketPath(endpoint)
	if err != nil {
		return nil, err
	}
	ln, err := unixsocket.Listen(unixsocket.ListenConfig{Path: path, Mode: 0o600, Stream: true})
	if err != nil {
		return nil, fmt.Errorf("CSI endpoint: %w", err)
	}
	return ln, nil
}
