/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_spool.c - unit tests of the durable spool: append, settle, recovery, limits, reclaiming. */
#include <dirent.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cmocka.h>
#include <zlib.h>
#include "akz_spool.h"

struct logbook {
	int n;
	char all[4096];
};

static void note(void *ctx, int level, const char *msg)
{
	struct logbook *l = ctx;
	(void)level;
	l->n++;
	size_t used = strlen(l->all);
	snprintf(l->all + used, sizeof(l->all) - used, "%s\n", msg);
}

static char *make_dir(void)
{
	char tmpl[] = "/tmp/akz-spool-XXXXXX";
	char *d = mkdtemp(tmpl);
	assert_non_null(d);
	return strdup(d);
}

static void remove_dir(char *dir)
{
	DIR *d = opendir(dir);
	assert_non_null(d);
	for(struct dirent *e; (e = readdir(d)) != NULL;){
		if(e->d_name[0] == '.') continue;
		char p[512];
		snprintf(p, sizeof(p), "%s/%s", dir, e->d_name);
		unlink(p);
	}
	closedir(d);
	rmdir(dir);
	free(dir);
}

/* Counts the files in dir whose names end in suffix. */
static int count_files(const char *dir, const char *suffix)
{
	int n = 0;
	DIR *d = opendir(dir);
	for(struct dirent *e; d && (e = readdir(d)) != NULL;){
		size_t l = strlen(e->d_name), s = strlen(suffix);
		if(l > s && strcmp(e->d_name + l - s, suffix) == 0) n++;
	}
	if(d) closedir(d);
	return n;
}

static struct akz_spool *open_spool(const char *dir, uint64_t segment, struct logbook *log)
{
	struct akz_spool_opts o = {.dir = dir, .sync = AKZ_SYNC_NONE, .sync_ms = 5,
			.max_bytes = 1 << 20, .device_max_bytes = 1 << 19, .segment_bytes = segment};
	struct akz_spool *s = NULL;
	char err[256] = "";
	assert_int_equal(akz_spool_open(&o, note, log, &s, err, sizeof(err)), 0);
	return s;
}

/* Appends "<i>" n times for device id; returns the last message's seq. */
static uint64_t append_n(struct akz_spool *s, const char *id, int from, int n)
{
	struct akz_spool_dev *sd = akz_spool_device(s, id, strlen(id));
	uint64_t seq = 0;
	assert_non_null(sd);
	for(int i = from; i < from + n; i++){
		char payload[32];
		int len = snprintf(payload, sizeof(payload), "%d", i);
		struct akz_msg *m = akz_msg_new("/up/device/id/x", 15, payload, (uint32_t)len, 1,
				i % 2 ? "corr" : NULL, 4);
		assert_non_null(m);
		assert_int_equal(akz_spool_append(s, sd, m), AKZ_SPOOL_OK);
		assert_int_equal(m->seq, seq ? seq + 1 : m->seq);
		seq = m->seq;
		free(m);
	}
	return seq;
}

/* Takes the device's backlog and checks it holds payloads from..from+n-1 in order. */
static void expect_backlog(struct akz_spool *s, const char *id, int from, int n)
{
	struct akz_spool_dev *sd = akz_spool_device(s, id, strlen(id));
	struct akz_msgq q = {0};
	akz_spool_take_backlog(s, sd, &q);
	assert_int_equal(q.count, n);
	int i = from;
	for(struct akz_msg *m; (m = akz_msgq_pop(&q)) != NULL; free(m), i++){
		char want[32];
		snprintf(want, sizeof(want), "%d", i);
		assert_int_equal(m->payloadlen, strlen(want));
		assert_memory_equal(m->payload, want, m->payloadlen);
		assert_string_equal(m->topic, "/up/device/id/x");
		assert_int_equal(m->corrlen, i % 2 ? 4 : 0);
	}
}

static void test_settled_records_are_not_replayed(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 1 << 20, &log);
	append_n(s, "a", 0, 10);
	append_n(s, "b", 100, 3);
	struct akz_spool_dev *a = akz_spool_device(s, "a", 1);
	akz_spool_settle(s, a, 0, 4, 4);   /* the first four of a went */
	struct akz_spool_stats st;
	akz_spool_get_stats(s, &st);
	assert_int_equal(st.msgs, 9);
	akz_spool_close(s);

	s = open_spool(dir, 1 << 20, &log);
	expect_backlog(s, "a", 4, 6);
	expect_backlog(s, "b", 100, 3);
	/* seqs continue after a restart */
	assert_int_equal(append_n(s, "a", 10, 1), 11);
	akz_spool_get_stats(s, &st);
	assert_int_equal(st.replayed, 9);
	akz_spool_close(s);
	assert_int_equal(log.n, 0);
	remove_dir(dir);
}

