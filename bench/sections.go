package main

import (
	"fmt"
	"os"
	"strings"

	"github.com/baton-run/baton/internal/netns"
)

// onlySections are the sections that run only when -only names them. Each
// runs in a network namespace of its own, so that the figures do not
// depend on what ran before (TIME_WAIT sockets, sysctls), and writes its
// own part of BENCHMARKS.md between its own markers.
var onlySections = map[string]func(*env) error{
	"tcp-accept":        (*env).tcpAcceptSection,
	"tcp-migrate":       (*env).tcpMigrateSection,
	"drain":             (*env).drainSection,
	"xdp":               (*env).xdpSection,
	"restart-breakdown": (*env).restartBreakdownSection,
	"scale":             (*env).scaleSection,
	"tcp": func(e *env) error {
		if err := e.tcpAcceptSection(); err != nil {
			return err
		}
		return e.tcpMigrateSection()
	},
}

// inOwnNS runs fn with a copy of e whose namespace is a new one, deleted
// afterwards.
func (e *env) inOwnNS(fn func(*env) error) error {
	ns, err := netns.New()
	if err != nil {
		return err
	}
	sub := *e
	sub.ns = ns
	err = fn(&sub)
	if cerr := ns.Close(); cerr != nil && err == nil {
		err = cerr
	}
	return err
}

// emitAfterFirst is emit with the section placed, when its markers are not
// in the file yet, after the first of afters that is (else at the top).
func emitAfterFirst(out, section, begin, end string, afters ...string) error {
	after := ""
	if out != "" {
		b, err := os.ReadFile(out)
		if err != nil && !os.IsNotExist(err) {
			return fmt.Errorf("read %s: %w", out, err)
		}
		for _, a := range afters {
			if strings.Contains(string(b), a) {
				after = a
				break
			}
		}
	}
	return emit(out, section, begin, end, after)
}

// sysctl reads or, with a value, writes a sysctl inside the namespace:
// /proc/sys/net shows the namespace of whoever opens it, so it is read by
// a process started there.
func (e *env) sysctl(name string, value ...string) (string, error) {
	args := []string{"-n", name}
	if len(value) > 0 {
		args = []string{"-q", "-w", name + "=" + value[0]}
	}
	out, err := e.ns.Command("sysctl", args...).CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("sysctl %s in namespace %s: %w: %s", strings.Join(args, " "), e.ns.Name, err, strings.TrimSpace(string(out)))
	}
	if len(value) > 0 {
		return e.sysctl(name)
	}
	return strings.TrimSpace(string(out)), nil
}
