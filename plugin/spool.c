/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* spool.c - the durable uplink spool: an append-only log of segment files with checksummed records.
 *
 * Layout: <dir>/<16 hex digits>.seg, oldest first. A segment starts with a 16-byte header
 * ("AKZSPOOL", version) and holds records:
 *
 *   u32 crc     CRC-32 of everything after this field (rest of the header and the body)
 *   u32 len     body length
 *   u8  type    1 = uplink, 2 = done marker
 *   u8  qos
 *   u16 idlen, topiclen, corrlen
 *   u64 seq     per-device sequence number (a marker: every record up to seq is done with)
 *   i64 time    wall-clock second the edge accepted the uplink
 *   body        device id, topic, correlation data, payload
 *
 * all little-endian. New records go to the newest ("active") segment; a segment is deleted once
 * every uplink in it is done with. A device whose uplinks stay undelivered would pin old segments
 * while others' traffic piles up behind them, so when the files grow past twice the backlog the
 * oldest segment's live records are copied forward and the segment deleted: the disk holds the
 * backlog, not the traffic. Replay orders each device's records by seq, which also removes the
 * duplicate a crash between copy and delete leaves. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <zlib.h>
#include <mosquitto.h>
#include "akz_htab.h"
#include "akz_spool.h"
#include "akz_util.h"

#define SEG_MAGIC "AKZSPOOL"
#define SEG_VERSION 1u
#define SEG_HDR 16u
#define REC_HDR 32u
#define REC_UPLINK 1
#define REC_DONE 2
#define RECLAIM_MS 1000      /* how often finished segments are looked for */
#define MARKER_MS 50         /* how long a done marker may wait in memory */
#define IO_LOG_GAP_S 10      /* at most one I/O error line per this many seconds */

struct seg_mark {                /* the highest seq a device has in a segment */
	struct akz_spool_dev *sd;
	uint64_t maxseq;
};

struct segment {
	struct segment *next;        /* newer */
	uint64_t id;
	uint64_t size;
	struct seg_mark *marks;
	size_t nmarks, capmarks;
};

struct akz_spool_dev {
	struct akz_htab_node node;   /* in s->devices, keyed by id */
	struct akz_spool_dev *marker_next;   /* on s->marker_due */
	char *id;
	size_t idlen;
	uint64_t last_seq;           /* highest seq handed out or recovered */
	uint64_t done_upto;          /* every record up to this seq is done with */
	uint64_t marked_upto;        /* done_upto as last written to disk */
	uint64_t bytes, msgs;        /* undelivered */
	struct segment *mark_seg;    /* segment holding this device's newest mark */
	size_t mark_idx;
	bool marker_queued;
	struct akz_msgq backlog;     /* recovered or given back, not yet taken */
};

struct akz_spool { /* NOLINT(clang-analyzer-optin.performance.Padding) */
	struct akz_spool_opts o;
	char *dir;
	akz_spool_log_fn log;
	void *log_ctx;

	pthread_mutex_t lock;
	pthread_cond_t cond;
	/* Guarded by lock. */
	int dirfd;
	int fd;                      /* the active segment, open for appending */
	struct segment *oldest, *active;
	int *retired;                /* closed segments' fds, for the flusher to sync and close */
	size_t nretired, capretired;
	struct akz_htab devices;      /* struct akz_spool_dev, by id */
	struct akz_spool_dev *marker_due;
	int64_t marker_due_ms;       /* when the first marker on marker_due was queued */
	bool dirty;                  /* appended since the last sync */
	bool stop;
	int64_t last_io_log;
	bool io_failed;              /* a write failed since the active segment was last recycled */
	struct akz_spool_stats st;

	struct akz_thread flusher;
};

/* ---- small helpers ----------------------------------------------------------------------- */

