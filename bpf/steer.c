//go:build ignore

/* steer: the SO_REUSEPORT socket selector baton attaches to each UDP
 * listener's reuseport group. Every generation owns a slot (1..31) and
 * W sockets in the group; this program picks, per datagram, the generation
 * that knows the flow, or the working generation for new flows.
 *
 * It must never return SK_PASS without having selected a socket: that makes
 * the kernel hash the datagram across every socket in the group, old
 * generations included. On any failure it falls back to the working slot,
 * then drops.
 *
 * User space (udpdrain) owns all policy: it sets the group's shape at load
 * time, inserts sockets, and writes the config map (working slot, live
 * slots, timeouts). The structs and maps below reach it through the
 * generated Go bindings. */

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

/* Limits shared with user space (mirrored in limits.go). */
enum steer_limits {
	STEER_SLOTS = 32,      /* slot 0 means "none"; generations use 1..31 */
	STEER_MAX_WORKERS = 16,
	STEER_N_COUNTERS = 8,  /* counters per slot, indexed by steer_counter */
	STEER_MAX_CID_LEN = 20,
	STEER_PIN_CID_BYTES = 8,
	STEER_NO_WORKER = 0xff,
	/* Bytes of each datagram copied to the stack up front: the UDP
	 * header, then enough QUIC for a short or long header's 20-byte DCID
	 * (8 + 1 + 4 + 1 + 20 = 34). */
	STEER_HDR_BYTES = 40,
};

enum steer_mode {
	STEER_MODE_OFF = 0,
	STEER_MODE_FLOW = 1,
	STEER_MODE_QUIC = 2,
};

enum steer_counter {
	STEER_CNT_CID = 0,      /* slot read from a server-chosen QUIC CID */
	STEER_CNT_PIN = 1,      /* existing flow entry or Initial pin */
	STEER_CNT_NEW = 2,      /* new flow / new handshake to the working slot */
	STEER_CNT_FALLBACK = 3, /* unparseable, unknown or dead slot: working */
	STEER_CNT_ERROR = 4,    /* select on this slot failed (no socket) */
	STEER_CNT_DROP = 5,     /* slot 0 only: nothing could be selected */
};

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
 * and socket count are fixed when it starts. User space sets these at
 * load time (they live in the frozen .rodata map), so the verifier knows
 * their values: offsets into the header copy are then constants it can
 * check, dead modes are pruned, and no helper call is needed to read a
 * CID octet. */
volatile const __u32 steer_mode = STEER_MODE_OFF;
volatile const __u32 steer_workers = 1;         /* W, 1..STEER_MAX_WORKERS */
volatile const __u32 steer_cid_len = 8;         /* L, 1..STEER_MAX_CID_LEN */
volatile const __u32 steer_slot_offset = 0;     /* DCID octet with the slot, < L */
volatile const __u32 steer_slot_shift = 0;      /* slot bits within that octet */
volatile const __u32 steer_slot_mask = 0x1f;
volatile const __u32 steer_worker_offset = STEER_NO_WORKER; /* < L, or none */

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
};

struct tuple {
	__u32 saddr[4]; /* network order; IPv4 as v4-mapped IPv6 */
	__u32 daddr[4];
	__u16 sport;    /* network order */
	__u16 dport;
};

struct flow {
	__u32 slot;
	__u32 epoch;
	__u64 last_seen; /* coarse CLOCK_MONOTONIC ns */
};

struct pin_key {
	struct tuple tuple;
	__u8 dcid[STEER_PIN_CID_BYTES]; /* first DCID bytes, zero padded */
};

struct pin {
	__u32 slot;
	__u32 epoch;
	__u64 expires; /* coarse CLOCK_MONOTONIC ns */
};

struct {
	__uint(type, BPF_MAP_TYPE_REUSEPORT_SOCKARRAY);
	__uint(max_entries, STEER_SLOTS * STEER_MAX_WORKERS);
	__uint(key_size, sizeof(__u32));
	__uint(value_size, sizeof(__u64));
} sockets SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* Flow mode: 4-tuple -> slot. QUIC mode: 4-tuple -> slot its most recent
 * new handshake went to, which lets an Initial carrying an older
 * generation's CID (the client's Initial after a Retry) reach that
 * generation while a random client DCID that merely looks like one does
 * not. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tuple);
	__type(value, struct flow);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct pin_key);
	__type(value, struct pin);
} initials SEC(".maps");

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

