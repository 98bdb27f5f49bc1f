package nbd

import (
	"encoding/binary"
	"errors"
	"fmt"
)

// ErrBadMagic means a message did not start with the magic its position in
// the protocol requires: the peer does not speak NBD or lost framing.
var ErrBadMagic = errors.New("nbd: bad magic")

// ErrShortMessage means a decoder was handed fewer bytes than the message
// it decodes.
var ErrShortMessage = errors.New("nbd: message too short")

var be = binary.BigEndian

func checkLength(b []byte, want int, what string) error {
	if len(b) < want {
		return fmt.Errorf("%w: %s needs %d bytes, have %d", ErrShortMessage, what, want, len(b))
	}
	return nil
}

// Greeting is the server's first message of the newstyle handshake:
// NBDMAGIC, IHAVEOPT and the handshake flags.
type Greeting struct {
	Flags HandshakeFlags
}

// Append appends the encoded greeting to b.
func (g Greeting) Append(b []byte) []byte {
	b = be.AppendUint64(b, Magic)
	b = be.AppendUint64(b, OptionMagic)
	return be.AppendUint16(b, uint16(g.Flags))
}

// ParseGreeting decodes the first GreetingSize bytes of b.
func ParseGreeting(b []byte) (Greeting, error) {
	if err := checkLength(b, GreetingSize, "greeting"); err != nil {
		return Greeting{}, err
	}
	if m := be.Uint64(b); m != Magic {
		return Greeting{}, fmt.Errorf("%w: greeting starts with %#016x, want NBDMAGIC", ErrBadMagic, m)
	}
	if m := be.Uint64(b[8:]); m != OptionMagic {
		// An oldstyle server sends its magic 0x00420281861253 here.
		return Greeting{}, fmt.Errorf("%w: greeting has %#016x after NBDMAGIC, want IHAVEOPT (newstyle)", ErrBadMagic, m)
	}
	return Greeting{Flags: HandshakeFlags(be.Uint16(b[16:]))}, nil
}

// AppendClientFlags appends the client's answer to the greeting.
func AppendClientFlags(b []byte, f ClientFlags) []byte {
	return be.AppendUint32(b, uint32(f))
}

// ParseClientFlags decodes the first ClientFlagsSize bytes of b.
func ParseClientFlags(b []byte) (ClientFlags, error) {
	if err := checkLength(b, ClientFlagsSize, "client flags"); err != nil {
		return 0, err
	}
	return ClientFlags(be.Uint32(b)), nil
}

// OptionHeader precedes the Length bytes of an option's data.
type OptionHeader struct {
	Option Option
	Length uint32
}

// Append appends the encoded header (IHAVEOPT, option, length) to b.
func (h OptionHeader) Append(b []byte) []byte {
	b = be.AppendUint64(b, OptionMagic)
	b = be.AppendUint32(b, uint32(h.Option))
	return be.AppendUint32(b, h.Length)
}

// ParseOptionHeader decodes the first OptionHeaderSize bytes of b.
func ParseOptionHeader(b []byte) (OptionHeader, error) {
	if err := checkLength(b, OptionHeaderSize, "option header"); err != nil {
		return OptionHeader{}, err
	}
	if m := be.Uint64(b); m != OptionMagic {
		return OptionHeader{}, fmt.Errorf("%w: option starts with %#016x, want IHAVEOPT", ErrBadMagic, m)
	}
	return OptionHeader{Option: Option(be.Uint32(b[8:])), Length: be.Uint32(b[12:])}, nil
}

// OptionReplyHeader precedes the Length bytes of a server's option reply.
type OptionReplyHeader struct {
	Option Option
	Type   ReplyType
	Length uint32
}

// Append appends the encoded reply header to b.
func (h OptionReplyHeader) Append(b []byte) []byte {
	b = be.AppendUint64(b, OptionReplyMagic)
	b = be.AppendUint32(b, uint32(h.Option))
	b = be.AppendUint32(b, uint32(h.Type))
	return be.AppendUint32(b, h.Length)
}

