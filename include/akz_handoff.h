/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_handoff.h - the one queue from the bridge's threads to the broker thread, which alone may
 * publish and log through Mosquitto: downlinks and delivery receipts, device statuses, log lines. */
#ifndef AKZ_HANDOFF_H
#define AKZ_HANDOFF_H

#include <stdbool.h>
#include <stddef.h>
#include "akz_queue.h"
#include "akz_spool.h"
#include "akz_status.h"

enum akz_handoff_kind {
	AKZ_HANDOFF_MESSAGE,         /* publish msg: a downlink or a delivery receipt */
	AKZ_HANDOFF_STATUS,          /* publish the status of device `text` */
	AKZ_HANDOFF_LOG,             /* log `text` at `level` */
	AKZ_HANDOFF_KINDS
};

struct akz_handoff_item {
	struct akz_handoff_item *next;
	enum akz_handoff_kind kind;
	int level;                   /* LOG: MOSQ_LOG_* */
	union {
		struct akz_msg *msg;     /* MESSAGE: owned by the item */
		struct {
			struct akz_status_dev st;
			struct akz_spool_dev *sd;   /* the device's spool share, NULL without one */
		} status;                /* STATUS */
	} u;
	char text[];                 /* LOG: the line; STATUS: the device id */
};

struct akz_handoff;

/* Makes a queue that holds at most max[kind] items of each kind (beyond that, items are
 * dropped and counted). Returns NULL when out of memory. */
struct akz_handoff *akz_handoff_new(const size_t max[AKZ_HANDOFF_KINDS]);

/* Frees the queue and what is still in it. NULL is ignored. */
void akz_handoff_free(struct akz_handoff *q);

/* Queues m (taken: freed when refused) for publishing. Returns false when m is NULL or the queue
 * holds its maximum of messages. Any thread; never blocks for long. */
bool akz_handoff_message(struct akz_handoff *q, struct akz_msg *m);

/* Queues a copy of device id's status, with its spool share sd (may be NULL). Returns false when
 * out of memory or full. Any thread. */
bool akz_handoff_status(struct akz_handoff *q, const char *id, const struct akz_status_dev *st,
		struct akz_spool_dev *sd);

/* Queues a log line. Any thread, holding any lock (the queue's own lock is taken last and
 * around nothing else); a line that finds the queue full or memory short is counted as dropped. */
void akz_handoff_log(struct akz_handoff *q, int level, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));

/* Takes up to max items, oldest first, as a list (free each with akz_handoff_item_free); *more
 * says whether items were left; dropped gets the count of items dropped since the last take, by
 * kind. NULL when there is none; an empty queue costs no lock. Any thread; the broker thread in
 * practice. */
struct akz_handoff_item *akz_handoff_take(struct akz_handoff *q, size_t max, bool *more,
		size_t dropped[AKZ_HANDOFF_KINDS]);

/* Frees an item and the message it owns. NULL is ignored. */
void akz_handoff_item_free(struct akz_handoff_item *it);

#endif
