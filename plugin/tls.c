/* tls.c - the shared, verifying TLS client context for upstream connections. */
#include <stdio.h>
#include <string.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/x509v3.h>
#include "akz_tls.h"

/* Appends OpenSSL's last error to err after `what`. */
static void set_ssl_error(char *err, size_t errlen, const char *what)
{
	char reason[200];
	unsigned long e = ERR_get_error();

	ERR_error_string_n(e, reason, sizeof(reason));
	snprintf(err, errlen, "%s: %s", what, e ? reason : "unknown error");
	ERR_clear_error();
}

static int is_ip_literal(const char *host)
{
	unsigned char buf[sizeof(struct in6_addr)];
	return inet_pton(AF_INET, host, buf) == 1 || inet_pton(AF_INET6, host, buf) == 1;
}

/* Pins the server identity on the context: libmosquitto installs no host-name check of its
 * own on a context it is given (DESIGN.md), so without this any certificate from a trusted CA
 * would do. */
static int pin_host(SSL_CTX *ctx, const char *host, char *err, size_t errlen)
{
	X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
	int ok;

	if(is_ip_literal(host)){
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
	if(load_trust(ctx, cafile, capath, err, errlen) || pin_host(ctx, host, err, errlen)) goto fail;
	return ctx;
fail:
	SSL_CTX_free(ctx);
	return NULL;
}
