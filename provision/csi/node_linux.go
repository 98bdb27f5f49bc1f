package csi

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/internal/procfs"
	"github.com/mvps-provisioner/mvps-provisioner/provision"
	"github.com/mvps-provisioner/mvps-provisioner/provision/mount"
)

// NodeStageVolume attaches the volume for its own sake (owner: the volume)
// and, for a mount volume, mounts its ext4 at the staging path. Staged
// already, as asked, is success.
func (n *Node) NodeStageVolume(ctx context.Context, req *csipb.NodeStageVolumeRequest) (*csipb.NodeStageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	unlock, err := n.begin(ctx, id, "staging target path", staging)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := checkCapability(req.GetVolumeCapability()); err != nil {
		return nil, err
	}
	block := isBlock(req.GetVolumeCapability())

	if info, ok := n.m.Volume(id); ok {
		if err := n.checkStaged(info, staging, block); err != nil {
			return nil, err
		}
		return &csipb.NodeStageVolumeResponse{}, nil
	}
	areq := provision.Request{Key: id}
	if !block {
		// Not attached here, so what is mounted at the staging path is a
		// stage's that outlived its device (an attachment ended without
		// an unstage, a daemon killed in the middle of a stage): not to
		// be stacked on.
		if err := unmountAll(staging, unix.MNT_DETACH); err != nil {
			return nil, status.Errorf(codes.Internal, "unmount what is left at the staging path: %v", err)
		}
		mreq, err := stagingMount(staging)
		if err != nil {
			return nil, err
		}
		areq.Mount = mreq
	}
	at, err := n.m.Attach(ctx, areq, provision.Owner{Kind: provision.OwnerVolume, Caller: provision.VolumeCaller, Volume: id})
	if err != nil {
		return nil, statusOf("stage volume "+id, err)
	}
	at.Delivered(n.m)
	return &csipb.NodeStageVolumeResponse{}, nil
}

// checkStaged answers a stage of a volume attached here already: success
// if it is staged as asked.
func (n *Node) checkStaged(info provision.Info, staging string, block bool) error {
	if block != (info.Mode == "fd") {
		return status.Errorf(codes.AlreadyExists, "volume %s is staged here as a %s volume", info.Volume, accessType(info.Mode))
	}
	if block {
		return nil
	}
	mounted, err := mountedFrom(staging, info.Device)
	if err != nil {
		return status.Errorf(codes.Internal, "check staging path: %v", err)
	}
	if !mounted {
		return status.Errorf(codes.FailedPrecondition, "volume %s is attached here (%s) but not mounted at %s", info.Volume, info.Device, staging)
	}
	return nil
}

func accessType(mode string) string {
	if mode == "fd" {
		return "block"
	}
	return "mount"
}

// stagingMount is mount mode's request for the staging path, in the
// daemon's own mount namespace: the kubelet's directories are shared
// with the host there.
func stagingMount(staging string) (*mount.Request, error) {
	ns, err := os.Open("/proc/self/ns/mnt")
	if err != nil {
		return nil, status.Errorf(codes.Internal, "open own mount namespace: %v", err)
	}
	fd, err := unix.Open(staging, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		ns.Close()
		code := codes.Internal
		if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOTDIR) {
			code = codes.FailedPrecondition
		}
		return nil, status.Errorf(code, "staging target path %s: %v", staging, err)
	}
	return &mount.Request{Namespace: ns, Dir: os.NewFile(uintptr(fd), staging)}, nil
}

