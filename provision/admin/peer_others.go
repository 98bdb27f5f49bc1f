//go:build !linux

package admin

import (
	"errors"
	"net"
)

func peerOf(*net.UnixConn) (Peer, error) {
	return Peer{}, errors.New("admin: peer credentials need Linux")
}
