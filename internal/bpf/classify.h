/* classify.h: where a UDP datagram of a steered listener goes, shared by
 * the two programs that steer one: steer.c, the sk_reuseport selector of
 * UDP and QUIC listeners, and xdp.c, the XDP program of AF_XDP listeners.
 * Both decide the same way, from the same load-time constants and the same
 * maps (config, flows, tuples, initials, and steer.h's counters), so user space
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
/* The tables' shapes (see "The tables" below): buckets - 1 of flows and of
 * initials, each a power of two, and the unit of the entries' clock,
 * 2^steer_time_shift ns, chosen by user space from the mode's timeout. */
volatile const __u32 steer_flow_mask = 8191;
volatile const __u32 steer_pin_mask = 2047;
volatile const __u32 steer_time_shift = 20; /* ~1 ms: timeouts of 16 ms to hours */

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
 * The tables keep 24 bits of a key (the tag) and the bucket it picks
 * ("The tables" below): two keys match as one when both agree, which for
 * a new flow and the other entries of its bucket happens about once in
 * 2^21 new flows. Different 4-tuples can also share a whole key. On the
 * hash alone a full table of 65536 flows would hold such a pair about
 * every other time; with the port (when sources pick ports at random)
 * about once in 2^16. IPv6 hashes
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
 *   - Initial pins add the first 8 DCID bytes to the key (pin_fp),
 *     random in a client's first Initials
 *     (RFC 9000 7.2: at least 8 unpredictable bytes) and in the CIDs a
 *     server issues: in practice a pin matches only datagrams of its own
 *     handshake.
 *   - QUIC mode's record of a 4-tuple's latest handshake (in flows)
 *     decides whether an Initial that names an older generation's CID may
 *     go there, which a random client DCID must not. It keeps the exact
 *     addresses and is only used for that when they match (each handshake
 *     has its own pin besides). So a shared key can make the record miss
 *     (as an evicted one does: the Initial goes to the working
 *     generation), never send a handshake to a generation that did not
 *     take it.
 *
 * The struct is the key's layout, for reading; the tables take its two
 * fields through key_fp. */
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

/* The tables.
 *
 * flows and initials are ARRAY maps of buckets, each bucket STEER_WAYS
 * ways, and a way is one 64-bit word that holds a whole entry:
 *
 *   63        40 39        15 14      5 4    0
 *   +-----------+------------+---------+------+
 *   |    tag    |    time    |  epoch  | slot |
 *   +-----------+------------+---------+------+
 *
 * A key (struct flow_key; a pin adds its DCID bytes) is mixed into 64
 * bits (key_fp): the low bits pick the bucket, the top 24 are the tag.
 * time is the entry's last use (a pin's start) in units of
 * 2^steer_time_shift ns, modulo 2^25; epoch is the low 10 bits of the
 * generation's epoch; slot 0 means an empty way (a valid entry has slot
 * 1..31, so an entry is never the word 0).
 *
 * Why an array: the verifier inlines a lookup in an ARRAY map to a bounds
 * check and an add, where a hash map's lookup, and above all its insert,
 * are calls (and every call out of the program is expensive: see steer.c).
 * A lookup here is a mix, one inlined lookup and a scan of one 64-byte
 * cache line; an insert is the same scan and one compare-and-swap.
 *
 * Concurrency: every CPU reads and writes the words without a lock. A
 * word is read with one 64-bit load and written with one 64-bit
 * compare-and-swap, so a reader sees some entry whole, never one flow's
 * tag with another flow's slot, epoch or time. A writer replaces only the
 * word it judged replaceable: if another CPU changed that way in between,
 * the swap fails and nothing is written (the datagram is then counted as
 * unrecorded, and the next one of its flow tries again). In particular no
 * write can overwrite an entry that another CPU has just made.
 *
 * Eviction (insert_way): an entry may only be replaced when the datagrams
 * it routes go to the same place without it. That is so for an empty way,
 * an entry that has expired or whose generation is gone (its slot is dead
 * or holds a newer epoch), and, while there is no canary, an entry of the
 * working slot: its flow's next datagram is new and goes to the working
 * slot again. Among those the order is: the key's own old entry or an
 * empty way, an expired or dead one, then the working slot's least
 * recently used one. A live entry of any other slot (a draining generation's, or the
 * canary's, and the working slot's own while a canary takes a share,
 * since a new flow might then go to the canary) is never replaced. When a
 * bucket holds nothing else, the new flow or handshake is not recorded:
 * its datagram still goes where a new one goes, and is counted as
 * STEER_CNT_UNRECORDED on that slot as well as NEW; its next datagram
 * tries again.
 *
 * Entries of a released generation whose slot was given again to a
 * generation 1024 epochs later would match it again; the slot's
 * generations would have to come and go 1024 times within one timeout. The
 * clock wraps after 2^25 units, about a million timeouts: an entry left
 * untouched that long may look fresh for one timeout. */
