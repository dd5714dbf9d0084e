/* classify.h: where a UDP datagram of a steered listener goes, shared by
 * the two programs that steer one: steer.c, the sk_reuseport selector of
 * UDP and QUIC listeners, and xdp.c, the XDP program of AF_XDP listeners.
 * Both decide the same way, from the same load-time constants and the same
 * maps (config, flows, initials, and steer.h's counters), so user space
 * writes both with one code path: the CID slot for short headers and
 * server-chosen long-header DCIDs, pinned Initials, the flow mode, the
 * canary's share, the working slot for the rest. What the programs do with
 * the choice differs (select a socket of the slot, or redirect to its
 * AF_XDP socket), and so does what they know about a datagram when it
 * starts, which is all this header asks of them.
 *
 * The including program defines, before this header, struct steer_pkt:
 * whatever it keeps about the datagram at hand (its context, where its
 * headers are). It defines, anywhere in the file, the hooks declared
 * below, which this header calls with that struct:
 *
 *   steer_pkt_hash    a 32-bit keyed hash of the 4-tuple, uniform over its
 *                     range and the same for every datagram of a 4-tuple
 *                     (the kernel's reuseport hash, or one the program
 *                     computes): flow keys, the canary's share and the
 *                     default worker come from it.
 *   steer_load_sport  the source port, network order (flow mode).
 *   steer_load_addrs  the exact addresses (QUIC mode, only where a
 *                     handshake record is trusted or written).
 *
 * The QUIC parser reads a copy of the datagram's head, UDP header first,
 * STEER_HDR_BYTES long and zero past the datagram's end (or past what was
 * copied, when quic_head_need says that is enough): each program makes it
 * in its own way, and passes it in with the UDP length.
 *
 * Everything here is inlined into the including program's one function,
 * so the hooks cost what their bodies cost, no call. */

#ifndef CLASSIFY_H
#define CLASSIFY_H

#include "steer.h"
#include <bpf/bpf_endian.h>

#define UDP_HDR 8
#define QUIC_V1 0x00000001
#define QUIC_V2 0x6b3343cf
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86DD

/* Long-header packet types in version-1 numbering. */
#define PT_INITIAL 0
#define PT_ZERO_RTT 1
#define PT_HANDSHAKE 2
#define PT_RETRY 3
#define PT_UNKNOWN 4

/* The shape of a group never changes while it lives: a generation's CIDs
 * are fixed when it starts. User space sets these at load time (they live
 * in the frozen .rodata map), so the verifier knows their values: offsets
 * into the header copy are then constants it can check, dead modes are
 * pruned, and no helper call is needed to read a CID octet. */
volatile const __u32 steer_mode = STEER_MODE_OFF;
volatile const __u32 steer_cid_len = 8;         /* L, 1..STEER_MAX_CID_LEN */
volatile const __u32 steer_slot_offset = 0;     /* DCID octet with the slot, < L */
volatile const __u32 steer_slot_shift = 0;      /* slot bits within that octet */
volatile const __u32 steer_slot_mask = 0x1f;
volatile const __u32 steer_worker_offset = STEER_NO_WORKER; /* < L, or none */
/* The kernel's tick (jiffy) in ns, 1e9/HZ, as clock_getres reports for
 * CLOCK_MONOTONIC_COARSE. With it the program's clock is jiffies * tick,
 * which the verifier inlines to one load; 0 means "unknown" and costs a
 * bpf_ktime_get_coarse_ns call per datagram instead. Both clocks advance
 * once per tick, so timeouts behave the same with either. */
volatile const __u32 steer_tick_ns = 0;

/* What changes at run time: written whole by user space. */
struct config {
	__u32 working; /* slot for new flows; 0 = none yet (drop) */
	__u32 live;    /* bit n: slot n has sockets and may be chosen */
	__u64 flow_idle_ns;
	__u64 initial_pin_ns;
	/* Bumped by user space each time a slot is given to a generation, so
	 * flow entries and pins left by a released generation never match
	 * the next generation that reuses the slot. */
	__u32 epoch[STEER_SLOTS];
	/* A second slot that takes canary_permille thousandths of new flows
	 * and new handshakes, chosen by the 4-tuple's hash (see new_slot);
	 * 0 = none. Last, so that the config of a program built before them
	 * is a prefix of this one: user space adopting such a program from an
	 * older supervisor writes only that prefix. */
	__u32 canary;
	__u32 canary_permille; /* 1..STEER_PERMILLE */
};

