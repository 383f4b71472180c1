/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akenza_api.c - akenza's REST API over libcurl: one kept-alive connection, rate limits respected,
 * 429 and 5xx retried with bounded backoff, redirects followed only within the API's own origin. */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cJSON.h>
#include <curl/curl.h>
#include <openssl/crypto.h>
#include "akenza_api.h"

#define BODY_MAX (16u << 20)     /* the largest answer read: a page of credentials is a few KB */
#define REDIRECTS_MAX 5
#define PAGE_SIZE 100            /* credentials per page asked for */
#define PAGES_MAX 1000
#define BACKOFF_FIRST_S 0.5
#define BACKOFF_MAX_S 10.0         /* without a hint from the server: 8 retries take ~45 s */
#define KEY_MAX 1024

struct body {
	char *data;
	size_t len, cap;
	bool too_big;
};

struct akz_api {
	CURL *curl;
	char *base;                  /* the URL without a trailing '/' */
	char *cafile;
	struct curl_slist *headers;  /* x-api-key (wiped at close), Accept, Content-Type */
	int max_retries, max_wait_s;
	double window_until;         /* monotonic time before which the rate-limit window is used up */
	unsigned rnd;                /* backoff jitter */
	struct akz_api_stats stats;
	char curl_err[CURL_ERROR_SIZE];
	char dead[512];              /* see akz_api_dead */
};

static double mono_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Sleeps s seconds (s <= 0: not at all), counting it as waiting. */
static void wait_s(struct akz_api *api, double s)
{
	if(s <= 0) return;
	struct timespec ts = {.tv_sec = (time_t)s, .tv_nsec = (long)((s - (double)(time_t)s) * 1e9)};
	while(nanosleep(&ts, &ts) != 0 && errno == EINTR){}
	api->stats.waited_s += s;
}

static size_t on_data(char *ptr, size_t size, size_t n, void *userdata)
{
	struct body *b = userdata;
	size_t add = size * n;
	if(b->len + add + 1 > BODY_MAX){
		b->too_big = true;
		return 0;
	}
	if(b->len + add + 1 > b->cap){
		size_t cap = b->cap ? b->cap : 4096;
		while(cap < b->len + add + 1) cap *= 2;
		char *d = realloc(b->data, cap);
		if(d == NULL) return 0;
		b->data = d;
		b->cap = cap;
	}
	memcpy(b->data + b->len, ptr, add);
	b->len += add;
	b->data[b->len] = '\0';
	return add;
}

