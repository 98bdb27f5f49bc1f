package nbd

import (
	"fmt"
	"strings"
)

// HandshakeFlags are the 16 bits the server sends after its greeting.
type HandshakeFlags uint16

// Handshake flags.
const (
	FlagFixedNewstyle HandshakeFlags = 1 << 0
	FlagNoZeroes      HandshakeFlags = 1 << 1
)

// ClientFlags are the 32 bits the client answers the greeting with.
type ClientFlags uint32

// Client flags.
const (
	ClientFlagFixedNewstyle ClientFlags = 1 << 0
	ClientFlagNoZeroes      ClientFlags = 1 << 1
)

// TransmissionFlags describe an export; the server sends them with the export
// size and the kernel needs them verbatim (NBD_ATTR_SERVER_FLAGS).
type TransmissionFlags uint16

// Transmission flags.
const (
	FlagHasFlags        TransmissionFlags = 1 << 0
	FlagReadOnly        TransmissionFlags = 1 << 1
	FlagSendFlush       TransmissionFlags = 1 << 2
	FlagSendFUA         TransmissionFlags = 1 << 3
	FlagRotational      TransmissionFlags = 1 << 4
	FlagSendTrim        TransmissionFlags = 1 << 5
	FlagSendWriteZeroes TransmissionFlags = 1 << 6
	FlagSendDF          TransmissionFlags = 1 << 7
	FlagCanMultiConn    TransmissionFlags = 1 << 8
	FlagSendResize      TransmissionFlags = 1 << 9
	FlagSendCache       TransmissionFlags = 1 << 10
	FlagSendFastZero    TransmissionFlags = 1 << 11
)

var transmissionFlagNames = []string{
	"HAS_FLAGS", "READ_ONLY", "SEND_FLUSH", "SEND_FUA", "ROTATIONAL", "SEND_TRIM",
	"SEND_WRITE_ZEROES", "SEND_DF", "CAN_MULTI_CONN", "SEND_RESIZE", "SEND_CACHE",
	"SEND_FAST_ZERO",
}

func (f TransmissionFlags) String() string {
	if f == 0 {
		return "0"
	}
	var names []string
	for i, name := range transmissionFlagNames {
		if f&(1<<i) != 0 {
			names = append(names, name)
			f &^= 1 << i
		}
	}
	if f != 0 {
		names = append(names, fmt.Sprintf("%#x", uint16(f)))
	}
	return strings.Join(names, "|")
}

// CommandFlags modify a single transmission request.
type CommandFlags uint16

// Command flags.
const (
	CmdFlagFUA      CommandFlags = 1 << 0
	CmdFlagNoHole   CommandFlags = 1 << 1
	CmdFlagDF       CommandFlags = 1 << 2
	CmdFlagReqOne   CommandFlags = 1 << 3
	CmdFlagFastZero CommandFlags = 1 << 4
)
