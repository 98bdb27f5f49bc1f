package daemon

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/mvps-provisioner/mvps-provisioner/provision/engine"
)

// The daemon makes the store directories of the engine it starts, as
// mvps-te does not: 0700, the last path element only. An engine that runs
// on its own (its container's run-engine makes them) is left alone.
func TestEngineStoreDirsMadeForTheEngineItStarts(t *testing.T) {
	dir := t.TempDir()
	env := []string{"MVPS_TE_BUFFER_STORE_PATH=" + filepath.Join(dir, "old"), "MVPS_TE_BUFFER_STORE_PATH=" + filepath.Join(dir, "buffer"),
		"MVPS_TE_IMAGE_STORE_LOCAL_PATH=" + filepath.Join(dir, "images")}
	log := slog.New(slog.DiscardHandler)
	for _, d := range []string{"state", "state-ext"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := newEngineSupervisor(filepath.Join(dir, "state-ext"), engine.Config{Env: env}, true, log); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, "buffer")); err == nil {
		t.Fatal("made the store directories of an engine that runs on its own")
	}
	if _, err := newEngineSupervisor(filepath.Join(dir, "state"), engine.Config{Env: env}, false, log); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"buffer", "images"} {
		if st, err := os.Stat(filepath.Join(dir, d)); err != nil || !st.IsDir() || st.Mode().Perm() != 0o700 {
			t.Errorf("%s: %v, want a 0700 directory", d, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "old")); err == nil {
		t.Error("made the directory of an earlier entry of the same name")
	}

	typo := []string{"MVPS_TE_BUFFER_STORE_PATH=" + filepath.Join(dir, "typo", "buffer")}
	_, err := newEngineSupervisor(filepath.Join(dir, "state"), engine.Config{Env: typo}, false, log)
	if err == nil || !strings.Contains(err.Error(), "MVPS_TE_BUFFER_STORE_PATH") {
		t.Fatalf("a mistyped path: %v, want an error naming the setting", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "typo")); err == nil {
		t.Error("made a mistyped path's parent")
	}
}
