package attestor

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The system calls that x/sys/unix's wrappers would make allocate: they
// copy a path into a new NUL-terminated string, return a new slice or
// struct, or (read) hand the buffer to the race detector, which moves it to
// the heap in -race builds. Verify runs after every attestation and must
// not allocate (TestVerifyDoesNotAllocate, with and without -race); a
// handshake allocates at most 4 times (TestHandshakeAllocations). Each
// wrapper is measured against its raw call in BenchmarkRawSyscalls.

// openat opens a NUL-terminated path; unix.Openat copies the path.
func openat(dirfd int, path *byte, flags int) (int, error) {
	fd, _, errno := unix.Syscall6(unix.SYS_OPENAT, uintptr(dirfd), uintptr(unsafe.Pointer(path)), uintptr(flags), 0, 0, 0)
	if errno != 0 {
		return -1, errno
	}
	return int(fd), nil
}

// readFD is read(2) without unix.Read's race-detector hooks; buf never
// leaves the calling goroutine.
func readFD(fd int, buf []byte) (int, error) {
	n, _, errno := unix.Syscall(unix.SYS_READ, uintptr(fd), uintptr(unsafe.Pointer(&buf[0])), uintptr(len(buf)))
	if errno != 0 {
		return 0, errno
	}
	return int(n), nil
}

// statxIno stats a NUL-terminated path for its device and inode;
// unix.Statx copies the path. statx rather than fstatat: its number is the
// same on every architecture.
func statxIno(dirfd int, path *byte, stx *unix.Statx_t) error {
	_, _, errno := unix.Syscall6(unix.SYS_STATX, uintptr(dirfd), uintptr(unsafe.Pointer(path)), unix.AT_STATX_SYNC_AS_STAT, unix.STATX_INO, uintptr(unsafe.Pointer(stx)), 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// getsockoptUint32s reads a socket option that is an array of uint32 (the
// peer's groups) into buf, and returns how many the kernel wrote or, with
// ERANGE, how many it has. unix.GetsockoptString would allocate a string
// and its conversion another slice.
func getsockoptUint32s(fd, level, opt int, buf []uint32) (int, error) {
	size := uint32(len(buf) * 4)
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return int(size / 4), errno
	}
	return int(size / 4), nil
}
