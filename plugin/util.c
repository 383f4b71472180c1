/* util.c - small helpers every module shares. */
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include "akz_util.h"

void akz_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if(err == NULL || errlen == 0) return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

int akz_thread_start(struct akz_thread *t, const char *what, void *(*fn)(void *), void *arg,
		char *err, size_t errlen)
{
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);   /* the new thread inherits this mask */
	int rc = pthread_create(&t->id, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	t->running = rc == 0;
	if(rc == 0){
		/* "akz <what>" in top -H and /proc/PID/task/TID/comm (cut to the kernel's 15 bytes) */
		char name[16];
		snprintf(name, sizeof(name), "akz %s", what);
		(void)pthread_setname_np(t->id, name);
	}
	if(rc) akz_set_err(err, errlen, "cannot start the %s thread: %s", what, strerror(rc));
	return rc ? -1 : 0;
}

void akz_thread_stop(struct akz_thread *t, void (*tell)(void *ctx), void *ctx)
{
	if(!t->running) return;
	tell(ctx);
	pthread_join(t->id, NULL);
	t->running = false;
}

struct sleeper {
	pthread_mutex_t *lock;
	pthread_cond_t *cond;
	bool *stop;
};

static void wake_sleeper(void *ctx)
{
	struct sleeper *s = ctx;
	pthread_mutex_lock(s->lock);
	*s->stop = true;
	pthread_cond_signal(s->cond);
	pthread_mutex_unlock(s->lock);
}

void akz_thread_stop_sleeper(struct akz_thread *t, pthread_mutex_t *lock, pthread_cond_t *cond, bool *stop)
{
	struct sleeper s = {lock, cond, stop};
	akz_thread_stop(t, wake_sleeper, &s);
}

int akz_cond_init_monotonic(pthread_cond_t *cond)
{
	pthread_condattr_t ca;
	int rc = pthread_condattr_init(&ca);
	if(rc) return rc;
	rc = pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
	if(rc == 0) rc = pthread_cond_init(cond, &ca);
	pthread_condattr_destroy(&ca);
	return rc;
}

int64_t akz_mono_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

int64_t akz_mono_ms(void)
{
	return akz_mono_us() / 1000;
}

bool akz_is_ip_literal(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];
	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}