/* A 4-tuple as the program's keyed hash sees it (steer_pkt_hash). In
 * steer.c that is ctx->hash, the hash the UDP socket lookup computed to
 * pick a socket in the group: udp_ehashfn (IPv4) or udp6_ehashfn (IPv6), a
 * jhash of the addresses and ports keyed with a secret chosen once per
 * boot and mixed with the network namespace. It is the same for every
 * datagram of a 4-tuple, and reading it costs nothing, where reading the
 * addresses costs a helper call. xdp.c computes one of its own (see
 * xdp_hash there) from headers it has parsed anyway. The source port,
 * already at hand, is added to the key.
 *
 * Different 4-tuples can still share a key. On the hash alone a full map
 * of 65536 flows would hold such a pair about every other time; with the
 * port (when sources pick ports at random) about once in 2^16. IPv6 hashes
 * only the low 32 bits of the local address, so one client socket that
 * talks to two local addresses sharing them always has one key. What a
 * shared key can do is bounded by what the key decides:
 *
 *   - flow mode: the second flow follows the first one's entry, to a
 *     generation that is alive (entries of a released generation never
 *     match) and still serves the flows it has, and stays there until the
 *     entry idles out or the generation is released, like any flow of that
 *     generation. No flow changes generation because of it: an entry, once
 *     made, sends every flow with its key to the same slot.
 *   - Initial pins (struct pin_key, and the DCID bytes in a QUIC record)
 *     add the first 8 DCID bytes, random in a client's first Initials
 *     (RFC 9000 7.2: at least 8 unpredictable bytes) and in the CIDs a
 *     server issues: in practice a pin matches only datagrams of its own
 *     handshake.
 *   - QUIC mode's record of a 4-tuple's latest handshake (struct flow)
 *     decides whether an Initial that names an older generation's CID may
 *     go there, which a random client DCID must not. It keeps the exact
 *     addresses and is only used for that when they match; a record that
 *     another 4-tuple's handshake replaces first hands its pin over to the
 *     initials map. So a shared key can make the record miss (as an
 *     evicted one does: the Initial goes to the working generation), never
 *     send a handshake to a generation that did not take it. */
struct flow_key {
	__u32 hash;  /* steer_pkt_hash */
	__u16 sport; /* network order */
	__u16 zero;
};

/* 8-byte aligned, so that clang writes a local one (zeroing it included)
 * in whole 64-bit words: without CAP_PERFMON the verifier refuses a
 * narrower write over a stack slot where a pointer was spilled, and clang
 * may give the struct such a slot. */
struct addrs {
	__u32 saddr[4]; /* network order; IPv4 as v4-mapped IPv6 */
	__u32 daddr[4];
} __attribute__((aligned(8)));

/* The including program's hooks (see the top of this file). */
struct steer_pkt;
static __always_inline __u32 steer_pkt_hash(const struct steer_pkt *p);
static __always_inline int steer_load_sport(struct steer_pkt *p, __u16 *sport);
static __always_inline int steer_load_addrs(struct steer_pkt *p, struct addrs *a);

struct flow {
	__u32 slot;
	__u32 epoch;
	__u64 last_seen; /* see now_ns */
	/* QUIC mode only, zero in flow mode: the exact addresses, and the
	 * pin_key DCID bytes of the handshake that made the record, whose
	 * pin the record is (see quic_pinned). */
	struct addrs addrs;
	__u8 dcid[STEER_PIN_CID_BYTES];
};

struct pin_key {
	struct flow_key flow;
	__u8 dcid[STEER_PIN_CID_BYTES]; /* first DCID bytes, zero padded */
};

