// Command baton is a graceful-restart supervisor: it holds a server's
// listening sockets and replaces one generation of the server with the
// next without refusing a connection.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"
	"golang.org/x/sys/unix"

	"github.com/baton-run/baton/internal/cli"
	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/supervisor"
	"github.com/baton-run/baton/internal/systemd"
)

const usage = `baton: graceful-restart supervisor for network servers

Usage:
  baton run [flags] -- COMMAND [ARGS...]   supervise COMMAND
  baton restart [flags]                    ask a running supervisor to restart
  baton status [flags]                     show a running supervisor's generations
  baton help                               this text

Run 'baton run -h', 'baton restart -h' or 'baton status -h' for flags.
`

func main() {
	if len(os.Args) > 1 && os.Args[1] == supervisor.ShimArg {
		os.Exit(supervisor.RunShim(os.Args[2:]))
	}
	if len(os.Args) < 2 {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "run":
		os.Exit(runMain(args, os.Stderr))
	case "restart":
		os.Exit(cli.RestartMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "status":
		os.Exit(cli.StatusMain(args, os.Getenv, os.Stdout, os.Stderr))
	case "help", "-h", "--help":
		fmt.Print(usage)
	default:
		fmt.Fprintf(os.Stderr, "baton: unknown command %q\n\n%s", os.Args[1], usage)
		os.Exit(2)
	}
}

// multiFlag collects a repeatable flag.
type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func runMain(args []string, stderr io.Writer) int {
	// A log pipe that breaks (baton run ... | head) must never take the
	// supervisor, and with it every generation, down: with SIGPIPE
	// handled, writes fail with EPIPE instead. Handled, not ignored, so
	// that generations still start with the default disposition.
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	// Descriptors baton inherited are not the generations' business (nor
	// a successor supervisor's): only the listeners and the handover
	// files are passed on, explicitly.
	if err := closeOnExecAll(); err != nil {
		fmt.Fprintln(stderr, "baton run:", err)
		return 1
	}
	fs := flag.NewFlagSet("baton run", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var (
		configPath   = fs.String("config", "", "TOML config file; re-read on every restart (flags win over it)")
		listens      multiFlag
		envs         multiFlag
		control      = fs.String("control", "", "coordination socket path (default $BATON_CONTROL, then "+config.DefaultControl+")")
		controlGroup = fs.String("control-group", "", "group allowed to use the coordination socket (mode 0660)")
		ready        = fs.String("ready", "auto", "readiness: auto (inheritance pipe or sd_notify), delay:DURATION, tcp-connect:HOST:PORT")
		readyTimeout = fs.Duration("ready-timeout", config.DefaultReadyTimeout, "how long a new generation may take to become ready")
		drainSignal  = fs.String("drain-signal", "SIGTERM", "signal that tells an old generation to drain")
		drainTimeout = fs.Duration("drain-timeout", config.DefaultDrainTimeout, "SIGKILL a draining generation after this long")
		maxDraining  = fs.Int("max-draining", config.DefaultMaxDraining, "refuse a restart while this many generations drain")
		stopTimeout  = fs.Duration("stop-timeout", config.DefaultStopTimeout, "on SIGTERM, SIGKILL generations still running after this long")
		checkCmd     = fs.String("check-cmd", "", "shell command run before each restart; non-zero exit refuses the restart")
		checkTimeout = fs.Duration("check-timeout", config.DefaultCheckTimeout, "bound on --check-cmd")
		udpIdle      = fs.Duration("udp-idle", config.DefaultUDPIdle, "end the drain of a generation that reported IDLE=1 once its UDP sockets were quiet this long")
		userName     = fs.String("user", "", "run generations as this user")
		groupName    = fs.String("group", "", "run generations with this group (needs --user)")
		dir          = fs.String("dir", "", "working directory of generations")
		logFormat    = fs.String("log-format", "text", "log format: text or json")
		logLevel     = fs.String("log-level", "info", "log level: debug, info, warn, error")
		tracking     = fs.String("process-tracking", "auto", "how to find everything a generation or check started, to kill it: auto (cgroup if baton may create cgroups, else process-group), cgroup, process-group")
	)
	fs.Var(&listens, "listen", "NAME=URL listener, repeatable: tcp://HOST:PORT, tcp://[::1]:PORT, udp://HOST:PORT, quic://HOST:PORT, unix:///path;\n"+
		"options as a query: ?backlog=N (tcp, unix), ?v6only=true (tcp, udp), ?mode=0660&owner=U&group=G (unix),\n"+
		"?steer=flow|quic|off&workers=W&flow_idle=D (udp, quic), ?cid_len=L&cid_slot_offset=N&cid_worker_offset=N (quic)")
	fs.Var(&envs, "env", "KEY=VALUE added to the generations' environment, repeatable")
	fs.Usage = func() {
		fmt.Fprint(stderr, "Usage: baton run [flags] -- COMMAND [ARGS...]\n\nFlags:\n")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	command := fs.Args()

	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	// Parse the flags that need it once, so usage errors show at start.
	var parsedListeners []config.Listener
	for _, l := range listens {
		pl, err := config.ParseListen(l)
		if err != nil {
			fmt.Fprintln(stderr, "baton run:", err)
			return 2
		}
		parsedListeners = append(parsedListeners, pl)
	}
	overrides := func(c *config.Config) error {
		if len(command) > 0 {
			c.Command = command
		}
		if len(parsedListeners) > 0 {
			c.Listeners = parsedListeners
		}
		c.Env = append(c.Env, envs...)
		if set["control"] {
			c.Control = *control
		} else if c.Control == config.DefaultControl {
			c.Control = cli.ControlPath("", os.Getenv)
		}
		str := map[string]*string{"control-group": &c.ControlGroup, "check-cmd": &c.CheckCmd, "user": &c.User,
			"group": &c.Group, "dir": &c.Dir, "log-format": &c.LogFormat, "log-level": &c.LogLevel, "process-tracking": &c.ProcessTracking}
		vals := map[string]string{"control-group": *controlGroup, "check-cmd": *checkCmd, "user": *userName,
			"group": *groupName, "dir": *dir, "log-format": *logFormat, "log-level": *logLevel, "process-tracking": *tracking}
		for name, dst := range str {
			if set[name] {
				*dst = vals[name]
			}
		}
		durs := map[string]struct {
			dst *time.Duration
			v   time.Duration
		}{
			"ready-timeout": {&c.ReadyTimeout, *readyTimeout}, "drain-timeout": {&c.DrainTimeout, *drainTimeout},
			"stop-timeout": {&c.StopTimeout, *stopTimeout}, "check-timeout": {&c.CheckTimeout, *checkTimeout},
			"udp-idle": {&c.UDPIdle, *udpIdle},
		}
		for name, d := range durs {
			if set[name] {
				*d.dst = d.v
			}
		}
		if set["max-draining"] {
			c.MaxDraining = *maxDraining
		}
		if set["ready"] {
			r, err := config.ParseReady(*ready)
			if err != nil {
				return err
			}
			c.Ready = r
		}
		if set["drain-signal"] {
			sig, err := config.ParseSignal(*drainSignal)
			if err != nil {
				return err
			}
			c.DrainSignal = sig
		}
		return nil
	}
	load := func(ctx context.Context) (*config.Config, error) {
		return config.LoadContext(ctx, *configPath, overrides)
	}

	cfg, err := load(context.Background())
	if err != nil {
		fmt.Fprintln(stderr, "baton run:", err)
		return 2
	}
	log := newLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	slog.SetDefault(log)

	// Every supervisor can be replaced by the binary at its path. One
	// started by an upgrade takes its sockets from its predecessor.
	upg, err := tableflip.New(tableflip.Options{UpgradeTimeout: cfg.ReadyTimeout + upgradeGrace})
	if err != nil {
		log.Error("cannot set up self-upgrade", "err", err)
		return 1
	}
	defer upg.Stop()
	// tableflip marks a child it started with this variable and reads it
	// only in New. Generations must not inherit it: a server that uses
	// tableflip itself would take fds 3 and 4 for its parent's pipes.
	os.Unsetenv(tableflipSentinel)
	var socks []*listen.Socket
	var succ *supervisor.Successor
	if upg.HasParent() {
		succ, socks, err = supervisor.TakeOver(upg, cfg.Listeners)
		if err != nil {
			log.Error("cannot take over from the previous supervisor; it keeps serving", "err", err)
			return 1
		}
		// The watchdog was armed for the previous main pid, which hands
		// that role to this process.
		if os.Getenv("WATCHDOG_PID") == strconv.Itoa(succ.State.FromPID) {
			os.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
		}
	} else {
		activated := listen.Activated()
		socks, err = listen.Resolve(cfg.Listeners, activated)
		if err != nil {
			log.Error("cannot open listeners", "err", err)
			return 1
		}
	}
	defer listen.CloseAll(socks)
	if len(socks) == 0 {
		log.Warn("no listeners: pass --listen NAME=URL or start baton with systemd socket activation")
	}
	for i, sk := range socks {
		log.Info("listener", "name", sk.Spec.Name, "url", sk.Spec.URL, "fd", 3+i, "systemd", sk.Activated)
	}

	mode, err := procgroup.ParseMode(cfg.ProcessTracking)
	if err != nil {
		log.Error("process tracking", "err", err)
		return 2
	}
	procs, err := procgroup.New(procgroup.Options{Mode: mode, Logger: log})
	if err != nil {
		log.Error("cannot track the processes of generations", "err", err)
		return 1
	}
	defer procs.Close()
	log.Info("process tracking", "mode", procs.Mode().String(), "where", procs.Describe())

	opts := supervisor.Options{Load: load, Logger: log, Sockets: socks, Upgrader: upg, Successor: succ, Procs: procs}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	notifier := systemd.FromEnv(os.Getenv, log)
	if notifier != nil {
		opts.Events = notifier
		if succ == nil {
			// A successor's sockets are the ones already stored.
			storeFDs(notifier, socks, log)
		}
	}
	sup := supervisor.New(cfg, opts)
	if every, ok := systemd.WatchdogInterval(os.Getenv); ok && notifier != nil {
		go notifier.Watchdog(ctx, every, sup.Ping)
	}
	return runSupervisor(ctx, sup, log)
}

// storeFDs pushes the sockets baton opened itself to systemd's fd store,
// so that if the supervisor dies, systemd hands them back on restart and
// clients wait in the backlog instead of being refused. Sockets that came
// from a .socket unit are kept by systemd already.
func storeFDs(n *systemd.Notifier, socks []*listen.Socket, log *slog.Logger) {
	if os.Getenv("FDSTORE") == "0" {
		return
	}
	for _, sk := range socks {
		if sk.Activated {
			continue
		}
		f := sk.File
		if sk.UDP != nil {
			// The anchor keeps the address bound and the reuseport group
			// alive. The program and maps are not stored: a supervisor
			// crash takes every generation with it (Pdeathsig), so there
			// is no steering state worth keeping, and the restarted baton
			// attaches a fresh program to the same group.
			var err error
			if f, err = sk.UDP.AnchorFile(); err != nil {
				log.Warn("could not store listener in systemd's fd store", "name", sk.Spec.Name, "err", err)
				continue
			}
			defer f.Close()
		}
		if err := n.StoreFD(sk.Spec.Name, int(f.Fd())); err != nil {
			log.Warn("could not store listener in systemd's fd store", "name", sk.Spec.Name, "err", err)
		}
	}
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
	// Kernels before 5.11: one by one.
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

// tableflipSentinel is the variable tableflip v1.2.3 sets in the
// environment of the process it starts.
const tableflipSentinel = "TABLEFLIP_HAS_PARENT_7DIU3"

// upgradeGrace is how long, beyond the ready timeout of its first
// generation, a new supervisor may take to report back in an upgrade.
const upgradeGrace = 15 * time.Second

func runSupervisor(ctx context.Context, sup *supervisor.Supervisor, log *slog.Logger) int {
	if err := sup.Run(ctx); err != nil {
		log.Error("baton run failed", "err", err)
		return 1
	}
	return 0
}

func newLogger(w io.Writer, format, level string) *slog.Logger {
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(level))
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
