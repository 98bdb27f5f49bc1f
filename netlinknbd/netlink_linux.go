//go:build linux

package netlinknbd

import (
	"errors"
	"fmt"

	"github.com/mdlayher/genetlink"
	"github.com/mdlayher/netlink"
)

// Constants of include/uapi/linux/nbd-netlink.h, which x/sys does not carry.
const (
	familyName     = "nbd"
	familyVersion  = 1
	multicastGroup = "nbd_mc_group"

	cmdConnect     = 1
	cmdDisconnect  = 2
	cmdReconfigure = 3
	cmdLinkDead    = 4
	cmdStatus      = 5

	attrIndex             = 1
	attrSizeBytes         = 2
	attrBlockSizeBytes    = 3
	attrTimeout           = 4
	attrServerFlags       = 5
	attrClientFlags       = 6
	attrSockets           = 7
	attrDeadConnTimeout   = 8
	attrDeviceList        = 9
	attrBackendIdentifier = 10

	// Inside attrSockets.
	sockItem = 1
	sockFD   = 1

	// Inside attrDeviceList.
	deviceItem      = 1
	deviceIndex     = 1
	deviceConnected = 2
)

func encodeSockets(ae *netlink.AttributeEncoder, fds []int) {
	if len(fds) == 0 {
		return
	}
	ae.Nested(attrSockets, func(nae *netlink.AttributeEncoder) error {
		for _, fd := range fds {
			nae.Nested(sockItem, func(iae *netlink.AttributeEncoder) error {
				iae.Uint32(sockFD, uint32(fd))
				return nil
			})
		}
		return nil
	})
}

// encodeConnect builds the CONNECT attributes. Only what cfg sets is sent,
// because the kernel distinguishes an absent attribute (keep its default)
// from a zero one.
func encodeConnect(cfg *ConnectConfig, fds []int) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	if cfg.Index != nil {
		ae.Uint32(attrIndex, *cfg.Index)
	}
	ae.Uint64(attrSizeBytes, cfg.Size)
	if cfg.BlockSize != 0 {
		ae.Uint64(attrBlockSizeBytes, cfg.BlockSize)
	}
	if cfg.Timeout != 0 {
		ae.Uint64(attrTimeout, seconds(cfg.Timeout))
	}
	if cfg.DeadConnTimeout != 0 {
		ae.Uint64(attrDeadConnTimeout, seconds(cfg.DeadConnTimeout))
	}
	if cfg.ServerFlags != 0 {
		ae.Uint64(attrServerFlags, cfg.ServerFlags)
	}
	if cfg.ClientFlags != 0 {
		ae.Uint64(attrClientFlags, uint64(cfg.ClientFlags))
	}
	encodeSockets(ae, fds)
	if cfg.BackendIdentifier != "" {
		ae.String(attrBackendIdentifier, cfg.BackendIdentifier)
	}
	return ae.Encode()
}

func encodeReconfigure(index uint32, cfg *ReconfigureConfig, fds []int) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	if cfg.Size != nil {
		ae.Uint64(attrSizeBytes, *cfg.Size)
	}
	if cfg.BlockSize != nil {
		ae.Uint64(attrBlockSizeBytes, *cfg.BlockSize)
	}
	if cfg.Timeout != nil {
		ae.Uint64(attrTimeout, seconds(*cfg.Timeout))
	}
	if cfg.DeadConnTimeout != nil {
		ae.Uint64(attrDeadConnTimeout, seconds(*cfg.DeadConnTimeout))
	}
	if cfg.ClientFlags != nil {
		ae.Uint64(attrClientFlags, uint64(*cfg.ClientFlags))
	}
	encodeSockets(ae, fds)
	if cfg.BackendIdentifier != "" {
		ae.String(attrBackendIdentifier, cfg.BackendIdentifier)
	}
	return ae.Encode()
}

func encodeIndex(index uint32) ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.Uint32(attrIndex, index)
	return ae.Encode()
}

// errNoIndex means a reply lacked NBD_ATTR_INDEX. For CONNECT the kernel
// skips the reply only when it cannot allocate it, after the device was
// already started.
var errNoIndex = errors.New("kernel reply carries no device index")

// decodeIndex finds NBD_ATTR_INDEX in the first message with command cmd.
// CONNECT replies and LINK_DEAD events share this layout.
func decodeIndex(msgs []genetlink.Message, cmd uint8) (uint32, error) {
	for _, m := range msgs {
		if m.Header.Command != cmd {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return 0, err
		}
		var (
			index uint32
			found bool
		)
		for ad.Next() {
			if ad.Type() == attrIndex {
				index, found = ad.Uint32(), true
			}
		}
		if err := ad.Err(); err != nil {
			return 0, err
		}
		if !found {
			return 0, errNoIndex
		}
		return index, nil
	}
	return 0, errNoIndex
}

// decodeStatus collects the devices of every STATUS reply in msgs.
func decodeStatus(msgs []genetlink.Message) ([]DeviceStatus, error) {
	var (
		devs    []DeviceStatus
		replied bool
	)
	for _, m := range msgs {
		if m.Header.Command != cmdStatus {
			continue
		}
		replied = true
		ad, err := netlink.NewAttributeDecoder(m.Data)
		if err != nil {
			return nil, err
		}
		for ad.Next() {
			if ad.Type() == attrDeviceList {
				ad.Nested(func(nad *netlink.AttributeDecoder) error {
					for nad.Next() {
						if nad.Type() != deviceItem {
							continue
						}
						var d DeviceStatus
						found := false
						nad.Nested(func(iad *netlink.AttributeDecoder) error {
							for iad.Next() {
								switch iad.Type() {
								case deviceIndex:
									d.Index, found = iad.Uint32(), true
								case deviceConnected:
									d.Connected = iad.Uint8() != 0
								}
							}
							return nil
						})
						// An item without an index cannot be attributed
						// to a device; dropping it beats inventing nbd0.
						if found {
							devs = append(devs, d)
						}
					}
					return nil
				})
			}
		}
		if err := ad.Err(); err != nil {
			return nil, fmt.Errorf("decoding device list: %w", err)
		}
	}
	if !replied {
		return nil, errors.New("kernel sent no status reply")
	}
	return devs, nil
}
