package devengine

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// DefaultListen is mvps-te's default listen address.
const DefaultListen = "127.0.0.1:10809"

// Settings is the process configuration of mvps-te-dev: the settings of
// mvps-te that the stand-in understands.
type Settings struct {
	// Listen is "host:port" or "unix:/path".
	Listen string
	// JWTSecret is the HMAC key of the export-name tokens.
	JWTSecret []byte
	// SecretFromFlag reports that the secret came from --jwt-secret, where
	// every local user can read it in /proc/PID/cmdline.
	SecretFromFlag bool
	// ImageStoreLocalPath is the directory of the image files.
	ImageStoreLocalPath string
	// BufferStorePath is mvps-te's write buffer (WAL) directory. The stand-in
	// writes straight to the image files and only creates it.
	BufferStorePath string
	// Ignored lists the mvps-te settings that were given but mean nothing
	// to the stand-in (tuning, encryption), so that the caller can say so.
	Ignored []string
}

// SettingError is a missing or invalid setting. Name is the environment
// variable; the flag of the same meaning is "--" + Flag.
type SettingError struct {
	Name    string
	Flag    string
	Problem string
}

func (e *SettingError) Error() string {
	return fmt.Sprintf("%s (--%s): %s", e.Name, e.Flag, e.Problem)
}

// setting is one mvps-te setting: an environment variable and a flag.
type setting struct {
	env, flag string
	boolean   bool // a flag without a value and without an environment variable
	numeric   bool // clap parses it as u64; a bad number is an error there too
	used      bool // read by the stand-in; the others are accepted and ignored
}

// settings mirrors mvps-te's Args (main.rs), so that a command line or an
// environment written for mvps-te starts the stand-in unchanged.
var settings = []setting{
	{env: "MVPS_TE_LISTEN", flag: "listen", used: true},
	{env: "MVPS_TE_IMAGE_STORE", flag: "image-store", used: true},
	{env: "MVPS_TE_IMAGE_STORE_LOCAL_PATH", flag: "image-store-local-path", used: true},
	{env: "MVPS_TE_IMAGE_STORE_S3_BUCKET", flag: "image-store-s3-bucket"},
	{env: "MVPS_TE_IMAGE_STORE_S3_PREFIX", flag: "image-store-s3-prefix"},
	{env: "MVPS_TE_WAL_PATH", flag: "wal-path", used: true},
	{env: "MVPS_TE_BUFFER_STORE_PATH", flag: "buffer-store-path", used: true},
	{env: "MVPS_TE_JWT_SECRET", flag: "jwt-secret", used: true},
	{env: "MVPS_TE_CHECKPOINT_INTERVAL_MS", flag: "checkpoint-interval-ms", numeric: true},
	{env: "MVPS_TE_CHECKPOINT_INTERVAL_JITTER_MS", flag: "checkpoint-interval-jitter-ms", numeric: true},
	{env: "MVPS_TE_IMAGE_CACHE_SIZE_BYTES", flag: "image-cache-size-bytes", numeric: true},
	{env: "MVPS_TE_IMAGE_CACHE_BLOCK_SIZE_BYTES", flag: "image-cache-block-size-bytes", numeric: true},
	{env: "MVPS_TE_WRITE_THROTTLE_THRESHOLD_PAGES", flag: "write-throttle-threshold-pages", numeric: true},
	{flag: "disable-image-store-write", boolean: true},
	{flag: "disable-compression", boolean: true},
	{env: "MVPS_TE_ROOT_KEY", flag: "root-key"},
	{env: "MVPS_TE_DECRYPTION_KEYS", flag: "decryption-keys"},
	{env: "MVPS_TE_SUBKEY_ALGORITHM", flag: "subkey-algorithm"},
}

