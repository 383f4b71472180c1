/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* evloop.c - an event loop: sockets (epoll), timers (a pairing heap) and a wake-up from other
 * threads. Mechanism only, in the manner of Redis's ae.c: the bridge's meaning is in its callers. */
#include <errno.h>
#include <limits.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>
#include "akz_evloop.h"
#include "akz_util.h"

#define MAX_EVENTS 256

struct akz_evloop {
	int epfd;
	int wakefd;
	atomic_bool awake;           /* running a turn, or a wake-up is on its way: wakers need no write(2) */
	atomic_bool stop;
	struct akz_ev_timer *root;   /* the heap: the first timer due, or NULL */
	uint64_t turn;               /* timer passes so far */
};

/* ---- timers: a pairing heap of the timers themselves, so arming allocates nothing ---------- */

/* Melds two heaps (roots with no siblings, either may be NULL); returns the new root. */
static struct akz_ev_timer *meld(struct akz_ev_timer *a, struct akz_ev_timer *b)
{
	if(a == NULL) return b;
	if(b == NULL) return a;
	if(b->due_ms < a->due_ms){
		struct akz_ev_timer *t = a;
		a = b;
		b = t;
	}
	b->prev = a;                 /* b becomes a's first child */
	b->sibling = a->child;
	if(a->child) a->child->prev = b;
	a->child = b;
	return a;
}

/* Melds a list of sibling heaps into one (the two-pass rule that keeps the heap shallow);
 * returns its root, NULL for an empty list. */
static struct akz_ev_timer *merge_pairs(struct akz_ev_timer *first)
{
	struct akz_ev_timer *pairs = NULL;

	while(first){                /* left to right, in pairs; the results stack up reversed */
		struct akz_ev_timer *a = first, *b = a->sibling;
		first = b ? b->sibling : NULL;
		a->sibling = a->prev = NULL;
		if(b) b->sibling = b->prev = NULL;
		struct akz_ev_timer *m = meld(a, b);
		m->sibling = pairs;
		pairs = m;
	}
	struct akz_ev_timer *root = NULL;
	while(pairs){                /* right to left */
		struct akz_ev_timer *next = pairs->sibling;
		pairs->sibling = NULL;
		root = meld(root, pairs);
		pairs = next;
	}
	return root;
}

static void heap_remove(struct akz_evloop *l, struct akz_ev_timer *t)
{
	if(t == l->root){
		l->root = merge_pairs(t->child);
	}else{
		if(t->prev->child == t) t->prev->child = t->sibling;   /* t is its parent's first child */
		else t->prev->sibling = t->sibling;
		if(t->sibling) t->sibling->prev = t->prev;
		l->root = meld(l->root, merge_pairs(t->child));
	}
	t->child = t->sibling = t->prev = NULL;
	t->armed = false;
}

void akz_ev_timer_arm(struct akz_evloop *l, struct akz_ev_timer *t, int64_t due_ms)
{
	if(t->armed){
		if(t->due_ms == due_ms) return;
		heap_remove(l, t);
	}
	t->due_ms = due_ms;
	t->armed_turn = l->turn;
	t->child = t->sibling = t->prev = NULL;
	t->armed = true;
	l->root = meld(l->root, t);
}

void akz_ev_timer_arm_by(struct akz_evloop *l, struct akz_ev_timer *t, int64_t due_ms)
{
	if(!t->armed || due_ms < t->due_ms) akz_ev_timer_arm(l, t, due_ms);
}

void akz_ev_timer_cancel(struct akz_evloop *l, struct akz_ev_timer *t)
{
	if(t->armed) heap_remove(l, t);
}

int64_t akz_evloop_next_due(const struct akz_evloop *l)
{
	return l->root ? l->root->due_ms : INT64_MAX;
}

/* Runs every timer due by now, the earliest first. A timer armed during this (armed_turn ==
 * turn) waits for the next turn even when it is due: a timer cannot keep the loop from its
 * sockets. */
static void run_timers(struct akz_evloop *l)
{
	int64_t now = akz_mono_ms();

	l->turn++;
	while(l->root && l->root->due_ms <= now && l->root->armed_turn != l->turn){
		struct akz_ev_timer *t = l->root;
		heap_remove(l, t);
		t->fn(t, now);
	}
}

/* ---- sockets ------------------------------------------------------------------------------ */

int akz_ev_io_watch(struct akz_evloop *l, struct akz_ev_io *io, int fd, uint32_t events)
{
	if(fd < 0) events = 0;
	if(io->fd >= 0 && (io->fd != fd || events == 0)){
		epoll_ctl(l->epfd, EPOLL_CTL_DEL, io->fd, NULL);
		io->fd = -1;
		io->events = 0;
	}
	if(events == 0 || (io->fd == fd && io->events == events)) return 0;
	struct epoll_event e = {.events = events, .data.ptr = io};
	if(epoll_ctl(l->epfd, io->fd == fd ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, fd, &e) != 0){
		int saved = errno;
		if(io->fd >= 0) epoll_ctl(l->epfd, EPOLL_CTL_DEL, io->fd, NULL);
		io->fd = -1;
		io->events = 0;
		errno = saved;
		return -1;
	}
	io->fd = fd;
	io->events = events;
	return 0;
}

