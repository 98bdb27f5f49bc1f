package mount

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"strings"
)

// The ext4 superblock is 1024 bytes at byte 1024 of the device; the
// offsets are those of struct ext4_super_block (the kernel's
// Documentation/filesystems/ext4/super.rst).
const (
	superblockOffset = 1024
	superblockSize   = 1024
	// headRead is what the check reads, in one engine request: the block
	// that holds the superblock and the next, which holds the group
	// descriptors (block 1 with 4 KiB blocks, byte 2048 with 1 KiB ones).
	// The kernel's mount reads both first, and finds them in the page
	// cache this read fills.
	headRead = 8192

	ext4Magic = 0xef53

	sbMagic        = 0x38  // le16
	sbRevLevel     = 0x4c  // le32
	sbCompat       = 0x5c  // le32
	sbIncompat     = 0x60  // le32
	sbROCompat     = 0x64  // le32
	sbJournalInum  = 0xe0  // le32
	sbJournalDev   = 0xe4  // le32, new_encode_dev's
	sbFlags        = 0x160 // le32
	sbChecksumType = 0x175 // u8
	sbChecksum     = 0x3fc // le32, over the bytes before it
)

// Feature bits the check looks at by name.
const (
	compatHasJournal = 0x4

	incompatJournalDev = 0x8

	roCompatMetadataCsum = 0x400

	flagsTestFilesys = 0x4 // the file system is for ext4dev, in-development code

	checksumCRC32C = 1
)

// What the ext4 of Linux 6.1 mounts read-write (EXT4_FEATURE_INCOMPAT_SUPP
// and EXT4_FEATURE_RO_COMPAT_SUPP in fs/ext4/ext4.h). 6.1 is the oldest
// kernel the provisioner is tested on, and later kernels mount all of
// these: a file system with any other incompat or ro_compat bit is refused
// here, with the bits named, before the kernel is asked. That is stricter
// than a newer kernel has to be, and never laxer: a feature only newer
// kernels know is added here when it is wanted. The running kernel's own
// list cannot be read (/sys/fs/ext4/features names a few optional
// features, not the bits), and the kernel refusing on its own would give
// only EINVAL. compat bits are ignored by every kernel, as they are here.
const (
	incompatKnown = 0x0002 | // filetype
		0x0004 | // recover (the journal needs replaying: the kernel does it)
		0x0010 | // meta_bg
		0x0040 | // extents
		0x0080 | // 64bit
		0x0100 | // mmp
		0x0200 | // flex_bg
		0x0400 | // ea_inode
		0x2000 | // metadata_csum_seed
		0x4000 | // large_dir
		0x8000 | // inline_data
		0x10000 | // encrypt
		0x20000 // casefold
	roCompatKnown = 0x0001 | // sparse_super
		0x0002 | // large_file
		0x0004 | // btree_dir (dir_index)
		0x0008 | // huge_file
		0x0010 | // uninit_bg (gdt_csum)
		0x0020 | // dir_nlink
		0x0040 | // extra_isize
		0x0100 | // quota
		0x0200 | // bigalloc
		0x0400 | // metadata_csum
		0x2000 | // project
		0x8000 | // verity
		0x10000 // orphan_present
)

// What ext3 knows: a file system within these sets, and without the
// test flag, is ext2 or ext3 and not ext4, as blkid tells them apart.
const (
	ext3IncompatKnown = 0x0002 | 0x0004 | 0x0010 // filetype, recover, meta_bg
	ext3ROCompatKnown = 0x0001 | 0x0002 | 0x0004 // sparse_super, large_file, btree_dir
)

// ErrUnsupportedExt4 is an ext4 file system the provisioner will not hand
// to the kernel: features it does not know, or a superblock whose checksum
// is wrong. Like a device without ext4, it is left exactly as it is.
var ErrUnsupportedExt4 = errors.New("image holds an ext4 file system this provisioner does not mount; refusing to mount or format it")

// crc32c is the checksum of ext4's metadata.
var crc32c = crc32.MakeTable(crc32.Castagnoli)

// readHead reads the first 8 KiB of the device, short for a device
// smaller than that.
func readHead(r io.ReaderAt) ([]byte, error) {
	buf := make([]byte, headRead)
	n, err := r.ReadAt(buf, 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return nil, fmt.Errorf("read the superblock: %w", err)
	}
	return buf[:n], nil
}

