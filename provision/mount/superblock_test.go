package mount

import (
	"encoding/binary"
	"errors"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// tool finds a command of e2fsprogs or util-linux: the tests make and
// probe real images with them.
func tool(t *testing.T, name string) string {
	t.Helper()
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin", "/bin"} {
		if p := filepath.Join(dir, name); fileExists(p) {
			return p
		}
	}
	t.Fatalf("%s is not installed (Debian's e2fsprogs and util-linux, both of priority required, have it)", name)
	return ""
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

// imageFile makes an 8 MiB image file and runs cmd (a tool and its
// arguments; the file's path is appended) on it, if cmd is not empty.
func imageFile(t *testing.T, cmd ...string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "image")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, 8<<20); err != nil {
		t.Fatal(err)
	}
	if len(cmd) > 0 {
		c := exec.Command(tool(t, cmd[0]), append(cmd[1:], path)...)
		// mke2fs reads /etc/mke2fs.conf: the defaults of the host's
		// e2fsprogs, which are the VM's and the daemon's (Debian's).
		if out, err := c.CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", cmd, err, out)
		}
	}
	return path
}

func firstBlock(t *testing.T, path string) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := readHead(f)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// editSuperblock edits the superblock in a copy of b and recomputes its
// checksum, as a tool that made the change would have.
func editSuperblock(b []byte, edit func(sb []byte)) []byte {
	b = append([]byte(nil), b...)
	sb := b[superblockOffset : superblockOffset+superblockSize]
	edit(sb)
	binary.LittleEndian.PutUint32(sb[sbChecksum:], ^crc32.Checksum(sb[:sbChecksum], crc32.MakeTable(crc32.Castagnoli)))
	return b
}

// setFeatures sets feature bits in a copy of the superblock.
func setFeatures(b []byte, incompat, roCompat uint32) []byte {
	return editSuperblock(b, func(sb []byte) {
		le := binary.LittleEndian
		le.PutUint32(sb[sbIncompat:], le.Uint32(sb[sbIncompat:])|incompat)
		le.PutUint32(sb[sbROCompat:], le.Uint32(sb[sbROCompat:])|roCompat)
	})
}

// setJournal names the journal's inode and device in a copy of the
// superblock: what a caller can write through fd mode, and what mke2fs
// -J device= writes for a journal on a real block device.
func setJournal(b []byte, inum, dev uint32) []byte {
	return editSuperblock(b, func(sb []byte) {
		binary.LittleEndian.PutUint32(sb[sbJournalInum:], inum)
		binary.LittleEndian.PutUint32(sb[sbJournalDev:], dev)
	})
}

