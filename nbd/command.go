package nbd

import "fmt"

// Command is the type of a transmission request.
type Command uint16

// Commands. mvps-te serves CmdRead, CmdWrite and its transaction extension;
// anything else, CmdDisc included, ends the connection.
const (
	CmdRead        Command = 0
	CmdWrite       Command = 1
	CmdDisc        Command = 2
	CmdFlush       Command = 3
	CmdTrim        Command = 4
	CmdCache       Command = 5
	CmdWriteZeroes Command = 6
	CmdBlockStatus Command = 7
	CmdResize      Command = 8

	// mvps transaction extension.
	CmdBeginTxn    Command = 64
	CmdCommitTxn   Command = 65
	CmdRollbackTxn Command = 66
	CmdLockTxn     Command = 67
)

var commandNames = map[Command]string{
	CmdRead: "READ", CmdWrite: "WRITE", CmdDisc: "DISC", CmdFlush: "FLUSH", CmdTrim: "TRIM",
	CmdCache: "CACHE", CmdWriteZeroes: "WRITE_ZEROES", CmdBlockStatus: "BLOCK_STATUS",
	CmdResize: "RESIZE", CmdBeginTxn: "MVPS_BEGIN_TXN", CmdCommitTxn: "MVPS_COMMIT_TXN",
	CmdRollbackTxn: "MVPS_ROLLBACK_TXN", CmdLockTxn: "MVPS_LOCK_TXN",
}

func (c Command) String() string {
	if name, ok := commandNames[c]; ok {
		return "NBD_CMD_" + name
	}
	return fmt.Sprintf("NBD_CMD(%d)", uint16(c))
}

// Errno is the error field of a transmission reply. Its values are the NBD
// protocol's, which match Linux errno numbers.
type Errno uint32

// Errors a server may return.
const (
	EPERM     Errno = 1
	EIO       Errno = 5
	ENOMEM    Errno = 12
	EINVAL    Errno = 22
	ENOSPC    Errno = 28
	EOVERFLOW Errno = 75
	ENOTSUP   Errno = 95
	ESHUTDOWN Errno = 108
)

var errnoNames = map[Errno]string{
	EPERM: "EPERM", EIO: "EIO", ENOMEM: "ENOMEM", EINVAL: "EINVAL", ENOSPC: "ENOSPC",
	EOVERFLOW: "EOVERFLOW", ENOTSUP: "ENOTSUP", ESHUTDOWN: "ESHUTDOWN",
}

func (e Errno) Error() string {
	if name, ok := errnoNames[e]; ok {
		return "nbd: server error " + name
	}
	return fmt.Sprintf("nbd: server error %d", uint32(e))
}
