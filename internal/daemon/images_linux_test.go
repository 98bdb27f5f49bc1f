package daemon

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
)

// A start whose image configs do not sync fails, unless it took devices
// over: those it serves on for, refusing attaches, rather than leave their
// I/O and Leases with nobody.
func TestAwaitImages(t *testing.T) {
	unreachable := errors.New("configmap mvps-system/mvps-images on https://api:6443: first sync failed: not synced within 30s")
	cancelled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name    string
		ctx     context.Context
		synced  error
		held    int
		wantErr bool
		wantLog string
	}{
		{"synced", context.Background(), nil, 0, false, ""},
		{"not synced, nothing held", context.Background(), unreachable, 0, true, ""},
		{"not synced, devices taken over", context.Background(), unreachable, 2, false, "serving on for the devices taken over"},
		{"stopped while waiting", cancelled, context.Canceled, 0, false, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs strings.Builder
			err := awaitImages(tc.ctx, func(context.Context) error { return tc.synced }, tc.held, slog.New(slog.NewTextHandler(&logs, nil)))
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want an error: %v", err, tc.wantErr)
			}
			if tc.wantErr && !errors.Is(err, unreachable) {
				t.Errorf("err = %v, want the sync's own", err)
			}
			if !strings.Contains(logs.String(), tc.wantLog) || tc.wantLog != "" && !strings.Contains(logs.String(), "on https://api:6443") {
				t.Errorf("log %q, want %q and the API server", logs.String(), tc.wantLog)
			}
		})
	}
}
