// Command installcaddy builds the Caddy that baton's tests run
// (testkit.InstallCaddy) into testkit.CaddyDir and prints the binary's
// path. CI starts it in the background before anything else, so that the
// minutes a build from nothing takes overlap with the rest; the tests
// that run caddy wait for it (InstallCaddy takes turns through a lock)
// and fail if it failed.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/baton-run/baton/internal/testkit"
)

func main() {
	timeout := flag.Duration("timeout", testkit.CaddyInstallTimeout, "give up after `duration`")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	start := time.Now()
	bin, err := testkit.InstallCaddy(ctx, func(format string, args ...any) {
		log.Info(fmt.Sprintf(format, args...))
	})
	if err != nil {
		// As it is, not quoted: it ends with the go command's output.
		log.Error("caddy not installed")
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	log.Info("caddy ready", "path", bin, "took", time.Since(start).Round(time.Millisecond))
	fmt.Println(bin)
}
