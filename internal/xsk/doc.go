// Package xsk holds AF_XDP sockets and the frame pool they share on one
// (netdev, queue).
//
// The kernel allows one UMEM per (netdev, queue): every further socket on
// that queue binds with XDP_SHARED_UMEM and shares the UMEM's single fill
// ring and completion ring, while each socket has its own RX and TX rings.
// baton gives each generation its own socket per queue, so several
// processes (the supervisor and the generations running during a restart)
// produce into the one fill ring and consume the one completion ring. This
// package makes that safe:
//
//   - A pool is a memfd. Its first page is a self-describing header (magic,
//     version, ifindex, queue, sizes, offsets) followed by the shared state:
//     a lock word, the free-frame stack's count, per-slot counters and the
//     cumulative leak counter. The free stack's entries follow on their own
//     pages, and the UMEM starts at a page-aligned offset of the same memfd,
//     so one descriptor carries everything a generation needs besides its
//     socket and the socket that owns the UMEM (the anchor, whose fd is
//     needed to mmap the shared fill and completion rings).
//   - The lock word holds the pid of its holder. A waiter that has spun for
//     a while checks whether the holder still exists and steals the lock
//     from a dead one. Stealing is safe because every critical section is
//     ordered so that a holder killed at any instruction can only leak
//     frames, never make one reachable twice (see the comments at each
//     critical section).
//   - Each generation keeps counters in its slot so that, once its
//     processes are gone, the supervisor knows how many frames died with
//     them (Pool.Reclaim) and Pool.Audit can check that every other frame
//     is accounted for.
//
// The supervisor side is CreatePool, Pool.NewSocket, Pool.Files,
// Pool.Reclaim, Pool.Stats and Pool.Audit; a generation uses OpenPool and
// Pool.OpenSocket and then Socket's batch operations. The package holds no
// BPF program: the XSKMAP that steers packets to the sockets belongs to
// the caller.
//
// Memory ordering. The rings' producer and consumer words are shared with
// the kernel, which reads the peer's index with smp_load_acquire and
// publishes its own with smp_store_release. Go's sync/atomic operations
// are sequentially consistent, which is at least acquire for loads and
// release for stores, so every access to a ring index goes through
// sync/atomic: a load of the peer's index must not let our later reads of
// the descriptors it covers be satisfied before it (acquire), and the
// store of our index must not become visible before our writes (or reads)
// of the descriptors it hands over (release). The same holds between
// processes for the lock word and the free stack's count: the CAS that
// takes the lock acquires, the store that frees it releases, so the
// entries one holder wrote are visible to the next.
package xsk
