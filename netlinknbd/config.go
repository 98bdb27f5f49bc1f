package netlinknbd

import (
	"fmt"
	"math"
	"strings"
	"syscall"
	"time"
)

// ClientFlags are the kernel-side behaviour flags of NBD_ATTR_CLIENT_FLAGS
// (NBD_CFLAG_* in linux/nbd.h). They are not part of the NBD wire protocol.
type ClientFlags uint64

const (
	// ClientFlagDestroyOnDisconnect makes the kernel delete the nbdN block
	// device once it is disconnected and its last user is gone, instead of
	// keeping an idle device around for reuse. Such devices are never
	// picked by a Connect without an explicit Index.
	ClientFlagDestroyOnDisconnect ClientFlags = 1 << 0

	// ClientFlagDisconnectOnClose makes the kernel disconnect the device
	// (as Disconnect does) when the last opener of /dev/nbdN closes it.
	ClientFlagDisconnectOnClose ClientFlags = 1 << 1
)

// serverFlagCanMultiConn is NBD_FLAG_CAN_MULTI_CONN. The kernel refuses
// more than one socket per device unless the server advertised it, so
// Connect checks it up front to give a clear error instead of EINVAL.
const serverFlagCanMultiConn = 1 << 8

const (
	// minBlockSize and maxBlockSize bound what blk_validate_block_size can
	// accept. Kernels before large block size support (6.15) cap the
	// block size at PAGE_SIZE instead and report EINVAL above it.
	minBlockSize = 512
	maxBlockSize = 64 << 10

	// maxIndex is MINORMASK: the kernel rejects larger indices whatever
	// its max_part setting. With the default max_part=16 the effective
	// limit is lower (MINORMASK >> 5), which only the kernel can check.
	maxIndex = 1<<20 - 1
)

// ConnectConfig describes a device to hand over to the kernel. Fields left
// at their zero value are not sent, so the kernel applies its defaults.
type ConnectConfig struct {
	// Index selects /dev/nbd<Index>. If nil, the kernel picks an idle
	// existing device or creates a new one, and Connect returns its index.
	// A device that does not exist yet is created on demand either way.
	Index *uint32

	// Sockets are connected stream sockets (TCP, Unix) whose NBD handshake
	// is complete: the kernel only speaks the transmission phase. Each
	// becomes one connection of the device. Any syscall.Conn works, e.g.
	// *net.TCPConn, *net.UnixConn or *os.File.
	//
	// The kernel takes its own reference to each socket, so the caller may
	// (and should) close its copies once Connect returns. The descriptors
	// are held open for the duration of the call, so closing them
	// concurrently cannot make the kernel pick up an unrelated file.
	//
	// More than one socket requires NBD_FLAG_CAN_MULTI_CONN (1<<8) in
	// ServerFlags.
	Sockets []syscall.Conn

	// Size is the export size in bytes. The kernel exposes it in 512-byte
	// sectors, so a size that is not a multiple of 512 is rounded down.
	Size uint64

	// BlockSize is the logical and physical block size of the device, a
	// power of two from 512 to 4096 (PAGE_SIZE) on older kernels and up to
	// 65536 on kernels with large block size support. 0 means the kernel
	// default of 1024.
	BlockSize uint64

	// ServerFlags are the NBD transmission flags the server sent in the
	// handshake. They are passed through unchanged: the kernel derives
	// read-only, flush, FUA, trim and multi-connection support from them.
	ServerFlags uint64

	// ClientFlags selects kernel-side behaviour; see the ClientFlag
	// constants.
	ClientFlags ClientFlags

	// Timeout is the per-request timeout, sent in whole seconds (rounded
	// up). 0 keeps the kernel default, under which a slow request is only
	// logged and never failed. When it expires, current kernels declare
	// the connection dead (a LinkDead event) and retry the request on
	// another connection or, with none left, wait DeadConnTimeout for a
	// Reconfigure before failing it.
	Timeout time.Duration

	// DeadConnTimeout is how long I/O waits for a Reconfigure to supply a
	// new socket once all connections are dead, sent in whole seconds
	// (rounded up). 0 means I/O fails as soon as no connection is left.
	DeadConnTimeout time.Duration

	// BackendIdentifier is an opaque label shown in
	// /sys/block/nbdN/backend. Once set, every Reconfigure of the device
	// must repeat it. Empty means not sent.
	BackendIdentifier string
}

