/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* util.c - small helpers every module shares. */
#include <arpa/inet.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <openssl/crypto.h>
#include "akz_util.h"

void akz_set_err(char *err, size_t errlen, const char *fmt, ...)
{
	va_list ap;
	if(err == NULL || errlen == 0) return;
	va_start(ap, fmt);
	vsnprintf(err, errlen, fmt, ap);
	va_end(ap);
}

void akz_free_secret(char *s)
{
	if(s == NULL) return;
	OPENSSL_cleanse(s, strlen(s));
	free(s);
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

size_t akz_utf8_seq_len(const unsigned char *s)
{
	if(s[0] < 0x80) return 1;
	if(s[0] >= 0xC2 && s[0] <= 0xDF) return (s[1] & 0xC0) == 0x80 ? 2 : 0;
	if(s[0] >= 0xE0 && s[0] <= 0xEF){
		if((s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80) return 0;
		if(s[0] == 0xE0 && s[1] < 0xA0) return 0;   /* overlong */
		if(s[0] == 0xED && s[1] >= 0xA0) return 0;  /* UTF-16 surrogates */
		return 3;
	}
	if(s[0] >= 0xF0 && s[0] <= 0xF4){
		if((s[1] & 0xC0) != 0x80 || (s[2] & 0xC0) != 0x80 || (s[3] & 0xC0) != 0x80) return 0;
		if(s[0] == 0xF0 && s[1] < 0x90) return 0;   /* overlong */
		if(s[0] == 0xF4 && s[1] >= 0x90) return 0;  /* above U+10FFFF */
		return 4;
	}
	return 0;   /* a continuation byte, C0/C1 (always overlong) or F5..FF */
}

/* True for U+0080..U+009F (C2 80..C2 9F): C1 controls, which some terminals obey (0x9B is CSI). */
static bool is_c1_control(const unsigned char *s)
{
	return s[0] == 0xC2 && s[1] >= 0x80 && s[1] <= 0x9F;
}

const char *akz_text_bad_reason(const char *s)
{
	for(const unsigned char *p = (const unsigned char *)s; *p;){
		size_t n = akz_utf8_seq_len(p);
		if(n == 0) return "is not valid UTF-8";
		if(*p < 0x20 || *p == 0x7F || (n == 2 && is_c1_control(p))) return "contains a control character";
		p += n;
	}
	return NULL;
}

size_t akz_escape(char *out, size_t outlen, const char *in)
{
	static const char hex[] = "0123456789abcdef";
	size_t o = 0;
	if(outlen == 0) return 0;
	for(const unsigned char *p = (const unsigned char *)(in ? in : "(null)"); *p;){
		char tmp[16];
		size_t tn;
		size_t n = akz_utf8_seq_len(p);
		if(n > 1 && !is_c1_control(p)){
			memcpy(tmp, p, n);          /* valid UTF-8 beyond ASCII stays readable */
			tn = n;
		}else if(n == 1 && *p >= 0x20 && *p != 0x7F && *p != '\\'){
			tmp[0] = (char)*p;
			tn = 1;
		}else{
			/* Control characters, the backslash itself, C1 controls and bytes that are not
			 * UTF-8: one escape per byte, so a log line stays one line and means one thing. */
			size_t bytes = n > 1 ? n : 1;
			tn = 0;
			for(size_t k = 0; k < bytes; k++){
				unsigned char c = p[k];
				const char *named = c == '\n' ? "\\n" : c == '\r' ? "\\r" : c == '\t' ? "\\t"
						: c == '\\' ? "\\\\" : NULL;
				if(named){
					memcpy(tmp + tn, named, 2);
					tn += 2;
				}else{
					tmp[tn++] = '\\';
					tmp[tn++] = 'x';
					tmp[tn++] = hex[c >> 4];
					tmp[tn++] = hex[c & 15];
				}
			}
			n = bytes;
		}
		if(o + tn + 4 > outlen){
			/* Room for "..." is always kept, so the cut falls between whole characters. */
			if(o + 4 <= outlen){
				memcpy(out + o, "...", 3);
				o += 3;
			}
			break;
		}
		memcpy(out + o, tmp, tn);
		o += tn;
		p += n;
	}
	out[o] = '\0';
	return o;
}

/* Slots of akz_esc: enough for every string of one log line. */
#define ESC_SLOTS 8
#define ESC_SLOT_LEN 1024

const char *akz_esc(const char *s)
{
	static _Thread_local char ring[ESC_SLOTS][ESC_SLOT_LEN];
	static _Thread_local unsigned next;
	char *out = ring[next++ % ESC_SLOTS];
	akz_escape(out, ESC_SLOT_LEN, s);
	return out;
}

bool akz_json_has_nul(const char *text, size_t len)
{
	if(memchr(text, '\0', len)) return true;
	for(size_t i = 0; i + 1 < len; i++){
		if(text[i] != '\\') continue;
		/* Outside strings JSON has no backslash; inside, "\\" is one escaped backslash and
		 * must be stepped over whole so that "\\u0000" (a backslash, then "u0000") is not read
		 * as an escaped NUL. */
		if(text[i + 1] == 'u' && i + 5 < len && memcmp(text + i + 2, "0000", 4) == 0) return true;
		i++;
	}
	return false;
}
