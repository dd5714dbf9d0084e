package bpf

import (
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// TickNs returns the kernel's tick (jiffy) length in nanoseconds, for the
// steer_tick_ns constant: with it the program reads its clock as jiffies,
// which the verifier inlines, instead of calling bpf_ktime_get_coarse_ns
// for every datagram. The resolution of CLOCK_MONOTONIC_COARSE is that
// tick (1e9/HZ). It returns 0, which keeps the helper call, if the kernel
// does not say.
func TickNs() uint32 {
	var ts unix.Timespec
	if err := unix.ClockGetres(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
		return 0
	}
	if ts.Sec != 0 || ts.Nsec <= 0 {
		return 0
	}
	return uint32(ts.Nsec)
}

// NowNs returns the steer program's clock (now_ns in steer.c, which stamps
// flow entries and pins) as user space can read it, for a program loaded
// with steer_tick_ns = tickNs.
//
// With a tick, the program reads jiffies_64 * tickNs. That is not
// CLOCK_MONOTONIC_COARSE, although both advance once per tick: jiffies_64
// starts at 2^32 - 300*HZ (so that the 32-bit jiffies wrap five minutes
// after boot), not at zero, and is never slewed by NTP. times(2) returns
// jiffies_64 itself, scaled to USER_HZ and rounded down, so
// times()*1e9/USER_HZ is the program's clock rounded down to a USER_HZ
// tick: never ahead of it, and less than 10 ms (USER_HZ is 100) behind.
//
// Without a tick, the program calls bpf_ktime_get_coarse_ns, which is
// CLOCK_MONOTONIC_COARSE as the kernel keeps it: the same clock, except
// that a time namespace would offset the value user space reads.
func NowNs(tickNs uint32) (uint64, error) {
	if tickNs == 0 {
		var ts unix.Timespec
		if err := unix.ClockGettime(unix.CLOCK_MONOTONIC_COARSE, &ts); err != nil {
			return 0, fmt.Errorf("read CLOCK_MONOTONIC_COARSE: %w", err)
		}
		return uint64(ts.Nano()), nil
	}
	ticks, err := unix.Times(nil)
	if err != nil {
		return 0, fmt.Errorf("times(2): %w", err)
	}
	return uint64(ticks) * (1e9 / userHZ()), nil
}

// atClkTck is the auxiliary vector entry with USER_HZ (sysconf's
// _SC_CLK_TCK).
const atClkTck = 17

// userHZ is the unit of times(2): 100 on every architecture Go supports,
// as the kernel tells each process in its auxiliary vector.
var userHZ = sync.OnceValue(func() uint64 {
	if auxv, err := unix.Auxv(); err == nil {
		for _, kv := range auxv {
			if kv[0] == atClkTck && kv[1] > 0 && 1e9%kv[1] == 0 {
				return uint64(kv[1])
			}
		}
	}
	return 100
})