static void test_torn_tail_is_cut_off(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 1 << 20, &log);
	append_n(s, "t", 0, 5);
	akz_spool_close(s);
	char path[512];
	snprintf(path, sizeof(path), "%s/%016x.seg", dir, 1);
	struct stat before;
	assert_int_equal(stat(path, &before), 0);
	int fd = open(path, O_WRONLY | O_APPEND);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, "\x01\x02\x03\x04\x40\x00\x00\x00\x01", 9), 9);   /* half a header */
	close(fd);

	s = open_spool(dir, 1 << 20, &log);
	expect_backlog(s, "t", 0, 5);
	akz_spool_close(s);
	assert_non_null(strstr(log.all, "cut off"));
	struct stat after;
	assert_int_equal(stat(path, &after), 0);
	assert_int_equal(after.st_size, before.st_size);
	remove_dir(dir);
}

static void test_corrupt_segment_is_set_aside_after_saving_what_reads(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 4096, &log);
	append_n(s, "c", 0, 200);    /* several 4 KiB segments */
	akz_spool_close(s);
	assert_true(count_files(dir, ".seg") >= 3);
	char path[512];
	snprintf(path, sizeof(path), "%s/%016x.seg", dir, 1);
	int fd = open(path, O_RDWR);
	assert_true(fd >= 0);
	/* Flip a byte in the body of a record in the middle of the first segment. */
	unsigned char b;
	assert_int_equal(pread(fd, &b, 1, 2000), 1);
	b ^= 0xff;
	assert_int_equal(pwrite(fd, &b, 1, 2000), 1);
	close(fd);

	s = open_spool(dir, 4096, &log);
	assert_non_null(strstr(log.all, "set aside"));
	assert_int_equal(count_files(dir, ".corrupt"), 1);
	struct akz_spool_dev *sd = akz_spool_device(s, "c", 1);
	struct akz_msgq q = {0};
	akz_spool_take_backlog(s, sd, &q);
	/* everything but the records from the damaged one to the end of that segment */
	assert_true(q.count > 150 && q.count < 200);
	uint64_t last = 0;
	for(struct akz_msg *m = q.head; m; m = m->next){
		assert_true(m->seq > last);
		last = m->seq;
	}
	akz_msgq_clear(&q);
	akz_spool_close(s);

	/* The saved records live on: a second restart finds them without new complaints. */
	struct logbook log2 = {0};
	s = open_spool(dir, 4096, &log2);
	sd = akz_spool_device(s, "c", 1);
	akz_spool_take_backlog(s, sd, &q);
	assert_true(q.count > 150);
	akz_msgq_clear(&q);
	akz_spool_close(s);
	assert_int_equal(log2.n, 0);
	remove_dir(dir);
}

/* A record whose CRC is right but whose device id holds a NUL (or whose QoS is above 2) is
 * damage: before the fix a NUL made the device's copied id shorter than its length, and the next
 * record of that device read past it (found with fuzz/fuzz_spool.c). */
static void test_nul_in_device_id_is_corrupt(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 1 << 20, &log);
	append_n(s, "ok", 0, 2);
	akz_spool_close(s);
	/* two uplink records of device "a\0b", CRC and all, appended to segment 1 */
	unsigned char rec[2][32 + 3 + 15 + 1];
	for(int r = 0; r < 2; r++){
		unsigned char *h = rec[r];
		memset(h, 0, sizeof(rec[r]));
		h[4] = 3 + 15 + 1;   /* len */
		h[8] = 1;            /* uplink */
		h[9] = 1;            /* qos */
		h[10] = 3;           /* idlen */
		h[12] = 15;          /* topiclen */
		h[16] = (unsigned char)(10 + r);   /* seq */
		memcpy(h + 32, "a\0b/up/device/id/ax", 3 + 15 + 1);
		uLong crc = crc32_z(0L, h + 4, sizeof(rec[r]) - 4);
		for(int k = 0; k < 4; k++) h[k] = (unsigned char)(crc >> (8 * k));
	}
	char path[512];
	snprintf(path, sizeof(path), "%s/%016x.seg", dir, 1);
	int fd = open(path, O_WRONLY | O_APPEND);
	assert_true(fd >= 0);
	assert_int_equal(write(fd, rec, sizeof(rec)), (ssize_t)sizeof(rec));
	close(fd);

	s = open_spool(dir, 1 << 20, &log);
	expect_backlog(s, "ok", 0, 2);
	struct akz_spool_stats st;
	akz_spool_get_stats(s, &st);
	assert_int_equal(st.msgs, 2);   /* only the two good ones */
	akz_spool_close(s);
	assert_non_null(strstr(log.all, "NUL byte"));
	assert_int_equal(count_files(dir, ".corrupt"), 1);
	remove_dir(dir);
}

/* The spool keeps its files private: a directory it creates is 0700, segments are 0600, and an
 * existing directory that group or others can access is reported (SECURITY.md). */
