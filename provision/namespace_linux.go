package provision

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// The checks in this file keep the trust a mount needs: a caller other
// than uid 0 may mount only where the kernel will hold it to nosuid,nodev
// and only onto an ordinary directory.

// ownUserNamespace is the provisioner's user namespace, read once.
var ownUserNamespace = sync.OnceValues(func() (nsID, error) {
	var st unix.Stat_t
	if err := unix.Stat("/proc/self/ns/user", &st); err != nil {
		return nsID{}, fmt.Errorf("stat own user namespace: %w", err)
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
})

// ownUserNamespaceLink is the provisioner's user namespace as its link in
// /proc names it ("user:[<inode>]"), read once.
var ownUserNamespaceLink = sync.OnceValues(func() (string, error) {
	return os.Readlink("/proc/self/ns/user")
})

// userNamespaceOf returns the user namespace that owns the namespace nsfd
// (NS_GET_USERNS).
func userNamespaceOf(nsfd int) (nsID, error) {
	fd, err := unix.IoctlRetInt(nsfd, unix.NS_GET_USERNS)
	if err != nil {
		return nsID{}, fmt.Errorf("owning user namespace (NS_GET_USERNS): %w", err)
	}
	defer unix.Close(fd)
	return nsIDOf(fd)
}

func nsIDOf(fd int) (nsID, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, fmt.Errorf("stat namespace: %w", err)
	}
	return nsID{dev: st.Dev, ino: st.Ino}, nil
}

// checkMountNamespaceOwner refuses a mount namespace that a user namespace
// other than the provisioner's owns. Whoever created that user namespace is
// root there: the kernel locks nosuid and nodev only on mounts it copies
// or propagates into a less privileged namespace, not on one attached
// directly, so such a caller could remount ours with dev and read or write
// any block device of the host through a device node in the image.
func checkMountNamespaceOwner(ns *os.File) error {
	own, err := ownUserNamespace()
	if err != nil {
		return err
	}
	got, err := userNamespaceOf(int(ns.Fd()))
	if err != nil {
		return err
	}
	if got != own {
		return failf(ErrForbidden, "mount mode: the mount namespace belongs to a user namespace of the caller's own, "+
			"where it could remount the file system with suid and dev; only uid 0 may mount there")
	}
	return nil
}

// Magic numbers of the file systems (statfs f_type) a caller other than
// uid 0 may mount onto, as fusermount allows only ordinary directories:
// never /proc/<pid> (which would hide a process from root's tools), sysfs,
// cgroup, devtmpfs, debugfs, securityfs, bpf or another pseudo file system.
var ordinaryFileSystems = map[int64]string{
	0xef53:     "ext2/3/4",
	0x58465342: "xfs",
	0x9123683e: "btrfs",
	0x01021994: "tmpfs",
	0x858458f6: "ramfs",
	0x794c7630: "overlayfs",
	0xf2f52010: "f2fs",
	0x2fc12fc1: "zfs",
	0xca451a4e: "bcachefs",
	0x6969:     "nfs",
}

// checkMountDirectory refuses a mount directory that does not lie on an
// ordinary file system.
func checkMountDirectory(dir *os.File) error {
	var st unix.Statfs_t
	if err := unix.Fstatfs(int(dir.Fd()), &st); err != nil {
		return fmt.Errorf("statfs mount directory: %w", err)
	}
	if _, ok := ordinaryFileSystems[int64(st.Type)]; !ok {
		return failf(ErrForbidden, "mount mode: the directory is on a file system of type %#x, not an ordinary one "+
			"(ext4, xfs, btrfs, tmpfs, overlayfs...); only uid 0 may mount there", st.Type)
	}
	return nil
}

// processGone reports whether err says that the process whose procfs
// entry was asked for no longer exists.
func processGone(err error) bool {
	return errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH)
}

// accountOf is what a caller's connections and devices count against:
// the uid that created the outermost user namespace between the
// provisioner's and the caller's, or the caller's own uid when it is in
// the provisioner's. Inside a user namespace of its own a user has many
// uids (its /etc/subuid range); by its own uid, it would get a cap per
// uid of the range.
//
// An outermost namespace that uid 0 made is an account of its own. A
// container runtime makes its containers' namespaces as root (Kubernetes
// with hostUsers: false, LXD, nspawn -U, Docker with userns-remap):
// counted as uid 0, an unprivileged process in one container could use up
// the caps of every root caller and every other such container. The
// namespaces a container makes inside its own count as that container.
//
// A caller that is uid 0 in the provisioner's namespace counts as 0
// without the walk, which costs a procfs lookup on the path of every
// connection. Only a process that is root there, or holds CAP_SETUID
// there (and can become root at will), can map uid 0 into a namespace it
// makes: the walk would name root or such a process.
func accountOf(pid, uid int32) Account {
	byUID := Account{UID: uid}
	if pid <= 0 || uid == 0 {
		return byUID
	}
	own, err := ownUserNamespace()
	if err != nil {
		return byUID
	}
	path := "/proc/" + strconv.Itoa(int(pid)) + "/ns/user"
	// Nearly every caller is in the provisioner's own user namespace: the
	// name of its namespace link tells, one readlink on the path of every
	// connection (a stat of the link, which resolves it to the namespace,
	// costs more). The name holds the namespace's inode number, which no
	// two namespaces share. The walk below opens it only for a caller in
	// another, and checks it again on what it opened.
	if ownLink, err := ownUserNamespaceLink(); err == nil {
		var buf [64]byte
		n, err := unix.Readlink(path, buf[:])
		switch {
		case processGone(err):
			return UnattributedAccount
		case err != nil || string(buf[:n]) == ownLink:
			return byUID
		}
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if processGone(err) {
		return UnattributedAccount
	}
	if err != nil {
		return byUID
	}
	defer func() { unix.Close(fd) }()
	for depth := 0; depth < 33; depth++ { // the kernel nests at most 32
		id, err := nsIDOf(fd)
		if err != nil || id == own {
			return byUID
		}
		parent, err := unix.IoctlRetInt(fd, unix.NS_GET_PARENT)
		if err != nil {
			// EPERM: the parent is outside what the provisioner can see,
			// so this one is as far out as it goes.
			break
		}
		if up, perr := nsIDOf(parent); perr == nil && up == own {
			unix.Close(parent)
			break
		}
		unix.Close(fd)
		fd = parent
	}
	owner, err := unix.IoctlGetUint32(fd, unix.NS_GET_OWNER_UID)
	if err != nil {
		return byUID
	}
	if owner != 0 {
		return Account{UID: int32(owner)}
	}
	id, err := nsIDOf(fd)
	if err != nil {
		return byUID
	}
	return Account{UID: 0, UserNS: id.ino}
}
