// Package files runs real apps that read their certificate, key and CA
// bundle from files (nginx and HAProxy from Debian) fed by `lanyard helper`
// from a real lanyard agent whose SVIDs rotate every few seconds, and reads
// the JWT and Filesystem Delivery files it writes while they are replaced.
package files

import (
	"os"
	"testing"

	"github.com/lanyard-dev/lanyard/internal/testkit"
)

// lanyardBin is the binary under test, built once by TestMain.
var lanyardBin string

func TestMain(m *testing.M) {
	os.Exit(testkit.RunWithLanyard(m, func(bin string) error {
		lanyardBin = bin
		return nil
	}))
}
