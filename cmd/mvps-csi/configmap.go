package main

import (
	"log/slog"

	"k8s.io/klog/v2"

	"github.com/mvps-provisioner/mvps-provisioner/provision/configmap"
	"github.com/mvps-provisioner/mvps-provisioner/provision/csi"
)

// The ConfigMap store: client-go stays in provision/configmap, wired here.

func checkConfigMapRef(ref string) error {
	_, _, err := configmap.ParseRef(ref)
	return err
}

// configMapStore records volumes in the ConfigMap ref names, through the
// in-cluster configuration (or KUBECONFIG outside a pod); client-go's own
// log lines go to log.
func configMapStore(ref string, log *slog.Logger) (csi.ImageStore, error) {
	klog.SetSlogLogger(log.With("component", "client-go"))
	return configmap.NewWriterFromEnv(ref, "mvps-csi")
}
