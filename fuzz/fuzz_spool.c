/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* fuzz_spool.c - libFuzzer target: spool recovery (akz_spool_open on damaged segment files).
 * Each input is tried three times, each time in a fresh temporary directory: written as it is as
 * the only segment file; behind a valid segment header (so that the fuzzer reaches the records
 * without having to find the magic); and behind the header with every record's CRC made right
 * (so that mutations reach what lies behind the checksum: ids, lengths, seqs, markers). The spool is opened (recovery), every device's backlog is
 * taken and settled, and the spool closed; then opened again: everything settled must stay
 * delivered, which checks that recovery reads back what the spool itself wrote. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <zlib.h>
#include "akz_spool.h"
#include "fuzz_common.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void quiet(void *ctx, int level, const char *msg)
{
	(void)ctx;
	(void)level;
	if(msg == NULL) abort();
}

struct ids {
	char **v;
	size_t n, cap;
};

static void collect_id(void *ctx, const char *id, uint64_t bytes, uint64_t msgs)
{
	struct ids *ids = ctx;
	if(msgs == 0 || bytes == 0) abort();   /* each_backlog lists only devices with a backlog */
	if(ids->n == ids->cap){
		size_t cap = ids->cap ? ids->cap * 2 : 16;
		char **nv = realloc(ids->v, cap * sizeof(*nv));
		if(nv == NULL) abort();
		ids->v = nv;
		ids->cap = cap;
	}
	ids->v[ids->n++] = strdup(id);
}

static struct akz_spool *open_in(const char *d)
{
	struct akz_spool_opts o = {.dir = d, .sync = AKZ_SYNC_NONE, .sync_ms = 5,
			.max_bytes = 1 << 24, .device_max_bytes = 1 << 22, .segment_bytes = 1 << 16};
	struct akz_spool *s = NULL;
	char err[512];
	if(akz_spool_open(&o, quiet, NULL, &s, err, sizeof(err)) != 0) return NULL;
	return s;
}

/* Takes and settles every backlog; returns how many messages there were. */
static uint64_t drain(struct akz_spool *s)
{
	struct ids ids = {0};
	uint64_t total = 0;
	akz_spool_each_backlog(s, collect_id, &ids);
	for(size_t i = 0; i < ids.n; i++){
		if(ids.v[i] == NULL) continue;
		struct akz_spool_dev *sd = akz_spool_device(s, ids.v[i], strlen(ids.v[i]));
		struct akz_msgq q = {0};
		if(sd) akz_spool_take_backlog(s, sd, &q);
		uint64_t last = 0;
		for(struct akz_msg *m; (m = akz_msgq_pop(&q)) != NULL; free(m)){
			if(m->seq <= last) abort();   /* replay is in seq order, without duplicates */
			last = m->seq;
			/* touch every byte, so that ASan sees a message built past its allocation */
			volatile unsigned char x = 0;
			for(size_t k = 0; m->topic[k]; k++) x ^= (unsigned char)m->topic[k];
			for(uint32_t k = 0; k < m->payloadlen; k++) x ^= ((unsigned char *)m->payload)[k];
			for(uint16_t k = 0; k < m->corrlen; k++) x ^= ((unsigned char *)m->corr)[k];
			(void)x;
			akz_spool_settle(s, sd, m->spooled, 1, m->seq);
			total++;
		}
		free(ids.v[i]);
	}
	free(ids.v);
	return total;
}

static void one(const uint8_t *hdr, size_t hlen, const uint8_t *data, size_t size)
{
	char d[64] = "/tmp/akz-fuzz-spool-XXXXXX";
	if(mkdtemp(d) == NULL) return;
	char path[128];
	snprintf(path, sizeof(path), "%s/0000000000000001.seg", d);
	uint8_t *buf = malloc(hlen + size + 1);
	if(buf){
		if(hlen) memcpy(buf, hdr, hlen);
		if(size) memcpy(buf + hlen, data, size);
		if(fuzz_write_file(path, buf, hlen + size) == 0){
			struct akz_spool *s = open_in(d);
			if(s){
				drain(s);
				akz_spool_close(s);
				/* Everything was settled: a second recovery must replay nothing. */
				s = open_in(d);
				if(s == NULL) abort();
				if(drain(s) != 0) abort();
				akz_spool_close(s);
			}
		}
		free(buf);
	}
	fuzz_clear_dir(d, 1);
}

/* Little-endian 32-bit field at p. */
static uint32_t le32(const uint8_t *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Sets the CRC of every whole record in buf (the layout of spool.c: u32 crc over the rest of the
 * 32-byte header and the body, u32 body length); a record running past the end is left as is. */
static void fix_crcs(uint8_t *buf, size_t size)
{
	for(size_t off = 0; size - off >= 32;){
		uint32_t len = le32(buf + off + 4);
		if(len > size - off - 32) break;
		uLong crc = crc32_z(0L, buf + off + 4, 28 + (size_t)len);
		for(int k = 0; k < 4; k++) buf[off + (size_t)k] = (uint8_t)(crc >> (8 * k));
		off += 32 + (size_t)len;
	}
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	static const uint8_t header[16] = {'A', 'K', 'Z', 'S', 'P', 'O', 'O', 'L', 1, 0, 0, 0, 0, 0, 0, 0};
	one(NULL, 0, data, size);
	one(header, sizeof(header), data, size);
	uint8_t *fixed = malloc(size + 1);
	if(fixed){
		if(size) memcpy(fixed, data, size);
		fix_crcs(fixed, size);
		one(header, sizeof(header), fixed, size);
		free(fixed);
	}
	return 0;
}
