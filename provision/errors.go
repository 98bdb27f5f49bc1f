package provision

import "errors"

// ErrForbidden is a request the image config or the caller's standing does
// not allow: another uid or gid, another mode, or a mount target the caller
// may not use. It is answered with CodeForbidden.
var ErrForbidden = errors.New("forbidden")