// NodeUnstageVolume unmounts the staging path (after a sync) and ends the
// volume's attachment: its device is flushed and detached before the
// answer. Not attached is success, once nothing is left mounted at the
// staging path.
func (n *Node) NodeUnstageVolume(ctx context.Context, req *csipb.NodeUnstageVolumeRequest) (*csipb.NodeUnstageVolumeResponse, error) {
	id, staging := req.GetVolumeId(), req.GetStagingTargetPath()
	unlock, err := n.begin(ctx, id, "staging target path", staging)
	if err != nil {
		return nil, err
	}
	defer unlock()
	info, ok := n.m.Volume(id)
	if !ok {
		// Its attachment may have ended without an unstage (a Lease lost
		// to another node, a forced detach, a device that could not be
		// recovered): its file system is still mounted at the staging
		// path, on a device that is gone, and held open there.
		if err := unmountAll(staging, unix.MNT_DETACH); err != nil {
			return nil, status.Errorf(codes.Internal, "unmount staging path of volume %s: %v", id, err)
		}
		return &csipb.NodeUnstageVolumeResponse{}, nil
	}
	if info.Mode == "mount" {
		if err := unmountStaging(info, staging); err != nil {
			return nil, err
		}
	}
	// Gone meanwhile (its device could not be recovered, say) is
	// unstaged too; left attached by the plugin's stop is not.
	if err := n.m.End(info.ImageID, errUnstaged); err != nil && !errors.Is(err, provision.ErrNotFound) {
		return nil, status.Errorf(codes.Unavailable, "volume %s: %v; the plugin is stopping, retry", info.Volume, err)
	}
	return &csipb.NodeUnstageVolumeResponse{}, nil
}

// unmountStaging syncs the volume's file system and unmounts it from the
// staging path, unless a pod's target still has it mounted: a detach
// under a live mount would lose what the pod writes next.
func unmountStaging(info provision.Info, staging string) error {
	dev, err := deviceNumber(info.Device)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", info.Volume, err)
	}
	points, err := procfs.MountPoints(dev)
	if err != nil {
		return status.Errorf(codes.Internal, "volume %s: %v", info.Volume, err)
	}
	others := slices.DeleteFunc(slices.Clone(points), func(p string) bool { return p == staging })
	if len(others) > 0 {
		return status.Errorf(codes.FailedPrecondition, "volume %s is still mounted at %v; unpublish it first", info.Volume, others)
	}
	if len(points) == 0 {
		return nil
	}
	if fd, err := unix.Open(staging, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err == nil {
		err = unix.Syncfs(fd)
		unix.Close(fd)
		if err != nil {
			return status.Errorf(codes.Internal, "sync volume %s: %v", info.Volume, err)
		}
	}
	// Detached lazily: the attachment holds the file system's root open
	// until its detach syncs and releases it.
	if err := unmountAll(staging, unix.MNT_DETACH); err != nil {
		return status.Errorf(codes.Internal, "unmount staging path of volume %s: %v", info.Volume, err)
	}
	return nil
}

// NodePublishVolume bind-mounts the staged volume into a pod's target
// path: the staging path's file system for a mount volume, the device node
// for a block volume, read-only when asked. Published already, alike, is
// success.
func (n *Node) NodePublishVolume(ctx context.Context, req *csipb.NodePublishVolumeRequest) (*csipb.NodePublishVolumeResponse, error) {
	id, staging, target := req.GetVolumeId(), req.GetStagingTargetPath(), req.GetTargetPath()
	unlock, err := n.begin(ctx, id, "target path", target)
	if err != nil {
		return nil, err
	}
	defer unlock()
	vc := req.GetVolumeCapability()
	if err := checkCapability(vc); err != nil {
		return nil, err
	}
	if staging == "" {
		// Not a missing field (InvalidArgument): for a node with
		// STAGE_UNSTAGE_VOLUME, CSI names this case FailedPrecondition.
		// After the checks above, which csi-sanity sends without a
		// staging path and expects InvalidArgument of.
		return nil, status.Errorf(codes.FailedPrecondition, "staging target path is not set; volume %s is published from where NodeStageVolume staged it", id)
	}
	if isBlock(vc) && req.GetReadonly() {
		return nil, errReadOnlyBlock
	}
	flags, err := publishMountFlags(vc.GetMount().GetMountFlags(), isBlock(vc),
		req.GetReadonly() || vc.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY)
	if err != nil {
		return nil, err
	}
	info, ok := n.m.Volume(id)
	if !ok {
		return nil, n.notStaged(id)
	}
	block := isBlock(vc)
	if block != (info.Mode == "fd") {
		if publishedAt(target, info) {
			return nil, status.Errorf(codes.AlreadyExists, "volume %s is published at %s as a %s volume", id, target, accessType(info.Mode))
		}
		return nil, status.Errorf(codes.FailedPrecondition, "volume %s is staged as a %s volume", id, accessType(info.Mode))
	}
	source := staging
	if block {
		source = info.Device
	} else if err := n.checkStaged(info, staging, false); err != nil {
		return nil, status.Errorf(codes.FailedPrecondition, "%s", status.Convert(err).Message())
	}
	if err := publish(source, target, block, flags); err != nil {
		return nil, err
	}
	return &csipb.NodePublishVolumeResponse{}, nil
}

