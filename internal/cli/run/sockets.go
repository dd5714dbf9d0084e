package run

import (
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/upgrade"
)

// tableflipSentinel is the variable tableflip v1.2.3 sets in the
// environment of the process it starts (parent.go, sentinelEnvVar). It is
// unexported there; TestUpgradeMarkerNotInherited fails if it changes.
const tableflipSentinel = "TABLEFLIP_HAS_PARENT_7DIU3"

// setUpUpgrades makes this supervisor replaceable by the binary at its
// path. upg.HasParent says whether an upgrade started this one.
func setUpUpgrades(env Env, timeout time.Duration) (Upgrader, error) {
	upg, err := env.NewUpgrader(tableflip.Options{UpgradeTimeout: timeout})
	if err != nil {
		return nil, err
	}
	// tableflip marks a child it started with this variable and reads it
	// only in New. Generations must not inherit it: a server that uses
	// tableflip itself would take fds 3 and 4 for its parent's pipes.
	if err := env.Unsetenv(tableflipSentinel); err != nil {
		upg.Stop()
		return nil, fmt.Errorf("unset %s: %w", tableflipSentinel, err)
	}
	return upg, nil
}

// source says where the listening sockets came from.
type source string

const (
	// fromPredecessor: the supervisor this one replaces in an upgrade
	// handed them over.
	fromPredecessor source = "predecessor"
	// fromSystemd: socket activation passed some or all of them; any
	// other configured listener was opened here.
	fromSystemd source = "systemd"
	// fromFresh: every one was opened here.
	fromFresh source = "opened"
)

// openSockets gets the listening sockets for specs. A supervisor started
// by an upgrade takes its predecessor's (and succ says what else the
// predecessor passed), without looking for systemd's: those are among
// the predecessor's already. Otherwise the sockets systemd passed serve
// the listeners of the same name, and the rest are opened. src is set on
// error too, for the message.
func openSockets(env Env, upg Upgrader, specs []config.Listener) (socks []*listen.Socket, succ *upgrade.Inherited, src source, err error) {
	if upg.HasParent() {
		succ, socks, err = listen.TakeOver(upg, specs)
		if err != nil {
			return nil, nil, fromPredecessor, err
		}
		return socks, succ, fromPredecessor, nil
	}
	activated := env.Activated()
	src = fromFresh
	if len(activated) > 0 {
		src = fromSystemd
	}
	socks, err = listen.Resolve(specs, activated)
	if err != nil {
		return nil, nil, src, err
	}
	return socks, nil, src, nil
}

// adoptWatchdog moves systemd's watchdog to this process when it was
// armed for fromPID, the previous supervisor, which handed the main pid
// role over. A watchdog meant for another process stays as it is.
func adoptWatchdog(env Env, fromPID int) error {
	if env.Getenv("WATCHDOG_PID") != strconv.Itoa(fromPID) {
		return nil
	}
	if err := env.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid())); err != nil {
		return fmt.Errorf("take over WATCHDOG_PID from pid %d: %w", fromPID, err)
	}
	return nil
}