#define STEER_WAYS 8
#define ENT_SLOT_MASK 0x1fULL
#define ENT_EPOCH_SHIFT 5
#define ENT_EPOCH_MASK 0x3ffULL
#define ENT_TIME_SHIFT 15
#define ENT_TIME_MASK 0x1ffffffULL
#define ENT_TAG_MASK (~0ULL << 40)

/* The datagram programs' counters use none of the TCP program's kinds:
 * STEER_CNT_MIGRATE's index counts, per slot, the new flows and
 * handshakes sent there that the tables had no room to record (see
 * "Eviction" above). */
#define STEER_CNT_UNRECORDED STEER_CNT_MIGRATE

/* A bucket of initials: Initial pins, key struct flow_key and the first
 * DCID bytes. */
struct pin_bucket {
	__u64 way[STEER_WAYS];
};

/* A bucket of flows in flow mode (the tuples map), key struct flow_key:
 * words alone, one cache line, so that a table of many flows spans as
 * few pages (TLB entries) as it can. */
struct tuple_bucket {
	__u64 way[STEER_WAYS];
};

/* A bucket of QUIC records (the flows map), key struct flow_key: an
 * entry is the 4-tuple's record of its latest new handshake, for which
 * the way's rec holds the exact addresses and check, the word they were
 * written for (see record_put). The words come first: they are all a
 * lookup reads; a record's two parts are together, on one or two cache
 * lines, on the page of its word more often than not. */
struct flow_rec {
	__u64 check;
	struct addrs addrs;
};

struct flow_bucket {
	__u64 way[STEER_WAYS];
	struct flow_rec rec[STEER_WAYS];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* QUIC mode: 4-tuple (struct flow_key) -> slot its most recent new
 * handshake went to, which lets an Initial carrying an older generation's
 * CID (the client's Initial after a Retry) reach that generation while a
 * random client DCID that merely looks like one does not. Buckets: user
 * space sets max_entries to steer_flow_mask + 1 (flow mode: 1, unused). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct flow_bucket);
} flows SEC(".maps");

/* Flow mode: 4-tuple (struct flow_key) -> slot. Buckets: as flows, which
 * it stands for in flow mode (QUIC mode: 1, unused). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 8192);
	__type(key, __u32);
	__type(value, struct tuple_bucket);
} tuples SEC(".maps");

/* QUIC mode: pins of new handshakes (4-tuple and first DCID bytes) to
 * the generation that took their first Initial, so that their
 * retransmitted Initials follow it. Buckets: steer_pin_mask + 1. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2048);
	__type(key, __u32);
	__type(value, struct pin_bucket);
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


/* The 64 bits a key is known by in a table: the low bits pick the
 * bucket, the top 24 are the tag. hash is already a keyed hash of the
 * 4-tuple (steer_pkt_hash), uniform over 32 bits, so one multiply and a
 * fold spread it and the port over both ends; a pin adds its DCID bytes,
 * random in a client's first Initials, with a second round. */
static __always_inline __u64 key_fp(__u32 hash, __u16 sport)
{
	__u64 x = ((__u64)hash << 16 | sport) * 0x9e3779b97f4a7c15ULL;

	return x ^ (x >> 29);
}

static __always_inline __u64 pin_fp(__u64 flow_fp, __u64 dcid)
{
	__u64 x = (flow_fp ^ dcid) * 0xff51afd7ed558ccdULL;

	return x ^ (x >> 32);
}

static __always_inline __u32 ent_slot(__u64 w)
{
	return w & ENT_SLOT_MASK;
}

