package provision

import (
	"context"
	"fmt"
)

// An attachment belongs to an Owner and lives as long as it does: until the
// owner's Life ends (its cause says why), an End or ForceDetach names it,
// its device cannot be recovered, or the Manager shuts down.
type Owner struct {
	Kind OwnerKind
	// Caller is the process the attachment is for: the one that asked on
	// a connection, the one followed; unknown (-1) for a volume. Attach
	// takes over its pidfd.
	Caller Caller
	// Volume names a persisted volume (OwnerVolume).
	Volume string
	// Life is the owner's life; nil for an owner that ends only when it is
	// told to (End), as a persisted volume does.
	Life context.Context
	// HungUp, if set, reports without waiting whether the owner has ended
	// though Life may not say so yet: a handover asks it, so that it
	// never leaves attached what its owner let go of just before.
	HungUp func() bool
}

// OwnerKind says what an attachment lives for.
type OwnerKind string

// Kinds of owner.
const (
	// OwnerConnection: a caller's connection; the attachment ends when the
	// connection does.
	OwnerConnection OwnerKind = "connection"
	// OwnerProcess: a process, followed by pidfd; the attachment ends when
	// it exits. A connection's attachment taken over after a restart
	// becomes its process's, the connection having died with the earlier
	// run.
	OwnerProcess OwnerKind = "process"
	// OwnerVolume: a persisted volume, such as a CSI volume staged on this
	// node; the attachment ends only when it is told to, and a restart
	// takes it over as it is.
	OwnerVolume OwnerKind = "volume"
)

// Caller is a process attachments are made for: who sent a request, as
// the kernel recorded it when the caller connected (SO_PEERCRED), and a
// pidfd on that process once pinned. A field the kernel did not tell is -1.
type Caller struct {
	PID, UID, GID int32
	// Account is what the caller's connections and devices count
	// against (accountOf): its own uid, the creator of the user
	// namespace it is in, so that a user cannot multiply its share by
	// the uids of its subuid range, or that namespace itself when root
	// made it for a container.
	Account Account
	// start is the process's start time (clock ticks after boot), which
	// with the pid names it for good; 0 if unknown.
	start uint64
	// pidfd pins the process: a pid can be reused once its process is
	// gone, a pidfd cannot. -1 when not pinned.
	pidfd int
}

// Account is what a caller's waiting connections and lingering devices
// count against, each account with caps of its own: a uid of the
// provisioner's user namespace, or a user namespace that uid 0 made.
type Account struct {
	// UID is the uid, as the provisioner's user namespace sees it; for
	// a user namespace's account, the uid that made it (0).
	UID int32
	// UserNS is the inode number of the user namespace (as lsns and the
	// /proc/<pid>/ns/user link name it), 0 for a uid's account. A
	// container runtime (Kubernetes with hostUsers: false, LXD, nspawn
	// -U, Docker with userns-remap) makes its containers' namespaces as
	// root: counted as uid 0, one container's unprivileged process could
	// use up the share of root's callers and of every other container.
	// The kernel gives the number again once the namespace is gone: devices
	// a gone container's callers still hold count against the namespace
	// given it next, until they are closed.
	UserNS uint64
}

func (a Account) String() string {
	switch {
	case a == UnattributedAccount:
		return "callers whose process was gone when they connected"
	case a.UserNS != 0:
		return fmt.Sprintf("user namespace %d (made by uid %d)", a.UserNS, a.UID)
	}
	return fmt.Sprintf("uid %d", a.UID)
}

// UnattributedAccount is the account of a caller whose process was gone
// before its user namespace could be told: all such callers share it.
// Counting one by its own uid would let a user whose connecting process
// exits at once (a sibling keeping the connection) count as each uid of
// its subuid range.
var UnattributedAccount = Account{UID: -2}

// UnknownCaller is the Caller of an owner that is no process.
var UnknownCaller = Caller{PID: -1, UID: -1, GID: -1, Account: Account{UID: -1}, pidfd: -1}

func (c Caller) known() bool { return c.UID >= 0 && c.GID >= 0 }

// root reports a caller with uid 0, the only one trusted to act for others
// (mount into another namespace, onto a directory it does not own, with
// suid or device files).
func (c Caller) root() bool { return c.UID == 0 }

// VolumeCaller is the Caller of a volume owner: the container
// orchestrator, which reaches the provisioner through a socket only root
// may use and acts as root on the node (mounts where it says, as root would).
var VolumeCaller = Caller{PID: -1, UID: 0, GID: 0, Account: Account{UID: 0}, pidfd: -1}
