// Package testkit is what Lanyard's tests share: CA and SVID builders, a
// log buffer safe for many goroutines, short temporary directories for
// Unix sockets, bounded waits, and the harness that builds and runs the
// lanyard binary. It imports nothing of Lanyard, so that every package's
// in-package tests may use it; the fakes of the agent's interfaces, which
// must import agent, are in the subpackage fakeagent.
package testkit
