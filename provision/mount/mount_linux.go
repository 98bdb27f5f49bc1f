package mount

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/mvps-provisioner/mvps-provisioner/internal/ownthread"
)

func (o Options) attributes() uint64 {
	var attr uint64
	if !o.Suid {
		attr |= unix.MOUNT_ATTR_NOSUID
	}
	if !o.Dev {
		attr |= unix.MOUNT_ATTR_NODEV
	}
	return attr
}

// Ext4 formats with Debian's mke2fs and mounts ext4 with the new mount
// API.
type Ext4 struct {
	Mke2fs string // /usr/sbin/mke2fs
	Blkid  string // /usr/sbin/blkid
}

// freshBytes is how much of a device must be zero for it to count as
// never written.
const freshBytes = 1 << 20

// New checks that the tools exist.
func New(mke2fs, blkid string) (*Ext4, error) {
	for _, tool := range []string{mke2fs, blkid} {
		if _, err := exec.LookPath(tool); err != nil {
			return nil, fmt.Errorf("mount mode needs %s (Debian package e2fsprogs / util-linux): %w", tool, err)
		}
	}
	return &Ext4{Mke2fs: mke2fs, Blkid: blkid}, nil
}

// Mount formats dev if it is provably fresh, mounts its file system and
// attaches the mount as req asks. It returns an open directory on the file
// system's root, for the provisioner to hold for the life of the
// attachment.
func (m *Ext4) Mount(ctx context.Context, file *os.File, path string, req Request) (*os.File, bool, error) {
	dev := blockDevice{Path: path, File: file}
	steps := contextSteps(ctx)
	steps.start()
	formatted, err := m.prepare(ctx, dev, req.RootOwner, steps)
	if err != nil {
		return nil, false, err
	}
	root, err := mountInto(dev, req, steps)
	return root, formatted, err
}

// prepare leaves dev holding an ext4 file system the kernel will mount
// read-write, or refuses it. The common case, an image that holds ext4
// already, costs one 8 KiB read, of the two blocks the kernel's mount reads
// first and then finds in the page cache: through mvps-te every read of a cold page is a fetch from
// object storage, and blkid would read superblock locations across the
// whole device, its end included. Only a device without an ext2, ext3 or
// ext4 superblock is probed with blkid, for any other signature, and
// formatted when it holds nothing at all.
func (m *Ext4) prepare(ctx context.Context, dev blockDevice, owner *Owner, steps *Steps) (formatted bool, err error) {
	// Without readahead the read below is those 8 KiB and no more: the
	// kernel would otherwise add blocks that nobody reads, each a cold
	// fetch through mvps-te. Only this descriptor's reads are affected;
	// should the advice fail, the read still works, with readahead.
	_ = unix.Fadvise(int(dev.File.Fd()), 0, 0, unix.FADV_RANDOM)
	first, err := readHead(dev.File)
	if err != nil {
		return false, fmt.Errorf("%s: %w", dev.Path, err)
	}
	found, err := checkExt4(first)
	steps.mark("superblock")
	if found {
		// Mountable ext4, or refused as it is: a superblock is data, so
		// the device is not fresh and is never formatted.
		return false, err
	}
	fsType, err := m.probe(ctx, dev)
	steps.mark("blkid")
	if err != nil {
		return false, err
	}
	switch {
	case fsType == "" && m.zeroPrefix(dev):
		steps.mark("fresh")
		// Formatting is decided here, from the device's content, and
		// never from a failed mount: a transient mount error on a device
		// with data must not end in mke2fs.
		if err := m.format(ctx, dev, owner); err != nil {
			return false, err
		}
		steps.mark("mke2fs")
		return true, nil
	case fsType == "":
		return false, ErrNotExt4
	default:
		// ext4 too, should the superblock have been written since it was
		// read: whatever is there now was not checked.
		return false, fmt.Errorf("%w (found %s)", ErrNotExt4, fsType)
	}
}

// probe asks blkid for any known signature (file system, partition table,
// RAID, LUKS...) anywhere on the device. "" means none.
func (m *Ext4) probe(ctx context.Context, dev blockDevice) (string, error) {
	cmd := exec.CommandContext(ctx, m.Blkid, "-p", "-o", "export", dev.Path)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 2 {
		return "", nil // nothing found
	}
	if err != nil {
		return "", fmt.Errorf("probe %s: %w: %s", dev.Path, err, strings.TrimSpace(stderr.String()))
	}
	found := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			found[k] = v
		}
	}
	for _, k := range []string{"TYPE", "PTTYPE"} {
		if found[k] != "" {
			return found[k], nil
		}
	}
	return "unrecognised signature", nil
}

