/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_tls.h - the one TLS client context every upstream connection shares. */
#ifndef AKZ_TLS_H
#define AKZ_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <openssl/ssl.h>

/* Makes a client SSL_CTX that verifies the server's certificate chain against cafile/capath
 * (both NULL: the system CA store) and the server's name against `host` (a DNS name or an IP
 * literal), with TLS 1.2 exactly ("tlsv1.2") or TLS 1.3 ("tlsv1.3").
 * Returns the context (free with SSL_CTX_free), or NULL with a reason in err. */
SSL_CTX *akz_tls_client_ctx(const char *host, const char *cafile, const char *capath,
		const char *tls_version, char *err, size_t errlen);

/* True once a connection made with ctx has left a TLS session that the next ones resume. */
bool akz_tls_has_session(SSL_CTX *ctx);

#endif
