/* akz_util.h - small helpers every module shares. */
#ifndef AKZ_UTIL_H
#define AKZ_UTIL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The object of type that holds member at p. */
#define akz_container_of(p, type, member) ((type *)(void *)((char *)(p) - offsetof(type, member)))

/* Formats a one-line reason into err (size errlen); err NULL or errlen 0 is allowed (nothing is
 * written). Never fails; long reasons are cut. */
void akz_set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* Starts a thread with every signal blocked in it: the broker's signals (SIGHUP reload, SIGINT)
 * belong to the broker thread. Returns 0, or pthread_create's error number. */
int akz_thread_start(pthread_t *thread, void *(*fn)(void *), void *arg);

/* Milliseconds and microseconds on the monotonic clock, which wall-clock steps do not move.
 * Never fail. */
int64_t akz_mono_ms(void);
int64_t akz_mono_us(void);

/* True if host is a numeric IPv4 or IPv6 address (no name to look up or to put into SNI). */
bool akz_is_ip_literal(const char *host);

#endif