void akz_ev_io_forget(struct akz_ev_io *io)
{
	io->fd = -1;
	io->events = 0;
}

/* ---- the loop ----------------------------------------------------------------------------- */

int akz_evloop_new(struct akz_evloop **out, char *err, size_t errlen)
{
	*out = NULL;
	struct akz_evloop *l = calloc(1, sizeof(*l));
	if(l == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	l->epfd = epoll_create1(EPOLL_CLOEXEC);
	l->wakefd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
	/* Edge-triggered: every write(2) to the eventfd reports one event, so the loop never needs
	 * to read the counter back (a 64-bit count of wake-ups does not fill up). */
	struct epoll_event e = {.events = EPOLLIN | EPOLLET, .data.ptr = NULL};
	if(l->epfd < 0 || l->wakefd < 0 || epoll_ctl(l->epfd, EPOLL_CTL_ADD, l->wakefd, &e) != 0){
		akz_set_err(err, errlen, "epoll/eventfd: %s", strerror(errno));
		akz_evloop_free(l);
		return -1;
	}
	atomic_init(&l->awake, false);
	atomic_init(&l->stop, false);
	*out = l;
	return 0;
}

void akz_evloop_free(struct akz_evloop *l)
{
	if(l == NULL) return;
	if(l->epfd >= 0) close(l->epfd);
	if(l->wakefd >= 0) close(l->wakefd);
	free(l);
}

void akz_evloop_wake(struct akz_evloop *l)
{
	if(atomic_exchange(&l->awake, true)) return;
	uint64_t one = 1;
	/* Cannot fail on a valid eventfd short of 2^64 - 1 writes. */
	if(write(l->wakefd, &one, sizeof(one)) < 0) atomic_store(&l->awake, false);
}

void akz_evloop_stop(struct akz_evloop *l)
{
	atomic_store(&l->stop, true);
	uint64_t one = 1;
	(void)!write(l->wakefd, &one, sizeof(one));
}

/* How long the loop may sleep: until the first timer (rounded up to whole ms), forever
 * without one (-1), or not at all (busy). */
static int wait_ms(const struct akz_evloop *l, bool busy)
{
	if(busy) return 0;
	if(l->root == NULL) return -1;
	int64_t ms = l->root->due_ms - akz_mono_ms();
	if(ms < 0) return 0;
	return ms > INT_MAX ? INT_MAX : (int)ms;
}

/* Sleeps ms milliseconds, whatever signals come. */
static void pause_for(int ms)
{
	struct timespec ts = {.tv_sec = ms / 1000, .tv_nsec = (long)(ms % 1000) * 1000000L};
	while(clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, &ts) == EINTR){}
}

/* Waits as asked; returns epoll_wait's answer (-1 with errno, or the events in evs). Leaves
 * the loop awake. */
static int wait_for_events(struct akz_evloop *l, const struct akz_ev_hooks *hooks,
		enum akz_ev_wait how, struct epoll_event *evs)
{
	int ms = wait_ms(l, how == AKZ_EV_POLL);
	if(how == AKZ_EV_PAUSE){
		/* awake stays set: wakers hand over without a write(2), and this turn takes it. */
		if(ms < 0 || ms > hooks->pause_ms) ms = hooks->pause_ms;
		if(ms > 0) pause_for(ms);
		return epoll_wait(l->epfd, evs, MAX_EVENTS, 0);
	}
	/* From here a wake-up writes the eventfd. What was handed over before is taken now, and
	 * then the turn's end runs again: awake, the loop costs its wakers no write(2). */
	atomic_store(&l->awake, false);
	if(hooks->on_wake && hooks->on_wake(hooks->ctx)){
		atomic_store(&l->awake, true);
		return 0;                /* a turn without events, for what on_wake took */
	}
	int n = epoll_wait(l->epfd, evs, MAX_EVENTS, ms);
	atomic_store(&l->awake, true);
	return n;
}

void akz_evloop_run(struct akz_evloop *l, const struct akz_ev_hooks *hooks,
		void (*report)(void *ctx, const char *what, int errnum))
{
	struct epoll_event evs[MAX_EVENTS];

	atomic_store(&l->awake, true);
	while(!atomic_load(&l->stop)){
		enum akz_ev_wait how = hooks->before_sleep ? hooks->before_sleep(hooks->ctx) : AKZ_EV_WATCH;
		int n = wait_for_events(l, hooks, how, evs);
		if(n < 0){
			if(errno == EINTR) continue;
			if(report) report(hooks->ctx, "epoll_wait", errno);
			usleep(100000);
			continue;
		}
		for(int i = 0; i < n; i++){
			struct akz_ev_io *io = evs[i].data.ptr;
			if(io) io->fn(io, evs[i].events);
		}
		run_timers(l);
		if(hooks->on_wake && !atomic_load(&l->stop)) hooks->on_wake(hooks->ctx);
	}
}
