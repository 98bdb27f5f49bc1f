// Package kubetest holds the tests that need a real Kubernetes API server:
// the ConfigMap image source (provision/configmap) through a service
// account bound by the shipped Role, and a server-side dry run of every
// manifest in deploy/kubernetes.
//
// They start etcd and kube-apiserver from ~/.cache/mvps-provisioner/k8s/bin
// (built by kubetest/build.sh, "make k8s-test"; MVPS_K8S_BIN, or what
// "bash kubetest/build.sh --bin-dir" says) on random loopback ports with
// temporary directories. Without those binaries the tests skip, unless
// MVPS_K8S_TESTS=1 (set by make), where they fail.
package kubetest
