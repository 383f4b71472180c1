/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* tlsio.c - the socket side of an upstream TLS connection: a loop turn's records leave in one
 * write(2), and a socket known to be empty is not read again until epoll says otherwise. */
#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/bio.h>
#include "akz_tlsio.h"

/* Why: akenza takes one connection per device, so the uplinks of a device are all the bridge
 * can send together, and libmosquitto hands OpenSSL one packet at a time: every PUBLISH was a
 * write(2), and a device with several uplinks waiting needed TCP_CORK around them (two more
 * syscalls) to leave in one segment. A filter BIO under the SSL object keeps the records of a
 * loop turn in memory and the bridge writes them out once at the end of the turn. The buffer
 * exists only while it holds something, so an idle device pays nothing.
 *
 * Reads: libmosquitto reads a connection until read(2) says EAGAIN, so every wake-up for a
 * PUBACK cost a second, empty read. A read that returned less than asked for emptied the
 * socket; until epoll (level-triggered: data that came later is reported) says the socket is
 * readable again, the filter answers "try again" itself. */

/* Past this a record waits for the socket instead of the buffer growing: it bounds the memory
 * a device with a stalled connection holds, as the socket's own send buffer would. */
#define TLSIO_MAX ((size_t)64 * 1024)
/* At a light load a turn holds one record of a device, a few hundred bytes: a first buffer this
 * small comes from glibc's per-thread cache, a larger one from the arena. Under load a turn
 * fills TLSIO_MAX, so the buffer grows fourfold (1, 4, 16, 64 KB): few copies on the way. */
#define TLSIO_FIRST ((size_t)1024)
#define TLSIO_GROWTH 4

struct tlsio {
	unsigned char *data;
	size_t len;
	size_t cap;
	bool drained;      /* the last read emptied the socket */
	bool direct;       /* records go straight to the socket (akz_tlsio_unbuffer) */
};

/* One method for every filter, made by the first akz_tlsio_init and freed by the last
 * akz_tlsio_cleanup (a plugin unloaded with it still allocated would leak it). The type number
 * is taken once per process and kept. */
static pthread_mutex_t method_lock = PTHREAD_MUTEX_INITIALIZER;
static int method_users;
static BIO_METHOD *tlsio_method;
static int tlsio_type = -1;

/* Writes the buffer to the next BIO. Returns 1 when all went (the memory is then given back),
 * 0 when the next BIO asks to retry (what is left stays, retry flags are copied onto bio),
 * -1 on an error. */
static int write_out(BIO *bio, struct tlsio *w)
{
	BIO *next = BIO_next(bio);
	size_t off = 0;
	int rc = 1;

	BIO_clear_retry_flags(bio);
	while(off < w->len){
		size_t chunk = w->len - off;
		int n = BIO_write(next, w->data + off, chunk > INT_MAX ? INT_MAX : (int)chunk);
		if(n <= 0){
			BIO_copy_next_retry(bio);
			rc = BIO_should_retry(next) ? 0 : -1;
			break;
		}
		off += (size_t)n;
	}
	if(off == w->len){
		free(w->data);
		w->data = NULL;
		w->len = w->cap = 0;
		return rc;
	}
	memmove(w->data, w->data + off, w->len - off);
	w->len -= off;
	return rc;
}

/* Appends n bytes, growing the buffer up to TLSIO_MAX. False when they would pass the limit or
 * memory is short: the caller then writes out first. */
static bool append(struct tlsio *w, const void *data, size_t n)
{
	if(w->len + n > w->cap){
		if(w->len + n > TLSIO_MAX) return false;
		size_t cap = w->cap ? w->cap : TLSIO_FIRST;
		while(cap < w->len + n) cap *= TLSIO_GROWTH;
		if(cap > TLSIO_MAX) cap = TLSIO_MAX;
		unsigned char *p = realloc(w->data, cap);
		if(p == NULL) return false;
		w->data = p;
		w->cap = cap;
	}
	memcpy(w->data + w->len, data, n);
	w->len += n;
	return true;
}

/* BIO write: keeps the record, or, when it does not fit, writes out what is held and then
 * keeps it (one larger than the buffer goes straight through, as every record does once
 * unbuffered). Returns the bytes taken, or
 * <= 0 with the next BIO's retry flags. */
static int tlsio_write(BIO *bio, const char *data, int len)
{
	struct tlsio *w = BIO_get_data(bio);
	BIO_clear_retry_flags(bio);
	if(len <= 0) return 0;
	if(!w->direct && append(w, data, (size_t)len)) return len;
	if(w->len && write_out(bio, w) != 1) return -1;   /* order: what is held goes first */
	if(!w->direct && append(w, data, (size_t)len)) return len;
	int n = BIO_write(BIO_next(bio), data, len);
	BIO_copy_next_retry(bio);
	return n;
}

/* BIO read: from the socket, unless the last read emptied it. */
static int tlsio_read(BIO *bio, char *data, int len)
{
	struct tlsio *w = BIO_get_data(bio);
	BIO_clear_retry_flags(bio);
	if(w->drained){
		BIO_set_retry_read(bio);
		errno = EAGAIN;
		return -1;
	}
	int n = BIO_read(BIO_next(bio), data, len);
	BIO_copy_next_retry(bio);
	if((n > 0 && n < len) || (n <= 0 && BIO_should_retry(bio))) w->drained = true;
	return n;
}

