/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_bridge_core.c - unit tests of the bridge's parts that need no network: the connection
 * state machine, the event loop's timers, sockets and wake-up, the uplink window, the hand-off
 * queue to the broker thread and the hash table. */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>
#include <cmocka.h>
#include "akz_conn.h"
#include "akz_evloop.h"
#include "akz_handoff.h"
#include "akz_htab.h"
#include "akz_queue.h"
#include "akz_util.h"
#include "akz_window.h"

/* ---- the connection state machine ------------------------------------------------------------- */

#define LIFE_MS 1200000

/* One step at time now with CONNACK rc and inflight uplinks; returns what the machine said. */
static struct akz_conn_out step(struct akz_conn *c, enum akz_conn_event ev, int64_t now, int rc, int inflight)
{
	struct akz_conn_in in = {.now_ms = now, .rnd = 12345, .connack_rc = rc, .inflight = inflight};
	struct akz_conn_out out;
	akz_conn_step(c, ev, &in, &out);
	return out;
}

/* Drives a new enabled device to CONNECTED at time now. */
static void bring_up(struct akz_conn *c, int64_t now)
{
	akz_conn_init(c, true, LIFE_MS, now);
	assert_int_equal(step(c, AKZ_CONN_TIMER, now, 0, 0).action, AKZ_CONN_WANT_SLOT);
	step(c, AKZ_CONN_STARTED, now, 0, 0);
	struct akz_conn_out o = step(c, AKZ_CONN_CONNACK, now, 0, 0);
	assert_int_equal(c->state, AKZ_CONN_CONNECTED);
	assert_true(o.changed);
	assert_true(o.news);
}

static void test_conn_connects(void **state)
{
	(void)state;
	struct akz_conn c;
	akz_conn_init(&c, true, LIFE_MS, 1000);
	assert_int_equal(c.state, AKZ_CONN_CONNECTING);
	assert_int_equal(c.due_ms, 1000);
	/* not due yet: nothing */
	assert_int_equal(step(&c, AKZ_CONN_TIMER, 999, 0, 0).action, AKZ_CONN_NONE);
	struct akz_conn_out o = step(&c, AKZ_CONN_TIMER, 1000, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_WANT_SLOT);
	assert_true(c.waiting_slot);
	assert_int_equal(c.due_ms, INT64_MAX);   /* waiting for a slot, not for time */
	/* a second timer while queued asks for nothing more */
	assert_int_equal(step(&c, AKZ_CONN_TIMER, 5000, 0, 0).action, AKZ_CONN_NONE);
	o = step(&c, AKZ_CONN_STARTED, 2000, 0, 0);
	assert_false(o.changed);                 /* still CONNECTING, now with a connection */
	assert_true(c.linked);
	assert_false(c.waiting_slot);
	assert_int_equal(c.due_ms, 2000 + AKZ_CONNECT_TIMEOUT_MS);
	o = step(&c, AKZ_CONN_CONNACK, 2100, 0, 0);
	assert_int_equal(c.state, AKZ_CONN_CONNECTED);
	assert_true(o.changed);
	assert_int_equal(c.failures, 0);
	/* the refresh falls between 70% and 90% of the token's life */
	assert_in_range(c.due_ms, 2100 + LIFE_MS * 7 / 10, 2100 + LIFE_MS * 9 / 10);
}