int akz_api_open(const struct akz_api_opts *opts, const char *api_key, struct akz_api **out, char *err, size_t errlen)
{
	*out = NULL;
	const char *url = opts->url ? opts->url : AKZ_API_URL_DEFAULT;
	if(strncmp(url, "https://", 8) != 0 || url[8] == '\0'){
		snprintf(err, errlen, "API URL '%s': only https:// is spoken (the API key must not travel in the clear)", url);
		return -1;
	}
	size_t klen = strlen(api_key);
	if(klen == 0 || klen > KEY_MAX){
		snprintf(err, errlen, "the API key is empty or longer than %d bytes", KEY_MAX);
		return -1;
	}
	for(size_t i = 0; i < klen; i++){
		if((unsigned char)api_key[i] < 0x21 || (unsigned char)api_key[i] == 0x7F){
			snprintf(err, errlen, "the API key holds a space or a control character");
			return -1;
		}
	}
	if(curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK){
		snprintf(err, errlen, "libcurl: initialisation failed");
		return -1;
	}
	struct akz_api *api = calloc(1, sizeof(*api));
	char header[KEY_MAX + 16];
	snprintf(header, sizeof(header), "x-api-key: %s", api_key);
	if(api == NULL || (api->base = strdup(url)) == NULL || (opts->cafile && (api->cafile = strdup(opts->cafile)) == NULL)
			|| (api->curl = curl_easy_init()) == NULL
			|| (api->headers = curl_slist_append(NULL, header)) == NULL){
		OPENSSL_cleanse(header, sizeof(header));
		akz_api_close(api);
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	OPENSSL_cleanse(header, sizeof(header));
	struct curl_slist *h = curl_slist_append(api->headers, "Accept: application/json");
	h = h ? curl_slist_append(h, "Content-Type: application/json") : NULL;
	if(h == NULL){
		akz_api_close(api);
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	size_t n = strlen(api->base);
	while(n > 8 && api->base[n - 1] == '/') api->base[--n] = '\0';
	api->max_retries = opts->max_retries;
	api->max_wait_s = opts->max_wait_s > 0 ? opts->max_wait_s : AKZ_API_WAIT_MAX_DEFAULT;
	api->rnd = (unsigned)getpid() ^ (unsigned)time(NULL);
	*out = api;
	return 0;
}

void akz_api_close(struct akz_api *api)
{
	if(api == NULL) return;
	/* The first header holds the key: wipe it before libcurl frees it. */
	if(api->headers) OPENSSL_cleanse(api->headers->data, strlen(api->headers->data));
	curl_slist_free_all(api->headers);
	if(api->curl) curl_easy_cleanup(api->curl);
	free(api->base);
	free(api->cafile);
	free(api);
	curl_global_cleanup();
}

const struct akz_api_stats *akz_api_stats(const struct akz_api *api)
{
	return &api->stats;
}

const char *akz_api_dead(const struct akz_api *api)
{
	return api->dead[0] ? api->dead : NULL;
}

/* A whole-number header of the last answer, or -1 when it is absent or not a number. */
static double header_number(struct akz_api *api, const char *name)
{
	struct curl_header *h;
	if(curl_easy_header(api->curl, name, 0, CURLH_HEADER, -1, &h) != CURLHE_OK) return -1;
	char *end;
	errno = 0;
	double v = strtod(h->value, &end);
	return errno || end == h->value || v < 0 ? -1 : v;
}

/* Seconds until the rate-limit window resets, from X-RateLimit-Reset: akenza's Java client reads
 * it without saying its unit, so a value past 2001 is taken as a Unix time and a smaller one as
 * seconds left. -1 when unknown. */
static double reset_in_s(struct akz_api *api)
{
	double v = header_number(api, "X-RateLimit-Reset");
	if(v < 0) return -1;
	if(v > 1e9) v -= (double)time(NULL);
	return v < 0 ? 0 : v;
}

/* After an answer: if it used up the window, the next request waits for the reset. */
static void note_rate_limit(struct akz_api *api)
{
	double reset = reset_in_s(api);
	if(header_number(api, "X-RateLimit-Remaining") == 0 && reset > 0){
		api->window_until = mono_s() + (reset < api->max_wait_s ? reset : api->max_wait_s);
	}
}

/* How long to wait before retry number attempt+1: what the server asked for (Retry-After, or for a
 * 429 the window's reset), else exponential backoff from 0.5 s with 20% jitter; at most max_wait_s. */
static double retry_delay(struct akz_api *api, int attempt, long status)
{
	curl_off_t after = -1;
	double d = -1;
	if(curl_easy_getinfo(api->curl, CURLINFO_RETRY_AFTER, &after) == CURLE_OK && after > 0) d = (double)after;
	else if(status == 429) d = reset_in_s(api);
	if(d <= 0){
		d = BACKOFF_FIRST_S * (double)(1u << (attempt < 10 ? attempt : 10));
		if(d > BACKOFF_MAX_S) d = BACKOFF_MAX_S;
		d *= 0.9 + 0.2 * (double)(rand_r(&api->rnd) % 1000) / 1000.0;
	}
	return d < api->max_wait_s ? d : api->max_wait_s;
}

/* True if libcurl's error is worth another try (the network, not the configuration or TLS). */
static bool transient(CURLcode rc)
{
	switch(rc){
	case CURLE_COULDNT_RESOLVE_HOST: case CURLE_COULDNT_CONNECT: case CURLE_OPERATION_TIMEDOUT:
	case CURLE_SEND_ERROR: case CURLE_RECV_ERROR: case CURLE_GOT_NOTHING: case CURLE_PARTIAL_FILE:
		return true;
	default:
		return false;
	}
}

/* True if url is on the API's own origin (scheme, host and port of the base URL), the only place
 * a redirect may take the API key to. */
static bool same_origin(const struct akz_api *api, const char *url)
{
	CURLU *a = curl_url(), *b = curl_url();
	char *va[3] = {0}, *vb[3] = {0};
	static const CURLUPart parts[3] = {CURLUPART_SCHEME, CURLUPART_HOST, CURLUPART_PORT};
	bool same = a && b && curl_url_set(a, CURLUPART_URL, api->base, 0) == CURLUE_OK
			&& curl_url_set(b, CURLUPART_URL, url, 0) == CURLUE_OK;
	for(size_t i = 0; same && i < 3; i++){
		same = curl_url_get(a, parts[i], &va[i], CURLU_DEFAULT_PORT) == CURLUE_OK
				&& curl_url_get(b, parts[i], &vb[i], CURLU_DEFAULT_PORT) == CURLUE_OK
				&& strcasecmp(va[i], vb[i]) == 0;
	}
	for(size_t i = 0; i < 3; i++){
		curl_free(va[i]);
		curl_free(vb[i]);
	}
	curl_url_cleanup(a);
	curl_url_cleanup(b);
	return same;
}

/* One HTTP exchange on the kept-alive handle. Returns libcurl's code; the answer's body in b. */
static CURLcode perform(struct akz_api *api, const char *method, const char *url, const char *payload, struct body *b)
{
	CURL *c = api->curl;
	curl_easy_reset(c);   /* options only: the connection stays open */
	api->curl_err[0] = '\0';
	curl_easy_setopt(c, CURLOPT_URL, url);
	curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "https");
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYPEER, 1L);
	curl_easy_setopt(c, CURLOPT_SSL_VERIFYHOST, 2L);
	if(api->cafile) curl_easy_setopt(c, CURLOPT_CAINFO, api->cafile);
	curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 0L);   /* see same_origin */
	curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
	curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, 20L);
	curl_easy_setopt(c, CURLOPT_TIMEOUT, 120L);
	curl_easy_setopt(c, CURLOPT_ACCEPT_ENCODING, "");
	curl_easy_setopt(c, CURLOPT_USERAGENT, "akenzactl (mosquitto-akenza)");
	curl_easy_setopt(c, CURLOPT_HTTPHEADER, api->headers);
	curl_easy_setopt(c, CURLOPT_ERRORBUFFER, api->curl_err);
	curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
	curl_easy_setopt(c, CURLOPT_WRITEDATA, b);
	if(strcmp(method, "POST") == 0){
		curl_easy_setopt(c, CURLOPT_POSTFIELDS, payload);
		curl_easy_setopt(c, CURLOPT_POSTFIELDSIZE, (long)strlen(payload));
	}else if(strcmp(method, "GET") != 0){
		curl_easy_setopt(c, CURLOPT_CUSTOMREQUEST, method);
	}
	api->stats.requests++;
	return curl_easy_perform(c);
}

