package bench

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Which server each agent is connected to, read from the kernel: the
// agent's socket inodes (/proc/<pid>/fd) looked up in /proc/net/tcp, and
// the bytes each of those connections received (ss's tcp_info), which
// grow when a server answers the agent.

// tcpConn is one row of /proc/net/tcp.
type tcpConn struct {
	Local, Remote netAddr
	Established   bool
	Inode         string
}

type netAddr struct {
	IP   string
	Port int
}

func (a netAddr) String() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Port)) }

// parseProcNetTCP reads /proc/net/tcp (IPv4).
func parseProcNetTCP(r io.Reader) ([]tcpConn, error) {
	var conns []tcpConn
	sc := bufio.NewScanner(r)
	for first := true; sc.Scan(); first = false {
		// sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode ...
		f := strings.Fields(sc.Text())
		if first || len(f) < 10 {
			continue // the header
		}
		local, err1 := parseProcAddr(f[1])
		remote, err2 := parseProcAddr(f[2])
		if err1 != nil || err2 != nil {
			return nil, fmt.Errorf("/proc/net/tcp line %q: %v %v", sc.Text(), err1, err2)
		}
		conns = append(conns, tcpConn{Local: local, Remote: remote, Established: f[3] == "01", Inode: f[9]})
	}
	return conns, sc.Err()
}

// parseProcAddr reads "0200007F:1F90": the IPv4 address in the kernel's
// byte order (little-endian on every machine this runs on), the port in
// hex.
func parseProcAddr(s string) (netAddr, error) {
	hexIP, hexPort, ok := strings.Cut(s, ":")
	b, err := hex.DecodeString(hexIP)
	if !ok || err != nil || len(b) != 4 {
		return netAddr{}, fmt.Errorf("not an IPv4 address: %q", s)
	}
	port, err := strconv.ParseUint(hexPort, 16, 16)
	if err != nil {
		return netAddr{}, fmt.Errorf("bad port in %q", s)
	}
	return netAddr{IP: net.IPv4(b[3], b[2], b[1], b[0]).String(), Port: int(port)}, nil
}

// socketInodes lists the inodes of the sockets process pid holds.
func socketInodes(pid int) (map[string]bool, error) {
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	fds, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		link, err := os.Readlink(filepath.Join(dir, fd.Name()))
		if err == nil && strings.HasPrefix(link, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(link, "socket:["), "]")] = true
		}
	}
	return inodes, nil
}

// serverConns counts, by server IP, the established connections to port
// whose socket is one of inodes.
func serverConns(conns []tcpConn, inodes map[string]bool, port int) map[string]int {
	out := map[string]int{}
	for _, c := range conns {
		if c.Established && c.Remote.Port == port && inodes[c.Inode] {
			out[c.Remote.IP]++
		}
	}
	return out
}

// readTCPTable reads the machine's IPv4 TCP table (every agent shares the
// harness's network namespace).
func readTCPTable() ([]tcpConn, error) {
	f, err := os.Open("/proc/net/tcp")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return parseProcNetTCP(f)
}

// ssSocket is one connection's tcp_info, as ss prints it.
type ssSocket struct {
	Received uint64 // bytes_received, left out by ss while 0
	// LastData is how long ago data last arrived (lastrcv, left out while
	// 0); -1 when ss printed no tcp_info for the socket.
	LastData time.Duration
}

// parseSS reads `ss -tinHe` output, per socket inode. A socket's summary
// line carries "ino:N"; its tcp_info follows on the next, indented, line.
func parseSS(out string) map[string]ssSocket {
	got := map[string]ssSocket{}
	inode := ""
	for _, line := range strings.Split(out, "\n") {
		if line == "" {
			continue
		}
		indented := line[0] == ' ' || line[0] == '\t'
		if !indented {
			inode = ""
		} else if inode != "" {
			// ss leaves lastrcv out while it is 0 ms.
			got[inode] = ssSocket{LastData: 0}
		}
		for _, f := range strings.Fields(line) {
			key, val, _ := strings.Cut(f, ":")
			switch {
			case !indented && key == "ino":
				inode = val
				got[inode] = ssSocket{LastData: -1}
			case !indented || inode == "":
			case key == "bytes_received":
				if n, err := strconv.ParseUint(val, 10, 64); err == nil {
					s := got[inode]
					s.Received = n
					got[inode] = s
				}
			case key == "lastrcv":
				if n, err := strconv.ParseUint(val, 10, 32); err == nil {
					s := got[inode]
					s.LastData = time.Duration(n) * time.Millisecond
					got[inode] = s
				}
			}
		}
	}
	return got
}

// sockets returns the tcp_info of every established connection ss's
// filter (e.g. "dst", "127.0.0.2:8081") selects.
func sockets(filter ...string) (map[string]ssSocket, error) {
	args := append([]string{"-tinHe", "state", "established"}, filter...)
	out, err := exec.Command("ss", args...).Output()
	if err != nil {
		return nil, fmt.Errorf("ss %s: %w", strings.Join(args, " "), err)
	}
	return parseSS(string(out)), nil
}
