// Package run is the `baton run` command: flags and config file to a
// configuration, the listening sockets from a predecessor, systemd or
// opened here, and the supervisor. Main is a function of its arguments
// and of an Env, so that everything it decides is testable in-process.
// It is a package of its own, not part of package cli, so that the small
// restart binary does not link the supervisor.
package run

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/cloudflare/tableflip"

	"github.com/baton-run/baton/internal/cli"
	"github.com/baton-run/baton/internal/config"
	"github.com/baton-run/baton/internal/listen"
	"github.com/baton-run/baton/internal/procgroup"
	"github.com/baton-run/baton/internal/supervisor"
	"github.com/baton-run/baton/internal/systemd"
)

// Env is the process `baton run` runs in: its environment variables and
// the process-wide facilities that can be claimed only once. OSEnv is
// the real one; tests replace parts of it.
type Env struct {
	Getenv   func(key string) string
	Setenv   func(key, value string) error
	Unsetenv func(key string) error
	// NewUpgrader sets up self-upgrade: tableflip.New, which succeeds
	// once per process.
	NewUpgrader func(tableflip.Options) (Upgrader, error)
	// Activated returns the sockets systemd passed: listen.Activated,
	// which finds them once per process.
	Activated func() []*listen.Socket
}

// Upgrader is what run needs of tableflip's Upgrader: what the
// supervisor uses, the descriptors a predecessor passed, and Stop.
type Upgrader interface {
	supervisor.Upgrader
	listen.FileSource
	Stop()
}

// OSEnv is the environment of this process.
func OSEnv() Env {
	return Env{
		Getenv:   os.Getenv,
		Setenv:   os.Setenv,
		Unsetenv: os.Unsetenv,
		NewUpgrader: func(opts tableflip.Options) (Upgrader, error) {
			upg, err := tableflip.New(opts)
			if err != nil {
				return nil, err // not a typed nil in the interface
			}
			return upg, nil
		},
		Activated: listen.Activated,
	}
}

// upgradeGrace is how long, beyond the ready timeout of its first
// generation, a new supervisor may take to report back in an upgrade.
const upgradeGrace = 15 * time.Second

// Main runs `baton run` with args, the arguments after "run", and
// returns its exit code: 0 after a clean stop or -h, 2 for a usage or
// config mistake, 1 for anything else.
func Main(args []string, env Env, stderr io.Writer) int {
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
	configPath := fs.String("config", "", "TOML config file; re-read on every restart (flags win over it)")
	collect := config.DefineFlags(fs)
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
	overrides, err := collect()
	if err != nil {
		fmt.Fprintln(stderr, "baton run:", err)
		return 2
	}
	overrides.Command = fs.Args()
	overrides.EnvControl = env.Getenv(cli.EnvControl)
	overrides.EnvInstance = env.Getenv(cli.EnvInstance)
	load := func(ctx context.Context) (*config.Config, error) {
		return config.Load(ctx, *configPath, overrides.Apply)
	}

	cfg, err := load(context.Background())
	if err != nil {
		fmt.Fprintln(stderr, "baton run:", err)
		return 2
	}
	log := newLogger(stderr, cfg.LogFormat, cfg.LogLevel)
	slog.SetDefault(log)
	// First, so that whoever reads the log knows where to send restart
	// and status, and what runs.
	log.Info("baton starting", "version", cli.Version("baton"), "pid", os.Getpid(), "control", cfg.Control)

	// Every supervisor can be replaced by the binary at its path. One
	// started by an upgrade takes its sockets from its predecessor.
	upg, err := setUpUpgrades(env, cfg.ReadyTimeout+upgradeGrace)
	if err != nil {
		log.Error("cannot set up self-upgrade", "err", err)
		return 1
	}
	defer upg.Stop()
	// Before the listeners: the tracker's first act is to kill what a
	// SIGKILLed baton left running, and those processes may still hold
	// the very ports about to be bound (a daemonized worker of an old
	// generation keeps serving on its socket).
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

	socks, succ, src, err := openSockets(env, upg, cfg.Listeners)
	if err != nil {
		if src == fromPredecessor {
			log.Error("cannot take over from the previous supervisor; it keeps serving", "err", err)
		} else {
			log.Error("cannot open listeners", "err", err)
		}
		return 1
	}
	defer listen.CloseAll(socks)
	msock, err := openMetrics(upg, succ != nil, cfg.Metrics, log)
	if err != nil {
		log.Error("cannot serve metrics", "err", err)
		return 1
	}
	if succ != nil {
		if err := adoptWatchdog(env, succ.State.FromPID); err != nil {
			log.Warn("systemd watchdog", "err", err)
		}
	}
	if len(socks) == 0 {
		log.Warn("no listeners: pass --listen NAME=URL or start baton with systemd socket activation")
	}
	for i, sk := range socks {
		log.Info("listener", "name", sk.Spec.Name, "url", sk.Spec.URL, "fd", 3+i, "systemd", sk.Activated)
	}

	opts := supervisor.Options{Load: load, Logger: log, Sockets: socks, Upgrader: upg, Successor: succ, Procs: procs}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	notifier := systemd.FromEnv(env.Getenv, log)
	if notifier != nil {
		opts.Events = notifier
		if succ == nil {
			// A successor's sockets are the ones already stored.
			storeFDs(notifier, socks, env.Getenv, log)
		}
	}
	sup := supervisor.New(cfg, opts)
	if msock != nil {
		stopMetrics, err := serveMetrics(msock, sup, succ != nil, log)
		if err != nil {
			msock.Close()
			log.Error("cannot serve metrics", "err", err)
			return 1
		}
		defer stopMetrics()
	}
	if every, ok := systemd.WatchdogInterval(env.Getenv); ok && notifier != nil {
		go notifier.Watchdog(ctx, every, sup.Ping)
	}
	if err := sup.Run(ctx); err != nil {
		log.Error("baton run failed", "err", err)
		return 1
	}
	return 0
}

// newLogger is baton's logger: format "json" or text, at level (one of
// debug, info, warn, error; config validated it).
func newLogger(w io.Writer, format, level string) *slog.Logger {
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(level))
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
