/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* ctl_mqtt.c - akenzactl's request/response over MQTT: one control command, one answer. */
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <cJSON.h>
#include "akz_mosquitto.h"
#include <openssl/rand.h>
#include "akenzactl.h"
#include "akz_control.h"

/* Progress of one exchange, shared with libmosquitto's callbacks. */
struct exchange {
	const char *payload;       /* the request */
	const char *corr;          /* our correlationData */
	const char *user;
	int state;                 /* 0 connecting, 1 subscribing, 2 waiting for the answer, 3 done */
	char error[512];           /* set when the exchange failed */
	cJSON *answer;             /* our entry of "responses" (owned) */
};

static void fail_ex(struct exchange *ex, const char *what)
{
	if(ex->error[0] == '\0') snprintf(ex->error, sizeof(ex->error), "%s", what);
	ex->state = 3;
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc, int flags, const mosquitto_property *props)
{
	struct exchange *ex = obj;
	(void)flags;
	(void)props;
	if(rc != 0){
		char msg[256];
		snprintf(msg, sizeof(msg), "connect refused: %s", mosquitto_reason_string(rc));
		fail_ex(ex, msg);
		return;
	}
	/* Subscribe first, publish once the SUBACK is in: the answer cannot overtake us. */
	if(mosquitto_subscribe(mosq, NULL, AKZ_CONTROL_RESPONSE_TOPIC, 1) != MOSQ_ERR_SUCCESS){
		fail_ex(ex, "cannot subscribe to " AKZ_CONTROL_RESPONSE_TOPIC);
		return;
	}
	ex->state = 1;
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int count, const int *granted,
		const mosquitto_property *props)
{
	struct exchange *ex = obj;
	(void)mid;
	(void)props;
	if(count < 1 || granted[0] >= 0x80){
		char msg[256];
		snprintf(msg, sizeof(msg), "not authorized to subscribe to %s (check the broker's ACL for user '%s')",
				AKZ_CONTROL_RESPONSE_TOPIC, ex->user ? ex->user : "(none)");
		fail_ex(ex, msg);
		return;
	}
	int rc = mosquitto_publish(mosq, NULL, AKZ_CONTROL_TOPIC, (int)strlen(ex->payload), ex->payload, 1, false);
	if(rc != MOSQ_ERR_SUCCESS){
		fail_ex(ex, mosquitto_strerror(rc));
		return;
	}
	ex->state = 2;
}

/* MQTT v5 tells a refused publish in the PUBACK: no need to wait for the timeout then. */
static void on_publish(struct mosquitto *mosq, void *obj, int mid, int reason, const mosquitto_property *props)
{
	struct exchange *ex = obj;
	(void)mosq;
	(void)mid;
	(void)props;
	if(reason >= 0x80){
		char msg[256];
		snprintf(msg, sizeof(msg), "not authorized to publish to %s (check the broker's ACL for user '%s'): %s",
				AKZ_CONTROL_TOPIC, ex->user ? ex->user : "(none)", mosquitto_reason_string(reason));
		fail_ex(ex, msg);
	}
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg,
		const mosquitto_property *props)
{
	struct exchange *ex = obj;
	(void)mosq;
	(void)props;
	if(ex->state != 2 || msg->payload == NULL) return;
	cJSON *doc = cJSON_ParseWithLength(msg->payload, (size_t)msg->payloadlen);
	const cJSON *rs = doc ? cJSON_GetObjectItemCaseSensitive(doc, "responses") : NULL;
	/* Other clients' answers arrive here too: only ours counts. */
	for(cJSON *r = rs && cJSON_IsArray(rs) ? rs->child : NULL; r; r = r->next){
		const cJSON *c = cJSON_GetObjectItemCaseSensitive(r, "correlationData");
		if(cJSON_IsString(c) && strcmp(c->valuestring, ex->corr) == 0){
			ex->answer = cJSON_DetachItemViaPointer((cJSON *)rs, r);
			ex->state = 3;
			break;
		}
	}
	cJSON_Delete(doc);
}

