/* util.c - small helpers every module shares. */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include "akz_util.h"

void akz_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if(err == NULL || errlen == 0) return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

int akz_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg)
{
	sigset_t all, old;
	sigfillset(&all);
	pthread_sigmask(SIG_SETMASK, &all, &old);   /* the new thread inherits this mask */
	int rc = pthread_create(thread, NULL, fn, arg);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	return rc;
}
