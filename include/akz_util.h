/* akz_util.h - small helpers every module shares. */
#ifndef AKZ_UTIL_H
#define AKZ_UTIL_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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
