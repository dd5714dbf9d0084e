package xsk

import (
	"fmt"
	"log/slog"
	"runtime"
	"sync/atomic"
	"time"
)

const (
	// lockSpin is how many failed attempts a waiter yields for before it
	// starts sleeping and checking the holder: critical sections are tens
	// of nanoseconds, so a live holder is almost always gone by then.
	lockSpin = 64
	// lockTimeout bounds the wait for a live holder. Only a stopped or
	// wedged process holds the lock that long; the caller gets an error
	// naming it rather than a hang.
	lockTimeout = 5 * time.Second
)

// testHook, when set (by tests only), runs at named points inside the
// critical sections, with the lock held, so that a test can kill a
// process there.
var testHook func(point string)

func hook(point string) {
	if testHook != nil {
		testHook(point)
	}
}

// lock takes the pool's lock word for this process. p.mu serialises this
// process's goroutines first, so they queue on a mutex instead of spinning
// on the shared word (which cannot tell them apart: it holds a pid).
//
// The word is the holder's pid. A waiter that has spun lockSpin times
// checks whether the holder still exists and, if it is dead, steals the
// word with a CAS from that pid, so two thieves cannot both win. Stealing
// leaves whatever the dead holder half did; every critical section is
// ordered so that such a state only leaks frames (see pushLocked,
// popLocked, fillLocked, reapLocked).
//
// A pid reused by an unrelated process before anyone notices the death
// would look alive; the wait then ends with lockTimeout's error. pids are
// allocated cyclically up to pid_max, so that needs the whole pid space to
// wrap while the lock is held.
func (p *Pool) lock() error {
	p.mu.Lock()
	w := &p.hdr.State.Lock
	// The CAS is sequentially consistent, so it acquires: the previous
	// holder's writes to the stack and rings are visible after it.
	if atomic.CompareAndSwapUint32(w, 0, p.pid) {
		return nil
	}
	start := time.Now()
	backoff := time.Microsecond
	for i := 0; ; i++ {
		holder := atomic.LoadUint32(w)
		if holder == 0 {
			if atomic.CompareAndSwapUint32(w, 0, p.pid) {
				return nil
			}
			continue
		}
		if i < lockSpin {
			runtime.Gosched()
			continue
		}
		if holder != p.pid && !processAlive(int(holder)) {
			if atomic.CompareAndSwapUint32(w, holder, p.pid) {
				atomic.AddUint64(&p.hdr.State.Steals, 1)
				lost := atomic.SwapUint64(&p.hdr.State.Transit, 0)
				atomic.AddUint64(&p.hdr.State.Leaked, lost)
				slog.Warn("xsk: pool lock taken from a dead holder",
					"ifindex", p.ifindex, "queue", p.queue, "dead_pid", holder, "frames_lost_in_transit", lost)
				return nil
			}
			continue
		}
		if time.Since(start) > lockTimeout {
			p.mu.Unlock()
			return fmt.Errorf("xsk pool (ifindex %d queue %d): lock held by live pid %d for more than %v", p.ifindex, p.queue, holder, lockTimeout)
		}
		time.Sleep(backoff)
		backoff = min(2*backoff, time.Millisecond)
	}
}

// unlock releases the word with a CAS from our pid: a plain store of 0
// would free a lock someone stole from us if we were ever (wrongly) taken
// for dead. The CAS also releases, publishing our writes to the next
// holder.
func (p *Pool) unlock() {
	if !atomic.CompareAndSwapUint32(&p.hdr.State.Lock, p.pid, 0) {
		slog.Error("xsk: pool lock was not ours at release (taken for dead while holding it?)",
			"ifindex", p.ifindex, "queue", p.queue, "pid", p.pid, "holder", atomic.LoadUint32(&p.hdr.State.Lock))
	}
	p.mu.Unlock()
}
