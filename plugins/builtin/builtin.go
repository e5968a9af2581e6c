// Package builtin compiles in every plugin the lanyard binary ships: each
// registers itself by name. Import it for its side effect, so that the
// binary, the bench and the config checks know the same set.
package builtin

import (
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/join_token"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/k8s_psat"
	_ "github.com/lanyard-dev/lanyard/plugins/nodeattestor/x509pop"
	_ "github.com/lanyard-dev/lanyard/plugins/upstream/local"
	_ "github.com/lanyard-dev/lanyard/plugins/upstream/spire"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/docker"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/k8s"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/systemd"
	_ "github.com/lanyard-dev/lanyard/plugins/workloadattestor/unix"
)