static double now_s(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Adds a fresh correlationData to command and renders the request. Returns the payload (caller
 * frees) and the correlationData in corr, or NULL when out of memory. */
static char *make_request(cJSON *command, char corr[64])
{
	unsigned char rnd[12];
	if(RAND_bytes(rnd, sizeof(rnd)) != 1) return NULL;
	int n = snprintf(corr, 64, "akenzactl-%ld-", (long)getpid());
	for(size_t i = 0; i < sizeof(rnd) && n < 60; i++) n += snprintf(corr + n, (size_t)(64 - n), "%02x", rnd[i]);
	cJSON *req = cJSON_CreateObject();
	cJSON *cmds = req ? cJSON_AddArrayToObject(req, "commands") : NULL;
	char *payload = NULL;
	if(cmds && cJSON_AddStringToObject(command, "correlationData", corr) && cJSON_AddItemToArray(cmds, command)){
		command = NULL;
		payload = cJSON_PrintUnformatted(req);
	}
	cJSON_Delete(command);
	cJSON_Delete(req);
	return payload;
}

/* Runs the exchange: connect, subscribe, publish, wait. Returns 0, or 1 after printing why. */
static int exchange_run(const struct ctl_conn *conn, struct exchange *ex)
{
	bool tls = conn->cafile || conn->capath;
	int port = conn->port ? conn->port : tls ? 8883 : 1883;
	const char *host = conn->host ? conn->host : "localhost";
	int rc = 1;

	struct mosquitto *mosq = mosquitto_new(NULL, true, ex);
	if(mosq == NULL){
		ctl_error("out of memory");
		return 1;
	}
	mosquitto_int_option(mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
	mosquitto_connect_v5_callback_set(mosq, on_connect);
	mosquitto_subscribe_v5_callback_set(mosq, on_subscribe);
	mosquitto_publish_v5_callback_set(mosq, on_publish);
	mosquitto_message_v5_callback_set(mosq, on_message);
	if(conn->user && mosquitto_username_pw_set(mosq, conn->user, conn->password) != MOSQ_ERR_SUCCESS){
		ctl_error("invalid username or password");
		goto out;
	}
	if((conn->cert || conn->key) && !tls){
		ctl_error("--cert and --key need --cafile or --capath (the server is always verified)");
		goto out;
	}
	if(tls){
		/* No option turns verification off: the server's certificate and name are checked. */
		int trc = mosquitto_tls_set(mosq, conn->cafile, conn->capath, conn->cert, conn->key, NULL);
		if(trc != MOSQ_ERR_SUCCESS){
			ctl_error("TLS settings: %s", mosquitto_strerror(trc));
			goto out;
		}
	}
	int crc = mosquitto_connect(mosq, host, port, 30);
	if(crc != MOSQ_ERR_SUCCESS){
		ctl_error("cannot connect to %s:%d: %s", host, port,
				crc == MOSQ_ERR_ERRNO ? "connection failed or refused" : mosquitto_strerror(crc));
		goto out;
	}
	double deadline = now_s() + conn->timeout_s;
	while(ex->state != 3 && now_s() < deadline){
		int lrc = mosquitto_loop(mosq, 100, 1);
		if(lrc != MOSQ_ERR_SUCCESS && ex->state != 3){
			char msg[300];
			snprintf(msg, sizeof(msg), "connection to %s:%d lost: %s", host, port, mosquitto_strerror(lrc));
			fail_ex(ex, msg);
		}
	}
	if(ex->error[0]){
		ctl_error("%s", ex->error);
	}else if(ex->answer == NULL){
		ctl_error("no answer within %d s: is mosquitto_akenza loaded in the broker at %s:%d, and may "
				"user '%s' publish to %s and subscribe to %s?", conn->timeout_s, host, port,
				conn->user ? conn->user : "(none)", AKZ_CONTROL_TOPIC, AKZ_CONTROL_RESPONSE_TOPIC);
	}else{
		rc = 0;
	}
	mosquitto_disconnect(mosq);
out:
	mosquitto_destroy(mosq);
	return rc;
}

int ctl_request(const struct ctl_conn *conn, cJSON *command, cJSON **data)
{
	char corr[64];
	*data = NULL;
	const cJSON *name = cJSON_GetObjectItemCaseSensitive(command, "command");
	char cmdname[64];
	snprintf(cmdname, sizeof(cmdname), "%s", cJSON_IsString(name) ? name->valuestring : "?");
	char *payload = make_request(command, corr);
	if(payload == NULL){
		ctl_error("out of memory");
		return 1;
	}
	struct exchange ex = {.payload = payload, .corr = corr, .user = conn->user};
	/* A write to a connection the broker closed must fail with EPIPE, not end the process:
	 * libmosquitto 2.0's mosquitto_lib_init ignored SIGPIPE, 2.1's leaves it to the program
	 * (its TLS close after DISCONNECT writes to a socket it has shut down). */
	signal(SIGPIPE, SIG_IGN);
	mosquitto_lib_init();
	int rc = exchange_run(conn, &ex);
	mosquitto_lib_cleanup();
	free(payload);
	if(rc == 0){
		const cJSON *err = cJSON_GetObjectItemCaseSensitive(ex.answer, "error");
		if(err){
			ctl_error("%s: %s", cmdname, cJSON_IsString(err) ? err->valuestring : "failed");
			rc = 1;
		}else{
			*data = cJSON_DetachItemFromObjectCaseSensitive(ex.answer, "data");
		}
	}
	cJSON_Delete(ex.answer);
	return rc;
}