// notStaged answers a publish of a volume this node has not staged:
// NotFound for a volume the image source does not hold (for the volume
// owner), InvalidArgument for a key it cannot hold, as a stage answers;
// FailedPrecondition for one it holds, which the CO must stage first.
func (n *Node) notStaged(id string) error {
	if err := n.m.LookupVolume(id); err != nil {
		st := status.Convert(statusOf("volume "+id, err))
		if st.Code() == codes.NotFound || st.Code() == codes.InvalidArgument {
			return st.Err()
		}
	}
	return status.Errorf(codes.FailedPrecondition, "volume %s is not staged on this node", id)
}

// publishedAt reports whether the staged volume info is published at
// target: its device node bound there, or its file system mounted there.
func publishedAt(target string, info provision.Info) bool {
	if same, err := sameFile(target, info.Device); err == nil && same {
		return true
	}
	mounted, err := mountedFrom(target, info.Device)
	return err == nil && mounted
}

// NodeUnpublishVolume unmounts the target path and removes it. Not
// published is success.
func (n *Node) NodeUnpublishVolume(ctx context.Context, req *csipb.NodeUnpublishVolumeRequest) (*csipb.NodeUnpublishVolumeResponse, error) {
	id, target := req.GetVolumeId(), req.GetTargetPath()
	unlock, err := n.begin(ctx, id, "target path", target)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if err := unmountAll(target, 0); err != nil {
		return nil, status.Errorf(codes.Internal, "unmount target path: %v", err)
	}
	if err := os.Remove(target); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, status.Errorf(codes.Internal, "remove target path: %v", err)
	}
	return &csipb.NodeUnpublishVolumeResponse{}, nil
}

// NodeGetVolumeStats: a mount volume's file system usage at a path where
// it is mounted; a block volume's size at a path its device is published.
func (n *Node) NodeGetVolumeStats(ctx context.Context, req *csipb.NodeGetVolumeStatsRequest) (*csipb.NodeGetVolumeStatsResponse, error) {
	id, path := req.GetVolumeId(), req.GetVolumePath()
	if err := required("volume id", id, "volume path", path); err != nil {
		return nil, err
	}
	info, ok := n.m.Volume(id)
	if !ok || info.Device == "" {
		return nil, status.Errorf(codes.NotFound, "volume %s is not staged on this node", id)
	}
	if info.Mode == "fd" {
		same, err := sameFile(path, info.Device)
		if err != nil || !same {
			return nil, status.Errorf(codes.NotFound, "volume %s is not published at %s", id, path)
		}
		size, err := deviceSize(info.Device)
		if err != nil {
			return nil, status.Errorf(codes.Internal, "volume %s: %v", id, err)
		}
		return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{{Unit: csipb.VolumeUsage_BYTES, Total: size}}}, nil
	}
	mounted, err := mountedFrom(path, info.Device)
	if err != nil || !mounted {
		return nil, status.Errorf(codes.NotFound, "volume %s is not mounted at %s", id, path)
	}
	var st unix.Statfs_t
	if err := unix.Statfs(path, &st); err != nil {
		return nil, status.Errorf(codes.Internal, "statfs %s: %v", path, err)
	}
	bsize := st.Bsize
	return &csipb.NodeGetVolumeStatsResponse{Usage: []*csipb.VolumeUsage{
		{Unit: csipb.VolumeUsage_BYTES, Total: int64(st.Blocks) * bsize, Available: int64(st.Bavail) * bsize, Used: int64(st.Blocks-st.Bfree) * bsize},
		{Unit: csipb.VolumeUsage_INODES, Total: int64(st.Files), Available: int64(st.Ffree), Used: int64(st.Files - st.Ffree)},
	}}, nil
}

