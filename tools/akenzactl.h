/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akenzactl.h - the commands of akenzactl, one function each. */
#ifndef AKENZACTL_H
#define AKENZACTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include "akz_keystore.h"

/* Long options shared by every command that reads keys (ids from 1000 up, clear of letters). */
enum { CTL_OPT_PASS = 1000, CTL_OPT_READABLE, CTL_OPT_PROVIDERS, CTL_OPT_OSSL_CONF, CTL_OPT_FIRST_FREE };
#define CTL_KEY_LONGOPTS \
	{"passphrase-file", required_argument, NULL, CTL_OPT_PASS}, \
	{"allow-readable", no_argument, NULL, CTL_OPT_READABLE}, \
	{"providers", required_argument, NULL, CTL_OPT_PROVIDERS}, \
	{"openssl-conf", required_argument, NULL, CTL_OPT_OSSL_CONF}

/* The help text of the key options, for each command's usage. */
#define CTL_KEY_HELP \
	"Key options: --passphrase-file F (encrypted keys), --allow-readable (key files others can\n" \
	"read), --providers LIST and --openssl-conf FILE (OpenSSL providers for keys held in a device,\n" \
	"e.g. --providers default,tpm2: as plugin_opt_providers and plugin_opt_openssl_conf).\n"

/* Applies getopt result c (with its argument) to ko; --providers and --openssl-conf set up the
 * key thread's providers (akz_keythread_configure) and exit with status 2 if they are refused.
 * Returns false if c is no key option. */
bool ctl_key_option(int c, const char *arg, struct akz_key_opts *ko);

/* Options that reach akenza's REST API: akenzactl akenza ... and device rotate-key --register. */
enum { CTL_OPT_API_URL = 1100, CTL_OPT_API_KEY_FILE, CTL_OPT_API_CAFILE, CTL_OPT_API_RETRIES, CTL_OPT_API_KEY };
/* --api-key is listed only to be refused: getopt would otherwise take it as --api-key-file. */
#define CTL_API_LONGOPTS \
	{"api-url", required_argument, NULL, CTL_OPT_API_URL}, \
	{"api-key", required_argument, NULL, CTL_OPT_API_KEY}, \
	{"api-key-file", required_argument, NULL, CTL_OPT_API_KEY_FILE}, \
	{"api-cafile", required_argument, NULL, CTL_OPT_API_CAFILE}, \
	{"max-retries", required_argument, NULL, CTL_OPT_API_RETRIES}

struct ctl_api_args {
	const char *url;         /* NULL: https://api.akenza.io */
	const char *key_file;    /* NULL: the key comes from $AKENZA_API_KEY */
	const char *cafile;      /* NULL: the system CA store */
	int max_retries;         /* -1: the default */
};

/* The API options' help text. */
extern const char ctl_api_help[];

/* Applies getopt result c (with its argument) to a. Returns 1 if c was an API option, 0 if it is
 * none, -1 after printing why its value is bad. */
int ctl_api_option(int c, const char *arg, struct ctl_api_args *a);

/* Uploads to akenza the pending public key `pem` of device `id` (its certificate `cert` instead,
 * when not NULL), unless akenza holds an identical public key for the device already: what device
 * rotate-key --register does. Prints one line saying what it did. Returns 0, or 1
 * after printing why not. (cmd_akenza.c) */
int ctl_akenza_register_key(const struct ctl_api_args *a, const char *id, const char *pem, const char *cert);

/* Each command takes argv with argv[0] = the command name, prints its result on stdout and
 * its errors on stderr, and returns the process exit code (0 success, 1 failure, 2 usage). */
int cmd_keygen(int argc, char **argv);
int cmd_fingerprint(int argc, char **argv);
int cmd_token(int argc, char **argv);
int cmd_passwd(int argc, char **argv);
int cmd_check_registry(int argc, char **argv);

/* The control API commands (cmd_control.c): akenzactl device|gateway|status ... */
int cmd_device(int argc, char **argv);
int cmd_gateway(int argc, char **argv);
int cmd_status(int argc, char **argv);

/* akenza's REST API: akenzactl akenza register|prune|import ... (cmd_akenza.c, cmd_import.c) */
int cmd_akenza(int argc, char **argv);

/* How akenzactl reaches a broker's control API (ctl_mqtt.c). */
struct ctl_conn {
	const char *host;        /* default localhost */
	int port;                /* 0: 1883, or 8883 with TLS */
	const char *user, *password;
	const char *cafile, *capath;   /* either turns TLS on; the server's certificate is always verified */
	const char *cert, *key;        /* client certificate */
	int timeout_s;           /* how long to wait for the answer */
};

struct cJSON;

/* The environment variable that may hold the broker's admin password (-P and
 * --admin-password-file win). */
#define CTL_ADMIN_PW_ENV "AKENZACTL_ADMIN_PASSWORD"

/* Sets conn->password from file (its first line; refused when group or others can read a regular
 * file) or, when neither -P nor file gave one, from CTL_ADMIN_PW_ENV, into buf (size bytes, the
 * caller cleanses it). Returns 0, or 2 after printing why (also when -P and file are both given).
 * (cmd_control.c) */
int ctl_admin_password(struct ctl_conn *conn, const char *file, char *buf, size_t size);

/* Sends one control command (taken, freed here) to $CONTROL/akenza/v1 and waits for its answer
 * on the response topic, matched by a fresh correlationData. Returns 0 and *data (the answer's
 * "data", caller frees with cJSON_Delete; NULL if there was none); 1 after printing the reason on
 * stderr (error answer, refused connection or subscription, not authorised, no answer in time). */
int ctl_request(const struct ctl_conn *conn, struct cJSON *command, struct cJSON **data);

/* Reads one line of f into buf (size bytes) without its line end. Returns 0; -1 at end of input;
 * -2 if the line holds a NUL byte (a secret cut short without a word); -3 if it does not fit.
 * (cmd_registry.c) */
int ctl_read_line(FILE *f, char *buf, size_t size);

/* The reason for a ctl_read_line return code, as a phrase. */
const char *ctl_read_line_error(int rc);

/* ctl_read_line of stdin, without echo when stdin is a terminal (the prompt goes to stderr
 * then). Same returns. (cmd_registry.c) */
int ctl_read_secret(const char *prompt, char *buf, size_t size);

/* Prints "akenzactl: <message>" on stderr. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Parses s as a whole number in [lo, hi] into *out. Returns 0, or -1 after printing why, naming
 * the option what. */
int ctl_parse_long(const char *what, const char *s, long lo, long hi, long *out);

/* True if argv holds -h or --help (before any "--"). */
bool ctl_wants_help(int argc, char **argv);

#endif
