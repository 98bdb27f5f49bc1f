//go:build !linux

package protocol

import (
	"fmt"
	"net"
)

// connectAndSend connects to the provisioner at socketPath and sends msg
// with oob.
func connectAndSend(socketPath string, msg, oob []byte) (*net.UnixConn, error) {
	c, err := net.Dial("unixpacket", socketPath)
	if err != nil {
		return nil, fmt.Errorf("connect to provisioner: %w", err)
	}
	conn := c.(*net.UnixConn)
	if _, _, err := conn.WriteMsgUnix(msg, oob, nil); err != nil {
		conn.Close()
		return nil, fmt.Errorf("send request: %w", err)
	}
	return conn, nil
}
