// Package admin is the provisioner's operator interface: a second Unix
// SEQPACKET socket, root's only, separate from the callers' socket, on
// which `mvps-provisioner status` and `mvps-provisioner detach` talk to the
// daemon.
//
// The protocol is one JSON request message and one JSON reply message per
// connection, each carrying "version": 1:
//
//	{"version":1,"command":"status"}
//	{"version":1,"command":"detach","target":"<image key | image id | /dev/nbdX>"}
//	{"version":1,"command":"handover"}
//	{"version":1,"command":"engine-restart"}
//
//	{"version":1,"ok":true,"status":{...}}
//	{"version":1,"ok":true,"detach":{...}}
//	{"version":1,"ok":false,"code":"not_found","error":"..."}
//
// A request with another version is answered with code
// "unsupported_version" and the version the daemon speaks; fields a
// version does not know are ignored, so later versions may add some.
package admin

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/version"
)

// Version is the protocol version this package speaks.
const Version = 1

// Commands.
const (
	CommandStatus = "status"
	CommandDetach = "detach"
	// CommandHandover asks the daemon to exit with every device left
	// attached and recorded, for the next start to take over (an
	// upgrade, a rollout). The reply comes just before the handover
	// begins.
	CommandHandover = "handover"
	// CommandEngineRestart asks the daemon to restart the engine it runs
	// (an engine upgrade): stop it (it checkpoints), start the installed
	// one, reconnect every device. The reply comes once the new engine
	// answers.
	CommandEngineRestart = "engine-restart"
)

// Error codes of a reply.
const (
	CodeBadRequest         = "bad_request"
	CodeUnsupportedVersion = "unsupported_version"
	CodeForbidden          = "forbidden"
	CodeNotFound           = "not_found"
	CodeFailed             = "failed"
)

// MaxMessage bounds a message in either direction.
const MaxMessage = 1 << 20

// Request is what the client sends.
type Request struct {
	Version int    `json:"version"`
	Command string `json:"command"`
	// Target names the attachment to detach: its image key, its image id
	// or its device (/dev/nbdX or nbdX).
	Target string `json:"target,omitempty"`
}

// Reply is what the daemon answers.
type Reply struct {
	Version int            `json:"version"`
	OK      bool           `json:"ok"`
	Code    string         `json:"code,omitempty"`
	Error   string         `json:"error,omitempty"`
	Status  *Status        `json:"status,omitempty"`
	Detach  *DetachResult  `json:"detach,omitempty"`
	Engine  *EngineRestart `json:"engine,omitempty"`
}

// Status is the daemon's state at a moment.
type Status struct {
	Time time.Time `json:"time"`
	// Daemon is the running daemon's build, which is not the command's
	// after an upgrade that has not restarted it.
	Daemon version.Info `json:"daemon"`
	// Version is Daemon.Version, at the top for scripts (jq .version).
	Version     string       `json:"version"`
	Attachments []Attachment `json:"attachments"`
	Engine      Engine       `json:"engine"`
	// Foreign lists connected nbd devices with an "mvps:" backend that
	// this provisioner does not own (another instance's, or left over).
	Foreign []Device `json:"foreign"`
	// OwnPIDNamespace is set when the daemon runs in a PID namespace of
	// its own: callers outside it are seen as pid 0, and after a restart
	// their attachments cannot be followed (they stay until detached).
	OwnPIDNamespace bool `json:"own_pid_namespace,omitempty"`
}

