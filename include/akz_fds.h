/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_fds.h - the file descriptors the bridge needs: libmosquitto's unused socket pairs, and the
 * process's open-file limit. */
#ifndef AKZ_FDS_H
#define AKZ_FDS_H

#include <stdbool.h>
#include <stddef.h>

struct mosquitto;

/* Checks, with throwaway clients, how a client's socket pair can be closed in this libmosquitto:
 * by its MOSQ_OPT_DISABLE_SOCKETPAIR option (2.1; where setting it frees the pair), or else by
 * hand, where the pair is proven to sit where akz_fds_close_pair() looks for it. Returns true if
 * either works (then akz_fds_close_pair() works for the rest of the process), false if not
 * (nothing is touched: every client keeps its pair).
 * Call once, while no other thread opens or closes descriptors (the plugin's init), after
 * mosquitto_lib_init(). */
bool akz_fds_probe_pair(void);

/* Closes the socket pair of a client fresh from mosquitto_new(), which the bridge's own event
 * loop never uses, the way the probe found. Returns true if it closed it, false if it left it
 * alone (the probe failed or was not run, or the client does not look fresh). Never fails
 * otherwise. */
bool akz_fds_close_pair(struct mosquitto *mosq);

/* Descriptors each upstream device costs: its connection, plus the pair if it is kept. */
int akz_fds_per_device(void);

/* Makes sure the process may open `need` descriptors: raises the soft RLIMIT_NOFILE towards the
 * hard limit if it is lower (never lowers it). Returns 0 if the limit now covers need, -1 if
 * the hard limit is below it (the soft limit is then raised to the hard limit). *soft_before and
 * *soft_after receive the limit before and after (equal when nothing changed). */
int akz_fds_reserve(size_t need, size_t *soft_before, size_t *soft_after);

#endif
