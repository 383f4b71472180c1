/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* conn.c - the state machine of one device's akenza connection (see akz_conn.h). */
#include <stdint.h>
#include <string.h>
#include "akz_conn.h"

const char *const akz_conn_state_names[AKZ_CONN_NSTATES] = {
	[AKZ_CONN_DISABLED] = "disabled", [AKZ_CONN_CONNECTING] = "connecting",
	[AKZ_CONN_CONNECTED] = "connected", [AKZ_CONN_BACKOFF] = "backoff",
	[AKZ_CONN_UNAUTHORIZED] = "unauthorized",
};

void akz_conn_init(struct akz_conn *c, bool enabled, int64_t lifetime_ms, int64_t now_ms)
{
	memset(c, 0, sizeof(*c));
	c->state = enabled ? AKZ_CONN_CONNECTING : AKZ_CONN_DISABLED;
	c->failed_as = AKZ_CONN_BACKOFF;
	c->due_ms = enabled ? now_ms : INT64_MAX;
	c->lifetime_ms = lifetime_ms;
}

/* A random wait in [cap/2, cap] where cap doubles from lo with each failure up to hi: "equal
 * jitter", so that a fleet spreads out but still backs off. */
static int64_t backoff_ms(int failures, int64_t lo, int64_t hi, uint32_t rnd)
{
	int64_t cap = lo;
	for(int i = 1; i < failures && cap < hi; i++) cap *= 2;
	if(cap > hi) cap = hi;
	return cap / 2 + (int64_t)(rnd % (uint64_t)(cap - cap / 2 + 1));
}

/* Moves to st, which the caller has checked is a change, and says so in out. */
static void enter(struct akz_conn *c, enum akz_conn_state st, struct akz_conn_out *out)
{
	c->state = st;
	c->linked = false;
	c->refreshing = false;
	out->changed = true;
	out->news = st != AKZ_CONN_CONNECTING;
}

/* A failed attempt: BACKOFF or UNAUTHORIZED until a wait that grows with each failure. Only the
 * first failure of a run, and a switch between the two states, are news: in an outage every
 * device retries every minute or two, and a line per attempt would fill an SD card. */
static void fail(struct akz_conn *c, enum akz_conn_state st, const struct akz_conn_in *in,
		struct akz_conn_out *out)
{
	c->failures++;
	bool changed = c->state != st;
	enter(c, st, out);
	out->changed = changed;
	out->failed = true;
	out->news = c->failures <= 1 || st != c->failed_as;
	c->failed_as = st;
	c->waiting_slot = false;
	c->due_ms = in->now_ms + (st == AKZ_CONN_UNAUTHORIZED
			? backoff_ms(c->failures, AKZ_UNAUTH_MIN_MS, AKZ_UNAUTH_MAX_MS, in->rnd)
			: backoff_ms(c->failures, AKZ_BACKOFF_MIN_MS, AKZ_BACKOFF_MAX_MS, in->rnd));
}

/* Connect again as soon as a slot is free, with a fresh backoff. */
static void restart(struct akz_conn *c, const struct akz_conn_in *in, struct akz_conn_out *out)
{
	if(c->state != AKZ_CONN_CONNECTING) enter(c, AKZ_CONN_CONNECTING, out);
	c->linked = false;
	c->refreshing = false;
	c->failures = 0;
	if(!c->waiting_slot) c->due_ms = in->now_ms;
}

/* The time has come to connect: ask for a slot; the timer waits for nothing meanwhile. */
static void want_slot(struct akz_conn *c, struct akz_conn_out *out)
{
	c->waiting_slot = true;
	c->due_ms = INT64_MAX;
	out->action = AKZ_CONN_WANT_SLOT;
}

/* CONNACK accepted: the token is refreshed at a random point late in its life, so that a fleet
 * that connected in the same second does not refresh in the same second. */
static void connected(struct akz_conn *c, const struct akz_conn_in *in, struct akz_conn_out *out)
{
	enter(c, AKZ_CONN_CONNECTED, out);
	c->failures = 0;
	int64_t lo = c->lifetime_ms * 70 / 100, span = c->lifetime_ms * 20 / 100;
	c->due_ms = in->now_ms + lo + (int64_t)(in->rnd % (uint64_t)(span + 1));
}