// ReconfigureConfig describes changes to a connected device. Nil pointer
// fields and empty values are not sent and leave the setting as it is.
type ReconfigureConfig struct {
	// Sockets replace dead connections. The kernel puts each socket into
	// the first dead connection slot; it never adds connections beyond the
	// number given to Connect. When no slot is dead the kernel silently
	// drops the socket and ignores the remaining ones, and Reconfigure
	// still succeeds. The caller may close its copies once Reconfigure
	// returns.
	Sockets []syscall.Conn

	// Size resizes the device, in bytes.
	Size *uint64

	// BlockSize changes the block size; see ConnectConfig.BlockSize.
	BlockSize *uint64

	// Timeout replaces the request timeout; 0 restores the kernel default.
	Timeout *time.Duration

	// DeadConnTimeout replaces the dead connection timeout.
	DeadConnTimeout *time.Duration

	// ClientFlags replaces the client flags as a whole: a flag that is not
	// set is cleared.
	ClientFlags *ClientFlags

	// BackendIdentifier must equal the identifier given to Connect, if
	// one was given: the kernel refuses (EINVAL) to reconfigure such a
	// device without it, as a guard against attaching the wrong backend.
	BackendIdentifier string
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%s: %w", fmt.Sprintf(format, args...), ErrInvalid)
}

// validate rejects what the kernel would refuse anyway, so that callers get
// an error naming the field rather than a bare EINVAL.
func (cfg *ConnectConfig) validate() error {
	if cfg.Index != nil && *cfg.Index > maxIndex {
		return invalidf("index %d exceeds the kernel maximum %d", *cfg.Index, maxIndex)
	}
	if len(cfg.Sockets) == 0 {
		return invalidf("at least one socket is required")
	}
	if err := validateSockets(cfg.Sockets); err != nil {
		return err
	}
	if len(cfg.Sockets) > 1 && cfg.ServerFlags&serverFlagCanMultiConn == 0 {
		return invalidf("%d sockets need NBD_FLAG_CAN_MULTI_CONN in server flags", len(cfg.Sockets))
	}
	if err := validateSize(cfg.Size); err != nil {
		return err
	}
	if cfg.BlockSize != 0 {
		if err := validateBlockSize(cfg.BlockSize); err != nil {
			return err
		}
	}
	if err := validateTimeout("timeout", cfg.Timeout); err != nil {
		return err
	}
	if err := validateTimeout("dead connection timeout", cfg.DeadConnTimeout); err != nil {
		return err
	}
	return validateBackend(cfg.BackendIdentifier)
}

func (cfg *ReconfigureConfig) validate() error {
	if err := validateSockets(cfg.Sockets); err != nil {
		return err
	}
	if cfg.Size != nil {
		if err := validateSize(*cfg.Size); err != nil {
			return err
		}
	}
	if cfg.BlockSize != nil {
		if err := validateBlockSize(*cfg.BlockSize); err != nil {
			return err
		}
	}
	if cfg.Timeout != nil {
		if err := validateTimeout("timeout", *cfg.Timeout); err != nil {
			return err
		}
	}
	if cfg.DeadConnTimeout != nil {
		if err := validateTimeout("dead connection timeout", *cfg.DeadConnTimeout); err != nil {
			return err
		}
	}
	return validateBackend(cfg.BackendIdentifier)
}

func validateSockets(socks []syscall.Conn) error {
	for i, s := range socks {
		if s == nil {
			return invalidf("socket %d is nil", i)
		}
	}
	return nil
}

func validateSize(size uint64) error {
	if size == 0 {
		return invalidf("size must be positive")
	}
	// The kernel keeps the size in a signed loff_t.
	if size > math.MaxInt64 {
		return invalidf("size %d exceeds the kernel maximum %d", size, int64(math.MaxInt64))
	}
	return nil
}

func validateBlockSize(bs uint64) error {
	if bs < minBlockSize || bs > maxBlockSize || bs&(bs-1) != 0 {
		return invalidf("block size %d is not a power of two from %d to %d", bs, minBlockSize, maxBlockSize)
	}
	return nil
}

func validateTimeout(name string, d time.Duration) error {
	if d < 0 {
		return invalidf("%s %v is negative", name, d)
	}
	return nil
}

func validateBackend(id string) error {
	// The kernel treats the attribute as a C string; a NUL would silently
	// truncate it and make later Reconfigure comparisons surprising.
	if strings.IndexByte(id, 0) >= 0 {
		return invalidf("backend identifier contains a NUL byte")
	}
	return nil
}

// seconds converts d to the whole seconds the kernel expects, rounding up so
// that a timeout is never shorter than asked for.
func seconds(d time.Duration) uint64 {
	s := d / time.Second
	if d%time.Second != 0 {
		s++
	}
	return uint64(s)
}