// Attachment is one attachment or lingering device.
type Attachment struct {
	Key     string `json:"key,omitempty"`
	ImageID string `json:"image_id"`
	// Device is empty while attaching.
	Device     string    `json:"device,omitempty"`
	Mode       string    `json:"mode,omitempty"`
	State      string    `json:"state"`
	CallerPID  int32     `json:"caller_pid"`
	CallerUID  int32     `json:"caller_uid"`
	Since      time.Time `json:"since"`
	Reconnects int       `json:"reconnects"`
	// IO holds the device's counters from /sys/block/nbdX/stat, when it
	// has a device.
	IO *IOStats `json:"io,omitempty"`
	// Owner is what the attachment lives for ("connection", "process",
	// "volume").
	Owner string `json:"owner,omitempty"`
	// Volume names a volume owner (a CSI volume id).
	Volume string `json:"volume,omitempty"`
	// Lease is the image's Kubernetes Lease, its holder and last renewal;
	// Suspended while the image's I/O is cut because renewals failed.
	Lease        string    `json:"lease,omitempty"`
	LeaseHolder  string    `json:"lease_holder,omitempty"`
	LeaseRenewed time.Time `json:"lease_renewed,omitzero"`
	Suspended    bool      `json:"suspended,omitempty"`
}

// IOStats are a block device's counters since it was connected
// (Documentation/block/stat.rst).
type IOStats struct {
	ReadIOs    uint64 `json:"read_ios"`
	ReadBytes  uint64 `json:"read_bytes"`
	WriteIOs   uint64 `json:"write_ios"`
	WriteBytes uint64 `json:"write_bytes"`
	InFlight   uint64 `json:"in_flight"`
	// IOTicksMS is the time the device had I/O in flight, in ms.
	IOTicksMS uint64 `json:"io_ticks_ms"`
	FlushIOs  uint64 `json:"flush_ios"`
}

// Engine describes the engine process.
type Engine struct {
	PID      int       `json:"pid"`
	Since    time.Time `json:"since"`
	Restarts int       `json:"restarts"`
	// Answering says whether it sent its NBD greeting just now; Error
	// says why not.
	Answering bool   `json:"answering"`
	Error     string `json:"error,omitempty"`
}

// Device is a connected nbd device.
type Device struct {
	Device  string `json:"device"`
	Backend string `json:"backend"`
}

// DetachResult says what a forced detach did.
// EngineRestart is what an engine restart did.
type EngineRestart struct {
	OldPID int `json:"old_pid"`
	NewPID int `json:"new_pid"`
	// Took is from the request to the new engine's first answer.
	Took time.Duration `json:"took_ns"`
}

// DetachResult is what a forced detach did.
type DetachResult struct {
	Key     string `json:"key,omitempty"`
	ImageID string `json:"image_id"`
	Device  string `json:"device,omitempty"`
	// Result is "detached", "still_open" (disconnected, but some process
	// still holds the device open) or "aborted" (it was still attaching).
	Result string `json:"result"`
}

// Error is a reply that was not OK.
type Error struct {
	Code, Message string
}

func (e *Error) Error() string { return e.Message + " (" + e.Code + ")" }

// Errorf makes an *Error; a backend returns one to choose the reply's code.
func Errorf(code, format string, args ...any) error {
	return &Error{Code: code, Message: fmt.Sprintf(format, args...)}
}

// errorReply turns err into a reply.
func errorReply(err error) Reply {
	var e *Error
	if !errors.As(err, &e) {
		e = &Error{Code: CodeFailed, Message: err.Error()}
	}
	return Reply{Version: Version, Code: e.Code, Error: e.Message}
}

// decodeRequest parses and checks a request message.
func decodeRequest(msg []byte) (Request, error) {
	var req Request
	if err := json.Unmarshal(msg, &req); err != nil {
		return req, Errorf(CodeBadRequest, "request is not a JSON object: %v", err)
	}
	if req.Version != Version {
		return req, Errorf(CodeUnsupportedVersion, "protocol version %d is not supported; this daemon speaks version %d", req.Version, Version)
	}
	switch req.Command {
	case CommandStatus, CommandHandover, CommandEngineRestart:
	case CommandDetach:
		if req.Target == "" {
			return req, Errorf(CodeBadRequest, "detach needs a target: image key, image id or /dev/nbdX")
		}
	default:
		return req, Errorf(CodeBadRequest, "unknown command %q", req.Command)
	}
	return req, nil
}
