/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* wakeup.c - waking the broker thread out of its event-loop sleep, so that its TICK runs now. */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include "akz_wakeup.h"
#include "akz_util.h"

/* Why a signal: Mosquitto 2.0's loop sleeps in epoll_wait for up to 100 ms between TICKs, and a
 * plugin may publish only on the broker thread, so a downlink the bridge thread handed over
 * waited 50 ms on average for the next TICK. The plugin API offers no wake-up; a signal to the
 * broker thread ends the sleep (epoll_wait returns EINTR, which the loop takes as a normal
 * turn) and the TICK follows at once. Around epoll_wait the broker blocks only SIGINT, SIGTERM,
 * SIGHUP, SIGUSR1 and SIGUSR2; 2.0 uses no real-time signal, 2.1 only SIGRTMIN. SA_RESTART
 * keeps every other call the broker thread may be in from failing with EINTR. */
#define WAKE_SIGNAL_OFFSET 6     /* SIGRTMIN + 6: clear of the few that libraries pick first */

/* A signal that lands after the TICK's last look at the hand-over queue and before the broker's
 * epoll_wait is spent on nothing, and the broker sleeps its 100 ms. A poke the TICK has not
 * acknowledged after this long is sent again (akz_wakeup_recheck). A busy broker acknowledges
 * within a loop turn, so the repeat is rare. */
#define REPOKE_MS 5
/* Past this the broker's own 100 ms TICK has come or will not come (per_listener_settings true
 * stops TICKs altogether): repeating further would only cost signals. */
#define REPOKE_UNTIL_MS 100

/* glibc 2.36 has SIGEV_THREAD_ID but not the field's documented name. */
#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* The heartbeat: Mosquitto 2.1 built without websockets sleeps until its next event (its
 * keepalive check, every 5 s while clients are connected; the $SYS update otherwise), not at
 * most 100 ms as 2.0 does, and its TICK offers no way to bound that sleep and still be called
 * on every loop turn (compat.c). A one-shot timer sends the wake signal to the broker thread
 * when no TICK has run for heartbeat_ms; every TICK pushes it back once less than half of it is
 * left, so while the loop turns on its own (2.1 with websockets turns every 100 ms) it never
 * fires, and a busy broker re-arms it once per half heartbeat. */
static int heartbeat_ms;         /* 0: off. Set at plugin init, before any wakeup is made */

struct akz_wakeup {
	pthread_t broker;
	int sig;
	atomic_bool poked;           /* a signal is on its way and the TICK has not run yet */
	_Atomic int64_t poked_ms;    /* when it was sent, CLOCK_MONOTONIC */
	_Atomic int64_t repoke_ms;   /* when to send it again */
	bool has_timer;              /* the heartbeat's timer exists */
	timer_t timer;
	int64_t beat_due_ms;         /* broker thread only: when the heartbeat fires */
};

static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;
static int installs;             /* instances sharing the handler, under install_lock */

static void on_wake_signal(int sig)
{
	(void)sig;   /* interrupting epoll_wait is all it is for */
}

/* Sets w's heartbeat to fire heartbeat_ms from now. Broker thread. Cannot fail for a timer
 * that exists; a failure would only leave the old due time. */
static void rearm_heartbeat(struct akz_wakeup *w, int64_t now)
{
	struct itimerspec its;
	memset(&its, 0, sizeof(its));
	its.it_value.tv_sec = heartbeat_ms / 1000;
	its.it_value.tv_nsec = (long)(heartbeat_ms % 1000) * 1000000L;
	if(timer_settime(w->timer, 0, &its, NULL) == 0) w->beat_due_ms = now + heartbeat_ms;
}