static void test_conn_failures_back_off(void **state)
{
	(void)state;
	struct akz_conn c;
	akz_conn_init(&c, true, LIFE_MS, 0);
	int64_t now = 0;
	for(int i = 1; i <= 12; i++){
		step(&c, AKZ_CONN_TIMER, now, 0, 0);
		step(&c, AKZ_CONN_STARTED, now, 0, 0);
		struct akz_conn_out o = step(&c, AKZ_CONN_LOST, now + 10, 0, 0);
		assert_int_equal(c.state, AKZ_CONN_BACKOFF);
		assert_true(o.failed);
		assert_true(o.address_failed);
		assert_int_equal(c.failures, i);
		/* only the first failure of a run is news; the state changes back and forth */
		assert_int_equal(o.news, i == 1);
		int64_t wait = c.due_ms - (now + 10);
		int64_t cap = AKZ_BACKOFF_MIN_MS << (i - 1 < 8 ? i - 1 : 8);
		if(cap > AKZ_BACKOFF_MAX_MS) cap = AKZ_BACKOFF_MAX_MS;
		assert_in_range(wait, cap / 2, cap);     /* equal jitter */
		/* a LOST after the failure (libmosquitto reporting the same end) changes nothing */
		o = step(&c, AKZ_CONN_LOST, now + 20, 0, 0);
		assert_false(o.changed);
		assert_false(o.failed);
		now = c.due_ms;
	}
	/* a connect that cannot start counts as a failure too */
	step(&c, AKZ_CONN_TIMER, now, 0, 0);
	struct akz_conn_out o = step(&c, AKZ_CONN_START_FAILED, now, 0, 0);
	assert_true(o.failed);
	assert_int_equal(c.failures, 13);
	assert_int_equal(c.state, AKZ_CONN_BACKOFF);
}

static void test_conn_refused_is_unauthorized(void **state)
{
	(void)state;
	struct akz_conn c;
	akz_conn_init(&c, true, LIFE_MS, 0);
	step(&c, AKZ_CONN_TIMER, 0, 0, 0);
	step(&c, AKZ_CONN_STARTED, 0, 0, 0);
	struct akz_conn_out o = step(&c, AKZ_CONN_CONNACK, 100, 5, 0);
	assert_int_equal(c.state, AKZ_CONN_UNAUTHORIZED);
	assert_true(o.news);
	assert_false(o.address_failed);          /* the address answered */
	assert_in_range(c.due_ms - 100, AKZ_UNAUTH_MIN_MS / 2, AKZ_UNAUTH_MIN_MS);
	/* refused again: no news; then a plain failure is news (backoff after unauthorized). The
	 * TIMER parks due_ms at INT64_MAX while the slot is wanted: the attempt runs at t. */
	int64_t t = c.due_ms;
	step(&c, AKZ_CONN_TIMER, t, 0, 0);
	assert_true(c.waiting_slot);
	step(&c, AKZ_CONN_STARTED, t, 0, 0);
	o = step(&c, AKZ_CONN_CONNACK, t, 4, 0);
	assert_false(o.news);                    /* the same failure again */
	assert_true(o.changed);                  /* CONNECTING -> UNAUTHORIZED */
	t = c.due_ms;
	step(&c, AKZ_CONN_TIMER, t, 0, 0);
	step(&c, AKZ_CONN_STARTED, t, 0, 0);
	o = step(&c, AKZ_CONN_CONNACK, t, 3, 0);
	assert_int_equal(c.state, AKZ_CONN_BACKOFF);
	assert_true(o.news);
	/* a clock step lets it try at once */
	step(&c, AKZ_CONN_CLOCK_STEP, 777, 0, 0);
	assert_int_equal(c.due_ms, 777);
}

static void test_conn_handshake_deadline(void **state)
{
	(void)state;
	struct akz_conn c;
	akz_conn_init(&c, true, LIFE_MS, 0);
	step(&c, AKZ_CONN_TIMER, 0, 0, 0);
	step(&c, AKZ_CONN_STARTED, 0, 0, 0);
	assert_int_equal(step(&c, AKZ_CONN_TIMER, AKZ_CONNECT_TIMEOUT_MS - 1, 0, 0).action, AKZ_CONN_NONE);
	struct akz_conn_out o = step(&c, AKZ_CONN_TIMER, AKZ_CONNECT_TIMEOUT_MS, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_ABORT);
	assert_int_equal(c.state, AKZ_CONN_BACKOFF);
	assert_non_null(o.reason);
	assert_true(o.address_failed);
}