static void slog(struct akz_spool *s, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

static void slog(struct akz_spool *s, int level, const char *fmt, ...)
{
	char msg[600];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(msg, sizeof(msg), fmt, ap);
	va_end(ap);
	if(s->log) s->log(s->log_ctx, level, msg);
}

static void put16(unsigned char *p, uint16_t v) { p[0] = (unsigned char)v; p[1] = (unsigned char)(v >> 8); }
static void put32(unsigned char *p, uint32_t v) { for(int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static void put64(unsigned char *p, uint64_t v) { for(int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i)); }
static uint16_t get16(const unsigned char *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t get32(const unsigned char *p)
{
	uint32_t v = 0;
	for(int i = 3; i >= 0; i--) v = (v << 8) | p[i];
	return v;
}
static uint64_t get64(const unsigned char *p)
{
	uint64_t v = 0;
	for(int i = 7; i >= 0; i--) v = (v << 8) | p[i];
	return v;
}

static void seg_path(const struct akz_spool *s, uint64_t id, const char *suffix, char *out, size_t outlen)
{
	snprintf(out, outlen, "%s/%016" PRIx64 ".seg%s", s->dir, id, suffix);
}

int akz_spool_sync_parse(const char *str, enum akz_spool_sync *out)
{
	static const char *const names[] = {[AKZ_SYNC_ALWAYS] = "always", [AKZ_SYNC_BATCH] = "batch",
			[AKZ_SYNC_NONE] = "none"};
	for(int i = 0; i < 3; i++){
		if(strcmp(str, names[i]) == 0){
			*out = (enum akz_spool_sync)i;
			return 0;
		}
	}
	return -1;
}

/* Logs an I/O failure, at most once every IO_LOG_GAP_S: a full disk fails every append. Locked. */
static void io_failed_locked(struct akz_spool *s, const char *what, int err)
{
	s->st.io_errors++;
	s->io_failed = true;
	int64_t now = akz_mono_ms() / 1000;
	if(s->last_io_log && now - s->last_io_log < IO_LOG_GAP_S) return;
	s->last_io_log = now;
	slog(s, MOSQ_LOG_ERR, "akenza: spool %s: %s: %s (%" PRIu64 " I/O errors so far)",
			s->dir, what, strerror(err), s->st.io_errors);
}

/* ---- devices ---------------------------------------------------------------------------- */

/* The device share of node n. */
static struct akz_spool_dev *dev_of(struct akz_htab_node *n)
{
	return akz_container_of(n, struct akz_spool_dev, node);
}

/* Finds or creates a device share. Locked. NULL when out of memory. */
static struct akz_spool_dev *device_locked(struct akz_spool *s, const char *id, size_t idlen)
{
	struct akz_htab_node *n = akz_htab_find(&s->devices, id, idlen);
	if(n) return dev_of(n);
	struct akz_spool_dev *d = calloc(1, sizeof(*d));
	if(d == NULL) return NULL;
	d->id = strndup(id, idlen);
	if(d->id == NULL || akz_htab_insert(&s->devices, &d->node, d->id, idlen)){
		free(d->id);
		free(d);
		return NULL;
	}
	d->idlen = idlen;
	return d;
}

struct akz_spool_dev *akz_spool_device(struct akz_spool *s, const char *id, size_t idlen)
{
	pthread_mutex_lock(&s->lock);
	struct akz_spool_dev *d = device_locked(s, id, idlen);
	pthread_mutex_unlock(&s->lock);
	return d;
}

/* Notes that segment seg holds record seq of sd, so that seg outlives it. Locked.
 * Returns 0, or -1 when out of memory. */
static int mark_locked(struct segment *seg, struct akz_spool_dev *sd, uint64_t seq)
{
	if(seg == NULL) return -1;
	if(sd->mark_seg == seg){
		struct seg_mark *m = &seg->marks[sd->mark_idx];
		if(seq > m->maxseq) m->maxseq = seq;
		return 0;
	}
	if(seg->nmarks == seg->capmarks){
		size_t n = seg->capmarks ? seg->capmarks * 2 : 16;
		struct seg_mark *nm = realloc(seg->marks, n * sizeof(*nm));
		if(nm == NULL) return -1;
		seg->marks = nm;
		seg->capmarks = n;
	}
	seg->marks[seg->nmarks] = (struct seg_mark){.sd = sd, .maxseq = seq};
	sd->mark_seg = seg;
	sd->mark_idx = seg->nmarks++;
	return 0;
}

/* ---- writing ----------------------------------------------------------------------------- */

/* Hands the active segment's fd to the flusher (which syncs and closes it) and opens segment
 * id+1. Locked. Returns 0, or -1 with errno set (the old segment stays active then). */
static int rotate_locked(struct akz_spool *s)
{
	char path[4200];
	uint64_t id = s->active ? s->active->id + 1 : 1;
	struct segment *seg = calloc(1, sizeof(*seg));
	if(seg == NULL) return -1;
	if(s->nretired == s->capretired){
		size_t n = s->capretired ? s->capretired * 2 : 8;
		int *nr = realloc(s->retired, n * sizeof(*nr));
		if(nr == NULL){
			free(seg);
			return -1;
		}
		s->retired = nr;
		s->capretired = n;
	}
	seg_path(s, id, "", path, sizeof(path));
	int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_APPEND | O_CLOEXEC, 0600);
	if(fd < 0){
		free(seg);
		return -1;
	}
	unsigned char hdr[SEG_HDR] = SEG_MAGIC;
	put32(hdr + 8, SEG_VERSION);
	if(write(fd, hdr, SEG_HDR) != (ssize_t)SEG_HDR){
		int e = errno ? errno : ENOSPC;
		close(fd);
		unlink(path);
		free(seg);
		errno = e;
		return -1;
	}
	if(s->o.sync != AKZ_SYNC_NONE){
		/* The new file's name must be on disk before records in it are reported durable. */
		if(s->fd >= 0 && s->o.sync == AKZ_SYNC_ALWAYS) fdatasync(s->fd);
		fdatasync(fd);
		fsync(s->dirfd);
	}
	if(s->fd >= 0) s->retired[s->nretired++] = s->fd;
	s->fd = fd;
	seg->id = id;
	seg->size = SEG_HDR;
	if(s->active) s->active->next = seg;
	else s->oldest = seg;
	s->active = seg;
	s->st.segments++;
	s->st.disk_bytes += SEG_HDR;
	return 0;
}

/* Appends one whole record (iov[0] is its header, CRC already set) to the active segment,
 * rotating first when it is full. A partial write is cut off again so that the segment stays
 * parseable. Locked. Returns 0, or -1 with errno set and nothing written. */
static int append_locked(struct akz_spool *s, struct iovec *iov, int iovcnt, size_t n)
{
	if(s->active->size > SEG_HDR && s->active->size + n > s->o.segment_bytes && rotate_locked(s)){
		/* Keep writing to the current one: a big segment beats a refused uplink. */
	}
	size_t done = 0;
	while(done < n){
		ssize_t w = writev(s->fd, iov, iovcnt);
		if(w <= 0){
			int e = w < 0 ? errno : ENOSPC;
			if(e == EINTR) continue;
			if(done && ftruncate(s->fd, (off_t)s->active->size) != 0){
				/* The torn bytes stay: start a new segment so that nothing follows them, and
				 * recovery cuts them off as the torn end of this one. */
				s->active->size += done;
				rotate_locked(s);
			}
			errno = e;
			return -1;
		}
		done += (size_t)w;
		/* Advance the iovecs past what was written (rare: writev to a file is normally whole). */
		size_t skip = (size_t)w;
		while(iovcnt && skip >= iov->iov_len){
			skip -= iov->iov_len;
			iov++;
			iovcnt--;
		}
		if(iovcnt){
			iov->iov_base = (char *)iov->iov_base + skip;
			iov->iov_len -= skip;
		}
	}
	s->active->size += n;
	s->st.disk_bytes += n;
	s->dirty = true;
	return 0;
}

/* Fills a record header for a body of the given parts and computes its CRC. */
static void make_header(unsigned char *h, int type, uint8_t qos, uint64_t seq, int64_t t,
		const struct iovec *body, int nbody, uint16_t idlen, uint16_t topiclen, uint16_t corrlen)
{
	size_t len = 0;
	for(int i = 0; i < nbody; i++) len += body[i].iov_len;
	put32(h + 4, (uint32_t)len);
	h[8] = (unsigned char)type;
	h[9] = qos;
	put16(h + 10, idlen);
	put16(h + 12, topiclen);
	put16(h + 14, corrlen);
	put64(h + 16, seq);
	put64(h + 24, (uint64_t)t);
	uLong crc = crc32_z(0L, h + 4, REC_HDR - 4);
	for(int i = 0; i < nbody; i++){
		/* zlib takes a NULL buffer as "give me the initial value": skip empty parts. */
		if(body[i].iov_len) crc = crc32_z(crc, body[i].iov_base, body[i].iov_len);
	}
	put32(h, (uint32_t)crc);
}

/* Writes a done marker for sd. Locked. Never fails (a lost marker only costs duplicates). */
static void write_marker_locked(struct akz_spool *s, struct akz_spool_dev *sd)
{
	unsigned char h[REC_HDR];
	struct iovec iov[2] = {{h, REC_HDR}, {sd->id, sd->idlen}};
	make_header(h, REC_DONE, 0, sd->done_upto, 0, iov + 1, 1, (uint16_t)sd->idlen, 0, 0);
	if(append_locked(s, iov, 2, REC_HDR + sd->idlen)){
		io_failed_locked(s, "writing a delivery marker", errno);
		return;
	}
	sd->marked_upto = sd->done_upto;
}

static void write_markers_locked(struct akz_spool *s)
{
	while(s->marker_due){
		struct akz_spool_dev *sd = s->marker_due;
		s->marker_due = sd->marker_next;
		sd->marker_queued = false;
		if(sd->done_upto > sd->marked_upto) write_marker_locked(s, sd);
	}
}

enum akz_spool_rc akz_spool_append(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msg *m)
{
	size_t topiclen = strlen(m->topic);
	unsigned char h[REC_HDR];
	struct iovec iov[5] = {{h, REC_HDR}, {sd->id, sd->idlen}, {m->topic, topiclen},
			{m->corr, m->corrlen}, {m->payload, m->payloadlen}};
	size_t n = REC_HDR + sd->idlen + topiclen + m->corrlen + m->payloadlen;
	enum akz_spool_rc rc = AKZ_SPOOL_OK;
	bool was_dirty;

	if(topiclen > UINT16_MAX || n > UINT32_MAX) return AKZ_SPOOL_FULL;
	pthread_mutex_lock(&s->lock);
	was_dirty = s->dirty;
	if(sd->bytes + n > s->o.device_max_bytes){
		rc = AKZ_SPOOL_DEVICE_FULL;
	}else if(s->st.bytes + n > s->o.max_bytes){
		rc = AKZ_SPOOL_FULL;
	}else{
		uint64_t seq = sd->last_seq + 1;
		make_header(h, REC_UPLINK, m->qos, seq, m->time, iov + 1, 4, (uint16_t)sd->idlen,
				(uint16_t)topiclen, m->corrlen);
		if(append_locked(s, iov, 5, n)){
			io_failed_locked(s, "appending an uplink", errno);
			rc = AKZ_SPOOL_IO;
		}else if(mark_locked(s->active, sd, seq)){
			/* Without the mark the segment could be deleted under the record: take it back. */
			if(ftruncate(s->fd, (off_t)(s->active->size - n)) == 0){
				s->active->size -= n;
				s->st.disk_bytes -= n;
			}
			rc = AKZ_SPOOL_IO;
		}else{
			sd->last_seq = seq;
			sd->bytes += n;
			sd->msgs++;
			s->st.bytes += n;
			s->st.msgs++;
			m->seq = seq;
			m->spooled = (uint32_t)n;
			if(s->o.sync == AKZ_SYNC_ALWAYS){
				if(fdatasync(s->fd) != 0) io_failed_locked(s, "fdatasync", errno);
				s->dirty = false;
			}else if(s->o.sync == AKZ_SYNC_BATCH && !was_dirty){
				pthread_cond_signal(&s->cond);   /* the flusher sleeps while nothing is dirty */
			}
		}
	}
	pthread_mutex_unlock(&s->lock);
	return rc;
}

void akz_spool_settle(struct akz_spool *s, struct akz_spool_dev *sd, uint64_t bytes, uint64_t n,
		uint64_t done_upto)
{
	pthread_mutex_lock(&s->lock);
	bytes = bytes > sd->bytes ? sd->bytes : bytes;
	n = n > sd->msgs ? sd->msgs : n;
	sd->bytes -= bytes;
	sd->msgs -= n;
	s->st.bytes -= bytes;
	s->st.msgs -= n;
	if(done_upto > sd->done_upto){
		sd->done_upto = done_upto;
		if(!sd->marker_queued){
			if(s->marker_due == NULL) s->marker_due_ms = akz_mono_ms();
			sd->marker_queued = true;
			sd->marker_next = s->marker_due;
			s->marker_due = sd;
		}
	}
	pthread_mutex_unlock(&s->lock);
}

/* ---- reclaiming --------------------------------------------------------------------------- */

static bool segment_done_locked(const struct segment *seg)
{
	for(size_t i = 0; i < seg->nmarks; i++){
		if(seg->marks[i].maxseq > seg->marks[i].sd->done_upto) return false;
	}
	return true;
}

static void free_segment(struct segment *seg)
{
	free(seg->marks);
	free(seg);
}

/* Forgets the oldest segment (its file is gone or set aside). Locked. */
static void drop_oldest_locked(struct akz_spool *s)
{
	struct segment *seg = s->oldest;
	for(size_t i = 0; i < seg->nmarks; i++){
		if(seg->marks[i].sd->mark_seg == seg) seg->marks[i].sd->mark_seg = NULL;
	}
	s->oldest = seg->next;
	s->st.disk_bytes -= seg->size;
	s->st.segments--;
	free_segment(seg);
}

/* Reads a whole file. Returns the buffer (caller frees) and its size, or NULL with errno set. */
static unsigned char *read_all(const char *path, size_t *size)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	if(fd < 0) return NULL;
	struct stat st;
	unsigned char *buf = NULL;
	if(fstat(fd, &st) == 0 && (buf = malloc((size_t)st.st_size + 1)) != NULL){
		size_t got = 0;
		while(got < (size_t)st.st_size){
			ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
			if(r < 0 && errno == EINTR) continue;
			if(r <= 0) break;
			got += (size_t)r;
		}
		*size = got;
	}
	int e = errno;
	close(fd);
	errno = e;
	return buf;
}

/* Why a record at some offset of a segment cannot be used. */
enum rec_check { REC_OK, REC_TORN, REC_CORRUPT };

/* Checks the record at buf+off (size bytes in all). A bad record that reaches the end of the
 * file is a write cut short (torn); one with good records after it is corruption. */
static enum rec_check check_record(const unsigned char *buf, size_t size, size_t off, const char **why)
{
	if(size - off < REC_HDR){
		*why = "incomplete record header";
		return REC_TORN;
	}
	const unsigned char *h = buf + off;
	uint32_t len = get32(h + 4);
	if(len > size - off - REC_HDR){
		*why = "record runs past the end of the file";
		return REC_TORN;
	}
	if((uint32_t)crc32_z(0L, h + 4, REC_HDR - 4 + (size_t)len) != get32(h)){
		*why = "checksum mismatch";
		return off + REC_HDR + len == size ? REC_TORN : REC_CORRUPT;
	}
	size_t parts = (size_t)get16(h + 10) + get16(h + 12) + get16(h + 14);
	if((h[8] != REC_UPLINK && h[8] != REC_DONE) || parts > len || get16(h + 10) == 0){
		*why = "unknown record type or bad field lengths";
		return REC_CORRUPT;
	}
	/* The spool only writes ids that were C strings and QoS 0..2. A NUL inside an id made
	 * device_locked() keep a strndup'ed copy shorter than its idlen, which later lookups and
	 * done markers read idlen bytes of (a heap over-read the spool fuzzer hit); a QoS above 2
	 * is one libmosquitto refuses to publish. Either is damage, not a record. */
	if(memchr(h + REC_HDR, '\0', get16(h + 10)) != NULL || (h[8] == REC_UPLINK && h[9] > 2)){
		*why = "device id with a NUL byte or QoS above 2";
		return REC_CORRUPT;
	}
	return REC_OK;
}

/* Copies the uplink records of the oldest segment that are still undelivered to the active one,
 * then deletes it. Locked; runs in the flusher, at most once per RECLAIM_MS. Returns 0, or -1
 * when a read or write failed (the segment is kept then). */
static int compact_oldest_locked(struct akz_spool *s)
{
	char path[4200];
	size_t size = 0;
	struct segment *seg = s->oldest;

	seg_path(s, seg->id, "", path, sizeof(path));
	unsigned char *buf = read_all(path, &size);
	if(buf == NULL){
		io_failed_locked(s, "reading a segment to compact it", errno);
		return -1;
	}
	size_t copied = 0;
	for(size_t off = SEG_HDR; off < size;){
		const char *why;
		if(check_record(buf, size, off, &why) != REC_OK) break;   /* already reported at start */
		const unsigned char *h = buf + off;
		size_t n = REC_HDR + get32(h + 4);
		if(h[8] == REC_UPLINK){
			struct akz_spool_dev *sd = device_locked(s, (const char *)h + REC_HDR, get16(h + 10));
			uint64_t seq = get64(h + 16);
			if(sd && seq > sd->done_upto){
				struct iovec iov = {(void *)h, n};
				if(append_locked(s, &iov, 1, n) || mark_locked(s->active, sd, seq)){
					io_failed_locked(s, "copying undelivered uplinks forward", errno ? errno : ENOMEM);
					free(buf);
					return -1;
				}
				copied++;
			}
		}
		off += n;
	}
	free(buf);
	/* The copies must be durable before the originals go. */
	if(copied && s->o.sync != AKZ_SYNC_NONE && fdatasync(s->fd) != 0){
		io_failed_locked(s, "fdatasync", errno);
		return -1;
	}
	if(unlink(path) != 0 && errno != ENOENT){
		io_failed_locked(s, "deleting a compacted segment", errno);
		return -1;
	}
	drop_oldest_locked(s);
	return 0;
}

/* Empties or retires the active segment once everything in it is delivered and it has grown
 * large (or a write failed: the disk may be full), so that a quiet spool does not keep megabytes
 * of delivered uplinks and a full disk gets its space back. The only segment is emptied in place
 * (nothing older needs its done markers); otherwise a new one is started and the loop in
 * reclaim_locked deletes the old one with the rest of the delivered prefix. Locked. */
static void recycle_active_locked(struct akz_spool *s)
{
	struct segment *seg = s->active;
	uint64_t big = s->o.segment_bytes / 2 < (1u << 20) ? s->o.segment_bytes / 2 : (1u << 20);

	if(seg->size <= SEG_HDR || (!s->io_failed && seg->size < big) || !segment_done_locked(seg)) return;
	s->io_failed = false;
	if(s->oldest == seg){
		if(ftruncate(s->fd, SEG_HDR) != 0){
			io_failed_locked(s, "emptying a delivered segment", errno);
			return;
		}
		for(size_t i = 0; i < seg->nmarks; i++){
			if(seg->marks[i].sd->mark_seg == seg) seg->marks[i].sd->mark_seg = NULL;
		}
		seg->nmarks = 0;
		s->st.disk_bytes -= seg->size - SEG_HDR;
		seg->size = SEG_HDR;
	}else if(rotate_locked(s) != 0){
		io_failed_locked(s, "starting a new segment", errno);
	}
}

/* Deletes segments whose uplinks are all done with, oldest first (a done marker in a newer
 * segment can only speak for older records, so only a prefix may go), and compacts when the
 * files have grown past twice the backlog. Locked. */
static void reclaim_locked(struct akz_spool *s)
{
	char path[4200];

	recycle_active_locked(s);
	/* Each compaction empties the oldest segment, after which the next ones may be done: the
	 * pass ends when nothing more can go. Bounded by the number of segments at the start. */
	for(uint64_t budget = s->st.segments; budget > 0; budget--){
		while(s->oldest != s->active && segment_done_locked(s->oldest)){
			seg_path(s, s->oldest->id, "", path, sizeof(path));
			if(unlink(path) != 0 && errno != ENOENT){
				io_failed_locked(s, "deleting a delivered segment", errno);
				return;
			}
			drop_oldest_locked(s);
		}
		if(s->oldest == s->active || s->st.disk_bytes <= 2 * s->st.bytes + 2 * s->o.segment_bytes) return;
		if(compact_oldest_locked(s)) return;
	}
}

/* ---- the flusher thread ------------------------------------------------------------------- */

static void *flusher_main(void *arg)
{
	struct akz_spool *s = arg;
	int64_t next_reclaim = akz_mono_ms() + RECLAIM_MS;
	int64_t last_sync = 0;

	pthread_mutex_lock(&s->lock);
	while(!s->stop){
		int64_t now = akz_mono_ms();
		int64_t wake = next_reclaim;
		if(s->marker_due && s->marker_due_ms + MARKER_MS < wake) wake = s->marker_due_ms + MARKER_MS;
		if(s->nretired) wake = now;
		if(s->o.sync == AKZ_SYNC_BATCH && s->dirty){
			int64_t due = last_sync + s->o.sync_ms;
			if(due < wake) wake = due;
		}
		if(wake > now){
			struct timespec ts;
			clock_gettime(CLOCK_MONOTONIC, &ts);
			int64_t ns = ts.tv_nsec + (wake - now) * 1000000;
			ts.tv_sec += ns / 1000000000;
			ts.tv_nsec = ns % 1000000000;
			pthread_cond_timedwait(&s->cond, &s->lock, &ts);
			continue;
		}
		if(s->marker_due && now >= s->marker_due_ms + MARKER_MS) write_markers_locked(s);
		if(s->o.sync == AKZ_SYNC_BATCH && s->dirty && now >= last_sync + s->o.sync_ms){
			/* Group commit: everything appended up to here goes in one fdatasync, outside the
			 * lock so that appends go on. The fd stays open: only this thread closes fds. */
			int fd = s->fd;
			s->dirty = false;
			pthread_mutex_unlock(&s->lock);
			int rc = fdatasync(fd);
			int e = errno;
			pthread_mutex_lock(&s->lock);
			if(rc) io_failed_locked(s, "fdatasync", e);
			last_sync = akz_mono_ms();
		}
		while(s->nretired){
			int fd = s->retired[--s->nretired];
			if(s->o.sync == AKZ_SYNC_BATCH) fdatasync(fd);
			close(fd);
		}
		if(now >= next_reclaim){
			reclaim_locked(s);
			next_reclaim = akz_mono_ms() + RECLAIM_MS;
		}
	}
	pthread_mutex_unlock(&s->lock);
	return NULL;
}

/* ---- recovery ---------------------------------------------------------------------------- */

/* Adds a recovered uplink to its device. Locked. Returns 0, or -1 when out of memory. */
static int recover_uplink(struct akz_spool *s, struct segment *seg, const unsigned char *h)
{
	uint16_t idlen = get16(h + 10), topiclen = get16(h + 12), corrlen = get16(h + 14);
	uint32_t len = get32(h + 4);
	const char *p = (const char *)h + REC_HDR;
	uint64_t seq = get64(h + 16);

	struct akz_spool_dev *sd = device_locked(s, p, idlen);
	if(sd == NULL || mark_locked(seg, sd, seq)) return -1;
	if(seq > sd->last_seq) sd->last_seq = seq;
	if(seq <= sd->done_upto) return 0;
	const char *topic = p + idlen, *corr = topic + topiclen, *payload = corr + corrlen;
	struct akz_msg *m = akz_msg_new(topic, topiclen, payload, len - idlen - topiclen - corrlen,
			h[9], corrlen ? corr : NULL, corrlen);
	if(m == NULL) return -1;
	m->seq = seq;
	m->time = (int64_t)get64(h + 24);
	m->spooled = REC_HDR + len;
	akz_msgq_push(&sd->backlog, m);
	return 0;
}

static int cmp_seq(const void *a, const void *b)
{
	uint64_t x = (*(struct akz_msg *const *)a)->seq, y = (*(struct akz_msg *const *)b)->seq;
	return x < y ? -1 : x > y;
}

/* Puts a device's recovered records in seq order, dropping those done with and duplicates
 * (a record copied forward whose original was not yet deleted). Locked. Returns 0, or -1 when
 * out of memory. */
static int order_backlog(struct akz_spool *s, struct akz_spool_dev *sd)
{
	size_t n = sd->backlog.count, k = 0;
	if(n == 0) return 0;
	struct akz_msg **v = malloc(n * sizeof(struct akz_msg *));
	if(v == NULL) return -1;
	for(struct akz_msg *m; (m = akz_msgq_pop(&sd->backlog)) != NULL;) v[k++] = m;
	qsort(v, n, sizeof(struct akz_msg *), cmp_seq);
	uint64_t kept = sd->done_upto;   /* seqs at or below this are done with or already kept */
	for(size_t i = 0; i < n; i++){
		if(v[i]->seq <= kept){
			free(v[i]);
			continue;
		}
		kept = v[i]->seq;
		sd->bytes += v[i]->spooled;
		sd->msgs++;
		s->st.bytes += v[i]->spooled;
		s->st.msgs++;
		akz_msgq_push(&sd->backlog, v[i]);
	}
	free(v);
	s->st.replayed += sd->msgs;
	return 0;
}

/* Reads one segment into the device backlogs. A torn end is cut off; a corrupt segment's good
 * records are copied into the active segment and the file is renamed to .corrupt. Locked.
 * Returns 0 (problems are logged), or -1 when out of memory or the segment cannot be read. */
static int recover_segment(struct akz_spool *s, struct segment *seg, char *err, size_t errlen)
{
	char path[4200];
	size_t size = 0;

	seg_path(s, seg->id, "", path, sizeof(path));
	unsigned char *buf = read_all(path, &size);
	if(buf == NULL){
		akz_set_err(err, errlen, "cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	seg->size = size;
	if(size < SEG_HDR){
		/* A crash between creating the file and writing its header: nothing was in it. */
		slog(s, MOSQ_LOG_WARNING, "akenza: spool: %s: empty segment (cut short when it was "
				"created): removed", path);
		free(buf);
		unlink(path);
		seg->size = 0;
		return 0;
	}
	bool corrupt = memcmp(buf, SEG_MAGIC, 8) != 0 || get32(buf + 8) != SEG_VERSION;
	size_t off = SEG_HDR, good = 0;
	const char *why = "not a spool segment (bad header)";
	while(!corrupt && off < size){
		enum rec_check c = check_record(buf, size, off, &why);
		if(c == REC_TORN){
			slog(s, MOSQ_LOG_WARNING, "akenza: spool: %s: %s at offset %zu (a write cut short by a "
					"crash or power cut): cut off; %zu records before it kept", path, why, off, good);
			if(truncate(path, (off_t)off) != 0){
				slog(s, MOSQ_LOG_ERR, "akenza: spool: %s: cannot cut off the torn record: %s",
						path, strerror(errno));
			}
			seg->size = off;
			break;
		}
		if(c == REC_CORRUPT){
			corrupt = true;
			break;
		}
		const unsigned char *h = buf + off;
		if(h[8] == REC_DONE){
			struct akz_spool_dev *sd = device_locked(s, (const char *)h + REC_HDR, get16(h + 10));
			if(sd == NULL) goto nomem;
			uint64_t seq = get64(h + 16);
			if(seq > sd->done_upto) sd->done_upto = sd->marked_upto = seq;
			if(seq > sd->last_seq) sd->last_seq = seq;
		}else if(recover_uplink(s, seg, h)){
			goto nomem;
		}
		good++;
		off += REC_HDR + get32(h + 4);
	}
	if(corrupt){
		/* Save what was readable into the active segment (it is new and lies beyond this one),
		 * then set the file aside for a human to look at. */
		size_t saved = 0;
		for(size_t o = SEG_HDR; o < off; saved++){
			const unsigned char *h = buf + o;
			size_t n = REC_HDR + get32(h + 4);
			struct iovec iov = {(void *)h, n};
			if(append_locked(s, &iov, 1, n)){
				akz_set_err(err, errlen, "cannot save the readable records of corrupt %s: %s", path,
						strerror(errno));
				free(buf);
				return -1;
			}
			if(h[8] == REC_UPLINK){
				struct akz_spool_dev *sd = device_locked(s, (const char *)h + REC_HDR, get16(h + 10));
				if(sd == NULL || mark_locked(s->active, sd, get64(h + 16))) goto nomem;
			}
			o += n;
		}
		if(s->o.sync != AKZ_SYNC_NONE) fdatasync(s->fd);
		char aside[4300];
		seg_path(s, seg->id, ".corrupt", aside, sizeof(aside));
		if(rename(path, aside) != 0){
			akz_set_err(err, errlen, "cannot set corrupt %s aside: %s", path, strerror(errno));
			free(buf);
			return -1;
		}
		slog(s, MOSQ_LOG_ERR, "akenza: spool: %s: %s at offset %zu: %zu records before it saved, "
				"the rest set aside as %s", path, why, off, saved, aside);
		seg->size = 0;   /* the caller drops it */
	}
	free(buf);
	return 0;
nomem:
	free(buf);
	akz_set_err(err, errlen, "out of memory recovering %s", path);
	return -1;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

/* Lists the segment ids in the directory, sorted. Returns the count (*ids malloc'ed, caller
 * frees), or -1 with the reason in err. */
static long list_segments(const char *dir, uint64_t **ids, char *err, size_t errlen)
{
	DIR *d = opendir(dir);
	if(d == NULL){
		akz_set_err(err, errlen, "cannot open spool directory %s: %s", dir, strerror(errno));
		return -1;
	}
	size_t n = 0, cap = 0;
	uint64_t *v = NULL;
	for(struct dirent *e; (e = readdir(d)) != NULL;){
		char *end;
		if(strlen(e->d_name) != 20 || strcmp(e->d_name + 16, ".seg") != 0) continue;
		uint64_t id = strtoull(e->d_name, &end, 16);
		if(end != e->d_name + 16) continue;
		if(n == cap){
			cap = cap ? cap * 2 : 16;
			uint64_t *nv = realloc(v, cap * sizeof(*nv));
			if(nv == NULL){
				free(v);
				closedir(d);
				akz_set_err(err, errlen, "out of memory listing %s", dir);
				return -1;
			}
			v = nv;
		}
		v[n++] = id;
	}
	closedir(d);
	if(n) qsort(v, n, sizeof(*v), cmp_u64);
	*ids = v;
	return (long)n;
}

/* Recovers every existing segment after opening a new active one beyond them. Locked. */
static int recover_all(struct akz_spool *s, char *err, size_t errlen)
{
	uint64_t *ids = NULL;
	long n = list_segments(s->dir, &ids, err, errlen);
	if(n < 0) return -1;

	/* Old segments first in the list (owned by s from here on), then the new active one. */
	s->oldest = s->active = NULL;
	for(long i = 0; i < n; i++){
		struct segment *seg = calloc(1, sizeof(*seg));
		if(seg == NULL){
			akz_set_err(err, errlen, "out of memory");
			goto fail;
		}
		seg->id = ids[i];
		if(s->active) s->active->next = seg;
		else s->oldest = seg;
		s->active = seg;   /* the new active segment comes after the last */
	}
	if(rotate_locked(s)){
		akz_set_err(err, errlen, "cannot create a segment in %s: %s", s->dir, strerror(errno));
		goto fail;
	}
	s->st.segments = 1;
	s->st.disk_bytes = SEG_HDR;
	free(ids);
	ids = NULL;
	for(struct segment **pp = &s->oldest; *pp != s->active;){
		struct segment *seg = *pp;
		if(recover_segment(s, seg, err, errlen)) return -1;
		if(seg->size == 0){   /* set aside */
			for(size_t i = 0; i < seg->nmarks; i++){
				if(seg->marks[i].sd->mark_seg == seg) seg->marks[i].sd->mark_seg = NULL;
			}
			*pp = seg->next;
			free_segment(seg);
			continue;
		}
		s->st.segments++;
		s->st.disk_bytes += seg->size;
		pp = &seg->next;
	}
	for(struct akz_htab_node *e = akz_htab_first(&s->devices); e; e = akz_htab_next(&s->devices, e)){
		if(order_backlog(s, dev_of(e))){
			akz_set_err(err, errlen, "out of memory ordering the recovered uplinks");
			return -1;
		}
	}
	return 0;
fail:
	free(ids);
	return -1;
}

/* ---- open and close ----------------------------------------------------------------------- */

static void free_spool(struct akz_spool *s)
{
	while(s->oldest){
		struct segment *seg = s->oldest;
		s->oldest = seg->next;
		free_segment(seg);
	}
	for(struct akz_htab_node *n = akz_htab_first(&s->devices), *next; n; n = next){
		next = akz_htab_next(&s->devices, n);
		struct akz_spool_dev *d = dev_of(n);
		akz_msgq_clear(&d->backlog);
		free(d->id);
		free(d);
	}
	akz_htab_free(&s->devices);
	for(size_t i = 0; i < s->nretired; i++) close(s->retired[i]);
	free(s->retired);
	if(s->fd >= 0) close(s->fd);
	if(s->dirfd >= 0) close(s->dirfd);
	pthread_cond_destroy(&s->cond);
	pthread_mutex_destroy(&s->lock);
	free(s->dir);
	free(s);
}

int akz_spool_open(const struct akz_spool_opts *opts, akz_spool_log_fn log, void *log_ctx,
		struct akz_spool **out, char *err, size_t errlen)
{
	*out = NULL;
	struct akz_spool *s = calloc(1, sizeof(*s));
	if(s == NULL){
		akz_set_err(err, errlen, "out of memory");
		return -1;
	}
	s->o = *opts;
	s->log = log;
	s->log_ctx = log_ctx;
	s->fd = s->dirfd = -1;
	pthread_mutex_init(&s->lock, NULL);
	akz_cond_init_monotonic(&s->cond);   /* a wall-clock step must not stall syncs */
	s->dir = strdup(opts->dir);
	if(s->dir == NULL){
		akz_set_err(err, errlen, "out of memory");
		goto fail;
	}
	if(mkdir(s->dir, 0700) != 0 && errno != EEXIST){
		akz_set_err(err, errlen, "cannot create spool directory %s: %s", s->dir, strerror(errno));
		goto fail;
	}
	s->dirfd = open(s->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if(s->dirfd < 0){
		akz_set_err(err, errlen, "cannot open spool directory %s: %s", s->dir, strerror(errno));
		goto fail;
	}
	/* The segments hold every sensor's uplinks (0600 each); a directory that others may list or
	 * enter is a deployment mistake worth a line, not a reason to refuse starting (an existing
	 * volume may be shared on purpose). */
	struct stat dsb;
	if(fstat(s->dirfd, &dsb) == 0 && (dsb.st_mode & 077)){
		slog(s, MOSQ_LOG_WARNING, "akenza: spool directory %s: mode %04o: group or others can "
				"access it; chmod 700 it", s->dir, (unsigned)(dsb.st_mode & 07777));
	}
	if(access(s->dir, W_OK) != 0){
		akz_set_err(err, errlen, "spool directory %s is not writable by this user: %s", s->dir,
				strerror(errno));
		goto fail;
	}
	pthread_mutex_lock(&s->lock);
	int rc = recover_all(s, err, errlen);
	if(rc == 0) reclaim_locked(s);
	pthread_mutex_unlock(&s->lock);
	if(rc) goto fail;
	if(akz_thread_start(&s->flusher, "spool", flusher_main, s, err, errlen)) goto fail;
	*out = s;
	return 0;
fail:
	free_spool(s);
	return -1;
}

void akz_spool_close(struct akz_spool *s)
{
	if(s == NULL) return;
	akz_thread_stop_sleeper(&s->flusher, &s->lock, &s->cond, &s->stop);
	pthread_mutex_lock(&s->lock);
	write_markers_locked(s);
	reclaim_locked(s);
	pthread_mutex_unlock(&s->lock);
	/* A clean stop leaves nothing unsynced, so a restart replays no duplicates. */
	if(s->fd >= 0 && fdatasync(s->fd) != 0) io_failed_locked(s, "fdatasync", errno);
	for(size_t i = 0; i < s->nretired; i++) fdatasync(s->retired[i]);
	free_spool(s);
}

/* ---- backlog and figures ------------------------------------------------------------------- */

void akz_spool_take_backlog(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msgq *out)
{
	pthread_mutex_lock(&s->lock);
	akz_msgq_take_all(out, &sd->backlog);
	pthread_mutex_unlock(&s->lock);
}

void akz_spool_give_back(struct akz_spool *s, struct akz_spool_dev *sd, struct akz_msgq *q)
{
	pthread_mutex_lock(&s->lock);
	/* What was taken earlier goes before what stayed behind. */
	akz_msgq_take_all(q, &sd->backlog);
	akz_msgq_take_all(&sd->backlog, q);
	pthread_mutex_unlock(&s->lock);
}

void akz_spool_device_usage(struct akz_spool *s, const struct akz_spool_dev *sd, uint64_t *bytes,
		uint64_t *msgs)
{
	pthread_mutex_lock(&s->lock);
	*bytes = sd->bytes;
	*msgs = sd->msgs;
	pthread_mutex_unlock(&s->lock);
}

void akz_spool_get_stats(struct akz_spool *s, struct akz_spool_stats *out)
{
	pthread_mutex_lock(&s->lock);
	*out = s->st;
	pthread_mutex_unlock(&s->lock);
}

void akz_spool_each_backlog(struct akz_spool *s,
		void (*fn)(void *ctx, const char *id, uint64_t bytes, uint64_t msgs), void *ctx)
{
	pthread_mutex_lock(&s->lock);
	for(struct akz_htab_node *n = akz_htab_first(&s->devices); n; n = akz_htab_next(&s->devices, n)){
		const struct akz_spool_dev *sd = dev_of(n);
		if(sd->msgs) fn(ctx, sd->id, sd->bytes, sd->msgs);
	}
	pthread_mutex_unlock(&s->lock);
}