static __always_inline int slot_live(const struct config *cfg, __u32 slot)
{
	return slot != 0 && slot < STEER_SLOTS && (cfg->live & (1u << slot));
}

/* A flow entry or pin is only valid for the generation that made it. */
static __always_inline int slot_current(const struct config *cfg, __u32 slot, __u32 epoch)
{
	return slot_live(cfg, slot) && cfg->epoch[slot & (STEER_SLOTS - 1)] == epoch;
}

/* Timestamps only need to resolve idle and pin timeouts of a second or
 * more; the coarse clock costs a fraction of bpf_ktime_get_ns. */
static __always_inline __u64 now_ns(void)
{
	return bpf_ktime_get_coarse_ns();
}

struct choice {
	__u32 slot;
	__u32 kind;
	__u32 worker; /* taken modulo W at the end */
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

static __always_inline int load_tuple(struct sk_reuseport_md *ctx, const __u8 *h,
				      struct tuple *t)
{
	/* Ports from the UDP header copy; like the addresses they stay in
	 * network order. */
	t->sport = (__u16)h[0] | ((__u16)h[1] << 8);
	t->dport = (__u16)h[2] | ((__u16)h[3] << 8);
	if (ctx->eth_protocol == bpf_htons(ETH_P_IP)) {
		__u32 a[2];

		if (bpf_skb_load_bytes_relative(ctx, 12, a, sizeof(a), BPF_HDR_START_NET))
			return -1;
		t->saddr[2] = bpf_htonl(0xffff);
		t->saddr[3] = a[0];
		t->daddr[2] = bpf_htonl(0xffff);
		t->daddr[3] = a[1];
		return 0;
	}
	if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6))
		return bpf_skb_load_bytes_relative(ctx, 8, t->saddr, 32, BPF_HDR_START_NET) ? -1 : 0;
	return -1;
}

/* Long-header packets not routed by CID. A pin from an earlier Initial of
 * the same handshake (4-tuple + first DCID bytes) wins; else the working
 * slot. Only Initial and 0-RTT create pins: they are what a client
 * retransmits with the same DCID across a flip. */
static __always_inline void quic_pinned(struct sk_reuseport_md *ctx, const struct config *cfg,
					const __u8 *h, __u32 len, __u32 dlen, int type,
					__u32 working, struct choice *c)
{
	struct pin_key key = {};
	struct pin *p;
	__u64 now;

	if (load_tuple(ctx, h, &key.tuple))
		return;
	/* DCID bytes start at h[14]; h is zero past the datagram's end. */
#pragma unroll
	for (__u32 i = 0; i < STEER_PIN_CID_BYTES; i++)
		if (i < dlen)
			key.dcid[i] = h[UDP_HDR + 6 + i];

	now = now_ns();
	p = bpf_map_lookup_elem(&initials, &key);
	if (p && slot_current(cfg, p->slot, p->epoch) && now < p->expires) {
		c->slot = p->slot;
		c->kind = STEER_CNT_PIN;
		return;
	}
	if (type != PT_INITIAL && type != PT_ZERO_RTT)
		return;

	/* An Initial or 0-RTT whose DCID has the server CID shape and names
	 * a live older slot continues a handshake that generation started
	 * (after its Retry, or once its first Initial arrived) if, and only
	 * if, that generation took this 4-tuple's new handshake recently. A
	 * random client DCID names a given slot about 1 time in 37, and must
	 * not be sent to a draining generation that ignores new
	 * connections. */
	if (dlen == steer_cid_len && len >= UDP_HDR + 6 + dlen) {
		__u32 cs = cid_slot(cfg, h, 6);

		if (cs && cs != working) {
			struct flow *f = bpf_map_lookup_elem(&flows, &key.tuple);

			if (f && f->slot == cs && slot_current(cfg, cs, f->epoch) &&
			    now - f->last_seen < cfg->initial_pin_ns) {
				route_cid(h, 6, cs, c);
				return;
			}
		}
	}

	if (!slot_live(cfg, working))
		return;
	__u32 epoch = cfg->epoch[working & (STEER_SLOTS - 1)];
	struct pin pin = {
		.slot = working,
		.epoch = epoch,
		.expires = now + cfg->initial_pin_ns,
	};
	struct flow hs = {
		.slot = working,
		.epoch = epoch,
		.last_seen = now,
	};
	bpf_map_update_elem(&initials, &key, &pin, BPF_ANY);
	bpf_map_update_elem(&flows, &key.tuple, &hs, BPF_ANY);
	c->kind = STEER_CNT_NEW;
}

