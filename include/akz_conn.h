/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_conn.h - the state machine of one device's akenza connection: one transition function and
 * no I/O, so that what happens in which state can be read in one place and tested without a
 * network (tests/unit/test_conn.c). The bridge thread (bridge_loop.c) feeds it events and
 * carries out the action it returns. */
#ifndef AKZ_CONN_H
#define AKZ_CONN_H

#include <stdbool.h>
#include <stdint.h>

#define AKZ_CONNECT_TIMEOUT_MS 30000   /* from TCP connect to CONNACK */
#define AKZ_DRAIN_MS 2000              /* a token refresh waits this long for PUBACKs at most */
#define AKZ_BACKOFF_MIN_MS 1000
#define AKZ_BACKOFF_MAX_MS 120000
#define AKZ_UNAUTH_MIN_MS 60000        /* a refused key is not fixed in seconds: ask again in minutes */
#define AKZ_UNAUTH_MAX_MS 900000

enum akz_conn_state {
	AKZ_CONN_DISABLED,           /* the registry disables the device: no connection */
	AKZ_CONN_CONNECTING,         /* waiting for a connect slot, or connected and waiting for CONNACK */
	AKZ_CONN_CONNECTED,          /* CONNACK accepted: uplinks flow */
	AKZ_CONN_BACKOFF,            /* the last attempt failed: the next one is at due_ms */
	AKZ_CONN_UNAUTHORIZED,       /* akenza refused the token: the next attempt is minutes away */
	AKZ_CONN_NSTATES
};

/* The states' names in status topics and the log, indexed by enum akz_conn_state. */
extern const char *const akz_conn_state_names[AKZ_CONN_NSTATES];

enum akz_conn_event {
	AKZ_CONN_ENABLE,             /* the registry enables the device */
	AKZ_CONN_DISABLE,            /* the registry disables it */
	AKZ_CONN_RESTART,            /* connect afresh now (its key changed, a reconnect was asked for) */
	AKZ_CONN_TIMER,              /* due_ms has come */
	AKZ_CONN_STARTED,            /* the connect slot was given and the connection is under way */
	AKZ_CONN_START_FAILED,       /* the connection could not start (no address, no token ...) */
	AKZ_CONN_CONNACK,            /* akenza answered the CONNECT with in->connack_rc */
	AKZ_CONN_LOST,               /* the connection failed or was closed */
	AKZ_CONN_DRAINED,            /* the last uplink in flight was acknowledged */
	AKZ_CONN_CLOCK_STEP,         /* the wall clock was stepped: tokens minted before are off */
};

/* What the caller does after a transition. */
enum akz_conn_action {
	AKZ_CONN_NONE,
	AKZ_CONN_WANT_SLOT,          /* queue for a connect slot (rate, handshakes): STARTED or START_FAILED follows */
	AKZ_CONN_HANG_UP,            /* end the connection with a DISCONNECT */
	AKZ_CONN_ABORT,              /* drop the connection at once, without a word to the peer */
};

struct akz_conn {
	enum akz_conn_state state;
	enum akz_conn_state failed_as;   /* the last failure's state: BACKOFF or UNAUTHORIZED */
	bool linked;                 /* CONNECTING: a connection is under way (not waiting for a slot) */
	bool waiting_slot;           /* queued for a connect slot (the caller's queue skips the others) */
	bool refreshing;             /* CONNECTED: the token is due: no new uplinks; reconnect once drained */
	int failures;                /* failed attempts since the last CONNACK accepted */
	int64_t due_ms;              /* when TIMER is due (INT64_MAX: never): the next attempt, the CONNACK
	                              * deadline, the token refresh, or the end of its drain */
	int64_t lifetime_ms;         /* of a token */
};

/* What an event comes with. */
struct akz_conn_in {
	int64_t now_ms;              /* monotonic */
	uint32_t rnd;                /* a random number: spreads a fleet's backoffs and refreshes */
	int connack_rc;              /* CONNACK: 0 accepted, 4 bad credentials, 5 not authorized ... */
	int inflight;                /* what a due refresh waits for: uplinks waiting for a PUBACK, and
	                              * one more while the next token is being signed (a key in a TPM) */
};

struct akz_conn_out {
	enum akz_conn_action action;
	bool changed;                /* the state changed */
	bool news;                   /* the change is worth the log at the normal level: a connect, a
	                              * first failure, a switch between backoff and unauthorized */
	bool failed;                 /* this was a failed attempt */
	bool address_failed;         /* the address of the connection under way did not work */
	const char *reason;          /* the machine's own reason for a failure (a deadline), or NULL */
};

/* Sets c up for a new device: CONNECTING with an attempt due now when enabled, else DISABLED.
 * Never fails. */
void akz_conn_init(struct akz_conn *c, bool enabled, int64_t lifetime_ms, int64_t now_ms);

/* The transition function: applies ev to c and says in out what the caller must do. An event
 * that means nothing in the current state (a LOST after a hang-up, a TIMER not yet due) changes
 * nothing and asks for nothing. Never fails. */
void akz_conn_step(struct akz_conn *c, enum akz_conn_event ev, const struct akz_conn_in *in,
		struct akz_conn_out *out);

#endif
