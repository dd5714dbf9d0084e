package unixsock

import (
	"encoding/binary"
	"errors"
	"fmt"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// kdev is a device number as the kernel keeps it (major in the high 12
// bits, minor in the low 20), which is how unix_diag reports it.
type kdev struct{ major, minor uint32 }

// unix_diag constants (linux/unix_diag.h).
const (
	udiagShowVFS = 0x2
	unixDiagVFS  = 1
	sizeofReq    = 24 // struct unix_diag_req
	sizeofMsg    = 16 // struct unix_diag_msg
)

// boundInode asks the kernel which filesystem inode the Unix socket fd is
// bound to: the one fact that tells our socket file from any other at the
// same path.
func boundInode(fd int) (uint64, kdev, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return 0, kdev{}, fmt.Errorf("fstat socket: %w", err)
	}
	nl, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return 0, kdev{}, fmt.Errorf("netlink: %w", err)
	}
	defer unix.Close(nl)
	// A kernel that never answers must not hang the caller.
	tv := unix.NsecToTimeval(int64(2 * time.Second))
	if err := unix.SetsockoptTimeval(nl, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &tv); err != nil {
		return 0, kdev{}, fmt.Errorf("netlink timeout: %w", err)
	}

	const seq = 1
	req := make([]byte, unix.NLMSG_HDRLEN+sizeofReq)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], seq)
	b := req[unix.NLMSG_HDRLEN:]
	b[0] = unix.AF_UNIX
	ne.PutUint32(b[4:], 0xffffffff) // all states
	ne.PutUint32(b[8:], uint32(st.Ino))
	ne.PutUint32(b[12:], udiagShowVFS)
	// No cookie: the inode alone selects the socket.
	ne.PutUint32(b[16:], 0xffffffff)
	ne.PutUint32(b[20:], 0xffffffff)
	if err := unix.Sendto(nl, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, kdev{}, fmt.Errorf("unix_diag request: %w", err)
	}
	buf := make([]byte, 8192)
	n, from, err := unix.Recvfrom(nl, buf, 0)
	if err != nil {
		return 0, kdev{}, fmt.Errorf("unix_diag reply: %w", err)
	}
	// Only the kernel (port 0) speaks for the kernel: the answer decides
	// whether a path is trusted.
	if sa, ok := from.(*unix.SockaddrNetlink); !ok || sa.Pid != 0 {
		return 0, kdev{}, errors.New("unix_diag reply not from the kernel")
	}
	msgs, err := syscall.ParseNetlinkMessage(buf[:n])
	if err != nil {
		return 0, kdev{}, fmt.Errorf("unix_diag reply: %w", err)
	}
	for _, m := range msgs {
		switch m.Header.Type {
		case unix.NLMSG_ERROR:
			if len(m.Data) >= 4 {
				if code := int32(ne.Uint32(m.Data)); code != 0 {
					return 0, kdev{}, fmt.Errorf("unix_diag: %w", unix.Errno(-code))
				}
			}
			return 0, kdev{}, errors.New("unix_diag: error reply")
		case unix.SOCK_DIAG_BY_FAMILY:
			if len(m.Data) < sizeofMsg || uint64(ne.Uint32(m.Data[4:])) != st.Ino {
				continue
			}
			attrs := m.Data[sizeofMsg:]
			for len(attrs) >= unix.SizeofRtAttr {
				alen := int(ne.Uint16(attrs[0:]))
				typ := ne.Uint16(attrs[2:])
				if alen < unix.SizeofRtAttr || alen > len(attrs) {
					break
				}
				if typ == unixDiagVFS && alen >= unix.SizeofRtAttr+8 {
					v := attrs[unix.SizeofRtAttr:]
					ino := ne.Uint32(v[0:])
					dev := ne.Uint32(v[4:])
					return uint64(ino), kdev{major: dev >> 20, minor: dev & 0xfffff}, nil
				}
				step := (alen + unix.RTA_ALIGNTO - 1) &^ (unix.RTA_ALIGNTO - 1)
				if step > len(attrs) {
					break
				}
				attrs = attrs[step:]
			}
			return 0, kdev{}, errors.New("unix_diag: the socket is not bound to a file")
		}
	}
	return 0, kdev{}, errors.New("unix_diag: no answer for the socket")
}