/* The entry's age in clock units (see "The tables"). */
static __always_inline __u64 ent_age(__u64 w, __u64 now_u)
{
	return (now_u - (w >> ENT_TIME_SHIFT)) & ENT_TIME_MASK;
}

/* The word of a new entry for slot, stamped now_u. */
static __always_inline __u64 ent_make(const struct config *cfg, __u64 fp, __u32 slot, __u64 now_u)
{
	__u64 epoch = cfg->epoch[slot & (STEER_SLOTS - 1)] & ENT_EPOCH_MASK;

	return (fp & ENT_TAG_MASK) | (now_u & ENT_TIME_MASK) << ENT_TIME_SHIFT |
	       epoch << ENT_EPOCH_SHIFT | (slot & ENT_SLOT_MASK);
}

/* Hides from clang what it knows of var, at no cost (no instruction).
 * Two uses: keep it from turning arithmetic that computes a 0 or a 1
 * back into a comparison, which BPF can only do with a branch (see
 * pick_way); and keep it from turning the cases of a switch on a way
 * into one map value pointer plus the way's offset, an add that without
 * CAP_PERFMON the verifier refuses where paths bring different offsets
 * (see WAY_PTR). */
#define hide(var) asm volatile("" : "+r"(var))

/* 1 if x is 0, else 0, without a branch. */
static __always_inline __u64 is_zero(__u64 x)
{
	__u64 t = x | -x;

	hide(t);
	return (t >> 63) ^ 1;
}

/* 1 if x < y, else 0, for x and y below 2^63, without a branch. */
static __always_inline __u64 is_less(__u64 x, __u64 y)
{
	__u64 d = x - y;

	hide(d);
	return d >> 63;
}

/* 1 if the addresses are equal, else 0. Read as 64-bit words: struct
 * addrs is 8-byte aligned. */
static __always_inline __u64 addrs_equal(const struct addrs *x, const struct addrs *y)
{
	const __u64 *a = (const __u64 *)x, *b = (const __u64 *)y;
	__u64 diff = 0;

#pragma unroll
	for (int i = 0; i < 4; i++)
		diff |= a[i] ^ b[i];
	return is_zero(diff);
}

/* 1 if the entry is honoured, else 0: its generation holds its slot
 * still, and it has not been idle (a pin: alive) for tmo_u units or more.
 * live is cfg->live. No branch (see pick_way). Its values are 64-bit
 * (hide): clang spills what does not fit in registers, and a 32-bit spill
 * over a stack slot where a pointer was spilled is refused without
 * CAP_PERFMON. */
static __always_inline __u64 ent_valid(const struct config *cfg, __u64 live, __u64 w, __u64 now_u,
				       __u64 tmo_u)
{
	__u64 slot = ent_slot(w);
	__u64 epoch = cfg->epoch[slot & (STEER_SLOTS - 1)];

	hide(epoch);
	return (live >> slot) & 1 & (is_zero(slot) ^ 1) & /* slot 0 is "none" */
	       is_zero((epoch ^ (w >> ENT_EPOCH_SHIFT)) & ENT_EPOCH_MASK) &
	       is_less(ent_age(w, now_u), tmo_u);
}

/* The way of bucket ways that holds a valid entry of the key fp, or
 * STEER_WAYS. Each word is read once, whole. */
static __always_inline __u64 find_way(const struct config *cfg, __u64 *ways, __u64 fp, __u64 now_u,
				      __u64 tmo_u, __u64 *w)
{
	__u64 tag = fp & ENT_TAG_MASK;
	__u64 live = cfg->live;

	hide(live);
#pragma unroll
	for (__u32 i = 0; i < STEER_WAYS; i++) {
		__u64 o = *(volatile __u64 *)&ways[i];

		if ((o & ENT_TAG_MASK) == tag && ent_valid(cfg, live, o, now_u, tmo_u)) {
			*w = o;
			return i;
		}
	}
	return STEER_WAYS;
}

