//go:build tools

// Package tools pins the real SPIRE release used as a test peer. It lives in
// its own module so the agent's module never depends on SPIRE.
package tools

import (
	_ "github.com/spiffe/spire/cmd/spire-agent"
	_ "github.com/spiffe/spire/cmd/spire-server"
)
