/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_tlsio.h - the socket side of an upstream TLS connection: a loop turn's records leave in
 * one write(2), and a socket known to be empty is not read again until epoll says otherwise. */
#ifndef AKZ_TLSIO_H
#define AKZ_TLSIO_H

#include <stddef.h>
#include <openssl/ssl.h>

/* Makes the filter's BIO method, shared by all connections. Returns 0, or -1 when out of
 * memory. Each successful call is paired with one akz_tlsio_cleanup(). */
int akz_tlsio_init(void);

/* Frees the method with the last user. Call once every SSL object with a filter is freed. */
void akz_tlsio_cleanup(void);

/* Puts a filter between ssl and its socket BIO. Every record OpenSSL makes (one per MQTT packet
 * libmosquitto sends) then stays in memory until akz_tlsio_flush(), and after a read that
 * emptied the socket further reads say "try again" without a syscall until
 * akz_tlsio_readable(). Call once the handshake is done, on a connection whose socket is in a
 * level-triggered epoll set; calling it again is a no-op. Returns 0, or -1 when out of memory
 * or without akz_tlsio_init (the connection then works as before, a syscall per record). */
int akz_tlsio_attach(SSL *ssl);

/* Writes out what ssl's buffer holds. Returns 1 when all of it went (also with nothing held, no
 * filter attached, or ssl NULL), 0 when the socket took only part (call again once it is
 * writable: akz_tlsio_pending() stays > 0), -1 on a socket error (errno tells). Never blocks
 * on a non-blocking socket. */
int akz_tlsio_flush(SSL *ssl);

/* Writes out what ssl's buffer holds, as akz_tlsio_flush() (same returns), and from then on lets
 * every record go straight to the socket: for the last packets of a connection, which
 * libmosquitto 2.1 follows with shutdown(2) on the socket within the same call. */
int akz_tlsio_unbuffer(SSL *ssl);

/* Bytes held for ssl, 0 for NULL or without a filter. */
size_t akz_tlsio_pending(SSL *ssl);

/* Tells that epoll reported the socket readable (or closed): the next read goes to it. NULL
 * and connections without a filter are ignored. */
void akz_tlsio_readable(SSL *ssl);

#endif
