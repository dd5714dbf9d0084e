/* steer.h: what baton's steering programs share, defined once: the
 * limits, modes and counter kinds user space reads from the objects' BTF,
 * the socket array that holds each generation's sockets by slot, the
 * per-slot counters, and the helpers that touch them.
 *
 * steer.c (UDP and QUIC) and tcp.c (TCP), the two sk_reuseport programs,
 * and xdp.c (AF_XDP listeners) each include it and are built to objects of
 * their own, so each object has its own maps of these shapes. An
 * sk_reuseport program defines STEER_SOCKET_ENTRIES, the size of its
 * socket array, first; the XDP program has no socket array (its sockets
 * are AF_XDP sockets, in an XSKMAP of its own) and defines none. */

#ifndef STEER_H
#define STEER_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

/* Limits shared with user space (generated into Go from the BTF below). */
enum steer_limits {
	STEER_SLOTS = 32,      /* slot 0 means "none"; generations use 1..31 */
	STEER_MAX_WORKERS = 16,
	STEER_N_COUNTERS = 8,  /* counters per slot, indexed by steer_counters */
	STEER_MAX_CID_LEN = 20,
	STEER_PIN_CID_BYTES = 8,
	STEER_NO_WORKER = 0xff,
	/* Bytes of each datagram copied to the stack up front: the UDP
	 * header, then enough QUIC for a short or long header's 20-byte DCID
	 * (8 + 1 + 4 + 1 + 20 = 34). */
	STEER_HDR_BYTES = 40,
	/* A canary's share of new connections (TCP), flows or handshakes
	 * (UDP) is in thousandths. */
	STEER_PERMILLE = 1000,
	/* Receive queues of one interface an XDP listener can serve: its
	 * XSKMAP holds a socket at slot * STEER_MAX_QUEUES + queue. */
	STEER_MAX_QUEUES = 64,
};

enum steer_modes {
	STEER_MODE_OFF = 0,
	STEER_MODE_FLOW = 1,
	STEER_MODE_QUIC = 2,
};

/* Per slot. UDP uses CID..DROP, TCP NEW, ERROR, MIGRATE and HASHED. */
enum steer_counters {
	STEER_CNT_CID = 0,      /* slot read from a server-chosen QUIC CID */
	STEER_CNT_PIN = 1,      /* existing flow entry or Initial pin */
	STEER_CNT_NEW = 2,      /* new flow, handshake or TCP connection */
	STEER_CNT_FALLBACK = 3, /* unparseable, unknown or dead slot: working */
	STEER_CNT_ERROR = 4,    /* select on this slot failed (no socket) */
	STEER_CNT_DROP = 5,     /* slot 0 only: nothing could be selected */
	STEER_CNT_MIGRATE = 6,  /* TCP: a closed listener's connection moved here */
	STEER_CNT_HASHED = 7,   /* TCP, slot 0 only: left to the kernel's hash */
};

/* The enums above are the programs' contract with user space, whose Go
 * constants are generated from an object's BTF. BTF only describes the
 * types of globals and functions, and no map or function of the programs
 * uses these enums, so these globals give them one. Their section is no
 * data section: the loader makes no map of it and ignores it, and the
 * programs never read it, so it costs nothing at run time. */
#define STEER_BTF_ONLY __attribute__((section(".steer.types"), used))
const enum steer_limits steer_limits_btf STEER_BTF_ONLY;
const enum steer_modes steer_modes_btf STEER_BTF_ONLY;
const enum steer_counters steer_counters_btf STEER_BTF_ONLY;

#ifdef STEER_SOCKET_ENTRIES
/* The generations' sockets, at an index the including program derives
 * from the slot. */
struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, STEER_SOCKET_ENTRIES);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} sockets SEC(".maps");
#endif

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STEER_SLOTS * STEER_N_COUNTERS);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void count(__u32 slot, __u32 kind)
{
	__u32 key = (slot & (STEER_SLOTS - 1)) * STEER_N_COUNTERS + kind;
	__u64 *c = bpf_map_lookup_elem(&counters, &key);

	if (c)
		*c += 1;
}

#endif /* STEER_H */
