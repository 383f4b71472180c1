/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akenza_api.h - akenza's REST API (https://api.akenza.io) as akenzactl uses it: devices and their
 * credentials, over libcurl, with akenza's rate limits respected and throttled requests retried. */
#ifndef AKENZA_API_H
#define AKENZA_API_H

#include <stdbool.h>
#include <stddef.h>

#define AKZ_API_URL_DEFAULT "https://api.akenza.io"
#define AKZ_API_KEY_ENV "AKENZA_API_KEY"
#define AKZ_API_RETRIES_DEFAULT 8
#define AKZ_API_WAIT_MAX_DEFAULT 120   /* seconds: the longest one wait for a rate-limit window */

struct akz_api_opts {
	const char *url;          /* https base URL; NULL: AKZ_API_URL_DEFAULT */
	const char *cafile;       /* CA file for the API's certificate; NULL: the system store */
	int max_retries;          /* retries of one request after a 429, a 5xx or a broken connection */
	int max_wait_s;           /* longest single wait the server's rate-limit headers may ask for */
};

/* What the requests cost, for the summary. */
struct akz_api_stats {
	long requests;            /* HTTP requests sent, retries included */
	long retries;
	long throttled;           /* 429 answers */
	long server_errors;       /* 5xx answers and broken connections */
	double waited_s;          /* time spent waiting for rate-limit windows and backoff */
};

struct akz_api;
struct cJSON;

/* Opens a client of the API at opts->url with api_key (sent as x-api-key; copied and wiped at
 * close). Connections are kept open between requests; TLS certificates and host names are always
 * verified; only https is spoken; libcurl's proxy variables (https_proxy, no_proxy) apply.
 * Returns 0 and *out, or -1 with a reason in err (URL not https, key with control characters,
 * libcurl failure). */
int akz_api_open(const struct akz_api_opts *opts, const char *api_key, struct akz_api **out, char *err, size_t errlen);

/* Closes the client and wipes the key. NULL is ignored. */
void akz_api_close(struct akz_api *api);

const struct akz_api_stats *akz_api_stats(const struct akz_api *api);

/* Why no further request can succeed - the API was unreachable after every retry, its certificate
 * failed verification, or it refused the API key (401) - or NULL while requests may succeed.
 * A caller working through a fleet stops there rather than fail every device the same way. */
const char *akz_api_dead(const struct akz_api *api);

/* Each call below returns 0 on success; AKZ_API_ABSENT where noted; or -1 with a reason in err
 * (akenza's "message" and the HTTP status, or the transport error). JSON results are new objects
 * the caller frees with cJSON_Delete. */
#define AKZ_API_ABSENT 1

/* GET /v3/devices/by-device-id?deviceId=ID: the device (its "id" is akenza's own id).
 * AKZ_API_ABSENT: akenza knows no such device. */
int akz_api_find_device(struct akz_api *api, const char *device_id, struct cJSON **device, char *err, size_t errlen);

/* POST /v3/devices {name, deviceId, workspaceId, dataFlowId, connectivity: MQTT}: the new device. */
int akz_api_create_device(struct akz_api *api, const char *device_id, const char *workspace_id,
		const char *data_flow_id, struct cJSON **device, char *err, size_t errlen);

/* GET /v3/device-authorization/devices/AKENZA_ID/credentials, every page: an array of credentials. */
int akz_api_list_credentials(struct akz_api *api, const char *akenza_id, struct cJSON **list, char *err, size_t errlen);

/* POST /v3/device-authorization/devices/AKENZA_ID/credentials {name, akenzaDeviceId, algorithm,
 * publicKey}: the new credential. algorithm: RSA256_PEM, EC256_PEM, RSA256_X509_PEM, EC256_X509_PEM. */
int akz_api_create_credential(struct akz_api *api, const char *akenza_id, const char *name,
		const char *algorithm, const char *pem, struct cJSON **credential, char *err, size_t errlen);

/* DELETE /v3/device-authorization/devices/AKENZA_ID/credentials/CREDENTIAL_ID. */
int akz_api_delete_credential(struct akz_api *api, const char *akenza_id, const char *credential_id,
		char *err, size_t errlen);

#endif