struct pin {
	__u32 slot;
	__u32 epoch;
	__u64 expires; /* see now_ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* Flow mode: 4-tuple (struct flow_key) -> slot. QUIC mode: 4-tuple -> slot
 * its most recent new handshake went to, which lets an Initial carrying an
 * older generation's CID (the client's Initial after a Retry) reach that
 * generation while a random client DCID that merely looks like one does
 * not; the record also pins that handshake's own Initials. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, struct flow);
} flows SEC(".maps");

/* Pins of the handshakes that a 4-tuple's record in flows does not hold:
 * a client's further connections from one socket, and its Initials that
 * carry the server's CID. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pin_key);
	__type(value, struct pin);
} initials SEC(".maps");

static __always_inline int slot_live(const struct config *cfg, __u32 slot)
{
	return slot != 0 && slot < STEER_SLOTS && (cfg->live & (1u << slot));
}

/* A flow entry or pin is only valid for the generation that made it. */
static __always_inline int slot_current(const struct config *cfg, __u32 slot, __u32 epoch)
{
	return slot_live(cfg, slot) && cfg->epoch[slot & (STEER_SLOTS - 1)] == epoch;
}

/* Timestamps only need to resolve idle and pin timeouts of a millisecond
 * or more. Tick resolution, as the coarse clock has; the verifier inlines
 * bpf_jiffies64 to a load where bpf_ktime_get_coarse_ns is a call. */
static __always_inline __u64 now_ns(void)
{
	if (steer_tick_ns)
		return bpf_jiffies64() * steer_tick_ns;
	return bpf_ktime_get_coarse_ns();
}

/* Where a new flow or handshake goes: to the canary for its share of
 * 4-tuples, else to the working slot; to the canary too when no slot is
 * working, as the TCP program does. The share is taken from the keyed
 * hash of the 4-tuple (steer_pkt_hash, see struct flow_key), as in tcp.c: uniform over 32 bits, so its top part scaled to 0..999, and the
 * same for every datagram of a 4-tuple, so a client's retransmitted
 * first datagram makes the same choice. Flows, handshakes and
 * connections already placed never move: only what would otherwise go to
 * the working slot as new asks.
 *
 * No branch: the caller computes it for every datagram (a dozen
 * instructions), and a branch here would double the paths the verifier
 * walks through everything after it. */
static __always_inline __u32 new_slot(const struct steer_pkt *p, const struct config *cfg,
				      __u32 working)
{
	__u32 canary = cfg->canary & (STEER_SLOTS - 1);
	__u32 live = cfg->live & ~1u; /* slot 0 is "none" */
	__u64 share = ((__u64)steer_pkt_hash(p) * STEER_PERMILLE) >> 32;
	/* share < canary_permille, without a branch: both are below 2^32. */
	__u32 in_share = (share - (__u64)cfg->canary_permille) >> 63;
	__u32 take = (live >> canary) & ((~live >> working) | in_share) & 1;

	return working ^ ((working ^ canary) & -take);
}

/* 64-bit fields although the values are small: clang may spill one of
 * them to a stack slot that held a pointer on another path, and without
 * CAP_PERFMON the verifier refuses a narrower write over a spilled
 * pointer. */
struct choice {
	__u64 slot;
	__u64 kind;
	__u64 worker; /* taken modulo W at the end */
};

/* The live slot named by a server-chosen DCID at payload offset start (1
 * for a short header, 6 for a long one), or 0. The caller has checked that
 * the whole CID is in the datagram, hence in h. */
static __always_inline __u32 cid_slot(const struct config *cfg, const __u8 *h, __u32 start)
{
	__u32 at = UDP_HDR + start + steer_slot_offset;

	if (at >= STEER_HDR_BYTES)
		return 0;
	__u8 oct = h[at];

	/* QUIC-LB reserves codepoint 0b111 in the top bits for CIDs that
	 * are not routable by configuration. */
	if ((oct & 0xe0) == 0xe0)
		return 0;
	__u32 slot = (oct >> (steer_slot_shift & 7)) & steer_slot_mask & (STEER_SLOTS - 1);

	return slot_live(cfg, slot) ? slot : 0;
}

static __always_inline void route_cid(const __u8 *h, __u32 start, __u32 slot, struct choice *c)
{
	c->slot = slot;
	c->kind = STEER_CNT_CID;
	if (steer_worker_offset != STEER_NO_WORKER) {
		__u32 at = UDP_HDR + start + steer_worker_offset;

		if (at < STEER_HDR_BYTES)
			c->worker = h[at];
	}
}

static __always_inline int addrs_equal(const struct addrs *x, const struct addrs *y)
{
	__u32 diff = 0;

#pragma unroll
	for (int i = 0; i < 4; i++)
		diff |= (x->saddr[i] ^ y->saddr[i]) | (x->daddr[i] ^ y->daddr[i]);
	return diff == 0;
}

static __always_inline int dcid_equal(const __u8 *x, const __u8 *y)
{
	__u8 diff = 0;

#pragma unroll
	for (int i = 0; i < STEER_PIN_CID_BYTES; i++)
		diff |= x[i] ^ y[i];
	return diff == 0;
}

/* A live pin in the initials map for key. */
static __always_inline int pinned(const struct config *cfg, const struct pin_key *key, __u64 now,
				  struct choice *c)
{
	struct pin *p = bpf_map_lookup_elem(&initials, key);