static __always_inline void steer_quic(struct sk_reuseport_md *ctx, const struct config *cfg,
				       const __u8 *h, __u32 len, __u32 working, struct choice *c)
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
	quic_pinned(ctx, cfg, h, len, dlen, type, working, c);
}

static __always_inline void steer_flow(struct sk_reuseport_md *ctx, const struct config *cfg,
				       const __u8 *h, __u32 working, struct choice *c)
{
	struct tuple t = {};
	struct flow *f;
	__u64 now, idle = cfg->flow_idle_ns;

	if (load_tuple(ctx, h, &t))
		return;
	now = now_ns();
	f = bpf_map_lookup_elem(&flows, &t);
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
	if (!slot_live(cfg, working))
		return;
	struct flow nf = {
		.slot = working,
		.epoch = cfg->epoch[working & (STEER_SLOTS - 1)],
		.last_seen = now,
	};
	bpf_map_update_elem(&flows, &t, &nf, BPF_ANY);
	c->kind = STEER_CNT_NEW;
}

SEC("sk_reuseport")
int steer(struct sk_reuseport_md *ctx)
{
	/* Off means "let the kernel hash". User space does not attach the
	 * program in that mode. */
	if (steer_mode == STEER_MODE_OFF)
		return SK_PASS;

	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg)
		return SK_DROP;
	__u32 w = steer_workers;
	if (w == 0 || w > STEER_MAX_WORKERS)
		w = 1;
	__u32 working = cfg->working & (STEER_SLOTS - 1);
	struct choice c = {
		.slot = working,
		.kind = STEER_CNT_FALLBACK,
		.worker = ctx->hash,
	};

	__u64 hw[STEER_HDR_BYTES / 8] = {};
	__u8 *h = (__u8 *)hw;
	__u32 len = ctx->len; /* UDP length: ctx->data is the UDP header */
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	int loaded = 0;

	/* Usually the head of the datagram is in the skb's linear area and
	 * can be copied without a helper call; NICs that put the payload in
	 * page fragments leave only the UDP header there. */
	if (data + STEER_HDR_BYTES <= data_end) {
#pragma unroll
		for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
			hw[i] = ((__u64 *)data)[i];
		loaded = 1;
	} else if (len >= UDP_HDR) {
		__u32 n = len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES;

		loaded = bpf_skb_load_bytes(ctx, 0, h, n) == 0;
	}
	if (loaded) {
		if (steer_mode == STEER_MODE_QUIC)
			steer_quic(ctx, cfg, h, len, working, &c);
		else if (steer_mode == STEER_MODE_FLOW)
			steer_flow(ctx, cfg, h, working, &c);
	}

	__u32 worker = c.worker % w;
	__u32 idx = (c.slot & (STEER_SLOTS - 1)) * w + worker;

	if (bpf_sk_select_reuseport(ctx, &sockets, &idx, 0) == 0) {
		count(c.slot, c.kind);
		return SK_PASS;
	}
	count(c.slot, STEER_CNT_ERROR);
	if (c.slot != working) {
		idx = working * w + worker;
		if (bpf_sk_select_reuseport(ctx, &sockets, &idx, 0) == 0) {
			count(working, STEER_CNT_FALLBACK);
			return SK_PASS;
		}
		count(working, STEER_CNT_ERROR);
	}
	count(0, STEER_CNT_DROP);
	return SK_DROP;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