func (m *Ext4) zeroPrefix(dev blockDevice) bool {
	buf := make([]byte, freshBytes)
	n, err := dev.File.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return false
	}
	for _, b := range buf[:n] {
		if b != 0 {
			return false
		}
	}
	return true
}

// format makes ext4 suited to a thin, page-granular remote device: 4 KiB
// blocks match the engine's pages, lazy init avoids writing every inode
// table up front, and no discard since the engine has no TRIM. It runs to
// its end (bounded by FormatTimeout) whatever happens to ctx; if it fails
// anyway, the first MiB, where a part-made file system shows, is zeroed so
// that the device counts as fresh again.
func (m *Ext4) format(ctx context.Context, dev blockDevice, owner *Owner) error {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), FormatTimeout)
	defer cancel()
	ext := "lazy_itable_init=1,lazy_journal_init=1,nodiscard"
	if owner != nil {
		ext += fmt.Sprintf(",root_owner=%d:%d", owner.UID, owner.GID)
	}
	cmd := exec.CommandContext(ctx, m.Mke2fs, "-F", "-q", "-t", "ext4", "-b", "4096", "-E", ext, dev.Path)
	out, err := cmd.CombinedOutput()
	if err == nil {
		return nil
	}
	err = fmt.Errorf("mke2fs %s: %v: %s", dev.Path, err, strings.TrimSpace(string(out)))
	if zerr := zeroFreshPrefix(dev); zerr != nil {
		return fmt.Errorf("%w; and the device could not be made fresh again: %v", err, zerr)
	}
	return err
}

// zeroFreshPrefix writes zeros over the part of dev that decides freshness,
// and flushes them.
func zeroFreshPrefix(dev blockDevice) error {
	if _, err := dev.File.WriteAt(make([]byte, freshBytes), 0); err != nil {
		return fmt.Errorf("zero the first MiB: %w", err)
	}
	if err := dev.File.Sync(); err != nil {
		return fmt.Errorf("zero the first MiB: %w", err)
	}
	return nil
}

// mountInto creates the mount in the provisioner's namespace, where the
// device node lives, and moves it onto dir inside ns.
func mountInto(dev blockDevice, req Request, steps *Steps) (*os.File, error) {
	fsfd, err := unix.Fsopen("ext4", unix.FSOPEN_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("fsopen ext4: %w", err)
	}
	defer unix.Close(fsfd)
	if err := unix.FsconfigSetString(fsfd, "source", dev.Path); err != nil {
		return nil, fmt.Errorf("fsconfig source: %w", err)
	}
	// The device reads zeros where nothing was written: zeroing inode
	// tables in the background would only write zeros to the engine.
	if err := unix.FsconfigSetFlag(fsfd, "noinit_itable"); err != nil {
		return nil, fmt.Errorf("fsconfig noinit_itable: %w", err)
	}
	// Whoever can write the image (in fd mode, say) chooses what its
	// superblock says to do on an error, panic included: the host's
	// answer to a corrupt block is never the image's to choose.
	if err := unix.FsconfigSetString(fsfd, "errors", "remount-ro"); err != nil {
		return nil, fmt.Errorf("fsconfig errors=remount-ro: %w", err)
	}
	if err := unix.FsconfigCreate(fsfd); err != nil {
		return nil, fmt.Errorf("mount ext4 from %s: %w", dev.Path, err)
	}
	steps.mark("fsconfig")
	mntfd, err := unix.Fsmount(fsfd, unix.FSMOUNT_CLOEXEC, int(req.Options.attributes()))
	if err != nil {
		return nil, fmt.Errorf("fsmount: %w", err)
	}
	defer unix.Close(mntfd)
	steps.mark("fsmount")
	rootfd, err := unix.Openat(mntfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open file system root: %w", err)
	}
	root := os.NewFile(uintptr(rootfd), dev.Path+":/")
	steps.mark("root")
	if err := moveMountInNamespace(mntfd, int(req.Namespace.Fd()), int(req.Dir.Fd()), req.Base, steps); err != nil {
		root.Close()
		return nil, err
	}
	return root, nil
}