// ParseSettings reads the settings from args (without the program name) and
// the environment; a flag wins over its environment variable, as with
// mvps-te's clap parser. An empty environment variable counts as unset.
// Usage goes to usage on -h; the error is then flag.ErrHelp. Any other
// error is a *SettingError or a flag syntax error, both fit for one line.
func ParseSettings(args []string, lookupEnv func(string) (string, bool), usage io.Writer) (Settings, error) {
	fset := flag.NewFlagSet("mvps-te-dev", flag.ContinueOnError)
	fset.SetOutput(io.Discard)
	values := make(map[string]*string, len(settings))
	bools := make(map[string]*bool)
	for _, s := range settings {
		help := "same as $" + s.env
		if s.env == "" {
			help = "accepted for mvps-te compatibility"
		}
		if !s.used && s.env != "" {
			help += " (ignored by the stand-in)"
		}
		if s.boolean {
			bools[s.flag] = fset.Bool(s.flag, false, help)
			continue
		}
		values[s.flag] = fset.String(s.flag, "", help)
	}
	if err := fset.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fset.SetOutput(usage)
			fmt.Fprintln(usage, "usage: mvps-te-dev [flags]  (stand-in for mvps-te: local files, not for production)")
			fset.PrintDefaults()
		}
		return Settings{}, err
	}
	if fset.NArg() > 0 {
		return Settings{}, fmt.Errorf("unexpected argument %q", fset.Arg(0))
	}
	given := map[string]bool{}
	fset.Visit(func(f *flag.Flag) { given[f.Name] = true })

	var st Settings
	get := func(s setting) (string, bool) {
		if given[s.flag] {
			return *values[s.flag], true
		}
		if s.env == "" {
			return "", false
		}
		v, ok := lookupEnv(s.env)
		return v, ok && v != ""
	}
	value := map[string]string{}
	for _, s := range settings {
		if s.boolean {
			if *bools[s.flag] {
				st.Ignored = append(st.Ignored, "--"+s.flag)
			}
			continue
		}
		v, ok := get(s)
		if !ok {
			continue
		}
		if s.numeric {
			if _, err := strconv.ParseUint(v, 10, 64); err != nil {
				return Settings{}, &SettingError{s.env, s.flag, "not an unsigned integer"}
			}
		}
		if !s.used {
			st.Ignored = append(st.Ignored, s.env)
			continue
		}
		value[s.env] = v
	}

	st.Listen = DefaultListen
	if v, ok := value["MVPS_TE_LISTEN"]; ok {
		if _, _, err := ParseListen(v); err != nil {
			return Settings{}, &SettingError{"MVPS_TE_LISTEN", "listen", err.Error()}
		}
		st.Listen = v
	}

	secret, ok := value["MVPS_TE_JWT_SECRET"]
	if !ok {
		return Settings{}, &SettingError{"MVPS_TE_JWT_SECRET", "jwt-secret", "required"}
	}
	if secret == "" {
		return Settings{}, &SettingError{"MVPS_TE_JWT_SECRET", "jwt-secret", "must not be empty"}
	}
	st.JWTSecret = []byte(secret)
	st.SecretFromFlag = given["jwt-secret"]

	switch store := value["MVPS_TE_IMAGE_STORE"]; store {
	case "local":
	case "":
		return Settings{}, &SettingError{"MVPS_TE_IMAGE_STORE", "image-store", "required (the stand-in supports \"local\")"}
	case "s3":
		return Settings{}, &SettingError{"MVPS_TE_IMAGE_STORE", "image-store",
			"\"s3\" is not supported: the stand-in only stores images in local files, use \"local\""}
	default:
		return Settings{}, &SettingError{"MVPS_TE_IMAGE_STORE", "image-store",
			fmt.Sprintf("invalid image store provider %q (want \"local\")", store)}
	}
	st.ImageStoreLocalPath = value["MVPS_TE_IMAGE_STORE_LOCAL_PATH"]
	if st.ImageStoreLocalPath == "" {
		return Settings{}, &SettingError{"MVPS_TE_IMAGE_STORE_LOCAL_PATH", "image-store-local-path",
			"required with MVPS_TE_IMAGE_STORE=local"}
	}
	// mvps-te still takes the obsolete MVPS_TE_WAL_PATH when the buffer store
	// path is missing.
	st.BufferStorePath = value["MVPS_TE_BUFFER_STORE_PATH"]
	if st.BufferStorePath == "" {
		st.BufferStorePath = value["MVPS_TE_WAL_PATH"]
	}
	if st.BufferStorePath == "" {
		return Settings{}, &SettingError{"MVPS_TE_BUFFER_STORE_PATH", "buffer-store-path", "required"}
	}
	return st, nil
}

// ParseListen splits a listen setting into a network and address for
// net.Listen: "unix:/path" is a Unix stream socket, anything else must be
// "host:port" for TCP.
func ParseListen(s string) (network, address string, err error) {
	if path, ok := strings.CutPrefix(s, "unix:"); ok {
		if path == "" {
			return "", "", errors.New("unix: needs a socket path")
		}
		return "unix", path, nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil {
		return "", "", fmt.Errorf("want host:port or unix:/path: %w", err)
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return "", "", fmt.Errorf("port %q is not a number", port)
	}
	return "tcp", net.JoinHostPort(host, port), nil
}

// ErrNotSocket: the path of a unix: listen setting is taken by something
// other than a socket.
var ErrNotSocket = errors.New("not a socket")

// ErrSocketInUse: something listens on the socket path of a unix: listen
// setting.
var ErrSocketInUse = errors.New("socket in use")

// Listen opens the listener of a listen setting. Like mvps-te it replaces
// a stale Unix socket, but unlike mvps-te only if that path really is a
// socket (a typo must not delete someone's file) and nothing answers on it
// (a running engine must not lose its socket to a second one).
func Listen(setting string) (net.Listener, error) {
	network, address, err := ParseListen(setting)
	if err != nil {
		return nil, err
	}
	if network == "unix" {
		if err := removeStaleSocket(address); err != nil {
			return nil, err
		}
	}
	ln, err := net.Listen(network, address)
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	return ln, nil
}

func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("check old socket: %w", err)
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("%w: %s exists and is not a socket, refusing to replace it", ErrNotSocket, path)
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("%w: something listens on %s, refusing to replace it", ErrSocketInUse, path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("%s: cannot tell whether something listens there: %w", path, err)
	}
	if err := os.Remove(path); err != nil {
		return fmt.Errorf("remove old socket: %w", err)
	}
	return nil
}