/* A state waiting for its next attempt (CONNECTING without a connection, BACKOFF, UNAUTHORIZED). */
static void step_waiting(struct akz_conn *c, enum akz_conn_event ev, const struct akz_conn_in *in,
		struct akz_conn_out *out)
{
	switch(ev){
	case AKZ_CONN_TIMER:
		if(!c->waiting_slot && in->now_ms >= c->due_ms) want_slot(c, out);
		break;
	case AKZ_CONN_STARTED:
		if(c->state != AKZ_CONN_CONNECTING) enter(c, AKZ_CONN_CONNECTING, out);
		c->waiting_slot = false;
		c->linked = true;
		c->due_ms = in->now_ms + AKZ_CONNECT_TIMEOUT_MS;
		break;
	case AKZ_CONN_START_FAILED:
		fail(c, AKZ_CONN_BACKOFF, in, out);
		break;
	case AKZ_CONN_RESTART:
		restart(c, in, out);
		break;
	case AKZ_CONN_CLOCK_STEP:
		/* A refused or failed device may have been refused for the clock: try again now. */
		if(!c->waiting_slot) c->due_ms = in->now_ms;
		break;
	default:
		break;
	}
}

/* CONNECTING with a connection under way: waiting for CONNACK. */
static void step_handshake(struct akz_conn *c, enum akz_conn_event ev, const struct akz_conn_in *in,
		struct akz_conn_out *out)
{
	switch(ev){
	case AKZ_CONN_CONNACK:
		if(in->connack_rc == 0) connected(c, in, out);
		else fail(c, in->connack_rc == 4 || in->connack_rc == 5 ? AKZ_CONN_UNAUTHORIZED
				: AKZ_CONN_BACKOFF, in, out);
		break;
	case AKZ_CONN_LOST:
		fail(c, AKZ_CONN_BACKOFF, in, out);
		out->address_failed = true;
		break;
	case AKZ_CONN_TIMER:
		if(in->now_ms < c->due_ms) break;
		fail(c, AKZ_CONN_BACKOFF, in, out);
		out->action = AKZ_CONN_ABORT;
		out->address_failed = true;
		out->reason = "no CONNACK within 30 s";
		break;
	case AKZ_CONN_RESTART:
		restart(c, in, out);
		out->action = AKZ_CONN_ABORT;
		break;
	default:
		break;
	}
}

/* The token is due, and nothing waits for a PUBACK (or the wait is over): reconnect with a
 * new token. */
static void refresh(struct akz_conn *c, const struct akz_conn_in *in, struct akz_conn_out *out)
{
	restart(c, in, out);
	out->action = AKZ_CONN_HANG_UP;
}

static void step_connected(struct akz_conn *c, enum akz_conn_event ev, const struct akz_conn_in *in,
		struct akz_conn_out *out)
{
	switch(ev){
	case AKZ_CONN_TIMER:
		if(in->now_ms < c->due_ms) break;
		if(!c->refreshing && in->inflight > 0){
			/* New uplinks wait; those in flight get AKZ_DRAIN_MS for their PUBACKs. */
			c->refreshing = true;
			c->due_ms = in->now_ms + AKZ_DRAIN_MS;
			break;
		}
		refresh(c, in, out);
		break;
	case AKZ_CONN_DRAINED:
		if(c->refreshing) refresh(c, in, out);
		break;
	case AKZ_CONN_LOST:
		fail(c, AKZ_CONN_BACKOFF, in, out);
		break;
	case AKZ_CONN_RESTART:
		refresh(c, in, out);
		break;
	case AKZ_CONN_CLOCK_STEP:
		if(!c->refreshing) c->due_ms = in->now_ms;   /* the token's times are off: refresh now */
		break;
	default:
		break;
	}
}

void akz_conn_step(struct akz_conn *c, enum akz_conn_event ev, const struct akz_conn_in *in,
		struct akz_conn_out *out)
{
	memset(out, 0, sizeof(*out));
	if(ev == AKZ_CONN_DISABLE){
		if(c->state == AKZ_CONN_DISABLED) return;
		bool up = c->state == AKZ_CONN_CONNECTED || (c->state == AKZ_CONN_CONNECTING && c->linked);
		enter(c, AKZ_CONN_DISABLED, out);
		c->waiting_slot = false;
		c->due_ms = INT64_MAX;
		if(up) out->action = AKZ_CONN_ABORT;
		return;
	}
	switch(c->state){
	case AKZ_CONN_DISABLED:
		if(ev != AKZ_CONN_ENABLE) break;
		enter(c, AKZ_CONN_CONNECTING, out);
		c->failures = 0;
		c->due_ms = in->now_ms;
		break;
	case AKZ_CONN_CONNECTING:
		if(c->linked) step_handshake(c, ev, in, out);
		else step_waiting(c, ev, in, out);
		break;
	case AKZ_CONN_CONNECTED:
		step_connected(c, ev, in, out);
		break;
	case AKZ_CONN_BACKOFF:
	case AKZ_CONN_UNAUTHORIZED:
		step_waiting(c, ev, in, out);
		break;
	case AKZ_CONN_NSTATES:
		break;
	}
}
