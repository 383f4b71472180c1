/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* tls.c - the shared, verifying TLS client context for upstream connections. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include "akz_tls.h"
#include "akz_util.h"

/* Appends OpenSSL's last error to err after `what`. */
static void set_ssl_error(char *err, size_t errlen, const char *what)
{
	char reason[200];
	unsigned long e = ERR_get_error();

	ERR_error_string_n(e, reason, sizeof(reason));
	akz_set_err(err, errlen, "%s: %s", what, e ? reason : "unknown error");
	ERR_clear_error();
}

/* Pins the server identity on the context: libmosquitto installs no host-name check of its
 * own on a context it is given (docs/DESIGN.md), so without this any certificate from a trusted CA
 * would do. */
static int pin_host(SSL_CTX *ctx, const char *host, char *err, size_t errlen)
{
	X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
	int ok;

	if(akz_is_ip_literal(host)){
		ok = X509_VERIFY_PARAM_set1_ip_asc(param, host);
	}else{
		X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
		ok = X509_VERIFY_PARAM_set1_host(param, host, 0);
	}
	if(ok != 1){
		set_ssl_error(err, errlen, "cannot set the expected server name");
		return -1;
	}
	return 0;
}

/* ---- session resumption across devices --------------------------------------------------
 * Every device connects to the same server with the same context, so a TLS session one
 * connection made can resume the next one: an abbreviated handshake, without the key exchange
 * and the certificate signatures, for a fleet coming online or refreshing its tokens. The device
 * still proves itself with its own JWT inside the connection; the server proved itself in the
 * full handshake that made the session, and a server that does not know the session answers with
 * a full, fully verified handshake. libmosquitto creates and starts the SSL objects itself, so the
 * session is offered from the info callback, which runs before the ClientHello is built. */

static int newest_idx = -1;   /* SSL_CTX ex_data: the newest session, one reference */
static int name_idx = -1;     /* SSL_CTX ex_data: the server name for SNI (malloc'd), if not numeric */
static pthread_once_t newest_once = PTHREAD_ONCE_INIT;

static void free_newest(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
	(void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
	SSL_SESSION_free(ptr);
}

static void free_name(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
	(void)parent; (void)ad; (void)idx; (void)argl; (void)argp;
	free(ptr);
}

static void make_newest_idx(void)
{
	newest_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_newest);
	name_idx = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, free_name);
}

/* A connection got a (new) session: keep it for the next ones. Returns 1: the reference is ours. */
static int keep_session(SSL *ssl, SSL_SESSION *sess)
{
	SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
	SSL_SESSION_free(SSL_CTX_get_ex_data(ctx, newest_idx));
	if(SSL_CTX_set_ex_data(ctx, newest_idx, sess) != 1){
		SSL_SESSION_free(sess);
	}
	return 1;
}

/* Runs before the ClientHello is built: names the server (the bridge connects to a numeric
 * address, which libmosquitto would put into SNI) and offers the newest session. */
static void start_handshake(const SSL *cssl, int where, int ret)
{
	(void)ret;
	if(!(where & SSL_CB_HANDSHAKE_START)) return;
	/* OpenSSL hands the callback a const pointer to the very SSL it is driving. */
	SSL *ssl = (SSL *)cssl; /* NOLINT(cppcoreguidelines-pro-type-const-cast) */
	SSL_CTX *ctx = SSL_get_SSL_CTX(ssl);
	const char *name = SSL_CTX_get_ex_data(ctx, name_idx);
	if(name) SSL_set_tlsext_host_name(ssl, name);   /* fails only on a name > 255 bytes */
	SSL_SESSION *sess = SSL_CTX_get_ex_data(ctx, newest_idx);
	if(sess && SSL_get0_session(ssl) == NULL && SSL_SESSION_is_resumable(sess)){
		SSL_set_session(ssl, sess);   /* failure only means a full handshake */
	}
}

/* Sets up the handshake callback: SNI with host (unless numeric) and session resumption.
 * Returns 0, or -1 with the reason in err. */
static int prepare_handshakes(SSL_CTX *ctx, const char *host, char *err, size_t errlen)
{
	if(pthread_once(&newest_once, make_newest_idx) != 0 || newest_idx < 0 || name_idx < 0){
		akz_set_err(err, errlen, "cannot set up TLS session resumption");
		return -1;
	}
	if(!akz_is_ip_literal(host)){
		char *name = strdup(host);
		if(name == NULL || SSL_CTX_set_ex_data(ctx, name_idx, name) != 1){
			free(name);
			akz_set_err(err, errlen, "out of memory");
			return -1;
		}
	}
	SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
	SSL_CTX_sess_set_new_cb(ctx, keep_session);
	SSL_CTX_set_info_callback(ctx, start_handshake);
	return 0;
}

bool akz_tls_has_session(SSL_CTX *ctx)
{
	return newest_idx >= 0 && SSL_CTX_get_ex_data(ctx, newest_idx) != NULL;
}

static int load_trust(SSL_CTX *ctx, const char *cafile, const char *capath, char *err, size_t errlen)
{
	if(cafile == NULL && capath == NULL){
		if(SSL_CTX_set_default_verify_paths(ctx) != 1){
			set_ssl_error(err, errlen, "cannot load the system CA store");
			return -1;
		}
		return 0;
	}
	if(SSL_CTX_load_verify_locations(ctx, cafile, capath) != 1){
		char what[512];
		snprintf(what, sizeof(what), "cannot load CA certificates from %s", cafile ? cafile : capath);
		set_ssl_error(err, errlen, what);
		return -1;
	}
	return 0;
}

SSL_CTX *akz_tls_client_ctx(const char *host, const char *cafile, const char *capath,
		const char *tls_version, char *err, size_t errlen)
{
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	if(ctx == NULL){
		set_ssl_error(err, errlen, "cannot create a TLS context");
		return NULL;
	}
	/* TLS 1.2 exactly, as akenza's reference client: a TLS 1.3 connection holds ~14 KB more
	 * per device (session tickets), which counts at thousands of devices. */
	int v = (tls_version && strcmp(tls_version, "tlsv1.3") == 0) ? TLS1_3_VERSION : TLS1_2_VERSION;
	if(SSL_CTX_set_min_proto_version(ctx, v) != 1 || SSL_CTX_set_max_proto_version(ctx, v) != 1){
		set_ssl_error(err, errlen, "cannot set the TLS version");
		goto fail;
	}
	SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
	SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
	/* Read-ahead: one read(2) takes every record waiting, where OpenSSL would otherwise read
	 * each record's header and body separately (two syscalls per PUBACK). The bridge reads
	 * on while OpenSSL holds input (bridge_loop.c, read_socket). */
	SSL_CTX_set_read_ahead(ctx, 1);
	if(load_trust(ctx, cafile, capath, err, errlen) || pin_host(ctx, host, err, errlen)
			|| prepare_handshakes(ctx, host, err, errlen)) goto fail;
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}