static void test_conn_token_refresh(void **state)
{
	(void)state;
	struct akz_conn c;
	bring_up(&c, 0);
	int64_t due = c.due_ms;
	/* uplinks in flight: new ones wait, the old ones get their drain time */
	struct akz_conn_out o = step(&c, AKZ_CONN_TIMER, due, 0, 3);
	assert_int_equal(o.action, AKZ_CONN_NONE);
	assert_true(c.refreshing);
	assert_int_equal(c.due_ms, due + AKZ_DRAIN_MS);
	/* drained: hang up with a DISCONNECT and connect again at once */
	o = step(&c, AKZ_CONN_DRAINED, due + 5, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_HANG_UP);
	assert_int_equal(c.state, AKZ_CONN_CONNECTING);
	assert_false(c.linked);
	assert_false(c.refreshing);
	assert_int_equal(c.due_ms, due + 5);
	/* the hang-up's own LOST is no failure */
	o = step(&c, AKZ_CONN_LOST, due + 6, 0, 0);
	assert_false(o.failed);
	assert_int_equal(c.state, AKZ_CONN_CONNECTING);

	/* nothing in flight: at once; a drain that never ends: at its deadline */
	bring_up(&c, 0);
	o = step(&c, AKZ_CONN_TIMER, c.due_ms, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_HANG_UP);
	bring_up(&c, 0);
	step(&c, AKZ_CONN_TIMER, c.due_ms, 0, 1);
	assert_int_equal(step(&c, AKZ_CONN_TIMER, c.due_ms, 0, 1).action, AKZ_CONN_HANG_UP);
	/* DRAINED without a refresh under way means nothing */
	bring_up(&c, 0);
	assert_int_equal(step(&c, AKZ_CONN_DRAINED, 10, 0, 0).action, AKZ_CONN_NONE);
	assert_int_equal(c.state, AKZ_CONN_CONNECTED);
	/* a clock step refreshes a connected device's token now */
	step(&c, AKZ_CONN_CLOCK_STEP, 50, 0, 0);
	assert_int_equal(c.due_ms, 50);
}

static void test_conn_registry_changes(void **state)
{
	(void)state;
	struct akz_conn c;
	akz_conn_init(&c, false, LIFE_MS, 0);
	assert_int_equal(c.state, AKZ_CONN_DISABLED);
	assert_int_equal(step(&c, AKZ_CONN_TIMER, 5, 0, 0).action, AKZ_CONN_NONE);
	struct akz_conn_out o = step(&c, AKZ_CONN_ENABLE, 10, 0, 0);
	assert_true(o.changed);
	assert_int_equal(c.state, AKZ_CONN_CONNECTING);
	assert_int_equal(c.due_ms, 10);

	/* disabled while connected: dropped; while waiting for a slot: out of the queue */
	bring_up(&c, 0);
	o = step(&c, AKZ_CONN_DISABLE, 10, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_ABORT);
	assert_int_equal(c.state, AKZ_CONN_DISABLED);
	assert_int_equal(step(&c, AKZ_CONN_LOST, 11, 0, 0).failed, false);
	akz_conn_init(&c, true, LIFE_MS, 0);
	step(&c, AKZ_CONN_TIMER, 0, 0, 0);
	o = step(&c, AKZ_CONN_DISABLE, 1, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_NONE);
	assert_false(c.waiting_slot);

	/* restart (key changed, reconnect asked for): connected hangs up, a handshake is dropped,
	 * a device in backoff tries now with a fresh count */
	bring_up(&c, 0);
	o = step(&c, AKZ_CONN_RESTART, 20, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_HANG_UP);
	assert_int_equal(c.due_ms, 20);
	step(&c, AKZ_CONN_TIMER, 20, 0, 0);
	step(&c, AKZ_CONN_STARTED, 20, 0, 0);
	o = step(&c, AKZ_CONN_RESTART, 30, 0, 0);
	assert_int_equal(o.action, AKZ_CONN_ABORT);
	assert_false(c.linked);
	step(&c, AKZ_CONN_TIMER, 30, 0, 0);
	step(&c, AKZ_CONN_STARTED, 30, 0, 0);
	step(&c, AKZ_CONN_LOST, 40, 0, 0);
	int64_t t = c.due_ms;
	step(&c, AKZ_CONN_TIMER, t, 0, 0);
	step(&c, AKZ_CONN_STARTED, t, 0, 0);
	step(&c, AKZ_CONN_LOST, t, 0, 0);
	assert_int_equal(c.failures, 2);
	o = step(&c, AKZ_CONN_RESTART, 50, 0, 0);
	assert_true(o.changed);
	assert_int_equal(c.state, AKZ_CONN_CONNECTING);
	assert_int_equal(c.failures, 0);
	assert_int_equal(c.due_ms, 50);
}