/* Installs the handler unless someone else's is there. Returns 0 or -1 with the reason. */
static int install_handler(int sig, char *err, size_t errlen)
{
	struct sigaction old, sa;
	if(sigaction(sig, NULL, &old) != 0){
		akz_set_err(err, errlen, "signal %d: %s", sig, strerror(errno));
		return -1;
	}
	/* Only called with no instance installed (installs == 0), so any handler is someone else's. */
	if((old.sa_flags & SA_SIGINFO) || (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)){
		akz_set_err(err, errlen, "signal SIGRTMIN+%d already has a handler in this process",
				WAKE_SIGNAL_OFFSET);
		return -1;
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_wake_signal;
	sa.sa_flags = SA_RESTART;
	sigemptyset(&sa.sa_mask);
	if(sigaction(sig, &sa, NULL) != 0){
		akz_set_err(err, errlen, "signal %d: %s", sig, strerror(errno));
		return -1;
	}
	return 0;
}

void akz_wakeup_set_heartbeat(int ms)
{
	heartbeat_ms = ms > 0 ? ms : 0;
}

/* Creates w's heartbeat timer, aimed at the calling (broker) thread and first due in
 * heartbeat_ms. Returns 0, or -1 with the reason in err. */
static int start_heartbeat(struct akz_wakeup *w, int sig, char *err, size_t errlen)
{
	struct sigevent sev;
	memset(&sev, 0, sizeof(sev));
	sev.sigev_notify = SIGEV_THREAD_ID;
	sev.sigev_signo = sig;
	sev.sigev_notify_thread_id = gettid();
	if(timer_create(CLOCK_MONOTONIC, &sev, &w->timer) != 0){
		snprintf(err, errlen, "cannot make the heartbeat timer: %s", strerror(errno));
		return -1;
	}
	w->has_timer = true;
	rearm_heartbeat(w, akz_mono_ms());
	return 0;
}

int akz_wakeup_new(struct akz_wakeup **out, char *err, size_t errlen)
{
	*out = NULL;
	int sig = SIGRTMIN + WAKE_SIGNAL_OFFSET;
	if(sig > SIGRTMAX){
		akz_set_err(err, errlen, "no real-time signal free");
		return -1;
	}
	struct akz_wakeup *w = calloc(1, sizeof(*w));
	if(w == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	pthread_mutex_lock(&install_lock);
	int rc = installs > 0 ? 0 : install_handler(sig, err, errlen);
	if(rc == 0) installs++;
	pthread_mutex_unlock(&install_lock);
	if(rc){
		free(w);
		return -1;
	}
	w->broker = pthread_self();
	w->sig = sig;
	atomic_init(&w->poked, false);
	atomic_init(&w->poked_ms, 0);
	atomic_init(&w->repoke_ms, 0);
	if(heartbeat_ms > 0 && start_heartbeat(w, sig, err, errlen)){
		akz_wakeup_free(w);
		return -1;
	}
	*out = w;
	return 0;
}

void akz_wakeup_poke(struct akz_wakeup *w)
{
	if(w == NULL || atomic_exchange(&w->poked, true)) return;
	int64_t now = akz_mono_ms();
	atomic_store(&w->poked_ms, now);
	atomic_store(&w->repoke_ms, now + REPOKE_MS);
	/* Cannot fail for a live thread and a valid signal; a lost wake only means the TICK comes
	 * in its own time. */
	(void)pthread_kill(w->broker, w->sig);
}

int akz_wakeup_recheck(struct akz_wakeup *w)
{
	if(w == NULL || !atomic_load(&w->poked)) return -1;
	int64_t now = akz_mono_ms(), due = atomic_load(&w->repoke_ms);
	if(now - atomic_load(&w->poked_ms) >= REPOKE_UNTIL_MS) return -1;
	if(now < due) return (int)(due - now);
	atomic_store(&w->repoke_ms, now + REPOKE_MS);
	(void)pthread_kill(w->broker, w->sig);
	return REPOKE_MS;
}

void akz_wakeup_ack(struct akz_wakeup *w)
{
	if(w == NULL) return;
	atomic_store(&w->poked, false);
	if(w->has_timer){
		int64_t now = akz_mono_ms();
		if(w->beat_due_ms - now < heartbeat_ms / 2) rearm_heartbeat(w, now);
	}
}

void akz_wakeup_free(struct akz_wakeup *w)
{
	if(w == NULL) return;
	if(w->has_timer) timer_delete(w->timer);
	pthread_mutex_lock(&install_lock);
	if(--installs == 0){
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = SIG_IGN;
		sigemptyset(&sa.sa_mask);
		sigaction(w->sig, &sa, NULL);
	}
	pthread_mutex_unlock(&install_lock);
	free(w);
}
