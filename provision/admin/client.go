package admin

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

// ErrUnreachable is wrapped by Call's errors when the daemon could not be
// asked or gave no answer (no socket, refused, timed out, hung up), as
// opposed to an answer that is an error (*Error): scripts tell the two
// apart by the commands' exit codes.
var ErrUnreachable = errors.New("daemon unreachable")

type unreachableError struct{ err error }

func (e unreachableError) Error() string        { return e.err.Error() }
func (e unreachableError) Unwrap() error        { return e.err }
func (e unreachableError) Is(target error) bool { return target == ErrUnreachable }

// Call sends req to the admin socket at path and returns the reply. A
// reply that is not OK is returned as an *Error; a daemon that cannot be
// asked, or does not answer, as an error wrapping ErrUnreachable.
func Call(ctx context.Context, path string, req Request) (Reply, error) {
	if req.Version == 0 {
		req.Version = Version
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", path)
	if err != nil {
		return Reply{}, unreachableError{fmt.Errorf("connect to the admin socket %s: %w", path, err)}
	}
	defer c.Close()
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
	}
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	b, err := json.Marshal(req)
	if err != nil {
		return Reply{}, err
	}
	if _, err := c.Write(b); err != nil {
		return Reply{}, unreachableError{fmt.Errorf("admin request: %w", err)}
	}
	buf := make([]byte, MaxMessage+1)
	n, err := c.Read(buf)
	if err != nil {
		return Reply{}, unreachableError{fmt.Errorf("admin reply: %w", err)}
	}
	if n == 0 {
		return Reply{}, unreachableError{errors.New("admin reply: the daemon closed the connection without an answer")}
	}
	var r Reply
	if err := json.Unmarshal(buf[:n], &r); err != nil {
		return Reply{}, fmt.Errorf("admin reply is not JSON: %v", err)
	}
	if !r.OK {
		return r, &Error{Code: r.Code, Message: r.Error}
	}
	return r, nil
}

// GetStatus asks for the daemon's status.
func GetStatus(ctx context.Context, path string) (*Status, error) {
	r, err := Call(ctx, path, Request{Command: CommandStatus})
	if err != nil {
		return nil, err
	}
	if r.Status == nil {
		return nil, fmt.Errorf("admin reply has no status")
	}
	return r.Status, nil
}

// Detach asks the daemon to detach target.
func Detach(ctx context.Context, path, target string) (*DetachResult, error) {
	r, err := Call(ctx, path, Request{Command: CommandDetach, Target: target})
	if err != nil {
		return nil, err
	}
	if r.Detach == nil {
		return nil, fmt.Errorf("admin reply has no detach result")
	}
	return r.Detach, nil
}

// Handover asks the daemon to hand over: exit with every device left
// attached, for the next start to take over. It returns once the handover
// has begun; the daemon's exit follows.
func Handover(ctx context.Context, path string) error {
	_, err := Call(ctx, path, Request{Command: CommandHandover})
	return err
}

// RestartEngine asks the daemon to restart its engine and returns once the
// new one answers.
func RestartEngine(ctx context.Context, path string) (*EngineRestart, error) {
	r, err := Call(ctx, path, Request{Command: CommandEngineRestart})
	if err != nil {
		return nil, err
	}
	if r.Engine == nil {
		return nil, fmt.Errorf("admin reply has no engine restart")
	}
	return r.Engine, nil
}