// ParseOptionReplyHeader decodes the first OptionReplyHeaderSize bytes of b.
func ParseOptionReplyHeader(b []byte) (OptionReplyHeader, error) {
	if err := checkLength(b, OptionReplyHeaderSize, "option reply"); err != nil {
		return OptionReplyHeader{}, err
	}
	if m := be.Uint64(b); m != OptionReplyMagic {
		return OptionReplyHeader{}, fmt.Errorf("%w: option reply starts with %#016x", ErrBadMagic, m)
	}
	return OptionReplyHeader{
		Option: Option(be.Uint32(b[8:])),
		Type:   ReplyType(be.Uint32(b[12:])),
		Length: be.Uint32(b[16:]),
	}, nil
}

// ExportInfo is the server's answer to NBD_OPT_EXPORT_NAME.
type ExportInfo struct {
	Size  uint64
	Flags TransmissionFlags
}

// Append appends the encoded export info, without padding, to b.
func (e ExportInfo) Append(b []byte) []byte {
	b = be.AppendUint64(b, e.Size)
	return be.AppendUint16(b, uint16(e.Flags))
}

// ParseExportInfo decodes the first ExportInfoSize bytes of b.
func ParseExportInfo(b []byte) (ExportInfo, error) {
	if err := checkLength(b, ExportInfoSize, "export info"); err != nil {
		return ExportInfo{}, err
	}
	return ExportInfo{Size: be.Uint64(b), Flags: TransmissionFlags(be.Uint16(b[8:]))}, nil
}

// Request is a transmission-phase request header. A CmdWrite request is
// followed by Length bytes of data.
type Request struct {
	Flags  CommandFlags
	Type   Command
	Handle uint64
	Offset uint64
	Length uint32
}

// Append appends the encoded request header to b.
func (r Request) Append(b []byte) []byte {
	b = be.AppendUint32(b, RequestMagic)
	b = be.AppendUint16(b, uint16(r.Flags))
	b = be.AppendUint16(b, uint16(r.Type))
	b = be.AppendUint64(b, r.Handle)
	b = be.AppendUint64(b, r.Offset)
	return be.AppendUint32(b, r.Length)
}

// ParseRequest decodes the first RequestSize bytes of b.
func ParseRequest(b []byte) (Request, error) {
	if err := checkLength(b, RequestSize, "request"); err != nil {
		return Request{}, err
	}
	if m := be.Uint32(b); m != RequestMagic {
		return Request{}, fmt.Errorf("%w: request starts with %#08x", ErrBadMagic, m)
	}
	return Request{
		Flags:  CommandFlags(be.Uint16(b[4:])),
		Type:   Command(be.Uint16(b[6:])),
		Handle: be.Uint64(b[8:]),
		Offset: be.Uint64(b[16:]),
		Length: be.Uint32(b[24:]),
	}, nil
}

// SimpleReply is a transmission-phase reply header. A successful reply to
// CmdRead is followed by the requested data.
type SimpleReply struct {
	Error  Errno
	Handle uint64
}

// Append appends the encoded reply header to b.
func (r SimpleReply) Append(b []byte) []byte {
	b = be.AppendUint32(b, SimpleReplyMagic)
	b = be.AppendUint32(b, uint32(r.Error))
	return be.AppendUint64(b, r.Handle)
}

// ParseSimpleReply decodes the first SimpleReplySize bytes of b.
func ParseSimpleReply(b []byte) (SimpleReply, error) {
	if err := checkLength(b, SimpleReplySize, "reply"); err != nil {
		return SimpleReply{}, err
	}
	if m := be.Uint32(b); m != SimpleReplyMagic {
		return SimpleReply{}, fmt.Errorf("%w: reply starts with %#08x", ErrBadMagic, m)
	}
	return SimpleReply{Error: Errno(be.Uint32(b[4:])), Handle: be.Uint64(b[8:])}, nil
}
