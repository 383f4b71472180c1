/* akz_util.h - small helpers every module shares. */
#ifndef AKZ_UTIL_H
#define AKZ_UTIL_H

#include <pthread.h>
#include <stddef.h>

/* Formats a one-line reason into err (size errlen); err NULL or errlen 0 is allowed (nothing is
 * written). Never fails; long reasons are cut. */
void akz_set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Starts a thread with every signal blocked in it: the broker's signals (SIGHUP reload, SIGINT)
 * belong to the broker thread. Returns 0, or pthread_create's error number. */
int akz_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg);

#endif
