package workloadapi

import (
	"context"

	"github.com/lanyard-dev/lanyard/attestor"
)

// CallerUID is the uid of a call's peer, for the metrics' uid classes.
func CallerUID(ctx context.Context) (uint32, bool) {
	c, ok := attestor.CallerFromContext(ctx)
	if !ok {
		return 0, false
	}
	return c.UID, true
}
