//go:build tools

// Package tools pins the real Kubernetes release the k8s tests run against.
// It lives in its own module so the kubernetes module graph never enters the
// agent's.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
