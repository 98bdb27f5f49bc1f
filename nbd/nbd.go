// Package nbd holds the NBD wire protocol that clients and servers share:
// magics, option, reply, command and flag values, and the encoding of the
// fixed-size messages of the handshake and transmission phases.
//
// It does no I/O and sets no policy: callers read and write the bytes and
// decide what a value means for them. Encoders append to a caller's buffer
// and decoders read from a fixed-size slice, so neither allocates.
//
// All integers on the wire are big-endian (network byte order).
package nbd

// Magic values that start NBD messages.
const (
	// Magic ("NBDMAGIC") opens the server's greeting.
	Magic uint64 = 0x4e42444d41474943
	// OptionMagic ("IHAVEOPT") follows Magic in a newstyle greeting and opens
	// each client option.
	OptionMagic uint64 = 0x49484156454f5054
	// OptionReplyMagic opens each server reply to an option.
	OptionReplyMagic uint64 = 0x0003e889045565a9
	// RequestMagic opens each transmission request.
	RequestMagic uint32 = 0x25609513
	// SimpleReplyMagic opens each simple transmission reply.
	SimpleReplyMagic uint32 = 0x67446698
	// StructuredReplyMagic opens a structured reply chunk; mvps-te never
	// negotiates structured replies, so a client seeing it has a confused peer.
	StructuredReplyMagic uint32 = 0x668e33ef
)

// Sizes of the fixed-size messages, in bytes.
const (
	GreetingSize          = 8 + 8 + 2
	ClientFlagsSize       = 4
	OptionHeaderSize      = 8 + 4 + 4
	OptionReplyHeaderSize = 8 + 4 + 4 + 4
	// ExportInfoSize is the reply to NBD_OPT_EXPORT_NAME when both sides
	// agreed on NO_ZEROES: size and transmission flags without the 124
	// zero bytes of padding.
	ExportInfoSize = 8 + 2
	// ExportInfoPadding is the number of zero bytes that follow the export
	// info when NO_ZEROES was not agreed.
	ExportInfoPadding = 124
	RequestSize       = 4 + 2 + 2 + 8 + 8 + 4
	SimpleReplySize   = 4 + 4 + 8
	// MaxOptionLength is the longest option payload mvps-te accepts.
	MaxOptionLength = 64 << 10
)
