// Package version says which build of the project a binary is, for
// --version, the admin status and the build_info metric.
//
// The Makefile stamps the version and the revision with
//
//	-ldflags "-X github.com/mvps-provisioner/mvps-provisioner/internal/version.version=V
//	          -X github.com/mvps-provisioner/mvps-provisioner/internal/version.revision=R"
//
// A binary built without them (go build, go install) still knows what the
// Go toolchain recorded in it: the module version, and the commit and
// whether the tree was modified when it was built in a checkout.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Stamped by the linker; empty in a plain go build.
var (
	version  string
	revision string
)

// Info describes a build.
type Info struct {
	// Version is the release (git describe), or the module version Go
	// recorded, or "devel" when neither is known.
	Version string `json:"version"`
	// Revision is the commit it was built from, "unknown" when not
	// known; a build from a modified tree ends in "-dirty".
	Revision string `json:"revision"`
	// GoVersion is the toolchain that built it.
	GoVersion string `json:"go_version"`
}

// Get returns this binary's build information.
func Get() Info {
	return get(version, revision, debug.ReadBuildInfo)
}

func get(stampedVersion, stampedRevision string, read func() (*debug.BuildInfo, bool)) Info {
	info := Info{Version: stampedVersion, Revision: stampedRevision, GoVersion: runtime.Version()}
	if bi, ok := read(); ok {
		info.GoVersion = bi.GoVersion
		if info.Version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			info.Version = bi.Main.Version
		}
		if info.Revision == "" {
			var rev string
			var modified bool
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					rev = s.Value
				case "vcs.modified":
					modified = s.Value == "true"
				}
			}
			if rev != "" && modified {
				rev += "-dirty"
			}
			info.Revision = rev
		}
	}
	if info.Version == "" {
		info.Version = "devel"
	}
	if info.Revision == "" {
		info.Revision = "unknown"
	}
	return info
}

// String is the one line --version prints after the program's name.
func (i Info) String() string {
	return fmt.Sprintf("%s (revision %s, %s)", i.Version, i.Revision, i.GoVersion)
}
