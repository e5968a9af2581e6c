package workloadapi

import (
	"time"

	"github.com/hashicorp/go-hclog"
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
func refuse(log hclog.Logger, caller *attestor.Caller, err error) {
	if !caller.Refuse(err) {
		return
	}
	time.AfterFunc(refusedConnGrace, caller.CloseConn)
	log.Warn("Refusing a caller that could not be verified", "pid", caller.PID, "uid", caller.UID, "gid", caller.GID, "error", err)
}

// send sends one stream message within the send timeout (see SendWithin).
func (h *handler) send(caller *attestor.Caller, send func() error) error {
	return SendWithin(h.cfg.Log, caller, h.cfg.SendTimeout, send)
}

// SendWithin sends one stream message within timeout. gRPC's Send blocks
// while the client's flow-control window is full, and cannot be cancelled,
// so a client that stops reading has its connection closed, which ends the
// Send; nothing else waits on it.
func SendWithin(log hclog.Logger, caller *attestor.Caller, timeout time.Duration, send func() error) error {
	return SendOrClose(timeout, func() {
		log.Warn("Disconnecting a client that stopped reading its stream", "pid", caller.PID, "timeout", timeout)
		caller.CloseConn()
	}, send)
}

// SendOrClose is SendWithin for any connection: closeConn closes the
// connection of a client that did not read within timeout.
func SendOrClose(timeout time.Duration, closeConn func(), send func() error) error {
	timer := time.AfterFunc(timeout, closeConn)
	err := send()
	if !timer.Stop() {
		return status.Errorf(codes.DeadlineExceeded, "the client did not read a message within %s", timeout)
	}
	return err
}
