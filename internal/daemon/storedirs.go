package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// MakeEngineStoreDirs makes the engine's local directories, its write
// buffer (MVPS_TE_BUFFER_STORE_PATH) and a local store's image directory
// (MVPS_TE_IMAGE_STORE_LOCAL_PATH), as getenv names them, 0700: mvps-te
// exits at start without its buffer directory and refuses every session
// without its image directory, and makes neither. The daemon makes them
// for the engine it starts, and run-engine in the engine container's
// volume, as the systemd unit's StateDirectory= does. Only the last path
// element is made: a missing parent is a mistyped path, and making it
// would put the engine's data where nobody looks (in a container, in its
// own file system, gone with it).
func MakeEngineStoreDirs(getenv func(string) string) error {
	for _, env := range []string{"MVPS_TE_BUFFER_STORE_PATH", "MVPS_TE_IMAGE_STORE_LOCAL_PATH"} {
		dir := getenv(env)
		if dir == "" {
			continue
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("%s: %w", env, err)
		}
		if st, err := os.Stat(dir); err != nil || !st.IsDir() {
			return fmt.Errorf("%s: %s is not a directory", env, dir)
		}
	}
	return nil
}

// envLookup is getenv over an environment list; the last entry of a name
// wins, as exec's does.
func envLookup(env []string) func(string) string {
	return func(name string) string {
		v := ""
		for _, kv := range env {
			if len(kv) > len(name) && kv[len(name)] == '=' && kv[:len(name)] == name {
				v = kv[len(name)+1:]
			}
		}
		return v
	}
}
