package spire

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/lanyard-dev/lanyard/agent"
)

// errPermanent marks rotation errors that retrying cannot fix.
var errPermanent = errors.New("the agent cannot get a new SVID")

// runRotation renews the agent SVID at half-life, at once when its
// authority is tainted, and attests again when the server asks.
func (id *agentIdentity) runRotation(ctx context.Context) {
	bo := agent.NewBackoff(time.Second, time.Minute)
	// While no server answers, as the syncs do: back within
	// maxOutageRetry of a server's return, with the SVID still valid.
	outage := agent.NewBackoff(time.Second, maxOutageRetry)
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	for {
		c := id.current()
		if c == nil {
			// Forgotten after the server refused it; Run is ending.
			<-ctx.Done()
			return
		}
		timer.Reset(max(c.renewAt.Sub(id.now()), 0))
		reattest := false
		select {
		case <-ctx.Done():
			return
		case <-timer.C:
		case <-id.renewKick:
		case <-id.reattestKick:
			reattest = true
		}
		for {
			err := id.rotate(ctx, reattest)
			if err == nil {
				bo.Reset()
				outage.Reset()
				break
			}
			if ctx.Err() != nil {
				return
			}
			if errors.Is(err, errPermanent) {
				id.fail(id.forget(err))
				return
			}
			// Each backoff grows only with its own kind of failure.
			var d time.Duration
			if unreachable(err) {
				d = outage.Next()
			} else {
				d = bo.Next()
			}
			logRetry(id.log, "Could not renew the agent SVID (it expires at "+c.svid[0].NotAfter.Format(time.RFC3339)+"); retrying", d, err)
			if !sleep(ctx, d) {
				return
			}
		}
	}
}

// rotate renews the agent SVID with RenewAgent, or by attesting again when
// the attestor allows it (as spire-agent does), the SVID has expired, or the
// server asked for it.
func (id *agentIdentity) rotate(ctx context.Context, reattest bool) error {
	prev := id.current()
	if prev == nil {
		return fmt.Errorf("%w: it was refused by the server", errPermanent)
	}
	var next *credentials
	var err error
	how := "renewed"
	if reattest || prev.reattestable || prev.expired(id.now()) {
		how = "re-attested"
		next, err = id.attest(ctx)
	} else {
		next, err = id.renew(ctx)
		if err != nil && mustReattest(err) {
			id.log.Warn("The SPIRE Server refused to renew the agent SVID; attesting again", "error", err)
			how = "re-attested"
			next, err = id.attest(ctx)
		}
	}
	if err != nil {
		if how == "re-attested" && !transient(err) {
			return fmt.Errorf("%w: node attestation with %s failed (%v); if it is join_token, whose tokens are single-use, generate a new token and restart the agent with it", errPermanent, id.attestorName, err)
		}
		if banned(err) {
			return fmt.Errorf("%w: the SPIRE Server has banned this agent (%v); evict it on the server (spire-server agent evict) and start it with a new join token or attestation", errPermanent, err)
		}
		return err
	}
	if err := id.install(prev, next); err != nil {
		return err
	}
	// Requests made against the SVID just replaced are answered.
	drain(id.renewKick)
	drain(id.reattestKick)
	id.log.Info("Agent SVID "+how, "spiffe_id", redactID(next.id()), "expires_at", next.svid[0].NotAfter)
	return nil
}
