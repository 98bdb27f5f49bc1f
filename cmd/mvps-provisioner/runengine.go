package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"time"

	"github.com/mvps-provisioner/mvps-provisioner/internal/daemon"
)

// runEngineCommand is the engine container's entry point when the engine
// runs on its own (PROVISIONER_ENGINE_EXTERNAL): it waits for the secret
// file the daemon makes (PROVISIONER_ENGINE_SECRET_FILE, in a directory
// both containers share), then becomes the engine (exec, no child), with
// the secret and its address in the environment mvps-te reads, never in
// argv.
func runEngineCommand(args []string, getenv func(string) string, stdout, stderr io.Writer) int {
	fs := newFlags("run-engine", stderr, "")
	wait := fs.Duration("wait", 5*time.Minute, "how long to wait for the secret file")
	pos, err := parseInterspersed(fs, args)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil || len(pos) != 0 {
		return 2
	}
	bin := getenv("PROVISIONER_ENGINE_BIN")
	if bin == "" {
		bin = daemon.DefaultEngineBin
	}
	listen, secretFile := getenv("PROVISIONER_ENGINE_LISTEN"), getenv("PROVISIONER_ENGINE_SECRET_FILE")
	if listen == "" || secretFile == "" {
		fmt.Fprintln(stderr, "mvps-provisioner run-engine: PROVISIONER_ENGINE_LISTEN and PROVISIONER_ENGINE_SECRET_FILE are required")
		return exitConfig
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner run-engine: PROVISIONER_ENGINE_BIN: %v\n", err)
		return exitConfig
	}
	if err := daemon.MakeEngineStoreDirs(getenv); err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner run-engine: %v\n", err)
		return exitConfig
	}
	secret, err := waitForSecret(secretFile, *wait)
	if err != nil {
		fmt.Fprintf(stderr, "mvps-provisioner run-engine: %v\n", err)
		return exitFailure
	}
	env := make([]string, 0, len(os.Environ())+2)
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MVPS_TE_JWT_SECRET=") && !strings.HasPrefix(kv, "MVPS_TE_LISTEN=") {
			env = append(env, kv)
		}
	}
	env = append(env, "MVPS_TE_LISTEN="+listen, "MVPS_TE_JWT_SECRET="+secret)
	err = syscall.Exec(path, []string{path}, env)
	fmt.Fprintf(stderr, "mvps-provisioner run-engine: exec %s: %v\n", path, err)
	return exitFailure
}

// waitForSecret reads the secret in path once it is there.
func waitForSecret(path string, wait time.Duration) (string, error) {
	deadline := time.Now().Add(wait)
	for {
		b, err := os.ReadFile(path)
		if secret := strings.TrimRight(string(b), "\r\n"); err == nil && secret != "" {
			return secret, nil
		}
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE: %w", err)
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("PROVISIONER_ENGINE_SECRET_FILE %s: not there after %v (the daemon makes it at start)", path, wait)
		}
		// The file appears once, when the daemon starts: nothing to
		// subscribe to across containers but the file system.
		time.Sleep(100 * time.Millisecond)
	}
}