/* Every state and event: the machine never leaves a state it cannot get out of. */
static void test_conn_every_transition_is_sane(void **state)
{
	(void)state;
	for(int st = 0; st < AKZ_CONN_NSTATES; st++){
		for(int linked = 0; linked < 2; linked++){
			for(int ev = AKZ_CONN_ENABLE; ev <= AKZ_CONN_CLOCK_STEP; ev++){
				struct akz_conn c = {.state = st, .linked = linked && st == AKZ_CONN_CONNECTING,
						.failed_as = AKZ_CONN_BACKOFF, .lifetime_ms = LIFE_MS,
						.due_ms = st == AKZ_CONN_DISABLED ? INT64_MAX : 100};
				struct akz_conn_out o = step(&c, ev, 100, 0, 0);
				assert_true(c.state < AKZ_CONN_NSTATES);
				/* a waiting state always has a deadline, or a place in the slot queue */
				if(c.state == AKZ_CONN_BACKOFF || c.state == AKZ_CONN_UNAUTHORIZED
						|| (c.state == AKZ_CONN_CONNECTING && !c.linked)){
					assert_true(c.due_ms != INT64_MAX || c.waiting_slot);
				}
				if(c.state == AKZ_CONN_DISABLED) assert_int_equal(c.due_ms, INT64_MAX);
				if(o.action == AKZ_CONN_WANT_SLOT) assert_true(c.waiting_slot);
				assert_true(!c.linked || c.state == AKZ_CONN_CONNECTING);
			}
		}
	}
}

/* ---- the event loop ----------------------------------------------------------------------------- */

struct fired {
	struct akz_ev_timer t;
	int64_t due;
	int order;
};

static int fire_count;
static int64_t last_due;

static void on_fire(struct akz_ev_timer *t, int64_t now)
{
	struct fired *f = akz_container_of(t, struct fired, t);
	(void)now;
	assert_true(f->due >= last_due);         /* earliest first */
	last_due = f->due;
	f->order = ++fire_count;
}

static struct akz_evloop *stop_after_loop;
static int turns_left;

static enum akz_ev_wait stop_after_turns(void *ctx)
{
	(void)ctx;
	if(--turns_left <= 0) akz_evloop_stop(stop_after_loop);
	return AKZ_EV_POLL;   /* the test's timers are all due */
}