/* Picks the way of bucket ways that a new entry of the key fp may take
 * (see "Eviction" above), or STEER_WAYS if none may be taken; *old is
 * the word it holds. The key's own (invalid) entry or an empty way,
 * whichever comes first, if there is one; else each way gets a rank, and
 * the highest wins, the first of equals: an invalid entry, then a working
 * slot's entry by age, and none for the rest. The ranking has no branch:
 * a branch per way would make the verifier walk every combination of the
 * ways' outcomes. */
static __always_inline __u64 pick_way(const struct config *cfg, __u64 *ways, __u64 fp, __u64 now_u,
				      __u64 tmo_u, __u64 *old)
{
	__u64 live = cfg->live;
	__u64 working = cfg->working & (STEER_SLOTS - 1);
	/* With a live canary, a new flow may go to either slot: nothing live
	 * can be replaced. */
	__u64 canary = cfg->canary & (STEER_SLOTS - 1);
	__u64 permille = cfg->canary_permille;

	hide(live);
	hide(working);
	hide(canary);
	hide(permille);
	__u64 canary_on = (live >> canary) & 1 & (is_zero(canary) ^ 1) & (is_zero(permille) ^ 1);
	__u64 evict_working = (is_zero(working) | canary_on) ^ 1;
	__u64 best = 0, way = STEER_WAYS, o_best = 0;

	/* The usual case first, and cheaply: the key's own entry (a flow
	 * back after idling) or an empty way. */
#pragma unroll
	for (__u32 i = 0; i < STEER_WAYS; i++) {
		__u64 o = *(volatile __u64 *)&ways[i];

		if (o == 0 || ((o ^ fp) & ENT_TAG_MASK) == 0) {
			*old = o;
			return i;
		}
	}
#pragma unroll
	for (__u32 i = 0; i < STEER_WAYS; i++) {
		__u64 o = *(volatile __u64 *)&ways[i];
		__u64 empty = is_zero(o);
		__u64 valid = ent_valid(cfg, live, o, now_u, tmo_u);
		__u64 own = is_zero((o ^ fp) & ENT_TAG_MASK);
		__u64 stale = (empty | valid) ^ 1;
		__u64 old_wk = valid & evict_working & is_zero(ent_slot(o) ^ working);
		__u64 rank = (empty * 3 + stale * (2 + 2 * own)) << 32 |
			     (-old_wk & (1ULL << 32 | ent_age(o, now_u)));
		__u64 take = -is_less(best, rank);

		best ^= (best ^ rank) & take;
		way ^= (way ^ i) & take;
		o_best ^= (o_best ^ o) & take;
		hide(way);
	}
	*old = o_best;
	return way;
}

/* Runs CASE(n) for way n, 0..STEER_WAYS-1, nothing for others: each
 * case at constant offsets into the bucket (hide keeps clang from merging
 * the cases into one add of a variable offset, which without CAP_PERFMON
 * the verifier refuses where paths bring different offsets). The cases
 * do all their work on the way inside, so that the paths join again with
 * nothing that tells them apart but a result. */
#define WAY_SWITCH(way, CASE)                                         \
	switch (way) {                                                \
		CASE(0) CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) \
	default:                                                      \
		break;                                                \
	}

/* Replaces way's word old with w; 0 if it did, 1 if another CPU changed
 * the way since old was read. (The flags of these functions are 64-bit
 * for the reason given at ent_valid.) */
static __always_inline __u64 put_way(__u64 *ways, __u64 way, __u64 old, __u64 w)
{
	__u64 failed = 1;

#define PUT_CASE(n)                                                     \
	case n: {                                                       \
		__u64 *p = &ways[n];                                    \
		hide(p);                                                \
		failed = __sync_val_compare_and_swap(p, old, w) != old; \
		break;                                                  \
	}
	WAY_SWITCH(way, PUT_CASE)
#undef PUT_CASE
	return failed;
}

/* Records a new entry w of the key fp in bucket ways; 1 if it could not. */
static __always_inline __u64 insert_way(const struct config *cfg, __u64 *ways, __u64 fp, __u64 now_u,
				      __u64 tmo_u, __u64 w)
{
	__u64 old = 0;
	__u64 way = pick_way(cfg, ways, fp, now_u, tmo_u, &old);

	return put_way(ways, way, old, w);
}

