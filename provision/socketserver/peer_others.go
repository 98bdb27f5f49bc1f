//go:build !linux

package socketserver

import (
	"net"

	"github.com/mvps-provisioner/mvps-provisioner/provision"
)

// Peer credentials of Unix sockets are a Linux matter here: elsewhere
// every caller is unknown.
func peerCredentials(*net.UnixConn) provision.Caller { return provision.UnknownCaller }

func peerPidfd(*net.UnixConn) int { return -1 }