static void test_evloop_timers(void **state)
{
	(void)state;
	struct akz_evloop *l;
	char err[128];
	assert_int_equal(akz_evloop_new(&l, err, sizeof(err)), 0);
	enum { N = 500 };
	struct fired *f = calloc(N, sizeof(*f));
	assert_non_null(f);
	int64_t now = akz_mono_ms();
	srand(7);
	/* arm all in the past, then move, cancel and re-arm at random: the heap must stay a heap */
	for(int i = 0; i < N; i++){
		f[i].t.fn = on_fire;
		f[i].due = now - 10000 + rand() % 5000;
		akz_ev_timer_arm(l, &f[i].t, f[i].due);
	}
	for(int k = 0; k < 2000; k++){
		int i = rand() % N;
		switch(rand() % 3){
		case 0:
			f[i].due = now - 10000 + rand() % 5000;
			akz_ev_timer_arm(l, &f[i].t, f[i].due);
			break;
		case 1:
			akz_ev_timer_cancel(l, &f[i].t);
			break;
		default:
			if(!f[i].t.armed || now - 7500 < f[i].due) f[i].due = now - 7500;
			akz_ev_timer_arm_by(l, &f[i].t, now - 7500);
			break;
		}
	}
	int armed = 0;
	int64_t first = INT64_MAX;
	for(int i = 0; i < N; i++){
		if(f[i].t.armed){
			armed++;
			if(f[i].due < first) first = f[i].due;
			assert_int_equal(f[i].t.due_ms, f[i].due);
		}
	}
	assert_int_equal(akz_evloop_next_due(l), first);
	struct akz_ev_hooks hooks = {.before_sleep = stop_after_turns};
	stop_after_loop = l;
	turns_left = 2;
	fire_count = 0;
	last_due = INT64_MIN;
	akz_evloop_run(l, &hooks, NULL);
	assert_int_equal(fire_count, armed);     /* each armed timer exactly once */
	for(int i = 0; i < N; i++) assert_false(f[i].t.armed);
	assert_int_equal(akz_evloop_next_due(l), INT64_MAX);
	free(f);
	akz_evloop_free(l);
}

static struct akz_evloop *wake_loop;
static atomic_int posted;
static int seen;

static bool on_wake(void *ctx)
{
	(void)ctx;
	bool news = atomic_load(&posted) != seen;
	seen = atomic_load(&posted);
	if(seen == 10000) akz_evloop_stop(wake_loop);
	return news && seen != 10000;
}

static void *waker(void *arg)
{
	for(int i = 0; i < 10000; i++){
		atomic_fetch_add(&posted, 1);
		akz_evloop_wake(arg);
	}
	return NULL;
}

/* Every other turn ends in a 1 ms pause. */
static enum akz_ev_wait pause_every_other(void *ctx)
{
	static unsigned turn;
	(void)ctx;
	return ++turn % 2 ? AKZ_EV_PAUSE : AKZ_EV_WATCH;
}

/* 10,000 hand-overs from another thread, each followed by a wake-up; with pauses, the loop
 * goes from pausing to watching and back while they come. */
static void run_wakes(enum akz_ev_wait (*before_sleep)(void *ctx))
{
	char err[128];
	atomic_store(&posted, 0);
	seen = 0;
	assert_int_equal(akz_evloop_new(&wake_loop, err, sizeof(err)), 0);
	/* the loop must also end without a timer: the last wake is never lost */
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, waker, wake_loop), 0);
	struct akz_ev_hooks hooks = {.on_wake = on_wake, .before_sleep = before_sleep, .pause_ms = 1};
	akz_evloop_run(wake_loop, &hooks, NULL);
	pthread_join(t, NULL);
	assert_int_equal(seen, 10000);
	akz_evloop_free(wake_loop);
}

static void test_evloop_wake_from_another_thread(void **state)
{
	(void)state;
	run_wakes(NULL);
	run_wakes(pause_every_other);
}

static struct akz_evloop *pause_loop;
static atomic_llong pause_began;    /* when the loop's first pause began (ms); 0 before */
static atomic_int pause_posted;
static int64_t pause_taken;         /* when on_wake first saw the hand-over (ms); 0 before */
static int pause_turns;

static enum akz_ev_wait pause_first_turn(void *ctx)
{
	(void)ctx;
	if(pause_turns++ > 0) return AKZ_EV_WATCH;
	atomic_store(&pause_began, akz_mono_ms());
	return AKZ_EV_PAUSE;
}

static bool take_after_pause(void *ctx)
{
	(void)ctx;
	if(atomic_load(&pause_posted) && pause_taken == 0){
		pause_taken = akz_mono_ms();
		akz_evloop_stop(pause_loop);
	}
	return false;
}