// moveMountInNamespace attaches the detached mount mntfd on dirfd inside
// the mount namespace nsfd, after checking that dirfd is inside base there
// (when base is set), and checks again where the mount landed. move_mount
// only attaches into the caller's own namespace, so this runs on a thread
// of its own that enters ns.
func moveMountInNamespace(mntfd, nsfd, dirfd int, base string, steps *Steps) error {
	return ownthread.Run(func() error {
		// Marked from the thread while the caller waits for it.
		steps.mark("thread")
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("unshare CLONE_FS: %w", err)
		}
		if err := unix.Setns(nsfd, unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("enter caller's mount namespace: %w", err)
		}
		steps.mark("setns")
		if base != "" {
			if err := checkInside(dirfd, base); err != nil {
				return err
			}
			steps.mark("base")
		}
		if err := unix.MoveMount(mntfd, "", dirfd, "", unix.MOVE_MOUNT_F_EMPTY_PATH|unix.MOVE_MOUNT_T_EMPTY_PATH); err != nil {
			return fmt.Errorf("move mount onto the caller's directory: %w", err)
		}
		steps.mark("move")
		if base != "" {
			// The caller may have renamed its directory out of the base
			// between the check and the move, and the mount went with
			// it. A mount point cannot be renamed in its namespace
			// (EBUSY), so the caller cannot bring it back in before this
			// look at where the mount itself is. A directory above it
			// can still be renamed later: the base holds when the mount
			// is made (docs/security.md).
			if err := checkInside(mntfd, base); err != nil {
				if uerr := undoMove(mntfd); uerr != nil {
					return fmt.Errorf("mount landed outside the base: %w; and it could not be undone: %v", err, uerr)
				}
				return fmt.Errorf("mount landed outside the base, undone: %w", err)
			}
			steps.mark("landed")
		}
		return nil
	})
}

// undoMove detaches the mount mntfd that moveMountInNamespace attached,
// from the thread in the caller's namespace. umount2 takes a path only:
// "." from the mount's root names that mount and no other, as nothing can
// be stacked on it in a namespace where only root mounts, and needs no
// /proc, which the caller's namespace may lack.
func undoMove(mntfd int) error {
	if err := unix.Fchdir(mntfd); err != nil {
		return fmt.Errorf("enter the mount's root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("unmount: %w", err)
	}
	return nil
}

// FindRoot opens the root of a mount of the block device dev (its st_rdev)
// in the mount namespace ns, O_PATH: the handle an attach keeps on the file
// system it mounted, found again by a provisioner that took the attachment
// over. Paths in the namespace's mount table are the caller's to change
// meanwhile, so one is followed without symbolic links and what it leads
// to must be on dev. It fails with fs.ErrNotExist when ns has no mount of
// dev.
func FindRoot(ns *os.File, dev uint64) (*os.File, error) {
	proc, err := unix.Open("/proc", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /proc: %w", err)
	}
	defer unix.Close(proc)
	var root *os.File
	err = ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("unshare CLONE_FS: %w", err)
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("enter caller's mount namespace: %w", err)
		}
		table, err := readAt(proc, "thread-self/mountinfo")
		if err != nil {
			return err
		}
		for _, point := range mountPointsOf(table, dev) {
			fd, err := unix.Openat2(unix.AT_FDCWD, point, &unix.OpenHow{
				Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
				Resolve: unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
			})
			if err != nil {
				continue
			}
			var st unix.Stat_t
			if unix.Fstat(fd, &st) == nil && st.Dev == dev {
				root = os.NewFile(uintptr(fd), point)
				return nil
			}
			unix.Close(fd)
		}
		return fmt.Errorf("no mount of device %d:%d in the caller's namespace: %w", unix.Major(dev), unix.Minor(dev), fs.ErrNotExist)
	})
	return root, err
}

// readAt reads the file name below dir.
func readAt(dir int, name string) ([]byte, error) {
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /proc/%s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	return io.ReadAll(f)
}

// mountPointsOf lists the mount points of dev's mounts in a mountinfo
// table (proc_pid_mountinfo(5)), unescaped.
func mountPointsOf(table []byte, dev uint64) []string {
	want := fmt.Sprintf("%d:%d", unix.Major(dev), unix.Minor(dev))
	var points []string
	for line := range strings.SplitSeq(string(table), "\n") {
		fields := strings.Fields(line)
		if len(fields) < 5 || fields[2] != want {
			continue
		}
		points = append(points, unescapeMountinfo(fields[4]))
	}
	return points
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// CheckInsideBase checks that dir is base or below it as the mount
// namespace ns sees it: what the mount itself checks again, for a request
// to be refused before its image is attached (or formatted).
func CheckInsideBase(ns, dir *os.File, base string) error {
	return ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("unshare CLONE_FS: %w", err)
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("enter caller's mount namespace: %w", err)
		}
		return checkInside(int(dir.Fd()), base)
	})
}