static void test_spool_files_are_private(void **state)
{
	(void)state;
	char *parent = make_dir();
	char dir[256];
	snprintf(dir, sizeof(dir), "%s/spool", parent);
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 1 << 20, &log);
	append_n(s, "p", 0, 1);
	akz_spool_close(s);
	struct stat sb;
	assert_int_equal(stat(dir, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0700);
	char path[512];
	snprintf(path, sizeof(path), "%s/%016x.seg", dir, 1);
	assert_int_equal(stat(path, &sb), 0);
	assert_int_equal(sb.st_mode & 0777, 0600);
	assert_int_equal(log.n, 0);

	assert_int_equal(chmod(dir, 0755), 0);
	s = open_spool(dir, 1 << 20, &log);
	akz_spool_close(s);
	assert_non_null(strstr(log.all, "mode 0755: group or others can access it"));
	remove_dir(strdup(dir));
	remove_dir(parent);
}

static void test_limits_refuse_without_writing(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool_opts o = {.dir = dir, .sync = AKZ_SYNC_BATCH, .sync_ms = 2,
			.max_bytes = 2000, .device_max_bytes = 800, .segment_bytes = 1 << 20};
	struct akz_spool *s = NULL;
	char err[256];
	assert_int_equal(akz_spool_open(&o, note, &log, &s, err, sizeof(err)), 0);
	const char *ids[] = {"d1", "d2", "d3"};
	int ok[3] = {0};
	enum akz_spool_rc last[3] = {AKZ_SPOOL_OK};
	for(int d = 0; d < 3; d++){
		struct akz_spool_dev *sd = akz_spool_device(s, ids[d], 2);
		for(int i = 0; i < 40; i++){
			struct akz_msg *m = akz_msg_new("/up/device/id/d", 15, "0123456789", 10, 1, NULL, 0);
			last[d] = akz_spool_append(s, sd, m);
			if(last[d] == AKZ_SPOOL_OK) ok[d]++;
			free(m);
		}
	}
	assert_int_equal(last[0], AKZ_SPOOL_DEVICE_FULL);
	assert_int_equal(last[2], AKZ_SPOOL_FULL);
	struct akz_spool_stats st;
	akz_spool_get_stats(s, &st);
	assert_true(st.bytes <= 2000);
	assert_int_equal(st.msgs, (uint64_t)(ok[0] + ok[1] + ok[2]));
	akz_spool_close(s);
	s = NULL;
	assert_int_equal(akz_spool_open(&o, note, &log, &s, err, sizeof(err)), 0);
	akz_spool_get_stats(s, &st);
	assert_int_equal(st.msgs, (uint64_t)(ok[0] + ok[1] + ok[2]));
	akz_spool_close(s);
	remove_dir(dir);
}

static void test_delivered_segments_are_deleted_and_backlog_compacted(void **state)
{
	(void)state;
	char *dir = make_dir();
	struct logbook log = {0};
	struct akz_spool *s = open_spool(dir, 4096, &log);
	append_n(s, "stuck", 0, 3);               /* never delivered: pins the first segment */
	struct akz_spool_dev *sd = akz_spool_device(s, "flow", 4);
	for(int round = 0; round < 20; round++){
		uint64_t seq = append_n(s, "flow", round * 50, 50), bytes, msgs;
		akz_spool_device_usage(s, sd, &bytes, &msgs);
		assert_int_equal(msgs, 50);
		akz_spool_settle(s, sd, bytes, msgs, seq);
	}
	akz_spool_close(s);   /* writes the markers and reclaims */
	int segs = count_files(dir, ".seg");
	assert_true(segs <= 3);
	s = open_spool(dir, 4096, &log);
	expect_backlog(s, "stuck", 0, 3);
	expect_backlog(s, "flow", 0, 0);
	akz_spool_close(s);
	remove_dir(dir);
}

static void test_sync_modes_parse(void **state)
{
	(void)state;
	enum akz_spool_sync m;
	assert_int_equal(akz_spool_sync_parse("always", &m), 0);
	assert_int_equal(m, AKZ_SYNC_ALWAYS);
	assert_int_equal(akz_spool_sync_parse("none", &m), 0);
	assert_int_equal(m, AKZ_SYNC_NONE);
	assert_int_equal(akz_spool_sync_parse("Batch", &m), -1);
	/* A directory that cannot be created is refused with its name. */
	struct akz_spool_opts o = {.dir = "/proc/no/such/spool", .sync = AKZ_SYNC_NONE, .max_bytes = 1,
			.device_max_bytes = 1, .segment_bytes = 4096};
	struct akz_spool *s = NULL;
	char err[256] = "";
	assert_int_equal(akz_spool_open(&o, NULL, NULL, &s, err, sizeof(err)), -1);
	assert_null(s);
	assert_non_null(strstr(err, "/proc/no/such/spool"));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_settled_records_are_not_replayed),
		cmocka_unit_test(test_torn_tail_is_cut_off),
		cmocka_unit_test(test_corrupt_segment_is_set_aside_after_saving_what_reads),
		cmocka_unit_test(test_nul_in_device_id_is_corrupt),
		cmocka_unit_test(test_spool_files_are_private),
		cmocka_unit_test(test_limits_refuse_without_writing),
		cmocka_unit_test(test_delivered_segments_are_deleted_and_backlog_compacted),
		cmocka_unit_test(test_sync_modes_parse),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
