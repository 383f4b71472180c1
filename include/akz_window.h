/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_window.h - one connection's uplinks handed to libmosquitto and waiting for akenza's PUBACK,
 * and what of a device's spooled uplinks the spool may forget. Bridge thread only. */
#ifndef AKZ_WINDOW_H
#define AKZ_WINDOW_H

#include <stdint.h>
#include "akz_queue.h"
#include "akz_spool.h"

/* Uplinks in flight per connection; a power of two (slots are found by mid). libmosquitto walks
 * its whole list of them on every PUBACK, so more is not free. */
#define AKZ_WINDOW 32

struct akz_window {
	struct {
		int mid;                 /* libmosquitto's message id */
		struct akz_msg *m;       /* NULL: free */
	} slot[AKZ_WINDOW];
	int count;                   /* slots taken */
	uint64_t sent_upto;          /* seq of the last spooled uplink taken off the pending queue */
};

/* Notes that m was taken off the device's pending queue, in queue order. Never fails. */
void akz_window_taken(struct akz_window *w, const struct akz_msg *m);

/* Puts m, handed to libmosquitto as mid, in a free slot; the caller has checked that
 * count < AKZ_WINDOW. Never fails. */
void akz_window_put(struct akz_window *w, int mid, struct akz_msg *m);

/* Frees the slot of mid and returns its uplink (the caller owns it), or NULL when mid is not in
 * the window (a QoS 0 uplink or the subscription also end up in libmosquitto's on_publish). */
struct akz_msg *akz_window_take(struct akz_window *w, int mid);

/* The spool seq up to which every uplink of the device is done with: those in the window are
 * not, nor is anything still pending (after sent_upto). */
uint64_t akz_window_done_upto(const struct akz_window *w);

/* Tells the spool (s may be NULL) that m, taken off the pending queue or out of the window, is
 * done with: delivered, or dropped by the TTL. Never fails. */
void akz_window_settle(const struct akz_window *w, struct akz_spool *s, struct akz_spool_dev *sd,
		const struct akz_msg *m);

/* Empties the window and then pending into out, the window's uplinks in seq order first, so that
 * they go out in the order the device sent them when it comes back; uplinks that are not in the
 * spool (seq 0) are freed. For a device leaving the bridge. Never fails. */
void akz_window_give_back(struct akz_window *w, struct akz_msgq *pending, struct akz_msgq *out);

#endif