// checkInside runs on a thread that has entered the caller's namespace:
// the directory's path as that namespace sees it is the thread's working
// directory after fchdir, which /proc of some other pid namespace could
// not tell.
func checkInside(dirfd int, base string) error {
	if err := unix.Fchdir(dirfd); err != nil {
		return fmt.Errorf("enter the mount directory: %w", err)
	}
	path, err := workingDir()
	if err != nil {
		return fmt.Errorf("%w: the mount directory's path cannot be told: %v", ErrOutsideBase, err)
	}
	if !pathInside(path, base) {
		return fmt.Errorf("%w: %s is not inside %s", ErrOutsideBase, path, base)
	}
	return nil
}

// workingDir is the calling thread's working directory as its mount
// namespace sees it.
func workingDir() (string, error) {
	buf := make([]byte, unix.PathMax)
	n, err := unix.Getcwd(buf)
	if err != nil {
		return "", fmt.Errorf("getcwd: %w", err)
	}
	return strings.TrimRight(string(buf[:n]), "\x00"), nil
}

// pathInside reports whether path is base or below it. Both are clean
// absolute paths; a path the kernel cannot reach from the root comes back
// as "(unreachable)/..." and is inside nothing.
func pathInside(path, base string) bool {
	if !strings.HasPrefix(path, "/") {
		return false
	}
	return path == base || base == "/" || strings.HasPrefix(path, base+"/")
}

// CheckFDs verifies a mount request's fds: a mount namespace, then a
// directory.
func CheckFDs(nsfd, dirfd int) error {
	kind, err := unix.IoctlRetInt(nsfd, unix.NS_GET_NSTYPE)
	if err != nil {
		return fmt.Errorf("first fd is not a namespace (NS_GET_NSTYPE: %v)", err)
	}
	if kind != unix.CLONE_NEWNS {
		return fmt.Errorf("first fd is a namespace of type %#x, not a mount namespace", kind)
	}
	var st unix.Stat_t
	if err := unix.Fstat(dirfd, &st); err != nil {
		return fmt.Errorf("second fd: %v", err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		return errors.New("second fd is not a directory")
	}
	return nil
}

// SyncAndRelease writes the file system's dirty data and metadata to the
// device, then drops the provisioner's hold on it so that a file system the
// caller unmounted is shut down before the device is flushed.
func SyncAndRelease(root *os.File) error {
	err := unix.Syncfs(int(root.Fd()))
	if cerr := root.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("syncfs: %w", err)
	}
	return nil
}

// blockDevice is the device a mount is made from: its node's path, for
// the tools and the kernel, and a read-write descriptor on it.
type blockDevice struct {
	Path string
	File *os.File
}

// Unmount detaches root's mount from ns (the package's Unmount).
func (m *Ext4) Unmount(ns, root *os.File) error { return Unmount(ns, root) }

// Unmount detaches the mount whose root is root from the mount namespace
// ns, lazily: files the caller still has open keep the file system alive
// until they are closed, but no path reaches it any more. A caller other
// than uid 0 cannot unmount what the provisioner mounted for it (the
// namespace belongs to the provisioner's user namespace), so without this
// every such mount would keep its device busy after the detach.
func Unmount(ns, root *os.File) error {
	// umount2 takes a path only. The root's own magic link in this
	// process's /proc names exactly that mount, whatever the caller did
	// with the paths leading to it; /proc is opened before the switch, as
	// the caller's namespace may have another /proc or none.
	proc, err := unix.Open("/proc", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open /proc: %w", err)
	}
	defer unix.Close(proc)
	return ownthread.Run(func() error {
		if err := unix.Unshare(unix.CLONE_FS); err != nil {
			return fmt.Errorf("unshare CLONE_FS: %w", err)
		}
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNS); err != nil {
			return fmt.Errorf("enter caller's mount namespace: %w", err)
		}
		if err := unix.Fchdir(proc); err != nil {
			return fmt.Errorf("enter /proc: %w", err)
		}
		if err := unix.Unmount(fmt.Sprintf("thread-self/fd/%d", root.Fd()), unix.MNT_DETACH); err != nil {
			return fmt.Errorf("unmount from the caller's namespace: %w", err)
		}
		return nil
	})
}
