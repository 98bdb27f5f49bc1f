package nbd

import "fmt"

// Option is a client option of the fixed-newstyle negotiation.
type Option uint32

// Options. mvps-te acts on OptExportName and OptAbort only and answers every
// other option with RepErrUnsup.
const (
	OptExportName      Option = 1
	OptAbort           Option = 2
	OptList            Option = 3
	OptPeekExport      Option = 4
	OptStartTLS        Option = 5
	OptInfo            Option = 6
	OptGo              Option = 7
	OptStructuredReply Option = 8
	OptListMetaContext Option = 9
	OptSetMetaContext  Option = 10
)

var optionNames = map[Option]string{
	OptExportName: "EXPORT_NAME", OptAbort: "ABORT", OptList: "LIST",
	OptPeekExport: "PEEK_EXPORT", OptStartTLS: "STARTTLS", OptInfo: "INFO", OptGo: "GO",
	OptStructuredReply: "STRUCTURED_REPLY", OptListMetaContext: "LIST_META_CONTEXT",
	OptSetMetaContext: "SET_META_CONTEXT",
}

func (o Option) String() string {
	if name, ok := optionNames[o]; ok {
		return "NBD_OPT_" + name
	}
	return fmt.Sprintf("NBD_OPT(%d)", uint32(o))
}

// ReplyType is the type of a server's reply to an option.
type ReplyType uint32

// RepFlagError marks a ReplyType as an error.
const RepFlagError ReplyType = 1 << 31

// Option reply types.
const (
	RepAck              ReplyType = 1
	RepServer           ReplyType = 2
	RepInfo             ReplyType = 3
	RepMetaContext      ReplyType = 4
	RepErrUnsup         ReplyType = 1 | RepFlagError
	RepErrPolicy        ReplyType = 2 | RepFlagError
	RepErrInvalid       ReplyType = 3 | RepFlagError
	RepErrPlatform      ReplyType = 4 | RepFlagError
	RepErrTLSReqd       ReplyType = 5 | RepFlagError
	RepErrUnknown       ReplyType = 6 | RepFlagError
	RepErrShutdown      ReplyType = 7 | RepFlagError
	RepErrBlockSizeReqd ReplyType = 8 | RepFlagError
	RepErrTooBig        ReplyType = 9 | RepFlagError
)

var replyNames = map[ReplyType]string{
	RepAck: "ACK", RepServer: "SERVER", RepInfo: "INFO", RepMetaContext: "META_CONTEXT",
	RepErrUnsup: "ERR_UNSUP", RepErrPolicy: "ERR_POLICY", RepErrInvalid: "ERR_INVALID",
	RepErrPlatform: "ERR_PLATFORM", RepErrTLSReqd: "ERR_TLS_REQD", RepErrUnknown: "ERR_UNKNOWN",
	RepErrShutdown: "ERR_SHUTDOWN", RepErrBlockSizeReqd: "ERR_BLOCK_SIZE_REQD",
	RepErrTooBig: "ERR_TOO_BIG",
}

// IsError reports whether the reply type is an error.
func (r ReplyType) IsError() bool { return r&RepFlagError != 0 }

func (r ReplyType) String() string {
	if name, ok := replyNames[r]; ok {
		return "NBD_REP_" + name
	}
	return fmt.Sprintf("NBD_REP(%#x)", uint32(r))
}