// publish bind-mounts source onto target, made if missing (a directory,
// or a file for a block device), then sets the mount's flags.
func publish(source, target string, block bool, flags uintptr) error {
	// A bind mount of source at target is source itself: a directory
	// made by an earlier publish is not, until its mount is there.
	if same, err := sameFile(target, source); err == nil && same {
		return checkPublishedFlags(target, flags)
	}
	if block {
		f, err := os.OpenFile(target, os.O_CREATE|os.O_RDONLY, 0o600)
		if err != nil {
			return status.Errorf(codes.Internal, "make target file: %v", err)
		}
		f.Close()
	} else if err := os.Mkdir(target, 0o750); err != nil && !errors.Is(err, os.ErrExist) {
		return status.Errorf(codes.Internal, "make target directory: %v", err)
	}
	if err := unix.Mount(source, target, "", unix.MS_BIND, ""); err != nil {
		return status.Errorf(codes.Internal, "bind mount %s onto %s: %v", source, target, err)
	}
	if err := unix.Mount("", target, "", unix.MS_BIND|unix.MS_REMOUNT|flags, ""); err != nil {
		unix.Unmount(target, unix.MNT_DETACH)
		return status.Errorf(codes.Internal, "set flags of %s: %v", target, err)
	}
	return nil
}

// checkPublishedFlags answers a publish found done already: success if
// read-only as asked, AlreadyExists otherwise.
func checkPublishedFlags(target string, flags uintptr) error {
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil {
		return status.Errorf(codes.Internal, "statfs %s: %v", target, err)
	}
	if (st.Flags&unix.ST_RDONLY != 0) != (flags&unix.MS_RDONLY != 0) {
		return status.Errorf(codes.AlreadyExists, "%s is published with another read-only setting", target)
	}
	return nil
}

// msFlags are the mount(2) flags of publishFlags.
var msFlags = map[string]uintptr{
	"ro": unix.MS_RDONLY, "noexec": unix.MS_NOEXEC, "noatime": unix.MS_NOATIME, "nodiratime": unix.MS_NODIRATIME,
	"relatime": unix.MS_RELATIME, "strictatime": unix.MS_STRICTATIME, "nosuid": unix.MS_NOSUID, "nodev": unix.MS_NODEV,
}

// publishMountFlags is a published mount's flags: nosuid always, nodev
// but on a block volume's device node (which nodev would make unusable),
// what the capability asks, read-only when asked.
func publishMountFlags(names []string, block, readonly bool) (uintptr, error) {
	if _, err := mountFlags(names); err != nil {
		return 0, err
	}
	flags := uintptr(unix.MS_NOSUID)
	if !block {
		flags |= unix.MS_NODEV
	}
	for _, name := range names {
		flags |= msFlags[name]
	}
	if readonly {
		flags |= unix.MS_RDONLY
	}
	return flags, nil
}

// unmountAll unmounts path until nothing is mounted there (a retried
// publish may have stacked two mounts); a path that is missing or no mount
// point is done.
func unmountAll(path string, flags int) error {
	for range 8 {
		err := unix.Unmount(path, flags|unix.UMOUNT_NOFOLLOW)
		switch {
		case err == nil:
			continue
		case errors.Is(err, unix.EINVAL), errors.Is(err, unix.ENOENT):
			return nil
		default:
			return err
		}
	}
	return fmt.Errorf("%s is still mounted after 8 unmounts", path)
}

// mountedFrom reports whether path lies on the file system of the block
// device at device.
func mountedFrom(path, device string) (bool, error) {
	dev, err := deviceNumber(device)
	if err != nil {
		return false, err
	}
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("stat %s: %w", path, err)
	}
	return st.Dev == dev, nil
}

// deviceNumber is the device number of the block device node at path.
func deviceNumber(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return 0, fmt.Errorf("%s is not a block device", path)
	}
	return st.Rdev, nil
}

// sameFile reports whether a and b are one file (a bind mount of b at a
// is).
func sameFile(a, b string) (bool, error) {
	var sa, sb unix.Stat_t
	if err := unix.Stat(a, &sa); err != nil {
		return false, err
	}
	if err := unix.Stat(b, &sb); err != nil {
		return false, err
	}
	return sa.Dev == sb.Dev && sa.Ino == sb.Ino, nil
}

// deviceSize is the size of the block device at path (or of the file, as
// tests attach).
func deviceSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", path, err)
	}
	defer f.Close()
	if st, err := f.Stat(); err == nil && st.Mode().IsRegular() {
		return st.Size(), nil
	}
	size, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
	if err != nil {
		return 0, fmt.Errorf("size of %s: %w", path, err)
	}
	return int64(size), nil
}
