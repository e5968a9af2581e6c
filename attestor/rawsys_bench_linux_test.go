package attestor

import (
	"os"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkRawSyscalls measures each raw call of rawsys_linux.go against
// the x/sys/unix wrapper it replaces; the allocations are the point (run
// with -race too for read).
func BenchmarkRawSyscalls(b *testing.B) {
	var path [procPathSize]byte
	stat := procPath(&path, int32(os.Getpid()), statName)
	statStr := "/proc/" + strconv.Itoa(os.Getpid()) + "/stat"
	exe := "/proc/self/exe"
	exeRaw := append([]byte(exe), 0)
	openClose := func(b *testing.B, open func() (int, error)) {
		b.ReportAllocs()
		for b.Loop() {
			fd, err := open()
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
	}
	b.Run("openat/raw", func(b *testing.B) {
		openClose(b, func() (int, error) { return openat(unix.AT_FDCWD, stat, unix.O_RDONLY|unix.O_CLOEXEC) })
	})
	b.Run("openat/unix.Openat", func(b *testing.B) {
		openClose(b, func() (int, error) { return unix.Openat(unix.AT_FDCWD, statStr, unix.O_RDONLY|unix.O_CLOEXEC, 0) })
	})

	fd, err := openat(unix.AT_FDCWD, stat, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	// Direct calls, as in readProcFile: through a func value buf would
	// escape either way.
	b.Run("read/raw", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var buf [procBufSize]byte
			rewind(b, fd)
			if _, err := readFD(fd, buf[:]); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("read/unix.Read", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			var buf [procBufSize]byte
			rewind(b, fd)
			if _, err := unix.Read(fd, buf[:]); err != nil {
				b.Fatal(err)
			}
		}
	})

	b.Run("statx/raw", func(b *testing.B) {
		b.ReportAllocs()
		var stx unix.Statx_t
		for b.Loop() {
			if err := statxIno(unix.AT_FDCWD, &exeRaw[0], &stx); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("statx/unix.Statx", func(b *testing.B) {
		b.ReportAllocs()
		var stx unix.Statx_t
		for b.Loop() {
			if err := unix.Statx(unix.AT_FDCWD, exe, unix.AT_STATX_SYNC_AS_STAT, unix.STATX_INO, &stx); err != nil {
				b.Fatal(err)
			}
		}
	})

	pair, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(pair[0])
	defer unix.Close(pair[1])
	// The groups outlive the handshake (the Caller keeps them): the raw
	// call fills the buffer inside peerConn, the wrapper's result must be
	// converted into a new slice.
	b.Run("peergroups/raw", func(b *testing.B) {
		b.ReportAllocs()
		p := new(peerConn)
		for b.Loop() {
			n, err := getsockoptUint32s(pair[0], unix.SOL_SOCKET, unix.SO_PEERGROUPS, p.groupsBuf[:])
			if err != nil {
				b.Fatal(err)
			}
			groupsSink = p.groupsBuf[:n]
		}
	})
	b.Run("peergroups/unix.GetsockoptString", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			s, err := unix.GetsockoptString(pair[0], unix.SOL_SOCKET, unix.SO_PEERGROUPS)
			if err != nil {
				b.Fatal(err)
			}
			groups := make([]uint32, len(s)/4)
			for i := range groups {
				groups[i] = uint32(s[4*i]) | uint32(s[4*i+1])<<8 | uint32(s[4*i+2])<<16 | uint32(s[4*i+3])<<24
			}
			groupsSink = groups
		}
	})
}

var groupsSink []uint32

func rewind(b *testing.B, fd int) {
	if _, err := unix.Seek(fd, 0, 0); err != nil {
		b.Fatal(err)
	}
}