// What each kind of content in the first 8 KiB makes of a mount: ext4 as
// mke2fs makes it is mounted; ext2, ext3 and an external journal are
// refused as not ext4, as blkid named them before; ext4 with a feature
// the kernel may not mount read-write, a journal on another device (which
// the kernel would open by number from the provisioner's context), or a
// damaged superblock, is refused and says why; no magic at all is for the
// probe to judge.
func TestCheckExt4(t *testing.T) {
	ext4 := firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096"))
	if compat := binary.LittleEndian.Uint32(ext4[superblockOffset+sbCompat:]); compat&compatHasJournal == 0 {
		t.Fatal("mke2fs made ext4 without a journal: the journal cases below would test nothing")
	}
	journalInum := binary.LittleEndian.Uint32(ext4[superblockOffset+sbJournalInum:])
	noJournal := firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^has_journal"))
	damaged := append([]byte(nil), ext4...)
	damaged[superblockOffset+0x78] ^= 0xff // the volume name, under the checksum

	for _, tc := range []struct {
		name  string
		first []byte
		found bool
		err   error
		says  string
	}{
		{name: "ext4", first: ext4, found: true},
		{name: "ext4 without metadata_csum", found: true,
			first: firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4", "-O", "^metadata_csum"))},
		{name: "ext4 with metadata_csum_seed and inline_data", found: true,
			first: firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext4", "-O", "metadata_csum_seed,inline_data"))},
		{name: "ext3", found: true, err: ErrNotExt4, says: "ext3",
			first: firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext3"))},
		{name: "ext2", found: true, err: ErrNotExt4, says: "ext2",
			first: firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-t", "ext2"))},
		{name: "external journal", found: true, err: ErrNotExt4, says: "jbd",
			first: firstBlock(t, imageFile(t, "mke2fs", "-q", "-F", "-O", "journal_dev", "-b", "4096"))},
		{name: "unknown incompat feature", first: setFeatures(ext4, 0x40000, 0), found: true,
			err: ErrUnsupportedExt4, says: "incompat 0x40000"},
		{name: "compression (never in ext4)", first: setFeatures(ext4, 0x1, 0), found: true,
			err: ErrUnsupportedExt4, says: "incompat 0x1"},
		{name: "read-only feature", first: setFeatures(ext4, 0, 0x1000), found: true,
			err: ErrUnsupportedExt4, says: "ro_compat 0x1000"},
		{name: "journal on another device", first: setJournal(ext4, 0, 0x0800), found: true,
			err: ErrUnsupportedExt4, says: "journal is on another device (8:0)"},
		{name: "journal on a device with a large minor", first: setJournal(ext4, 0, 0x1234567), found: true,
			err: ErrUnsupportedExt4, says: "(837:4711)"},
		{name: "journal inode and device both", first: setJournal(ext4, journalInum, 0x0800), found: true,
			err: ErrUnsupportedExt4, says: "another device"},
		{name: "journal in neither inode nor device", first: setJournal(ext4, 0, 0), found: true,
			err: ErrUnsupportedExt4, says: "no journal inode"},
		{name: "no journal", first: noJournal, found: true},
		{name: "no journal, stale journal fields", first: setJournal(noJournal, 0, 0x0800), found: true},
		{name: "damaged superblock", first: damaged, found: true, err: ErrUnsupportedExt4, says: "checksum"},
		{name: "zeros", first: make([]byte, headRead)},
		{name: "swap", first: firstBlock(t, imageFile(t, "mkswap"))},
		{name: "shorter than a superblock", first: ext4[:superblockOffset+100]},
	} {
		t.Run(tc.name, func(t *testing.T) {
			found, err := checkExt4(tc.first)
			if found != tc.found || !errors.Is(err, tc.err) || (tc.err == nil) != (err == nil) {
				t.Fatalf("checkExt4 = %v, %v; want %v, %v", found, err, tc.found, tc.err)
			}
			if err != nil && !strings.Contains(err.Error(), tc.says) {
				t.Errorf("error %q does not say %q", err, tc.says)
			}
		})
	}
}

// Whatever the first 8 KiB of an image hold (a caller wrote them), the
// check neither panics nor calls ext4 what has no magic, and a mountable
// answer always comes with the magic.
func FuzzCheckExt4(f *testing.F) {
	ext4 := make([]byte, headRead)
	sb := ext4[superblockOffset:]
	binary.LittleEndian.PutUint16(sb[sbMagic:], ext4Magic)
	binary.LittleEndian.PutUint32(sb[sbRevLevel:], 1)
	binary.LittleEndian.PutUint32(sb[sbIncompat:], 0x2c2)
	binary.LittleEndian.PutUint32(sb[sbROCompat:], 0x46b)
	sb[sbChecksumType] = checksumCRC32C
	f.Add(setFeatures(ext4, 0, 0))
	f.Add(ext4)
	f.Add(ext4[:superblockOffset+sbMagic+2])
	f.Add([]byte{})
	f.Fuzz(func(t *testing.T, first []byte) {
		found, err := checkExt4(first)
		magic := len(first) >= superblockOffset+superblockSize &&
			binary.LittleEndian.Uint16(first[superblockOffset+sbMagic:]) == ext4Magic
		if found != magic {
			t.Fatalf("found %v with magic %v", found, magic)
		}
		if !found && err != nil {
			t.Fatalf("no superblock, yet an error: %v", err)
		}
	})
}