/* Puts "METHOD PATH: HTTP status: akenza's message" into err. The key is in no part of it. */
static void http_error(char *err, size_t errlen, const char *method, const char *path, long status, const cJSON *json)
{
	const cJSON *m = cJSON_GetObjectItemCaseSensitive(json, "message");
	const char *hint = status == 401 ? " (check the API key: --api-key-file or " AKZ_API_KEY_ENV ")"
			: status == 403 ? " (the API key lacks a permission this needs)" : "";
	snprintf(err, errlen, "%s %s: HTTP %ld%s%s%s", method, path, status, cJSON_IsString(m) ? ": " : "",
			cJSON_IsString(m) ? m->valuestring : "", hint);
}

/* Sends METHOD path (escaped, from "/v3/...") with payload (JSON text, POST only) and waits for an
 * answer that is neither a 429 nor a 5xx, retrying those (and broken connections) up to
 * max_retries times. Returns 0 with the status and the answer's JSON (NULL if it had no body;
 * caller frees), or -1 with a reason in err. */
static int request(struct akz_api *api, const char *method, const char *path, const char *payload,
		long *status, cJSON **json, char *err, size_t errlen)
{
	*json = NULL;
	size_t ulen = strlen(api->base) + strlen(path) + 1;
	char *url = malloc(ulen);
	if(url == NULL){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	snprintf(url, ulen, "%s%s", api->base, path);
	int rc = -1, redirects = 0;
	for(int attempt = 0;; ){
		wait_s(api, api->window_until - mono_s());
		api->window_until = 0;
		struct body b = {0};
		CURLcode cc = perform(api, method, url, payload, &b);
		long st = 0;
		if(cc == CURLE_OK) curl_easy_getinfo(api->curl, CURLINFO_RESPONSE_CODE, &st);
		if(cc == CURLE_OK) note_rate_limit(api);
		const char *why = NULL;
		char why_buf[CURL_ERROR_SIZE + 64];
		if(cc != CURLE_OK){
			snprintf(why_buf, sizeof(why_buf), "%s", b.too_big ? "answer larger than 16 MiB"
					: api->curl_err[0] ? api->curl_err : curl_easy_strerror(cc));
			why = why_buf;
			if(!transient(cc)){
				snprintf(err, errlen, "%s %s: %s", method, path, why);
				snprintf(api->dead, sizeof(api->dead), "%s", why);
				free(b.data);
				break;
			}
			api->stats.server_errors++;
		}else if(st >= 300 && st < 400){
			char *loc = NULL;
			curl_easy_getinfo(api->curl, CURLINFO_REDIRECT_URL, &loc);
			if(loc == NULL || !same_origin(api, loc) || ++redirects > REDIRECTS_MAX){
				snprintf(err, errlen, "%s %s: HTTP %ld: redirected %s%s", method, path, st,
						loc && !same_origin(api, loc) ? "away from the API's host, where the API key "
						"must not go: " : "too often or nowhere: ", loc ? loc : "(no Location)");
				free(b.data);
				break;
			}
			char *next = strdup(loc);
			free(b.data);
			if(next == NULL){
				snprintf(err, errlen, "out of memory");
				break;
			}
			free(url);
			url = next;
			continue;
		}else if(st == 429 || st >= 500){
			if(st == 429) api->stats.throttled++;
			else api->stats.server_errors++;
			snprintf(why_buf, sizeof(why_buf), "HTTP %ld", st);
			why = why_buf;
		}
		if(why){
			free(b.data);
			if(attempt >= api->max_retries){
				snprintf(err, errlen, "%s %s: %s, %d retries spent", method, path, why, attempt);
				if(cc != CURLE_OK) snprintf(api->dead, sizeof(api->dead), "%s, %d retries spent", why, attempt);
				break;
			}
			wait_s(api, retry_delay(api, attempt, st));
			api->stats.retries++;
			attempt++;
			continue;
		}
		*status = st;
		if(b.len){
			*json = cJSON_ParseWithLength(b.data, b.len);
			if(*json == NULL && st < 300){
				snprintf(err, errlen, "%s %s: HTTP %ld: the answer is not JSON", method, path, st);
				free(b.data);
				break;
			}
		}
		free(b.data);
		rc = 0;
		break;
	}
	free(url);
	return rc;
}

/* request() for calls whose success is one status (or two): any other is an error with akenza's
 * message. Returns 0 with *json (may be NULL), AKZ_API_ABSENT for a 404 when absent_ok, or -1. */
static int call(struct akz_api *api, const char *method, const char *path, const char *payload, long ok1, long ok2,
		bool absent_ok, cJSON **json, char *err, size_t errlen)
{
	long st = 0;
	cJSON *j = NULL;
	if(request(api, method, path, payload, &st, &j, err, errlen)) return -1;
	if(st == ok1 || st == ok2){
		*json = j;
		return 0;
	}
	if(st == 404 && absent_ok){
		cJSON_Delete(j);
		return AKZ_API_ABSENT;
	}
	http_error(err, errlen, method, path, st, j);
	if(st == 401) snprintf(api->dead, sizeof(api->dead), "akenza refused the API key (HTTP 401)");
	cJSON_Delete(j);
	return -1;
}

/* Percent-encodes s for a path segment or a query value. Caller frees with curl_free; NULL if out
 * of memory. */
static char *escape(struct akz_api *api, const char *s)
{
	return curl_easy_escape(api->curl, s, 0);
}

int akz_api_find_device(struct akz_api *api, const char *device_id, cJSON **device, char *err, size_t errlen)
{
	char *e = escape(api, device_id);
	char path[2048];
	if(e == NULL || snprintf(path, sizeof(path), "/v3/devices/by-device-id?deviceId=%s", e) >= (int)sizeof(path)){
		curl_free(e);
		snprintf(err, errlen, "device id too long or out of memory");
		return -1;
	}
	curl_free(e);
	int rc = call(api, "GET", path, NULL, 200, 200, true, device, err, errlen);
	if(rc == 0 && !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(*device, "id"))){
		snprintf(err, errlen, "GET %s: the device has no \"id\"", path);
		cJSON_Delete(*device);
		*device = NULL;
		return -1;
	}
	return rc;
}