/* Moves a found entry's time to now_u, if it is older than 1/8 of the
 * timeout: not per datagram, so that the bucket's cache line stays shared
 * between CPUs (the timeout is then effectively 7/8 to 8/8 of the
 * setting). A failed swap means another CPU wrote the way: nothing to do. */
static __always_inline void touch_way(__u64 *ways, __u64 way, __u64 w, __u64 now_u, __u64 tmo_u)
{
	if (ent_age(w, now_u) <= (tmo_u >> 3))
		return;
	put_way(ways, way, w,
		(w & ~(ENT_TIME_MASK << ENT_TIME_SHIFT)) | (now_u & ENT_TIME_MASK) << ENT_TIME_SHIFT);
}

/* find_way without a branch, for the QUIC record: its callers go on to
 * do a good deal with the way found, and nine paths out of a lookup
 * would each be walked through all of it by the verifier. */
static __always_inline __u64 find_way_flat(const struct config *cfg, __u64 *ways, __u64 fp,
					   __u64 now_u, __u64 tmo_u, __u64 *w)
{
	__u64 live = cfg->live, found = 0, way = STEER_WAYS, wf = 0;

	hide(live);
#pragma unroll
	for (__u32 i = 0; i < STEER_WAYS; i++) {
		__u64 o = *(volatile __u64 *)&ways[i];
		__u64 m = is_zero((o ^ fp) & ENT_TAG_MASK) & ent_valid(cfg, live, o, now_u, tmo_u) &
			  (found ^ 1);
		__u64 take = -m;

		way ^= (way ^ i) & take;
		wf ^= (wf ^ o) & take;
		found |= m;
		hide(way);
	}
	*w = wf;
	return way;
}

/* A QUIC record's addresses (struct flow_bucket) are too wide for its
 * word, so they are kept beside it, with check, a sequence word, around
 * them: the writer sets check to 0, writes the addresses, sets check to
 * the word it is about to swap in, then swaps the word in; a reader that
 * found the word w reads check, the addresses, and check again, and
 * trusts the addresses only if both reads of check are w. A torn read, or
 * a way taken over meanwhile, then reads as "other addresses", which makes
 * the record miss (as an evicted one does): it can never lend one 4-tuple's
 * record to another. The writer's stores to check are atomic exchanges,
 * which order the stores around them on every architecture. */
static __always_inline __u64 record_addrs_equal(struct flow_bucket *b, __u64 way, __u64 w,
						const struct addrs *a)
{
	__u64 eq = 0;

#define EQ_CASE(n)                                                            \
	case n: {                                                             \
		__u64 *check = &b->rec[n].check;                              \
		struct addrs *ra = &b->rec[n].addrs;                          \
		hide(check);                                                  \
		hide(ra);                                                     \
		__u64 c1 = *(volatile __u64 *)check;                          \
		eq = addrs_equal(ra, a);                                      \
		__u64 c2 = *(volatile __u64 *)check;                          \
		eq &= is_zero(c1 ^ w) & is_zero(c2 ^ w);                      \
		break;                                                        \
	}
	WAY_SWITCH(way, EQ_CASE)
#undef EQ_CASE
	return eq;
}

static __always_inline __u64 record_put(struct flow_bucket *b, __u64 way, __u64 old, __u64 w,
					const struct addrs *a)
{
	__u64 failed = 1;

#define PUT_CASE(n)                                                            \
	case n: {                                                              \
		__u64 *word = &b->way[n], *check = &b->rec[n].check;           \
		struct addrs *ra = &b->rec[n].addrs;                           \
		hide(word);                                                    \
		hide(check);                                                   \
		hide(ra);                                                      \
		__sync_lock_test_and_set(check, 0);                            \
		*ra = *a;                                                      \
		__sync_lock_test_and_set(check, w);                            \
		failed = __sync_val_compare_and_swap(word, old, w) != old;     \
		break;                                                         \
	}
	WAY_SWITCH(way, PUT_CASE)
#undef PUT_CASE
	return failed;
}

/* What a table insert takes (the functions below have one argument). */
struct table_insert {
	__u64 fp;    /* the key's, see key_fp */
	__u64 now_u; /* the clock, in table units */
	__u64 tmo_u; /* the timeout, in table units */
	__u64 w;     /* the new entry */
	/* steer_record_insert only: the 4-tuple's own record's way, if
	 * found (else STEER_WAYS), and its word; and its addresses. */
	__u64 way;
	__u64 old;
	struct addrs addrs;
};

