//go:build !linux

package csi

import (
	"errors"
	"net"
)

// Listen opens the gRPC endpoint; it is served on Linux only.
func Listen(endpoint string) (net.Listener, error) {
	if _, err := SocketPath(endpoint); err != nil {
		return nil, err
	}
	return nil, errors.New("the CSI endpoint is served on Linux only")
}