	if (p && slot_current(cfg, p->slot, p->epoch) && now < p->expires) {
		c->slot = p->slot;
		c->kind = STEER_CNT_PIN;
		return 1;
	}
	return 0;
}

/* Long-header packets not routed by CID. A pin from an earlier Initial of
 * the same handshake (4-tuple + first DCID bytes) wins; else the working
 * slot, or the canary (see new_slot). Only Initial and 0-RTT create pins:
 * they are what a client retransmits with the same DCID across a flip or
 * a change of the canary.
 *
 * A new client's first Initial makes one map entry, not two: the 4-tuple's
 * record in flows (which the Retry case needs anyway) carries the DCID
 * bytes of that handshake and is its pin. An insert is the costliest
 * thing the program does (it allocates, locks, and touches cold memory),
 * so the initials map only takes the pins the record cannot hold: further
 * handshakes of the same 4-tuple, and the handshake a record held before
 * it was replaced. */
static __always_inline void quic_pinned(struct steer_pkt *p, const struct config *cfg,
					const __u8 *h, __u32 len, __u32 dlen, int type,
					__u32 to, struct choice *c)
{
	struct pin_key key = {
		.flow = {
			.hash = steer_pkt_hash(p),
			.sport = *(const __u16 *)h,
		},
	};
	__u64 now, pin_ns = cfg->initial_pin_ns;
	struct addrs a = {};
	struct flow *rec;

	/* DCID bytes start at h[14]; h is zero past the datagram's end. */
#pragma unroll
	for (__u32 i = 0; i < STEER_PIN_CID_BYTES; i++)
		if (i < dlen)
			key.dcid[i] = h[UDP_HDR + 6 + i];

	now = now_ns();
	/* A DCID in the server CID shape that names a live slot is a
	 * server's CID (or, 1 time in 37, a client's random one that looks
	 * like it): the client's Initials that carry it (its ACKs of the
	 * server's Initials, or the ClientHello again after a Retry) are
	 * pinned in the initials map, if at all, so look there first. */
	__u32 cs = 0;

	if (dlen == steer_cid_len && len >= UDP_HDR + 6 + dlen)
		cs = cid_slot(cfg, h, 6);
	if (cs && pinned(cfg, &key, now, c))
		return;
	/* Like a pin, the record matches on the DCID bytes alone, without
	 * the addresses (see struct flow_key). */
	rec = bpf_map_lookup_elem(&flows, &key.flow);
	int rec_live = rec && slot_current(cfg, rec->slot, rec->epoch) && now - rec->last_seen < pin_ns;

	if (rec_live && dcid_equal(rec->dcid, key.dcid)) {
		c->slot = rec->slot;
		c->kind = STEER_CNT_PIN;
		return;
	}
	if (!cs && pinned(cfg, &key, now, c))
		return;
	if (type != PT_INITIAL && type != PT_ZERO_RTT)
		return;
	/* From here on the record is trusted for where a handshake goes or
	 * written, which takes the exact addresses. */
	if (steer_load_addrs(p, &a))
		return;
	int same_tuple = rec_live && addrs_equal(&rec->addrs, &a);

	/* An Initial or 0-RTT whose DCID has the server CID shape and names
	 * a live slot other than the one a new handshake would go to
	 * continues a handshake that generation started (after its Retry,
	 * or once its first Initial arrived) if, and only if, that
	 * generation took this 4-tuple's new handshake recently: an older
	 * generation, or the working one or the canary when the canary
	 * changed since. A random client DCID names a given slot about 1
	 * time in 37, and must not be sent to a draining generation that
	 * ignores new connections. */
	if (same_tuple && cs && cs != to && rec->slot == cs) {
		route_cid(h, 6, cs, c);
		return;
	}

	if (!slot_live(cfg, to))
		return;
	__u32 epoch = cfg->epoch[to & (STEER_SLOTS - 1)];

	if (same_tuple && rec->slot == to) {
		/* Another handshake of a 4-tuple whose latest one went to the
		 * same generation: its own pin, and the record's time moves
		 * in place. */
		struct pin pin = {
			.slot = to,
			.epoch = epoch,
			.expires = now + pin_ns,
		};
		bpf_map_update_elem(&initials, &key, &pin, BPF_ANY);
		rec->last_seen = now;
	} else {
		if (rec_live) {
			/* The record still pins a handshake (on an older
			 * generation, or of another 4-tuple with the same key):
			 * it moves to the initials map before the record is
			 * replaced, so its retransmissions stay where they
			 * are. */
			struct pin_key old = { .flow = key.flow };
			struct pin op = {
				.slot = rec->slot,
				.epoch = rec->epoch,
				.expires = rec->last_seen + pin_ns,
			};

			__builtin_memcpy(old.dcid, rec->dcid, sizeof(old.dcid));
			bpf_map_update_elem(&initials, &old, &op, BPF_ANY);
		}
		struct flow nr = {
			.slot = to,
			.epoch = epoch,
			.last_seen = now,
			.addrs = a,
		};

		__builtin_memcpy(nr.dcid, key.dcid, sizeof(nr.dcid));
		bpf_map_update_elem(&flows, &key.flow, &nr, BPF_ANY);
	}
	c->slot = to;
	c->kind = STEER_CNT_NEW;
}

static __always_inline void steer_quic(struct steer_pkt *p, const struct config *cfg,
				       const __u8 *h, __u32 len, __u32 to, struct choice *c)
{
	if (len < UDP_HDR + 1)
		return;
	__u8 b0 = h[UDP_HDR];

	if (!(b0 & 0x80)) {
		/* Short header: no DCID length on the wire, hence a fixed L.
		 * Without the fixed bit it is not QUIC v1/v2. */
		if (!(b0 & 0x40) || len < UDP_HDR + 1 + steer_cid_len)
			return;
		__u32 slot = cid_slot(cfg, h, 1);

		if (slot)
			route_cid(h, 1, slot, c);
		return;
	}

	if (len < UDP_HDR + 6)
		return;
	__u32 version = ((__u32)h[UDP_HDR + 1] << 24) | ((__u32)h[UDP_HDR + 2] << 16) |
			((__u32)h[UDP_HDR + 3] << 8) | (__u32)h[UDP_HDR + 4];
	__u32 dlen = h[UDP_HDR + 5];
	int type = PT_UNKNOWN;

	if (version == QUIC_V1)
		type = (b0 >> 4) & 3;
	else if (version == QUIC_V2)
		/* RFC 9369: Initial=1, 0-RTT=2, Handshake=3, Retry=0. */
		type = ((b0 >> 4) + 3) & 3;
	/* v1 and v2 cap CIDs at 20 bytes: a longer one is nothing a
	 * generation accepts. */
	if (dlen > STEER_MAX_CID_LEN)
		type = PT_UNKNOWN;

	/* Handshake DCIDs are always server-chosen. */
	if (type == PT_HANDSHAKE && dlen == steer_cid_len && len >= UDP_HDR + 6 + dlen) {
		__u32 slot = cid_slot(cfg, h, 6);

		if (slot) {
			route_cid(h, 6, slot, c);
			return;
		}
	}
	quic_pinned(p, cfg, h, len, dlen, type, to, c);
}

/* Flow mode reads nothing but the source port (steer_load_sport), which
 * neither program needs a copy of the head for. */
static __always_inline void steer_flow(struct steer_pkt *p, const struct config *cfg,
				       __u32 to, struct choice *c)
{
	struct flow_key k = { .hash = steer_pkt_hash(p) };
	struct flow *f;
	__u64 now, idle = cfg->flow_idle_ns;

	if (steer_load_sport(p, &k.sport))
		return;
	now = now_ns();
	f = bpf_map_lookup_elem(&flows, &k);
	if (f && slot_current(cfg, f->slot, f->epoch) && now - f->last_seen < idle) {
		c->slot = f->slot;
		c->kind = STEER_CNT_PIN;
		/* Refresh at 1/8 of the timeout, not per datagram, so the
		 * entry's cache line stays shared between CPUs; the timeout
		 * is then effectively 7/8 to 8/8 of the setting. */
		if (now - f->last_seen > (idle >> 3))
			f->last_seen = now;
		return;
	}
	if (!slot_live(cfg, to))
		return;
	struct flow nf = {
		.slot = to,
		.epoch = cfg->epoch[to & (STEER_SLOTS - 1)],
		.last_seen = now,
	};
	bpf_map_update_elem(&flows, &k, &nf, BPF_ANY);
	c->slot = to;
	c->kind = STEER_CNT_NEW;
}

/* Bytes of the copy the QUIC parser reads for a datagram whose first
 * QUIC byte is b0 (see steer_quic and quic_pinned): a short header's
 * DCID, or a long header's version, DCID length and the DCID bytes that
 * a CID or a pin key takes. */
static __always_inline __u32 quic_head_need(__u8 b0)
{
	if (!(b0 & 0x80))
		return UDP_HDR + 1 + steer_cid_len;
	return UDP_HDR + 6 +
	       (steer_cid_len > STEER_PIN_CID_BYTES ? steer_cid_len : STEER_PIN_CID_BYTES);
}

#endif /* CLASSIFY_H */