int akz_api_create_device(struct akz_api *api, const char *device_id, const char *workspace_id,
		const char *data_flow_id, cJSON **device, char *err, size_t errlen)
{
	cJSON *o = cJSON_CreateObject();
	char *payload = NULL;
	if(o && cJSON_AddStringToObject(o, "name", device_id) && cJSON_AddStringToObject(o, "deviceId", device_id)
			&& cJSON_AddStringToObject(o, "workspaceId", workspace_id)
			&& cJSON_AddStringToObject(o, "dataFlowId", data_flow_id)
			&& cJSON_AddStringToObject(o, "connectivity", "MQTT")){
		payload = cJSON_PrintUnformatted(o);
	}
	cJSON_Delete(o);
	if(payload == NULL){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	int rc = call(api, "POST", "/v3/devices", payload, 201, 200, false, device, err, errlen);
	free(payload);
	if(rc == 0 && !cJSON_IsString(cJSON_GetObjectItemCaseSensitive(*device, "id"))){
		snprintf(err, errlen, "POST /v3/devices: the new device has no \"id\"");
		cJSON_Delete(*device);
		*device = NULL;
		return -1;
	}
	return rc;
}

/* "/v3/device-authorization/devices/<akenza id>/credentials<tail>" into path. Returns 0 or -1. */
static int credentials_path(struct akz_api *api, const char *akenza_id, const char *tail, char *path, size_t size)
{
	char *e = escape(api, akenza_id);
	int n = e ? snprintf(path, size, "/v3/device-authorization/devices/%s/credentials%s", e, tail) : -1;
	curl_free(e);
	return n < 0 || (size_t)n >= size ? -1 : 0;
}

int akz_api_list_credentials(struct akz_api *api, const char *akenza_id, cJSON **list, char *err, size_t errlen)
{
	*list = cJSON_CreateArray();
	if(*list == NULL){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	for(int page = 0; page < PAGES_MAX; page++){
		char tail[64], path[1024];
		snprintf(tail, sizeof(tail), "?page=%d&size=%d", page, PAGE_SIZE);
		cJSON *doc = NULL;
		if(credentials_path(api, akenza_id, tail, path, sizeof(path))){
			snprintf(err, errlen, "akenza device id too long");
		}else if(call(api, "GET", path, NULL, 200, 200, false, &doc, err, errlen) == 0){
			cJSON *content = cJSON_GetObjectItemCaseSensitive(doc, "content");
			if(!cJSON_IsArray(content)){
				snprintf(err, errlen, "GET %s: the answer has no \"content\" list", path);
			}else{
				bool empty = content->child == NULL;
				cJSON *c;
				while((c = cJSON_DetachItemFromArray(content, 0)) != NULL) cJSON_AddItemToArray(*list, c);
				bool last = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(doc, "last"))
						|| !cJSON_GetObjectItemCaseSensitive(doc, "last") || empty;
				cJSON_Delete(doc);
				if(last) return 0;
				continue;
			}
		}
		cJSON_Delete(doc);
		cJSON_Delete(*list);
		*list = NULL;
		return -1;
	}
	snprintf(err, errlen, "more than %d pages of credentials for akenza device %s", PAGES_MAX, akenza_id);
	cJSON_Delete(*list);
	*list = NULL;
	return -1;
}

int akz_api_create_credential(struct akz_api *api, const char *akenza_id, const char *name,
		const char *algorithm, const char *pem, cJSON **credential, char *err, size_t errlen)
{
	char path[1024];
	if(credentials_path(api, akenza_id, "", path, sizeof(path))){
		snprintf(err, errlen, "akenza device id too long");
		return -1;
	}
	cJSON *o = cJSON_CreateObject();
	char *payload = NULL;
	if(o && cJSON_AddStringToObject(o, "name", name) && cJSON_AddStringToObject(o, "akenzaDeviceId", akenza_id)
			&& cJSON_AddStringToObject(o, "algorithm", algorithm) && cJSON_AddStringToObject(o, "publicKey", pem)){
		payload = cJSON_PrintUnformatted(o);
	}
	cJSON_Delete(o);
	if(payload == NULL){
		snprintf(err, errlen, "out of memory");
		return -1;
	}
	int rc = call(api, "POST", path, payload, 201, 200, false, credential, err, errlen);
	free(payload);
	return rc;
}

int akz_api_delete_credential(struct akz_api *api, const char *akenza_id, const char *credential_id,
		char *err, size_t errlen)
{
	char *e = escape(api, credential_id);
	char tail[512], path[1024];
	bool ok = e && snprintf(tail, sizeof(tail), "/%s", e) < (int)sizeof(tail)
			&& credentials_path(api, akenza_id, tail, path, sizeof(path)) == 0;
	curl_free(e);
	if(!ok){
		snprintf(err, errlen, "credential id too long or out of memory");
		return -1;
	}
	cJSON *j = NULL;
	int rc = call(api, "DELETE", path, NULL, 204, 200, false, &j, err, errlen);
	cJSON_Delete(j);
	return rc;
}
