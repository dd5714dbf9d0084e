//go:build ignore

/* steer: the SO_REUSEPORT socket selector baton attaches to each UDP
 * listener's reuseport group. Every generation owns a slot (1..31) and
 * W sockets in the group; this program picks, per datagram, the generation
 * that knows the flow, or for new flows the working generation (or, for
 * its share of them, a canary generation).
 *
 * It must never return SK_PASS without having selected a socket: that makes
 * the kernel hash the datagram across every socket in the group, old
 * generations included. On any failure it falls back to the working slot,
 * then drops.
 *
 * User space (internal/steer's Group) owns all policy: it sets the group's
 * shape at load time, inserts sockets, and writes the config map (working
 * and canary slots, live slots, timeouts). How a datagram is classified,
 * with the structs and maps that takes, is classify.h's, shared with the
 * XDP program (xdp.c); the limits, the socket array and the counters are
 * steer.h's, shared with the TCP program (tcp.c). They reach user space
 * through the generated Go bindings.
 *
 * Cost: every call out of the program (a helper, or a map operation the
 * verifier does not inline) is the expensive part of a run, far more than
 * the parsing. The per-datagram paths therefore make as few as possible:
 * the clock is read inline (jiffies), addresses are only read where a
 * handshake is recorded or trusted, and the header is copied without a
 * helper whenever the kernel has it in the linear area. */

/* W sockets per slot, slot*W + worker. */
#define STEER_SOCKET_ENTRIES (STEER_SLOTS * STEER_MAX_WORKERS)

/* What classify.h's hooks read: everything is in the context. */
struct steer_pkt {
	struct sk_reuseport_md *ctx;
};

#include "classify.h"

/* W, 1..STEER_MAX_WORKERS, fixed when the group is made: the sockets each
 * generation has in the group. */
volatile const __u32 steer_workers = 1;

/* The kernel's reuseport hash: a ctx field, read where it is used. */
static __always_inline __u32 steer_pkt_hash(const struct steer_pkt *p)
{
	return p->ctx->hash;
}

/* The UDP header is always in the linear area by the time the socket
 * lookup runs (udp_rcv pulls it): no copy and no helper, but for a
 * packet the kernel did not lay out that way. */
static __always_inline int steer_load_sport(struct steer_pkt *p, __u16 *sport)
{
	__u8 *data = (void *)(long)p->ctx->data;
	__u8 *data_end = (void *)(long)p->ctx->data_end;

	if (data + UDP_HDR <= data_end) {
		*sport = *(__u16 *)data;
		return 0;
	}
	return bpf_skb_load_bytes(p->ctx, 0, sport, sizeof(*sport)) ? -1 : 0;
}

/* The exact addresses, for the QUIC handshake record only: a helper call. */
static __always_inline int steer_load_addrs(struct steer_pkt *p, struct addrs *a)
{
	struct sk_reuseport_md *ctx = p->ctx;

	if (ctx->eth_protocol == bpf_htons(ETH_P_IP)) {
		__u32 v4[2];

		if (bpf_skb_load_bytes_relative(ctx, 12, v4, sizeof(v4), BPF_HDR_START_NET))
			return -1;
		a->saddr[2] = bpf_htonl(0xffff);
		a->saddr[3] = v4[0];
		a->daddr[2] = bpf_htonl(0xffff);
		a->daddr[3] = v4[1];
		return 0;
	}
	if (ctx->eth_protocol == bpf_htons(ETH_P_IPV6))
		return bpf_skb_load_bytes_relative(ctx, 8, a, sizeof(*a), BPF_HDR_START_NET) ? -1 : 0;
	return -1;
}

/* Copies the head of the datagram (UDP header included) into hw, zero
 * past what was copied; returns 0 if what the parser will read is there.
 * The copy comes from the skb's linear area without a helper call: all
 * STEER_HDR_BYTES in the usual case, else whole words, which is enough
 * for the parser in most short datagrams (QUIC ACKs are often under 40
 * bytes with the UDP header). Only a head the linear area does not hold,
 * as from NICs that leave just the UDP header there, takes
 * bpf_skb_load_bytes. Packet offsets are immediates throughout: without
 * CAP_PERFMON the verifier refuses a packet pointer plus a register. */
static __always_inline int load_head(struct sk_reuseport_md *ctx, __u64 *hw, __u32 len)
{
	__u8 *data = (void *)(long)ctx->data;
	__u8 *data_end = (void *)(long)ctx->data_end;
	__u8 *h = (__u8 *)hw;
	__u32 n = 0, need;

	if (data + STEER_HDR_BYTES <= data_end) {
#pragma unroll
		for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
			hw[i] = ((__u64 *)data)[i];
		return 0;
	}
#pragma unroll
	for (int i = 0; i < STEER_HDR_BYTES / 8; i++)
		hw[i] = 0;
#pragma unroll
	for (int i = 0; i < STEER_HDR_BYTES / 8 - 1; i++) {
		if (data + 8 * i + 8 > data_end)
			break;
		hw[i] = ((__u64 *)data)[i];
		n = 8 * i + 8;
	}
	need = len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES;
	if (n > UDP_HDR && quic_head_need(h[UDP_HDR]) < need)
		need = quic_head_need(h[UDP_HDR]);
	if (n >= need)
		return 0;
	if (len < UDP_HDR)
		return -1;
	return bpf_skb_load_bytes(ctx, 0, h, len < STEER_HDR_BYTES ? len : STEER_HDR_BYTES);
}

SEC("sk_reuseport")
int steer(struct sk_reuseport_md *ctx)
{
	/* Off means "let the kernel hash". User space does not attach the
	 * program in that mode. */
	if (steer_mode == STEER_MODE_OFF)
		return SK_PASS;

	struct steer_pkt p = { .ctx = ctx };
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&config, &zero);

	if (!cfg)
		return SK_DROP;
	__u32 w = steer_workers;
	if (w == 0 || w > STEER_MAX_WORKERS)
		w = 1;
	__u32 working = cfg->working & (STEER_SLOTS - 1);
	/* Where a new flow or handshake would go; see new_slot for why it is
	 * computed here, for every datagram. */
	__u32 to = new_slot(&p, cfg, working);
	struct choice c = {
		.slot = working,
		.kind = STEER_CNT_FALLBACK,
		.worker = ctx->hash,
	};

	if (steer_mode == STEER_MODE_QUIC) {
		__u64 hw[STEER_HDR_BYTES / 8];
		__u32 len = ctx->len; /* UDP length: ctx->data is the UDP header */

		if (load_head(ctx, hw, len) == 0)
			steer_quic(&p, cfg, (__u8 *)hw, len, to, &c);
	} else if (steer_mode == STEER_MODE_FLOW) {
		steer_flow(&p, cfg, to, &c);
	}

	/* W is a load-time constant: with one worker the verifier drops
	 * the division. */
	__u32 worker = 0;

	if (w > 1)
		worker = c.worker % w;
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
