// Package systemd is the "systemd" workload attestor: it asks systemd, over
// the system D-Bus, which unit a process runs in, and describes the
// workload with SPIRE's selectors systemd:id:<unit> and
// systemd:fragment_path:<unit file>.
//
// One connection to the bus serves every attestation. It is made at the
// first one (building the attestor does no I/O), made again when the bus
// goes away, and a bus that cannot be used is logged once per cause rather
// than for every fetch (systemBus).
package systemd

import (
	"context"
	"errors"
	"fmt"
	"os"

	"github.com/godbus/dbus/v5"
	"github.com/hashicorp/go-hclog"
	"github.com/lanyard-dev/lanyard/attestor"
	"github.com/lanyard-dev/lanyard/attestor/selector"
)

// PluginName is the name the attestor registers under and its selector type.
const PluginName = "systemd"

// It calls systemd over D-Bus, so it runs on a worker goroutine of its own.
func init() {
	attestor.Register(PluginName, New)
}

// systemd's names on the bus (org.freedesktop.systemd1(5)).
const (
	systemdName       = "org.freedesktop.systemd1"
	systemdPath       = dbus.ObjectPath("/org/freedesktop/systemd1")
	getUnitByPID      = "org.freedesktop.systemd1.Manager.GetUnitByPID"
	unitInterface     = "org.freedesktop.systemd1.Unit"
	propertiesGet     = "org.freedesktop.DBus.Properties.Get"
	errNoUnitForPID   = "org.freedesktop.systemd1.NoUnitForPID"
	defaultBusAddress = "unix:path=/run/dbus/system_bus_socket"
)

// maxPropertyLen bounds a unit property made into a selector: systemd's
// unit names are at most 255 bytes and paths PATH_MAX (4096).
const maxPropertyLen = 4096

// Config is the plugin_data of the systemd attestor. It has no keys, as in
// SPIRE; any key is refused.
type Config struct{}

// Attestor is the systemd workload attestor. It is safe for concurrent use.
type Attestor struct {
	bus *systemBus
}

// New builds the systemd attestor. It connects to nothing: the system bus
// is dialled at the first attestation.
func New(cfg attestor.PluginConfig) (attestor.WorkloadAttestor, error) {
	return newAttestor(cfg, systemBusAddress())
}

// systemBusAddress is where the system bus listens: DBUS_SYSTEM_BUS_ADDRESS
// when set, as for every D-Bus client, else the standard socket.
func systemBusAddress() string {
	if addr := os.Getenv("DBUS_SYSTEM_BUS_ADDRESS"); addr != "" {
		return addr
	}
	return defaultBusAddress
}

func newAttestor(cfg attestor.PluginConfig, address string) (*Attestor, error) {
	if err := cfg.Data.Decode(&Config{}); err != nil {
		return nil, err
	}
	log := cfg.Log
	if log == nil {
		log = hclog.NewNullLogger()
	}
	a := &Attestor{bus: newSystemBus(address, log)}
	// Attestors are built again on every reload and dropped without a
	// call: the connection goes with the attestor.
	a.bus.closeWith(a)
	return a, nil
}

// Attest returns the systemd selectors of the unit p runs in. A process
// systemd knows no unit for is an error, as in SPIRE: the other attestors'
// selectors still count. It keeps nothing about p: the caller checks
// afterwards that the pid still names the process that connected.
func (a *Attestor) Attest(ctx context.Context, p attestor.Process) ([]selector.Selector, error) {
	if p.PID <= 0 {
		return nil, fmt.Errorf("pid %d is not a process id", p.PID)
	}
	var id, fragment string
	err := a.bus.do(ctx, func(conn *dbus.Conn) error {
		var err error
		id, fragment, err = unitOf(ctx, conn, uint32(p.PID))
		return err
	})
	var dbusErr dbus.Error
	switch {
	case errors.As(err, &dbusErr) && dbusErr.Name == errNoUnitForPID:
		return nil, fmt.Errorf("systemd has no unit for pid %d: %w", p.PID, err)
	case err != nil:
		return nil, fmt.Errorf("asking systemd for the unit of pid %d: %w", p.PID, err)
	}
	// An empty FragmentPath (a scope, a transient unit) is a selector
	// too, as in SPIRE.
	return []selector.Selector{
		{Type: PluginName, Value: "id:" + id},
		{Type: PluginName, Value: "fragment_path:" + fragment},
	}, nil
}

// unitOf asks systemd for the unit of pid, then its Id and FragmentPath.
func unitOf(ctx context.Context, conn *dbus.Conn, pid uint32) (id, fragment string, err error) {
	var unit dbus.ObjectPath
	if err := conn.Object(systemdName, systemdPath).CallWithContext(ctx, getUnitByPID, 0, pid).Store(&unit); err != nil {
		return "", "", err
	}
	obj := conn.Object(systemdName, unit)
	if id, err = stringProperty(ctx, obj, "Id"); err != nil {
		return "", "", err
	}
	if id == "" {
		return "", "", fmt.Errorf("unit %s has an empty Id", unit)
	}
	if fragment, err = stringProperty(ctx, obj, "FragmentPath"); err != nil {
		return "", "", err
	}
	return id, fragment, nil
}

func stringProperty(ctx context.Context, obj dbus.BusObject, name string) (string, error) {
	var v dbus.Variant
	if err := obj.CallWithContext(ctx, propertiesGet, 0, unitInterface, name).Store(&v); err != nil {
		return "", fmt.Errorf("unit %s, property %s: %w", obj.Path(), name, err)
	}
	s, ok := v.Value().(string)
	switch {
	case !ok:
		return "", fmt.Errorf("unit %s, property %s: systemd answered a %s, not a string", obj.Path(), name, v.Signature())
	case len(s) > maxPropertyLen:
		return "", fmt.Errorf("unit %s, property %s: %d bytes long, more than a unit's name or path can be", obj.Path(), name, len(s))
	}
	return s, nil
}
