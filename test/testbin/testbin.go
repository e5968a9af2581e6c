// Package testbin forwards to internal/testkit for the in-package tests
// that still import it; they move to testkit in the second phase of the
// test-kit change, and this package goes.
package testbin

import (
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// RequireRoot is testkit.RequireRoot.
func RequireRoot(t testing.TB, why string) {
	t.Helper()
	testkit.RequireRoot(t, why)
}
