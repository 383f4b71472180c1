/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_evloop.h - an event loop: sockets (epoll), timers (a heap) and a wake-up from other
 * threads. Mechanism only: what the events mean belongs to the caller (bridge_loop.c). */
#ifndef AKZ_EVLOOP_H
#define AKZ_EVLOOP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct akz_evloop;

/* A socket watched by the loop. Embedded in the caller's object; fn gets the io it was
 * registered with (container_of finds the object) and the epoll events that fired. */
struct akz_ev_io {
	void (*fn)(struct akz_ev_io *io, uint32_t events);
	int fd;                      /* registered descriptor, -1: none (set by the loop) */
	uint32_t events;             /* registered interest (set by the loop) */
};

/* A one-shot timer. Embedded in the caller's object; fn runs once when due_ms (monotonic ms,
 * akz_mono_ms) has come, and may arm the timer again. Arming never fails: the heap is made of
 * the timers themselves. */
struct akz_ev_timer {
	void (*fn)(struct akz_ev_timer *t, int64_t now_ms);
	int64_t due_ms;              /* meaningful while armed */
	struct akz_ev_timer *child, *sibling, *prev;   /* the heap's links (the loop's) */
	uint64_t armed_turn;         /* the loop's timer pass when it was armed (the loop's) */
	bool armed;
};

/* How the loop waits at the end of a turn: before_sleep's answer. */
enum akz_ev_wait {
	AKZ_EV_WATCH,                /* until a socket event, the first timer or a wake-up */
	AKZ_EV_POLL,                 /* not at all: work is left that must not wait for an event */
	AKZ_EV_PAUSE,                /* pause_ms (less if a timer is due sooner) without looking:
	                              * what came in meanwhile is then taken in one turn, and wakers
	                              * write nothing (the pause's end takes what they hand over) */
};

/* What the loop calls besides sockets and timers; ctx is passed to each. */
struct akz_ev_hooks {
	/* Takes what other threads handed over (they call akz_evloop_wake after handing over).
	 * Called after each turn's events and once more before the loop sleeps; returns true when
	 * it found something (the loop then ends the turn again instead of sleeping). */
	bool (*on_wake)(void *ctx);
	/* Before every wait: the work a loop turn leaves for its end (writes). Returns how to wait;
	 * NULL: always AKZ_EV_WATCH. */
	enum akz_ev_wait (*before_sleep)(void *ctx);
	int pause_ms;                /* how long AKZ_EV_PAUSE waits; more than 0 if it is ever asked for */
	void *ctx;
};

/* Makes a loop (an epoll set and an eventfd). Returns 0, or -1 with the reason in err. */
int akz_evloop_new(struct akz_evloop **out, char *err, size_t errlen);

/* Frees the loop. Sockets still registered are not closed. NULL is ignored. */
void akz_evloop_free(struct akz_evloop *l);

/* Runs the loop on the calling thread until akz_evloop_stop: each turn waits as before_sleep
 * said (for sockets, the first timer or a wake-up; or a pause), then runs the socket callbacks,
 * the due timers, on_wake, before_sleep, and on_wake again before it watches. Returns once
 * stopped, at most a pause later. An epoll failure other than EINTR is passed to report (may be
 * NULL) and the loop goes on after 100 ms. */
void akz_evloop_run(struct akz_evloop *l, const struct akz_ev_hooks *hooks,
		void (*report)(void *ctx, const char *what, int errnum));

/* Ends akz_evloop_run at its next turn. Any thread; never fails. */
void akz_evloop_stop(struct akz_evloop *l);

/* Makes the running loop call on_wake soon: at once, or at the end of a pause. Any thread;
 * never blocks, never fails; costs a write(2) only when the loop watches or is about to (a
 * running loop looks before it watches). */
void akz_evloop_wake(struct akz_evloop *l);

/* Watches fd for events (EPOLLIN, EPOLLOUT ...; level-triggered) with io, replacing what io
 * watched before; fd -1 or events 0 stops watching. A descriptor closed while watched left the
 * epoll set by itself: tell the loop with akz_ev_io_forget first. Returns 0, or -1 with errno
 * from epoll_ctl (io then watches nothing). Loop thread. */
int akz_ev_io_watch(struct akz_evloop *l, struct akz_ev_io *io, int fd, uint32_t events);

/* Tells the loop that io's descriptor was closed (it is out of the epoll set already): io
 * watches nothing now. Never fails. */
void akz_ev_io_forget(struct akz_ev_io *io);

/* Arms t to fire at due_ms, or moves it there if armed. Loop thread; never fails. */
void akz_ev_timer_arm(struct akz_evloop *l, struct akz_ev_timer *t, int64_t due_ms);

/* Arms t at due_ms unless it is armed to fire sooner. Loop thread; never fails. */
void akz_ev_timer_arm_by(struct akz_evloop *l, struct akz_ev_timer *t, int64_t due_ms);

/* Disarms t; a timer not armed is left alone. Loop thread; never fails. */
void akz_ev_timer_cancel(struct akz_evloop *l, struct akz_ev_timer *t);

/* The due time of the first armed timer, INT64_MAX when none is. */
int64_t akz_evloop_next_due(const struct akz_evloop *l);

#endif
