package run

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/systemd"
)

// storeFDs pushes the sockets baton opened itself to systemd's fd store,
// so that if the supervisor dies, systemd hands them back on restart and
// clients wait in the backlog instead of being refused. Sockets that came
// from a .socket unit are kept by systemd already. FDSTORE=0 in the
// environment turns it off.
func storeFDs(n *systemd.Notifier, socks []*listen.Socket, getenv func(string) string, log *slog.Logger) {
	if getenv("FDSTORE") == "0" {
		return
	}
	for _, sk := range socks {
		if sk.Activated {
			continue
		}
		if err := storeFD(n, sk); err != nil {
			log.Warn("could not store listener in systemd's fd store", "name", sk.Spec.Name, "err", err)
		}
	}
}

func storeFD(n *systemd.Notifier, sk *listen.Socket) error {
	f := sk.File
	if sk.UDP != nil && sk.UDP.IsXDP() {
		// An xdp listener: its sockets and frame pools are worth
		// nothing without the supervisor that fills and drains them,
		// and a restarted baton makes new ones.
		return nil
	}
	if sk.UDP != nil {
		// The anchor keeps the address bound and the reuseport group
		// alive. The program and maps are not stored: a supervisor
		// crash takes every generation with it (Pdeathsig), so there
		// is no steering state worth keeping, and the restarted baton
		// attaches a fresh program to the same group.
		anchor, err := sk.UDP.AnchorFile()
		if err != nil {
			return err
		}
		defer anchor.Close()
		f = anchor
	}
	if sk.TCP != nil {
		// The first socket: connections wait in it while no baton
		// runs, and the restarted baton builds its group around it,
		// listening or not.
		first, err := sk.TCP.FirstFile()
		if err != nil {
			return err
		}
		defer first.Close()
		f = first
	}
	return n.StoreFD(sk.Spec.Name, int(f.Fd()))
}

// closeOnExecAll marks every descriptor from 3 up close-on-exec. Sockets
// from systemd and from a previous supervisor stay open in baton; a
// descriptor a shell left open (exec 7>file) no longer reaches children.
func closeOnExecAll() error {
	err := unix.CloseRange(3, math.MaxUint32, unix.CLOSE_RANGE_CLOEXEC)
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.ENOSYS) && !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("mark inherited descriptors close-on-exec: %w", err)
	}
	// Kernels before 5.11.
	return closeOnExecEach()
}

// closeOnExecAll for kernels without CLOSE_RANGE_CLOEXEC: one by one.
func closeOnExecEach() error {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fmt.Errorf("mark inherited descriptors close-on-exec: %w", err)
	}
	for _, e := range ents {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd < 3 {
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil && !errors.Is(err, unix.EBADF) {
			return fmt.Errorf("mark descriptor %d close-on-exec: %w", fd, err)
		}
	}
	return nil
}
