package bpf

import "golang.org/x/sys/unix"

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
