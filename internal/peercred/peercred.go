// Package peercred reads who is at the other end of a Unix socket: the
// credentials the kernel recorded when the peer connected (SO_PEERCRED on
// Linux). They are the peer's as of connect: a process cannot forge them by
// what it sends, nor change them by dropping privileges later.
package peercred

// Cred is a peer's process id, user id and group id. A field the kernel
// did not tell is Unknown.
type Cred struct {
	PID, UID, GID int32
}

// Unknown stands for a credential that could not be read: -1 is no
// process, user or group, so it never matches a real one.
const Unknown = -1

// unknown is what Read returns with an error.
var unknown = Cred{PID: Unknown, UID: Unknown, GID: Unknown}