/* Inserts are global functions, which the verifier checks once, on
 * their own, instead of once for every path that reaches them through
 * the program: each is a scan of a bucket and a switch over its ways,
 * and the paths into them multiply. A call costs a few nanoseconds, on
 * the paths of a new flow or handshake only. Each looks up its map (and
 * the config) itself: a pointer passed in would be plain memory, and
 * without CAP_PERFMON the verifier refuses a variable offset into that.
 * They return 1 when the entry could not be recorded. */
__attribute__((noinline)) int steer_flow_insert(struct table_insert *t)
{
	__u32 zero = 0;

	if (!t)
		return 1;
	__u32 idx = t->fp & steer_flow_mask;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct tuple_bucket *b = bpf_map_lookup_elem(&tuples, &idx);

	if (!cfg || !b)
		return 1;
	return insert_way(cfg, b->way, t->fp, t->now_u, t->tmo_u, t->w);
}

__attribute__((noinline)) int steer_pin_insert(struct table_insert *t)
{
	__u32 zero = 0;

	if (!t)
		return 1;
	__u32 idx = t->fp & steer_pin_mask;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct pin_bucket *b = bpf_map_lookup_elem(&initials, &idx);

	if (!cfg || !b)
		return 1;
	return insert_way(cfg, b->way, t->fp, t->now_u, t->tmo_u, t->w);
}

/* A QUIC record: into the 4-tuple's own way if it has one (t->way), its
 * latest handshake replacing the one it names, else as insert_way picks. */
__attribute__((noinline)) int steer_record_insert(struct table_insert *t)
{
	__u32 zero = 0;

	if (!t)
		return 1;
	__u32 idx = t->fp & steer_flow_mask;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);
	struct flow_bucket *b = bpf_map_lookup_elem(&flows, &idx);

	if (!cfg || !b)
		return 1;
	__u64 old = t->old, way = t->way;

	if (way >= STEER_WAYS)
		way = pick_way(cfg, b->way, t->fp, t->now_u, t->tmo_u, &old);
	return record_put(b, way, old, t->w, &t->addrs);
}

/* Long-header packets not routed by CID. A pin from an earlier Initial of
 * the same handshake (4-tuple + first DCID bytes) wins; else the working
 * slot, or the canary (see new_slot). Only Initial and 0-RTT create pins:
 * they are what a client retransmits with the same DCID across a flip or
 * a change of the canary. A new handshake writes its pin in initials and
 * the 4-tuple's record in flows: two words, no allocation. */