static void *hand_over_in_pause(void *arg)
{
	for(int i = 0; i < 10000 && atomic_load(&pause_began) == 0; i++) usleep(1000);
	atomic_store(&pause_posted, 1);
	akz_evloop_wake(arg);
	return NULL;
}

static void stop_pause_loop(struct akz_ev_timer *t, int64_t now)
{
	(void)t;
	(void)now;
	akz_evloop_stop(pause_loop);
}

/* A wake-up does not end a pause: what is handed over during it is taken at its end. A timer
 * due sooner does end it. */
static void test_evloop_pause(void **state)
{
	(void)state;
	char err[128];
	assert_int_equal(akz_evloop_new(&pause_loop, err, sizeof(err)), 0);
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, hand_over_in_pause, pause_loop), 0);
	struct akz_ev_hooks hooks = {.on_wake = take_after_pause, .before_sleep = pause_first_turn,
			.pause_ms = 300};
	akz_evloop_run(pause_loop, &hooks, NULL);
	pthread_join(t, NULL);
	int64_t began = atomic_load(&pause_began);
	assert_true(began > 0 && pause_taken > 0);
	assert_true(pause_taken - began >= 299);   /* akz_mono_ms truncates to whole ms */

	akz_evloop_free(pause_loop);
	assert_int_equal(akz_evloop_new(&pause_loop, err, sizeof(err)), 0);
	struct akz_ev_timer timer = {.fn = stop_pause_loop};
	pause_turns = 0;
	hooks = (struct akz_ev_hooks){.before_sleep = pause_first_turn, .pause_ms = 60000};
	akz_ev_timer_arm(pause_loop, &timer, akz_mono_ms() + 20);
	int64_t t0 = akz_mono_ms();
	akz_evloop_run(pause_loop, &hooks, NULL);
	assert_false(timer.armed);
	assert_true(akz_mono_ms() - t0 < 30000);   /* the timer, not the minute's pause, ended it */
	akz_evloop_free(pause_loop);
}

struct piped {
	struct akz_ev_io io;
	int events;
	struct akz_evloop *l;
};

static void on_readable(struct akz_ev_io *io, uint32_t events)
{
	struct piped *p = akz_container_of(io, struct piped, io);
	char c;
	assert_true(events & EPOLLIN);
	assert_int_equal(read(io->fd, &c, 1), 1);
	p->events++;
	akz_evloop_stop(p->l);
}

static void test_evloop_sockets(void **state)
{
	(void)state;
	char err[128];
	int fds[2];
	struct piped p = {.io = {.fn = on_readable, .fd = -1}};
	assert_int_equal(akz_evloop_new(&p.l, err, sizeof(err)), 0);
	assert_int_equal(pipe(fds), 0);
	assert_int_equal(akz_ev_io_watch(p.l, &p.io, fds[0], EPOLLIN), 0);
	assert_int_equal(p.io.fd, fds[0]);
	assert_int_equal(write(fds[1], "x", 1), 1);
	struct akz_ev_hooks hooks = {0};
	akz_evloop_run(p.l, &hooks, NULL);
	assert_int_equal(p.events, 1);
	/* no longer watched: a byte written now is not reported */
	assert_int_equal(akz_ev_io_watch(p.l, &p.io, -1, 0), 0);
	assert_int_equal(p.io.fd, -1);
	/* a closed descriptor cannot be watched: the io says so and watches nothing */
	assert_int_equal(akz_ev_io_watch(p.l, &p.io, 9999, EPOLLIN), -1);
	assert_int_equal(p.io.fd, -1);
	close(fds[0]);
	close(fds[1]);
	akz_evloop_free(p.l);
}

/* ---- the window ---------------------------------------------------------------------------------- */

static struct akz_msg *msg_with_seq(uint64_t seq)
{
	struct akz_msg *m = akz_msg_new("t", 1, "p", 1, 1, NULL, 0);
	assert_non_null(m);
	m->seq = seq;
	return m;
}

