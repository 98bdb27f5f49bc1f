package csi

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	csipb "github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/mvps-provisioner/mvps-provisioner/provision/protocol"
)

// VolumeKey is the image key, and the CSI volume id, of the volume the
// orchestrator names name: the name itself when it is a valid key (a
// Kubernetes PV's pvc-<uid> is), otherwise its allowed characters and a
// hash of the whole name, so that two names never share a key.
func VolumeKey(name string) string {
	if protocol.ValidateKey(name) == nil {
		return name
	}
	sum := sha256.Sum256([]byte(name))
	return cleanName(name, 200) + "-" + hex.EncodeToString(sum[:8])
}

// newImageID makes the engine's image id of a new volume: its name's
// allowed characters and 16 random hex digits. A name made again after a
// DeleteVolume gets a new image: the store keeps the old one's bytes, which
// must never reappear in a volume that should be empty.
func newImageID(name string) (string, error) {
	var nonce [8]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		return "", fmt.Errorf("image id nonce: %w", err)
	}
	return cleanName(name, 40) + "-" + hex.EncodeToString(nonce[:]) + ".mvps-image", nil
}

// cleanName keeps at most max of name's bytes that an image id allows
// (0-9 a-z A-Z _ -), and "vol" if none is left.
func cleanName(name string, max int) string {
	var b strings.Builder
	for i := 0; i < len(name) && b.Len() < max; i++ {
		c := name[i]
		if 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '_' || c == '-' {
			b.WriteByte(c)
		}
	}
	if b.Len() == 0 {
		return "vol"
	}
	return b.String()
}

// checkCapability refuses what an mvps volume cannot be: written from more
// than one node (one writer per image), or mounted as anything but ext4.
func checkCapability(c *csipb.VolumeCapability) error {
	if c == nil {
		return status.Error(codes.InvalidArgument, "volume capability is required")
	}
	switch mode := c.GetAccessMode().GetMode(); mode {
	case csipb.VolumeCapability_AccessMode_SINGLE_NODE_WRITER, csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
	case csipb.VolumeCapability_AccessMode_UNKNOWN:
		return status.Error(codes.InvalidArgument, "volume capability has no access mode")
	default:
		return status.Errorf(codes.InvalidArgument, "access mode %s is not offered: an mvps image has one writer, on one node", mode)
	}
	switch t := c.GetAccessType().(type) {
	case *csipb.VolumeCapability_Block:
		if c.GetAccessMode().GetMode() == csipb.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY {
			return errReadOnlyBlock
		}
	case *csipb.VolumeCapability_Mount:
		if fs := t.Mount.GetFsType(); fs != "" && fs != "ext4" {
			return status.Errorf(codes.InvalidArgument, "file system %q is not offered; mvps volumes are ext4", fs)
		}
		if _, err := mountFlags(t.Mount.GetMountFlags()); err != nil {
			return err
		}
	default:
		return status.Error(codes.InvalidArgument, "volume capability has no access type (block or mount)")
	}
	return nil
}

// errReadOnlyBlock refuses a block volume read-only: a published block
// volume is its device node bound at the target, and a read-only mount
// stops writes to files, not to a device through its node.
var errReadOnlyBlock = status.Error(codes.InvalidArgument,
	"a block volume cannot be published read-only: a read-only bind mount does not keep writes from a device node")

// isBlock reports a block volume capability.
func isBlock(c *csipb.VolumeCapability) bool { return c.GetBlock() != nil }

// publishFlags are the mount flags a volume's published mounts may carry,
// beyond the nosuid,nodev that every mount has: per-mount flags the bind
// mount can take, none that changes the file system for other mounts.
var publishFlags = []string{"ro", "noexec", "noatime", "nodiratime", "relatime", "strictatime", "nosuid", "nodev"}

// mountFlags checks a capability's mount flags against publishFlags.
func mountFlags(flags []string) ([]string, error) {
	for _, f := range flags {
		if !slices.Contains(publishFlags, f) {
			return nil, status.Errorf(codes.InvalidArgument, "mount flag %q is not offered; offered are %s", f, strings.Join(publishFlags, ","))
		}
	}
	return flags, nil
}
