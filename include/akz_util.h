/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_util.h - small helpers every module shares. */
#ifndef AKZ_UTIL_H
#define AKZ_UTIL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* The object of type that holds member at p. */
#define akz_container_of(p, type, member) ((type *)(void *)((char *)(p) - offsetof(type, member)))

/* Formats a one-line reason into err (size errlen): the one way errors are reported to a caller.
 * err NULL or errlen 0 is allowed (nothing is written). Never fails; long reasons are cut. */
void akz_set_err(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* A thread of the plugin's (the bridge, the spool's flusher, the name lookups). */
struct akz_thread {
	pthread_t id;
	bool running;                /* started and not yet stopped */
};

/* Starts fn(arg) on a new thread named "akz <what>" with every signal blocked in it: the
 * broker's signals (SIGHUP reload, SIGINT) belong to the broker thread. Returns 0, or -1 with
 * "cannot start the <what> thread: <reason>" in err. */
int akz_thread_start(struct akz_thread *t, const char *what, void *(*fn)(void *), void *arg,
		char *err, size_t errlen);

/* If t runs: calls tell(ctx), which must make the thread's function return soon, and waits until
 * it has. Never fails; a thread never started is left alone. */
void akz_thread_stop(struct akz_thread *t, void (*tell)(void *ctx), void *ctx);

/* akz_thread_stop for a thread that sleeps on cond under lock until *stop is true: sets it under
 * the lock, signals cond, and waits for the thread to end. Never fails. */
void akz_thread_stop_sleeper(struct akz_thread *t, pthread_mutex_t *lock, pthread_cond_t *cond, bool *stop);

/* Wipes the NUL-terminated secret s (a password, a token) and frees it, so that freed memory
 * keeps no copy. NULL is allowed. Never fails. */
void akz_free_secret(char *s);

/* Initialises a condition variable whose timed waits run on the monotonic clock, which a
 * wall-clock step does not move. Returns 0 or pthread's error number. */
int akz_cond_init_monotonic(pthread_cond_t *cond);

/* Milliseconds and microseconds on the monotonic clock, which wall-clock steps do not move.
 * Never fail. */
int64_t akz_mono_ms(void);
int64_t akz_mono_us(void);

/* True if host is a numeric IPv4 or IPv6 address (no name to look up or to put into SNI). */
bool akz_is_ip_literal(const char *host);

/* Length of the UTF-8 sequence starting at s (1..4), or 0 if it is not valid UTF-8: overlong forms
 * (C0 80 for NUL), UTF-16 surrogates and code points above U+10FFFF are invalid. Reads at most
 * up to the first byte that does not fit, so a NUL terminator ends any sequence. Never fails. */
size_t akz_utf8_seq_len(const unsigned char *s);

/* The one check of text that names something (device ids, usernames, what a token carries):
 * NULL if s is valid UTF-8 without control characters (C0, DEL, C1), else the reason as a phrase
 * ("is not valid UTF-8", "contains a control character"). Never fails. */
const char *akz_text_bad_reason(const char *s);

/* Copies in (NULL prints as "(null)") into out (size outlen >= 1) so that it is safe in a log
 * line: control characters become \n, \r, \t or \xHH, a backslash becomes \\, bytes that are
 * not UTF-8 become \xHH; what does not fit is cut and marked "...". Returns the length written.
 * Never fails. */
size_t akz_escape(char *out, size_t outlen, const char *in);

/* akz_escape into one of 8 buffers of this thread, used in turn: for the arguments of one log
 * call, e.g. mosquitto_log_printf(..., "user '%s'", akz_esc(username)). The result stays valid
 * until the same thread has made 8 more calls; strings are cut at about 1000 bytes. Never fails. */
const char *akz_esc(const char *s);

/* True if JSON text (len bytes) holds a NUL character, raw or as the escape \u0000: parsed into
 * a C string it would cut the string short without a word. Never fails. */
bool akz_json_has_nul(const char *text, size_t len);

#endif