static void test_window(void **state)
{
	(void)state;
	struct akz_window w = {0};
	/* seqs 1..40 pending; 32 handed over with mids that collide in their home slots */
	struct akz_msgq pending = {0};
	for(uint64_t s = 1; s <= 40; s++) akz_msgq_push(&pending, msg_with_seq(s));
	for(int i = 0; i < AKZ_WINDOW; i++){
		struct akz_msg *m = akz_msgq_pop(&pending);
		akz_window_taken(&w, m);
		akz_window_put(&w, 1 + i * AKZ_WINDOW, m);   /* every mid has home slot 1 */
	}
	assert_int_equal(w.count, AKZ_WINDOW);
	assert_int_equal(w.sent_upto, 32);
	assert_int_equal(akz_window_done_upto(&w), 0);    /* seq 1 is still in flight */
	struct akz_msg *m = akz_window_take(&w, 1);
	assert_int_equal(m->seq, 1);
	free(m);
	assert_int_equal(akz_window_done_upto(&w), 1);
	assert_null(akz_window_take(&w, 1));              /* a QoS 0 uplink's mid: not ours */
	m = akz_window_take(&w, 1 + 5 * AKZ_WINDOW);      /* seq 6, out of order */
	assert_int_equal(m->seq, 6);
	free(m);
	assert_int_equal(akz_window_done_upto(&w), 1);    /* 2 is still out */
	/* giving back: the window in seq order, then pending; unspooled ones are freed */
	struct akz_msgq out = {0};
	akz_msgq_push(&pending, msg_with_seq(0));
	akz_window_give_back(&w, &pending, &out);
	assert_int_equal(w.count, 0);
	assert_int_equal(out.count, 30 + 8);
	uint64_t expect = 2;
	for(struct akz_msg *x; (x = akz_msgq_pop(&out)) != NULL; free(x)){
		if(expect == 6) expect++;
		assert_int_equal(x->seq, expect++);
	}
	assert_int_equal(expect, 41);
}

/* ---- the hand-off queue ------------------------------------------------------------------------- */

static void test_handoff(void **state)
{
	(void)state;
	const size_t max[AKZ_HANDOFF_KINDS] = {[AKZ_HANDOFF_MESSAGE] = 2, [AKZ_HANDOFF_STATUS] = 5,
			[AKZ_HANDOFF_LOG] = 3};
	struct akz_handoff *q = akz_handoff_new(max);
	assert_non_null(q);
	size_t dropped[AKZ_HANDOFF_KINDS];
	bool more;
	assert_null(akz_handoff_take(q, 100, &more, dropped));
	assert_true(akz_handoff_message(q, akz_msg_new("a", 1, "1", 1, 0, NULL, 0)));
	akz_handoff_log(q, 3, "line %d", 1);
	struct akz_status_dev st = {.state = "connected", .queued = 7};
	assert_true(akz_handoff_status(q, "dev-1", &st, NULL));
	assert_true(akz_handoff_message(q, akz_msg_new("b", 1, "2", 1, 0, NULL, 0)));
	assert_false(akz_handoff_message(q, akz_msg_new("c", 1, "3", 1, 0, NULL, 0)));   /* full */
	assert_false(akz_handoff_message(q, NULL));                                        /* no memory */
	for(int i = 0; i < 4; i++) akz_handoff_log(q, 4, "more %d", i);                   /* 2 fit */
	/* in the order handed over, across kinds, up to max */
	struct akz_handoff_item *it = akz_handoff_take(q, 4, &more, dropped);
	assert_true(more);
	assert_int_equal(dropped[AKZ_HANDOFF_MESSAGE], 2);
	assert_int_equal(dropped[AKZ_HANDOFF_LOG], 2);
	assert_int_equal(it->kind, AKZ_HANDOFF_MESSAGE);
	assert_string_equal(it->u.msg->topic, "a");
	assert_int_equal(it->next->kind, AKZ_HANDOFF_LOG);
	assert_string_equal(it->next->text, "line 1");
	assert_int_equal(it->next->next->kind, AKZ_HANDOFF_STATUS);
	assert_string_equal(it->next->next->text, "dev-1");
	assert_int_equal(it->next->next->u.status.st.queued, 7);
	assert_string_equal(it->next->next->next->u.msg->topic, "b");
	assert_null(it->next->next->next->next);
	for(struct akz_handoff_item *next; it; it = next){
		next = it->next;
		akz_handoff_item_free(it);
	}
	/* the kinds' room came back with the take */
	assert_true(akz_handoff_message(q, akz_msg_new("d", 1, "4", 1, 0, NULL, 0)));
	it = akz_handoff_take(q, 100, &more, dropped);
	assert_false(more);
	assert_string_equal(it->text, "more 0");
	assert_string_equal(it->next->text, "more 1");
	assert_string_equal(it->next->next->u.msg->topic, "d");
	assert_int_equal(dropped[AKZ_HANDOFF_LOG], 0);
	for(struct akz_handoff_item *next; it; it = next){
		next = it->next;
		akz_handoff_item_free(it);
	}
	akz_handoff_log(q, 3, "left behind");   /* freed with the queue */
	akz_handoff_free(q);
}