// checkExt4 looks at the first bytes of a device (readHead's). found is false when
// there is no ext4 superblock magic: the device holds no ext2, ext3 or
// ext4, and only a probe for every other signature can tell whether it is
// fresh. When found, err is nil for an ext4 file system the kernel will
// mount read-write, and otherwise says why it is refused: ErrNotExt4 for
// ext2, ext3, ext4dev and an external journal (which blkid names so, and
// which mount mode has always refused), ErrUnsupportedExt4 for the rest,
// an ext4 that uses an external journal included.
func checkExt4(first []byte) (found bool, err error) {
	if len(first) < superblockOffset+superblockSize {
		return false, nil
	}
	sb := first[superblockOffset : superblockOffset+superblockSize]
	le := binary.LittleEndian
	if le.Uint16(sb[sbMagic:]) != ext4Magic {
		return false, nil
	}
	compat, incompat, roCompat := le.Uint32(sb[sbCompat:]), le.Uint32(sb[sbIncompat:]), le.Uint32(sb[sbROCompat:])
	switch {
	case incompat&incompatJournalDev != 0:
		return true, fmt.Errorf("%w (found jbd, an external ext4 journal)", ErrNotExt4)
	case incompat&^ext3IncompatKnown == 0 && roCompat&^ext3ROCompatKnown == 0:
		if compat&compatHasJournal != 0 {
			return true, fmt.Errorf("%w (found ext3)", ErrNotExt4)
		}
		return true, fmt.Errorf("%w (found ext2)", ErrNotExt4)
	case le.Uint32(sb[sbFlags:])&flagsTestFilesys != 0:
		return true, fmt.Errorf("%w (found ext4dev)", ErrNotExt4)
	}
	// Revision 0 has no feature fields, and a revision above 1 is one no
	// kernel writes.
	if rev := le.Uint32(sb[sbRevLevel:]); rev != 1 {
		return true, fmt.Errorf("%w: superblock revision %d", ErrUnsupportedExt4, rev)
	}
	var unknown []string
	if extra := incompat &^ incompatKnown; extra != 0 {
		unknown = append(unknown, fmt.Sprintf("incompat %#x", extra))
	}
	if extra := roCompat &^ roCompatKnown; extra != 0 {
		unknown = append(unknown, fmt.Sprintf("ro_compat %#x", extra))
	}
	if len(unknown) > 0 {
		return true, fmt.Errorf("%w: unknown features (%s)", ErrUnsupportedExt4, strings.Join(unknown, ", "))
	}
	if roCompat&roCompatMetadataCsum != 0 {
		if t := sb[sbChecksumType]; t != checksumCRC32C {
			return true, fmt.Errorf("%w: unknown checksum type %d", ErrUnsupportedExt4, t)
		}
		// The kernel's crc32c starts from ~0 and is stored without the
		// final inversion that Go's (the standard CRC-32C) applies.
		if want, got := le.Uint32(sb[sbChecksum:]), ^crc32.Checksum(sb[:sbChecksum], crc32c); want != got {
			return true, fmt.Errorf("%w: superblock checksum %#08x, computed %#08x", ErrUnsupportedExt4, want, got)
		}
	}
	return true, checkJournal(sb, compat)
}

// checkJournal refuses a file system whose journal is not an inode of its
// own. The kernel's mount opens a journal that no inode holds by the
// device number in the superblock, read-write and exclusively, from the
// provisioner's context, and replays into it whatever that device's
// journal holds: the superblock is the caller's to write (in fd mode), so
// the number could name any block device of the host. A superblock naming
// both an inode and a device the kernel refuses as corrupt; it is refused
// here as well, with the reason. Without has_journal the kernel reads
// neither field.
func checkJournal(sb []byte, compat uint32) error {
	if compat&compatHasJournal == 0 {
		return nil
	}
	le := binary.LittleEndian
	inum, dev := le.Uint32(sb[sbJournalInum:]), le.Uint32(sb[sbJournalDev:])
	switch {
	case dev != 0:
		// The kernel's new_decode_dev: this file builds on every system,
		// and not all have unix.Major.
		major, minor := (dev&0xfff00)>>8, (dev&0xff)|((dev>>12)&0xfff00)
		return fmt.Errorf("%w: its journal is on another device (%d:%d); only a journal inside the file system is mounted",
			ErrUnsupportedExt4, major, minor)
	case inum == 0:
		return fmt.Errorf("%w: it has a journal but names no journal inode; only a journal inside the file system is mounted",
			ErrUnsupportedExt4)
	}
	return nil
}
