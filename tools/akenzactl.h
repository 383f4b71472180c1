/* akenzactl.h - the commands of akenzactl, one function each. */
#ifndef AKENZACTL_H
#define AKENZACTL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>
#include "akz_keystore.h"

/* Long options shared by every command that reads keys (ids from 1000 up, clear of letters). */
enum { CTL_OPT_PASS = 1000, CTL_OPT_READABLE, CTL_OPT_FIRST_FREE };
#define CTL_KEY_LONGOPTS \
	{"passphrase-file", required_argument, NULL, CTL_OPT_PASS}, \
	{"allow-readable", no_argument, NULL, CTL_OPT_READABLE}

/* Applies getopt result c (with its argument) to ko. Returns false if c is no key option. */
bool ctl_key_option(int c, const char *arg, struct akz_key_opts *ko);

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

/* True if argv holds -h or --help (before any "--"). */
bool ctl_wants_help(int argc, char **argv);

#endif