/* ---- the hash table ----------------------------------------------------------------------------- */

struct entry {
	struct akz_htab_node node;
	char key[16];
};

static void test_htab(void **state)
{
	(void)state;
	enum { N = 1000 };
	struct akz_htab t = AKZ_HTAB_INIT;
	struct entry *e = calloc(N, sizeof(*e));
	assert_non_null(e);
	assert_null(akz_htab_find(&t, "x", 1));
	for(int i = 0; i < N; i++){
		snprintf(e[i].key, sizeof(e[i].key), "dev-%d", i);
		assert_int_equal(akz_htab_insert(&t, &e[i].node, e[i].key, strlen(e[i].key)), 0);
	}
	assert_int_equal(t.count, N);
	for(int i = 0; i < N; i++){
		struct akz_htab_node *n = akz_htab_find(&t, e[i].key, strlen(e[i].key));
		assert_ptr_equal(n, &e[i].node);
	}
	/* a key is found by its bytes, not a prefix */
	assert_null(akz_htab_find(&t, "dev-1", 4));
	assert_ptr_equal(akz_htab_find(&t, "dev-10xyz", 6), &e[10].node);
	/* a walk that removes every odd entry on the way visits each once */
	int visited = 0;
	for(struct akz_htab_node *n = akz_htab_first(&t), *next; n; n = next){
		next = akz_htab_next(&t, n);
		struct entry *x = akz_container_of(n, struct entry, node);
		visited++;
		if(atoi(x->key + 4) % 2) akz_htab_remove(&t, n);
	}
	assert_int_equal(visited, N);
	assert_int_equal(t.count, N / 2);
	for(int i = 0; i < N; i++){
		bool present = akz_htab_find(&t, e[i].key, strlen(e[i].key)) != NULL;
		assert_int_equal(present, i % 2 == 0);
	}
	assert_int_equal(akz_htab_reserve(&t, 10 * N), 0);
	assert_true(t.nbuckets >= 20 * N);
	assert_ptr_equal(akz_htab_find(&t, "dev-2", 5), &e[2].node);
	akz_htab_free(&t);
	free(e);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_conn_connects),
		cmocka_unit_test(test_conn_failures_back_off),
		cmocka_unit_test(test_conn_refused_is_unauthorized),
		cmocka_unit_test(test_conn_handshake_deadline),
		cmocka_unit_test(test_conn_token_refresh),
		cmocka_unit_test(test_conn_registry_changes),
		cmocka_unit_test(test_conn_every_transition_is_sane),
		cmocka_unit_test(test_evloop_timers),
		cmocka_unit_test(test_evloop_wake_from_another_thread),
		cmocka_unit_test(test_evloop_pause),
		cmocka_unit_test(test_evloop_sockets),
		cmocka_unit_test(test_window),
		cmocka_unit_test(test_handoff),
		cmocka_unit_test(test_htab),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
