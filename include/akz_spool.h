/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* akz_spool.h - the durable uplink spool: what the edge acknowledged is on disk until akenza has it. */
#ifndef AKZ_SPOOL_H
#define AKZ_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include "akz_queue.h"

/* When an appended record is forced to stable storage. */
enum akz_spool_sync {
	AKZ_SYNC_ALWAYS,  /* before the append returns, so before the sensor's PUBACK */
	AKZ_SYNC_BATCH,   /* by the flusher within sync_ms: a power cut loses at most that window */
	AKZ_SYNC_NONE,    /* left to the kernel: survives a broker crash, not a power cut */
};

struct akz_spool_opts {
	const char *dir;
	enum akz_spool_sync sync;
	int sync_ms;                 /* batch bound */
	uint64_t max_bytes;          /* undelivered bytes, all devices */
	uint64_t device_max_bytes;   /* undelivered bytes, one device */
	uint64_t segment_bytes;      /* a segment file is closed once it is this large */
};

/* Result of an append. */
enum akz_spool_rc {
	AKZ_SPOOL_OK = 0,
	AKZ_SPOOL_DEVICE_FULL,   /* the device's share is used up */
	AKZ_SPOOL_FULL,          /* the spool as a whole is full */
	AKZ_SPOOL_IO,            /* the write failed (disk full, I/O error): nothing was kept */
};

/* Totals, for the status topics. */
struct akz_spool_stats {
	uint64_t bytes, msgs;        /* undelivered, all devices */
	uint64_t disk_bytes;         /* size of the segment files */
	uint64_t segments;
	uint64_t replayed;           /* recovered at start: may reach akenza twice after a crash */
	uint64_t io_errors;
};

struct akz_spool;
struct akz_spool_dev;  /* one device's share; lives as long as the spool */

/* Receives a recovery or I/O problem, formatted with the file and the reason. level is a
 * MOSQ_LOG_* value. Called from the opening thread or the flusher; must not block long. */
typedef void (*akz_spool_log_fn)(void *ctx, int level, const char *msg);

/* Opens (creating it if needed) the spool directory and recovers it: torn last records are cut
 * off, corrupt segments are set aside as <name>.corrupt after their readable records are saved,
 * and every undelivered record is kept per device for akz_spool_take_backlog. Starts the flusher
 * thread. Returns 0, or -1 with the reason in err (the directory is left as it was found). */
int akz_spool_open(const struct akz_spool_opts *opts, akz_spool_log_fn log, void *log_ctx,
		struct akz_spool **out, char *err, size_t errlen);

/* Syncs, stops the flusher and frees the spool. Undelivered records stay on disk. NULL is ignored. */
void akz_spool_close(struct akz_spool *s);

/* The share of device `id` (idlen bytes), created on first use. NULL when out of memory. */
struct akz_spool_dev *akz_spool_device(struct akz_spool *s, const char *id, size_t idlen);

/* Moves the device's recovered records, in the order the device sent them, to the end of out. */
void akz_spool_take_backlog(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msgq *out);

/* Gives undelivered messages back to the device's backlog (a device leaving the bridge), to be
 * taken again if it returns. Takes ownership of every message in q. */
void akz_spool_give_back(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msgq *q);

/* Writes m as the device's next record: sets m->seq and m->spooled. Syncs first when the mode is
 * always. Nothing is written unless AKZ_SPOOL_OK is returned. Thread-safe. */
enum akz_spool_rc akz_spool_append(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msg *m);

/* Records that `n` of the device's messages taking `bytes` in the spool are done with (delivered
 * or expired), and that every record up to seq `done_upto` is: those are never replayed. Writes a
 * small unsynced marker when done_upto advances (a crash may lose it: then duplicates, counted as
 * replayed). Thread-safe; never fails (an I/O error is counted and logged). */
void akz_spool_settle(struct akz_spool *s, struct akz_spool_dev *sd, uint64_t bytes, uint64_t n,
		uint64_t done_upto);

/* Undelivered bytes and messages of one device. */
void akz_spool_device_usage(struct akz_spool *s, const struct akz_spool_dev *sd, uint64_t *bytes,
		uint64_t *msgs);

void akz_spool_get_stats(struct akz_spool *s, struct akz_spool_stats *out);

/* Calls fn for every device that has undelivered records, with its id and usage. For reporting
 * devices that are not in the registry. fn must not call back into the spool. */
void akz_spool_each_backlog(struct akz_spool *s,
		void (*fn)(void *ctx, const char *id, uint64_t bytes, uint64_t msgs), void *ctx);

/* Parses "always", "batch" or "none". Returns 0, or -1 for anything else. */
int akz_spool_sync_parse(const char *s, enum akz_spool_sync *out);

#endif
