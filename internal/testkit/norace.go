//go:build !race

package testkit

// RaceEnabled reports whether the tests run with the race detector, so the
// binary under test is built with it too.
const RaceEnabled = false
