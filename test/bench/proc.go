package bench

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// clockTicks is USER_HZ, the unit of utime and stime in /proc/<pid>/stat;
// it is 100 on every Linux ABI Go supports.
const clockTicks = 100

// Proc reads a running process's CPU time and memory from /proc.
type Proc struct{ PID int }

// CPUSeconds is the user plus system CPU time of every thread of the
// process so far.
func (p Proc) CPUSeconds() (float64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p.PID))
	if err != nil {
		return 0, err
	}
	// Fields after the parenthesized command name; utime and stime are
	// fields 14 and 15, so 11 and 12 after the state (field 3).
	end := bytes.LastIndexByte(b, ')')
	if end < 0 {
		return 0, fmt.Errorf("/proc/%d/stat has no command name", p.PID)
	}
	f := bytes.Fields(b[end+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat is too short", p.PID)
	}
	utime, err1 := strconv.ParseUint(string(f[11]), 10, 64)
	stime, err2 := strconv.ParseUint(string(f[12]), 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %w", p.PID, err)
	}
	return float64(utime+stime) / clockTicks, nil
}

// RSS is the resident set size now, in bytes.
func (p Proc) RSS() (uint64, error) { return p.statusKB("VmRSS:") }

// PeakRSS is the largest resident set size since the process started or
// since ResetPeak, in bytes.
func (p Proc) PeakRSS() (uint64, error) { return p.statusKB("VmHWM:") }

// ResetPeak makes PeakRSS start again from the current RSS (it needs the
// right to ptrace the process, e.g. root or the same user).
func (p Proc) ResetPeak() error {
	return os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", p.PID), []byte("5"), 0)
}

// Alive reports whether the process still exists.
func (p Proc) Alive() bool {
	return unix.Kill(p.PID, 0) == nil
}

func (p Proc) statusKB(key string) (uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.PID))
	if err != nil {
		return 0, err
	}
	i := bytes.Index(b, []byte("\n"+key))
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/status has no %s line", p.PID, key)
	}
	line := b[i+1+len(key):]
	if nl := bytes.IndexByte(line, '\n'); nl >= 0 {
		line = line[:nl]
	}
	f := bytes.Fields(line)
	if len(f) != 2 || string(f[1]) != "kB" {
		return 0, fmt.Errorf("/proc/%d/status: unexpected %s line %q", p.PID, key, line)
	}
	kb, err := strconv.ParseUint(string(f[0]), 10, 64)
	if err != nil {
		return 0, fmt.Errorf("/proc/%d/status %s: %w", p.PID, key, err)
	}
	return kb << 10, nil
}

// Memory splits the resident set: anonymous memory (heap, stacks) and
// file-backed pages (the binary's code and data that were touched).
type Memory struct {
	RSS  uint64 `json:"rss_bytes"`
	Anon uint64 `json:"anon_bytes"`
	File uint64 `json:"file_bytes"`
}

// Memory reads the resident set and its split from smaps_rollup.
func (p Proc) Memory() (Memory, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", p.PID))
	if err != nil {
		return Memory{}, err
	}
	field := func(key string) uint64 {
		i := bytes.Index(b, []byte("\n"+key))
		if i < 0 {
			return 0
		}
		f := bytes.Fields(b[i+1+len(key):])
		if len(f) == 0 {
			return 0
		}
		kb, _ := strconv.ParseUint(string(f[0]), 10, 64)
		return kb << 10
	}
	m := Memory{RSS: field("Rss:"), Anon: field("Anonymous:")}
	if m.RSS == 0 {
		return Memory{}, fmt.Errorf("/proc/%d/smaps_rollup has no Rss line", p.PID)
	}
	m.File = m.RSS - min(m.Anon, m.RSS)
	return m, nil
}

// SocketOwner returns the PID of the process serving the Unix socket at
// path: on a client's connection SO_PEERCRED names the listening process.
func SocketOwner(path string) (int, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return 0, fmt.Errorf("connecting to %s to find its server: %w", path, err)
	}
	defer conn.Close()
	raw, err := conn.(*net.UnixConn).SyscallConn()
	if err != nil {
		return 0, err
	}
	var cred *unix.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		return 0, err
	}
	if credErr != nil {
		return 0, fmt.Errorf("SO_PEERCRED on %s: %w", path, credErr)
	}
	if cred.Pid <= 0 {
		return 0, fmt.Errorf("the server of %s runs in another PID namespace", path)
	}
	return int(cred.Pid), nil
}

// Usage is what a process used over an interval.
type Usage struct {
	CPUSeconds float64 `json:"cpu_seconds"`
	PeakRSS    uint64  `json:"peak_rss_bytes"`
	// PeakSinceStart is set when the peak could not be reset, so that
	// PeakRSS covers the whole life of the process.
	PeakSinceStart bool `json:"peak_since_start,omitempty"`
}

// Meter measures a process over an interval: Start, then Stop.
type Meter struct {
	proc     Proc
	cpu0     float64
	resetErr error
}

// StartMeter resets the process's peak RSS and notes its CPU time.
func StartMeter(p Proc) (*Meter, error) {
	m := &Meter{proc: p, resetErr: p.ResetPeak()}
	cpu, err := p.CPUSeconds()
	if err != nil {
		return nil, err
	}
	m.cpu0 = cpu
	return m, nil
}

// Stop returns the CPU time used since Start and the peak RSS since Start
// (since the process started, when the peak could not be reset).
func (m *Meter) Stop() (Usage, error) {
	cpu, err := m.proc.CPUSeconds()
	if err != nil {
		return Usage{}, err
	}
	peak, err := m.proc.PeakRSS()
	if err != nil {
		return Usage{}, err
	}
	return Usage{CPUSeconds: cpu - m.cpu0, PeakRSS: peak, PeakSinceStart: m.resetErr != nil}, nil
}
