package workloadapi

import (
	"time"

	"github.com/lanyard-dev/lanyard/attestor"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// What happens to a caller's connection when it is refused, or stops
// reading its stream.

// refusedConnGrace is how long a refused caller's connection stays open:
// long enough for the refusal to be written (microseconds on a Unix
// socket), short enough that a client retrying on it reconnects soon.
const refusedConnGrace = time.Second

// refuse makes the refusal stick to the caller's connection, closes the
// connection after refusedConnGrace, and logs it once per connection.
func (h *handler) refuse(caller *attestor.Caller, err error) {
	if !caller.Refuse(err) {
		return
	}
	time.AfterFunc(refusedConnGrace, caller.CloseConn)
	h.cfg.Log.Warn("Refusing a caller that could not be verified", "pid", caller.PID, "uid", caller.UID, "gid", caller.GID, "error", err)
}

// send sends one stream message within the send timeout. gRPC's Send blocks
// while the client's flow-control window is full, and cannot be cancelled,
// so a client that stops reading has its connection closed, which ends the
// Send; nothing else waits on it.
func (h *handler) send(caller *attestor.Caller, send func() error) error {
	timer := time.AfterFunc(h.cfg.SendTimeout, func() {
		h.cfg.Log.Warn("Disconnecting a client that stopped reading its stream", "pid", caller.PID, "timeout", h.cfg.SendTimeout)
		caller.CloseConn()
	})
	err := send()
	if !timer.Stop() {
		return status.Errorf(codes.DeadlineExceeded, "the client did not read a message within %s", h.cfg.SendTimeout)
	}
	return err
}