static __always_inline void quic_pinned(struct steer_pkt *p, const struct config *cfg,
					const __u8 *h, __u32 len, __u32 dlen, int type,
					__u32 to, struct choice *c)
{
	__u16 sport = *(const __u16 *)h;
	const __u64 *hw = (const __u64 *)h; /* the head copy is 64-bit words */
	__u64 dcid = 0, dl = dlen;

	/* DCID bytes start at h[14]; h is zero past the datagram's end.
	 * The first dlen of them, byte i at bits 8i, from two words and
	 * without a branch per byte (whose paths, each knowing dlen's range,
	 * the verifier would walk apart). */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	dcid = hw[1] >> 48 | hw[2] << 16;
#else
#pragma unroll
	for (__u32 i = 0; i < STEER_PIN_CID_BYTES; i++)
		dcid |= (__u64)h[UDP_HDR + 6 + i] << (8 * i);
	(void)hw;
#endif
	hide(dl);
	__u64 short_dcid = is_less(dl, STEER_PIN_CID_BYTES);

	dcid &= (((1ULL << ((dl & 7) * 8)) - 1) & -short_dcid) | (short_dcid - 1);

	__u64 ffp = key_fp(steer_pkt_hash(p), sport);
	__u64 pfp = pin_fp(ffp, dcid);
	__u32 pidx = pfp & steer_pin_mask;
	struct pin_bucket *pb = bpf_map_lookup_elem(&initials, &pidx);

	if (!pb)
		return;
	__u64 shift = steer_time_shift & 63;
	__u64 now_u = now_ns() >> shift;
	__u64 tmo_u = cfg->initial_pin_ns >> shift;
	__u64 pw = 0;

	if (find_way(cfg, pb->way, pfp, now_u, tmo_u, &pw) < STEER_WAYS) {
		c->slot = ent_slot(pw);
		c->kind = STEER_CNT_PIN;
		return;
	}
	if (type != PT_INITIAL && type != PT_ZERO_RTT)
		return;

	/* A DCID in the server CID shape that names a live slot is a
	 * server's CID (or, 1 time in 37, a client's random one that looks
	 * like it). */
	__u32 cs = 0;

	if (dlen == steer_cid_len && len >= UDP_HDR + 6 + dlen)
		cs = cid_slot(cfg, h, 6);
	/* From here on the record is trusted for where a handshake goes or
	 * written, which takes the exact addresses. */
	/* The insert's arguments hold the addresses from the start: one
	 * copy on the stack, which the program and the insert share. */
	struct table_insert t = {};

	if (steer_load_addrs(p, &t.addrs))
		return;
	__u32 ridx = ffp & steer_flow_mask;
	struct flow_bucket *rb = bpf_map_lookup_elem(&flows, &ridx);

	if (!rb)
		return;
	__u64 rw = 0;
	__u64 rway = find_way_flat(cfg, rb->way, ffp, now_u, tmo_u, &rw);
	__u64 same_tuple = rway < STEER_WAYS && record_addrs_equal(rb, rway, rw, &t.addrs);

	/* An Initial or 0-RTT whose DCID has the server CID shape and names
	 * a live slot other than the one a new handshake would go to
	 * continues a handshake that generation started (after its Retry,
	 * or once its first Initial arrived) if, and only if, that
	 * generation took this 4-tuple's new handshake recently: an older
	 * generation, or the working one or the canary when the canary
	 * changed since. A random client DCID names a given slot about 1
	 * time in 37, and must not be sent to a draining generation that
	 * ignores new connections. */
	if (same_tuple && cs && cs != to && ent_slot(rw) == cs) {
		route_cid(h, 6, cs, c);
		return;
	}

	if (!slot_live(cfg, to))
		return;
	t.fp = pfp;
	t.now_u = now_u;
	t.tmo_u = tmo_u;
	t.w = ent_make(cfg, pfp, to, now_u);
	__u64 lost = steer_pin_insert(&t);

	if (same_tuple && ent_slot(rw) == to) {
		/* Another handshake of a 4-tuple whose latest one went to the
		 * same generation: the record's time moves. */
		touch_way(rb->way, rway, rw, now_u, tmo_u);
	} else {
		/* The record names this 4-tuple's latest handshake: its own
		 * older record (found valid or not) is the way it takes. */
		t.fp = ffp;
		t.w = ent_make(cfg, ffp, to, now_u);
		t.way = rway;
		t.old = rw;
		lost |= steer_record_insert(&t);
	}
	c->slot = to;
	c->kind = STEER_CNT_NEW;
	if (lost)
		count(to, STEER_CNT_UNRECORDED);
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
	__u16 sport;

	if (steer_load_sport(p, &sport))
		return;
	__u64 fp = key_fp(steer_pkt_hash(p), sport);
	__u32 idx = fp & steer_flow_mask;
	struct tuple_bucket *b = bpf_map_lookup_elem(&tuples, &idx);

	if (!b)
		return;
	__u64 shift = steer_time_shift & 63;
	__u64 now_u = now_ns() >> shift;
	__u64 tmo_u = cfg->flow_idle_ns >> shift;
	__u64 w = 0;
	__u64 way = find_way(cfg, b->way, fp, now_u, tmo_u, &w);

	if (way < STEER_WAYS) {
		c->slot = ent_slot(w);
		c->kind = STEER_CNT_PIN;
		touch_way(b->way, way, w, now_u, tmo_u);
		return;
	}
	if (!slot_live(cfg, to))
		return;
	struct table_insert t = {
		.fp = fp,
		.now_u = now_u,
		.tmo_u = tmo_u,
		.w = ent_make(cfg, fp, to, now_u),
	};

	if (steer_flow_insert(&t))
		count(to, STEER_CNT_UNRECORDED);
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
