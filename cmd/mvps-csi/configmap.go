package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"
)

func checkConfigMapRef(ref string) error {
	_, _, err := configmap.ParseRef(ref)
	return err
}

func configMapStore(ctx context.Context, ref string, log *slog.Logger) (csi.ImageStore, error) {
	return nil, errors.New("not yet")
}
