/* akenzactl.h - the commands of akenzactl, one function each. */
#ifndef AKENZACTL_H
#define AKENZACTL_H

#include <stdbool.h>
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

/* Prints "akenzactl: <message>" on stderr. */
void ctl_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* True if argv holds -h or --help (before any "--"). */
bool ctl_wants_help(int argc, char **argv);

#endif