static long tlsio_ctrl(BIO *bio, int cmd, long num, void *ptr)
{
	struct tlsio *w = BIO_get_data(bio);
	BIO *next = BIO_next(bio);

	switch(cmd){
	case BIO_CTRL_FLUSH:
		/* OpenSSL flushes after alerts (close_notify): the DISCONNECT before it goes too. */
		if(w->len){
			int rc = write_out(bio, w);
			if(rc != 1) return rc == 0 ? 0 : -1;
		}
		return next ? BIO_ctrl(next, cmd, num, ptr) : 1;
	case BIO_CTRL_WPENDING:
		return (long)w->len + (next ? BIO_ctrl(next, cmd, num, ptr) : 0);
	case BIO_CTRL_DUP:
		return 0;   /* an SSL object is never duplicated here */
	default:
		return next ? BIO_ctrl(next, cmd, num, ptr) : 0;
	}
}

static int tlsio_create(BIO *bio)
{
	struct tlsio *w = calloc(1, sizeof(*w));
	if(w == NULL) return 0;
	BIO_set_data(bio, w);
	BIO_set_init(bio, 1);
	return 1;
}

static int tlsio_destroy(BIO *bio)
{
	struct tlsio *w = BIO_get_data(bio);
	if(w){
		free(w->data);
		free(w);
	}
	BIO_set_data(bio, NULL);
	return 1;
}

/* Makes the method. Returns it, or NULL when out of memory. */
static BIO_METHOD *make_method(void)
{
	if(tlsio_type == -1){
		int type = BIO_get_new_index();
		if(type == -1) return NULL;
		tlsio_type = type | BIO_TYPE_FILTER;
	}
	BIO_METHOD *m = BIO_meth_new(tlsio_type, "akenza upstream socket filter");
	if(m == NULL) return NULL;
	if(!BIO_meth_set_write(m, tlsio_write) || !BIO_meth_set_read(m, tlsio_read)
			|| !BIO_meth_set_ctrl(m, tlsio_ctrl)
			|| !BIO_meth_set_create(m, tlsio_create) || !BIO_meth_set_destroy(m, tlsio_destroy)){
		BIO_meth_free(m);
		return NULL;
	}
	return m;
}

int akz_tlsio_init(void)
{
	int rc = 0;
	pthread_mutex_lock(&method_lock);
	if(method_users == 0) tlsio_method = make_method();
	if(tlsio_method) method_users++;
	else rc = -1;
	pthread_mutex_unlock(&method_lock);
	return rc;
}

void akz_tlsio_cleanup(void)
{
	pthread_mutex_lock(&method_lock);
	if(method_users > 0 && --method_users == 0){
		BIO_meth_free(tlsio_method);
		tlsio_method = NULL;
	}
	pthread_mutex_unlock(&method_lock);
}

/* ssl's filter, or NULL. After akz_tlsio_attach it is the top of the read side; on the write
 * side OpenSSL may push its own buffer above it for a renegotiation. */
static BIO *find_filter(SSL *ssl)
{
	if(ssl == NULL || tlsio_type == -1) return NULL;
	return BIO_find_type(SSL_get_wbio(ssl), tlsio_type);
}

int akz_tlsio_attach(SSL *ssl)
{
	if(ssl == NULL || tlsio_method == NULL) return -1;
	if(find_filter(ssl)) return 0;
	BIO *sock = SSL_get_rbio(ssl);
	/* libmosquitto gives the SSL object one socket BIO for both directions; after the
	 * handshake OpenSSL's own write buffer is gone, so both ends are that BIO. */
	if(sock == NULL || SSL_get_wbio(ssl) != sock) return -1;
	BIO *f = BIO_new(tlsio_method);
	if(f == NULL) return -1;
	/* References: the chain takes one on the socket BIO, the SSL object two on the filter (a
	 * read and a write end); each SSL_set0 gives back one of the SSL's two on the socket BIO. */
	if(BIO_up_ref(sock) != 1){
		BIO_free(f);
		return -1;
	}
	BIO_push(f, sock);
	if(BIO_up_ref(f) != 1){
		BIO_free_all(f);
		return -1;
	}
	SSL_set0_rbio(ssl, f);
	SSL_set0_wbio(ssl, f);
	return 0;
}

int akz_tlsio_flush(SSL *ssl)
{
	BIO *f = find_filter(ssl);
	if(f == NULL) return 1;
	struct tlsio *w = BIO_get_data(f);
	if(w->len == 0) return 1;
	errno = 0;
	int rc = write_out(f, w);
	if(rc < 0 && errno == 0) errno = EIO;
	return rc;
}

int akz_tlsio_unbuffer(SSL *ssl)
{
	BIO *f = find_filter(ssl);
	if(f == NULL) return 1;
	struct tlsio *w = BIO_get_data(f);
	w->direct = true;
	return akz_tlsio_flush(ssl);
}

size_t akz_tlsio_pending(SSL *ssl)
{
	BIO *f = find_filter(ssl);
	if(f == NULL) return 0;
	const struct tlsio *w = BIO_get_data(f);
	return w->len;
}

void akz_tlsio_readable(SSL *ssl)
{
	BIO *f = find_filter(ssl);
	if(f){
		struct tlsio *w = BIO_get_data(f);
		w->drained = false;
	}
}
