package main

import (
	"fmt"
	"io"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"github.com/baton-run/baton/internal/testkit"
)

// ---- supervisor footprint (measured in roundTripAndFootprint) ----

// idleCPU returns the CPU share (percent of one core) that pid used over
// window, from utime+stime in /proc/pid/stat.
func idleCPU(pid int, window time.Duration) (float64, error) {
	t0, err := testkit.CPUTicks(pid)
	if err != nil {
		return 0, err
	}
	start := time.Now()
	time.Sleep(window)
	t1, err := testkit.CPUTicks(pid)
	if err != nil {
		return 0, err
	}
	secs := float64(t1-t0) / float64(clockTicks())
	return 100 * secs / time.Since(start).Seconds(), nil
}

// clockTicks is USER_HZ, the unit of utime and stime. Go has no sysconf;
// getconf knows it, and 100 is what Linux uses on every common platform.
func clockTicks() int {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if n, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && n > 0 {
			return n
		}
	}
	return 100
}

func (r *report) writeFootprint(w io.Writer, o options) {
	fmt.Fprintf(w, "### Supervisor footprint\n\n")
	fmt.Fprintf(w, "| VmRSS idle after start | VmRSS idle after %d restarts | CPU idle (utime+stime over %s) |\n|---|---|---|\n", o.restarts, o.idle)
	fmt.Fprintf(w, "| %s | %s | %.3f%% of one core |\n\n", r.rssStart, r.rssAfter, r.cpuIdle)
}
