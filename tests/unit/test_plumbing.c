/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* test_plumbing.c - unit tests of the option parser, topic recognition, message queues, the
 * broker wake-up, the file-descriptor budget and the upstream socket filter. */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <dirent.h>
#include <netinet/in.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <cmocka.h>
#include "akz_mosquitto.h"
#include "akz_config.h"
#include "akz_fds.h"
#include "akz_queue.h"
#include "akz_registry.h"
#include "akz_resolver.h"
#include "akz_tls.h"
#include "akz_tlsio.h"
#include "akz_topic.h"
#include "akz_util.h"
#include "akz_wakeup.h"

struct problems {
	int n;
	char last[512];
	int notices;
	char last_notice[512];
};

static void collect(void *ctx, const char *msg)
{
	struct problems *p = ctx;
	p->n++;
	snprintf(p->last, sizeof(p->last), "%s", msg);
}

static void note(void *ctx, const char *msg)
{
	struct problems *p = ctx;
	p->notices++;
	snprintf(p->last_notice, sizeof(p->last_notice), "%s", msg);
}

static int parse(struct akz_config *cfg, struct problems *p, const char *const *kv, int n)
{
	struct mosquitto_opt opts[16];
	for(int i = 0; i < n; i++){
		opts[i].key = (char *)kv[2*i];
		opts[i].value = (char *)kv[2*i+1];
	}
	memset(p, 0, sizeof(*p));
	return akz_config_parse(cfg, opts, n, collect, note, p);
}

static void test_config_defaults(void **state)
{
	(void)state;
	struct akz_config cfg;
	struct problems p;
	const char *kv[] = {"devices", "/etc/akenza/devices.json"};
	assert_int_equal(parse(&cfg, &p, kv, 1), 0);
	assert_string_equal(cfg.upstream_host, "mqtt.akenza.io");
	assert_int_equal(cfg.upstream_port, 8883);
	assert_string_equal(cfg.upstream_username, "unused");
	assert_int_equal(cfg.token_lifetime, 1200);
	assert_int_equal(cfg.upstream_dns_refresh, 60);
	assert_int_equal(cfg.light_pause_ms, 5);
	assert_true(cfg.bridge_enabled);
	assert_false(cfg.allow_readable_keys);
	assert_null(cfg.upstream_cafile);
	akz_config_free(&cfg);
}

static void test_config_values(void **state)
{
	(void)state;
	struct akz_config cfg;
	struct problems p;
	const char *kv[] = {"devices", "d.json", "upstream_port", "18883", "token_lifetime", "60",
		"bridge", "false", "upstream_host", "localhost", "upstream_dns_refresh", "5"};
	assert_int_equal(parse(&cfg, &p, kv, 6), 0);
	assert_int_equal(cfg.upstream_dns_refresh, 5);
	assert_int_equal(cfg.upstream_port, 18883);
	assert_int_equal(cfg.token_lifetime, 60);
	assert_false(cfg.bridge_enabled);
	assert_string_equal(cfg.upstream_host, "localhost");
	akz_config_free(&cfg);
}

static void test_config_refusals(void **state)
{
	(void)state;
	struct akz_config cfg;
	struct problems p;
	const char *unknown[] = {"devices", "d.json", "devcies", "x"};
	assert_int_equal(parse(&cfg, &p, unknown, 2), -1);
	assert_non_null(strstr(p.last, "plugin_opt_devcies: unknown option"));

	const char *range[] = {"devices", "d.json", "token_lifetime", "59"};
	assert_int_equal(parse(&cfg, &p, range, 2), -1);
	assert_non_null(strstr(p.last, "plugin_opt_token_lifetime: 59 is outside 60..86400"));

	const char *pause[] = {"devices", "d.json", "light_pause_ms", "101"};
	assert_int_equal(parse(&cfg, &p, pause, 2), -1);
	assert_non_null(strstr(p.last, "plugin_opt_light_pause_ms: 101 is outside 0..100"));

	/* An option of an earlier version is ignored with a notice, not refused. */
	const char *retired[] = {"devices", "d.json", "uplink_direct", "true"};
	assert_int_equal(parse(&cfg, &p, retired, 2), 0);
	assert_int_equal(p.n, 0);
	assert_int_equal(p.notices, 1);
	assert_non_null(strstr(p.last_notice, "plugin_opt_uplink_direct: no longer used, ignored"));
	akz_config_free(&cfg);

	const char *nan[] = {"devices", "d.json", "upstream_port", "88x"};
	assert_int_equal(parse(&cfg, &p, nan, 2), -1);
	assert_non_null(strstr(p.last, "not a whole number"));

	const char *boolean[] = {"devices", "d.json", "bridge", "maybe"};
	assert_int_equal(parse(&cfg, &p, boolean, 2), -1);
	assert_non_null(strstr(p.last, "not true or false"));

	assert_int_equal(parse(&cfg, &p, NULL, 0), -1);
	assert_non_null(strstr(p.last, "plugin_opt_devices: required"));

	const char *tls[] = {"devices", "d.json", "upstream_tls_version", "sslv3"};
	assert_int_equal(parse(&cfg, &p, tls, 2), -1);
	assert_non_null(strstr(p.last, "upstream_tls_version"));

	const char *wake[] = {"devices", "d.json", "downlink_wakeup", "poll"};
	assert_int_equal(parse(&cfg, &p, wake, 2), -1);
	assert_non_null(strstr(p.last, "plugin_opt_downlink_wakeup: 'poll' is not signal or tick"));

	/* every problem is reported, not only the first */
	const char *many[] = {"devcies", "x", "upstream_port", "0", "bridge", "2"};
	assert_int_equal(parse(&cfg, &p, many, 3), -1);
	assert_int_equal(p.n, 4);
}

/* Hardening: a receipts prefix long enough to cut a device id short in bridge_loop.c's topic buffer
 * is refused; one of 256 bytes is fine. */
static void test_config_long_receipts_prefix(void **state)
{
	(void)state;
	struct akz_config cfg;
	struct problems p;
	char prefix[300];
	memset(prefix, 'r', sizeof(prefix) - 1);
	prefix[sizeof(prefix) - 1] = '\0';
	const char *kv[] = {"devices", "/d.json", "receipts_topic", prefix};
	assert_int_equal(parse(&cfg, &p, kv, 2), -1);
	assert_non_null(strstr(p.last, "plugin_opt_receipts_topic: longer than 256 bytes"));
	prefix[256] = '\0';
	assert_int_equal(parse(&cfg, &p, kv, 2), 0);
	akz_config_free(&cfg);
}

/* Hardening: a problem report for a registry path longer than the report buffer is truncated,
 * not written past it (before the fix: a stack overflow, seen under san-unit). */
static void test_registry_long_path_report(void **state)
{
	(void)state;
	char path[2100];
	size_t n = 0;
	while(n < 1500) n += (size_t)snprintf(path + n, sizeof(path) - n, "/%s", "long-directory-name");
	snprintf(path + n, sizeof(path) - n, "/devices.json");
	struct problems p;
	memset(&p, 0, sizeof(p));
	struct akz_key_opts kopts = {0};
	struct akz_registry *reg = NULL;
	assert_int_equal(akz_registry_load(path, NULL, &kopts, collect, &p, &reg), -1);
	assert_null(reg);
	assert_int_equal(p.n, 1);
	assert_memory_equal(p.last, "/long-directory-name", 20);
}

/* Log escaping: one line stays one line, and the escape of a byte cannot be forged from text. */
static void test_escape(void **state)
{
	(void)state;
	char out[64];
	akz_escape(out, sizeof(out), "a\nFORGED 'root' granted\r\t\x1b[31m\\n");
	assert_string_equal(out, "a\\nFORGED 'root' granted\\r\\t\\x1b[31m\\\\n");
	akz_escape(out, sizeof(out), "caf\xc3\xa9 \xc0\x80 \xc2\x9b \x7f \xff");
	assert_string_equal(out, "caf\xc3\xa9 \\xc0\\x80 \\xc2\\x9b \\x7f \\xff");
	akz_escape(out, 8, "abcdefghij");
	assert_string_equal(out, "abcd...");
	akz_escape(out, 8, "\n\n\n\n");
	assert_string_equal(out, "\\n\\n...");
	akz_escape(out, sizeof(out), NULL);
	assert_string_equal(out, "(null)");
	/* Eight buffers in turn: eight strings of one log line stay intact. */
	const char *e[8];
	for(int i = 0; i < 8; i++) e[i] = akz_esc(i % 2 ? "odd\n" : "even");
	for(int i = 0; i < 8; i++) assert_string_equal(e[i], i % 2 ? "odd\\n" : "even");

	static const char raw[] = "{\"a\":\"x\0y\"}";
	assert_true(akz_json_has_nul(raw, sizeof(raw) - 1));
	static const char *const with[] = {"{\"p\":\"pw\\u0000x\"}", "{\"p\":\"\\\\\\u0000\"}"};
	static const char *const without[] = {"{\"p\":\"pw\\\\u0000x\"}",   /* "\\" then "u0000" */
		"{\"p\":\"pw\\u0001x\"}", "{\"p\":\"x\\u000\"}"};
	for(size_t i = 0; i < 2; i++) assert_true(akz_json_has_nul(with[i], strlen(with[i])));
	for(size_t i = 0; i < 3; i++) assert_false(akz_json_has_nul(without[i], strlen(without[i])));
}

static void test_topics(void **state)
{
	(void)state;
	size_t n;
	const char *id = akz_topic_device("/up/device/id/abc", AKZ_TOPIC_UP, &n);
	assert_non_null(id);
	assert_int_equal(n, 3);
	assert_memory_equal(id, "abc", 3);
	id = akz_topic_device("/up/device/id/abc/alerts/x", AKZ_TOPIC_UP, &n);
	assert_int_equal(n, 3);
	assert_null(akz_topic_device("/up/device/id/", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("/up/device/id//x", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("/up/device/id/+", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("/up/device/id/#", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("/up/device/idabc", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("up/device/id/abc", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device("/down/device/id/abc", AKZ_TOPIC_UP, &n));
	assert_null(akz_topic_device(NULL, AKZ_TOPIC_UP, &n));
	assert_true(akz_topic_is_for("/down/device/id/abc/cmd", AKZ_TOPIC_DOWN, "abc"));
	assert_false(akz_topic_is_for("/down/device/id/abcd/cmd", AKZ_TOPIC_DOWN, "abc"));
	assert_false(akz_topic_is_for("/down/device/id/ab", AKZ_TOPIC_DOWN, "abc"));
}

static void test_queue_fifo(void **state)
{
	(void)state;
	struct akz_msgq q = {0}, other = {0};
	for(int i = 0; i < 5; i++){
		char payload[8];
		snprintf(payload, sizeof(payload), "m%d", i);
		struct akz_msg *m = akz_msg_new("/up/device/id/a/xyz", 15, payload, (uint32_t)strlen(payload), 1, NULL, 0);
		assert_non_null(m);
		assert_string_equal(m->topic, "/up/device/id/a");  /* topiclen is honoured */
		akz_msgq_push(i < 3 ? &q : &other, m);
	}
	assert_int_equal(q.count, 3);
	assert_int_equal(q.bytes, 6);
	akz_msgq_take_all(&q, &other);
	assert_int_equal(q.count, 5);
	assert_null(other.head);
	assert_int_equal(other.count, 0);
	for(int i = 0; i < 3; i++){
		struct akz_msg *m = akz_msgq_pop(&q);
		char want[8];
		snprintf(want, sizeof(want), "m%d", i);
		assert_memory_equal(m->payload, want, m->payloadlen);
		free(m);
	}
	assert_int_equal(akz_msgq_clear(&q), 2);
	assert_null(akz_msgq_pop(&q));
	struct akz_msg *empty = akz_msg_new("t", 1, NULL, 0, 0, NULL, 0);
	assert_non_null(empty);
	assert_int_equal(empty->payloadlen, 0);
	free(empty);
}

static void test_tls_ctx(void **state)
{
	(void)state;
	char err[256];
	SSL_CTX *ctx = akz_tls_client_ctx("localhost", NULL, NULL, "tlsv1.2", err, sizeof(err));
	assert_non_null(ctx);
	assert_int_equal(SSL_CTX_get_verify_mode(ctx) & SSL_VERIFY_PEER, SSL_VERIFY_PEER);
	assert_int_equal(SSL_CTX_get_min_proto_version(ctx), TLS1_2_VERSION);
	assert_int_equal(SSL_CTX_get_max_proto_version(ctx), TLS1_2_VERSION);
	SSL_CTX_free(ctx);
	ctx = akz_tls_client_ctx("127.0.0.1", NULL, NULL, "tlsv1.3", err, sizeof(err));
	assert_non_null(ctx);
	assert_int_equal(SSL_CTX_get_min_proto_version(ctx), TLS1_3_VERSION);
	SSL_CTX_free(ctx);
	ctx = akz_tls_client_ctx("localhost", "/nonexistent/ca.pem", NULL, "tlsv1.2", err, sizeof(err));
	assert_null(ctx);
	assert_non_null(strstr(err, "/nonexistent/ca.pem"));
}

static void *poke_soon(void *w)
{
	usleep(50000);
	akz_wakeup_poke(w);
	akz_wakeup_poke(w);   /* coalesced with the first until the ack */
	return NULL;
}

/* The poking thread's loop: calls recheck until it says nothing is outstanding, at most 20 s. */
static void *recheck_until_acked(void *w)
{
	for(int i = 0; i < 2000; i++){
		int ms = akz_wakeup_recheck(w);
		if(ms < 0) break;
		usleep((useconds_t)ms * 1000);
	}
	return NULL;
}

/* A poke spent while the broker thread was not asleep (here: it pokes itself, so the handler
 * runs at once) is sent again by recheck, and the sleep that follows ends with EINTR rather
 * than running its course. */
static void test_wakeup_repoke(void **state)
{
	(void)state;
	struct akz_wakeup *w = NULL;
	char err[200];
	int ep = epoll_create1(0);
	assert_true(ep >= 0);
	assert_int_equal(akz_wakeup_new(&w, err, sizeof(err)), 0);
	assert_int_equal(akz_wakeup_recheck(w), -1);        /* nothing outstanding */
	assert_int_equal(akz_wakeup_recheck(NULL), -1);
	akz_wakeup_poke(w);                                  /* spent right here */
	int ms = akz_wakeup_recheck(w);
	assert_true(ms >= 0 && ms <= 5);
	pthread_t t;
	assert_int_equal(pthread_create(&t, NULL, recheck_until_acked, w), 0);
	struct epoll_event ev;
	errno = 0;
	int n = epoll_wait(ep, &ev, 1, 2000);   /* 0 (timed out) if the poke were not repeated */
	int err_no = errno;
	akz_wakeup_ack(w);
	pthread_join(t, NULL);
	assert_int_equal(n, -1);
	assert_int_equal(err_no, EINTR);
	assert_int_equal(akz_wakeup_recheck(w), -1);        /* acknowledged */
	akz_wakeup_free(w);
	close(ep);
}

/* The heartbeat (a broker loop that may sleep until its next event, Mosquitto 2.1 without
 * websockets): it ends a long sleep of the thread that made the wakeup when no TICK came, and
 * acknowledged TICKs keep it from firing while they come. */
static void test_wakeup_heartbeat(void **state)
{
	(void)state;
	struct akz_wakeup *w = NULL;
	char err[200];
	int ep = epoll_create1(0);
	assert_true(ep >= 0);
	akz_wakeup_set_heartbeat(500);
	assert_int_equal(akz_wakeup_new(&w, err, sizeof(err)), 0);
	struct epoll_event ev;
	errno = 0;
	int n = epoll_wait(ep, &ev, 1, 20000);   /* 0 after 20 s without the heartbeat */
	assert_int_equal(n, -1);
	assert_int_equal(errno, EINTR);
	/* TICKs every 10 ms push it back: it would fire only after a stall of 250 ms or more */
	for(int i = 0; i < 50; i++){
		akz_wakeup_ack(w);
		assert_int_equal(epoll_wait(ep, &ev, 1, 10), 0);
	}
	/* ... and re-arm it: once they stop, it ends the next long sleep too */
	errno = 0;
	assert_int_equal(epoll_wait(ep, &ev, 1, 20000), -1);
	assert_int_equal(errno, EINTR);
	akz_wakeup_free(w);
	akz_wakeup_set_heartbeat(0);
	close(ep);
}

static void someone_elses_handler(int sig)
{
	(void)sig;
}

/* A poke from another thread ends the sleep of the thread that made the wakeup, as it ends the
 * broker's epoll_wait; a signal someone else handles is left alone. */
static void test_wakeup(void **state)
{
	(void)state;
	struct akz_wakeup *w = NULL;
	char err[200];
	int ep = epoll_create1(0);
	assert_true(ep >= 0);
	for(int round = 0; round < 2; round++){
		assert_int_equal(akz_wakeup_new(&w, err, sizeof(err)), 0);
		pthread_t t;
		assert_int_equal(pthread_create(&t, NULL, poke_soon, w), 0);
		struct epoll_event ev;
		errno = 0;
		int n = epoll_wait(ep, &ev, 1, 20000);
		assert_int_equal(n, -1);
		assert_int_equal(errno, EINTR);
		pthread_join(t, NULL);
		akz_wakeup_ack(w);
		akz_wakeup_free(w);   /* the second round installs the handler again */
	}
	akz_wakeup_poke(NULL);
	akz_wakeup_ack(NULL);
	akz_wakeup_free(NULL);
	close(ep);

	struct sigaction sa, old;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = someone_elses_handler;
	assert_int_equal(sigaction(SIGRTMIN + 6, &sa, &old), 0);
	assert_int_equal(akz_wakeup_new(&w, err, sizeof(err)), -1);
	assert_null(w);
	assert_non_null(strstr(err, "already has a handler"));
	struct sigaction now;
	assert_int_equal(sigaction(SIGRTMIN + 6, NULL, &now), 0);
	assert_ptr_equal(now.sa_handler, someone_elses_handler);
	sigaction(SIGRTMIN + 6, &old, NULL);
}

static int open_fd_count(void)
{
	DIR *dir = opendir("/proc/self/fd");
	assert_non_null(dir);
	int n = 0;
	for(struct dirent *e; (e = readdir(dir)) != NULL; ) n += e->d_name[0] != '.';
	closedir(dir);
	return n - 1;   /* the directory's own descriptor */
}

/* Reads what arrived on a socket until it holds at least `want` bytes or 5 s pass. */
static size_t read_some(int fd, unsigned char *buf, size_t len, size_t want)
{
	size_t got = 0;
	struct timeval tv = {.tv_sec = 5};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	while(got < want){
		ssize_t r = recv(fd, buf + got, len - got, 0);
		if(r <= 0) break;
		got += (size_t)r;
	}
	return got;
}

/* The pair libmosquitto opens for each client is found and closed, the client still connects and
 * publishes, and destroying it closes none of the descriptors that took the pair's numbers. */
static void test_fds_pair(void **state)
{
	(void)state;
	mosquitto_lib_init();
	assert_true(akz_fds_probe_pair());
	assert_true(akz_fds_probe_pair());   /* once proven, stays proven */
	assert_int_equal(akz_fds_per_device(), 1);

	int before = open_fd_count();
	struct mosquitto *m = mosquitto_new("pair-test", true, NULL);
	assert_non_null(m);
	assert_int_equal(open_fd_count(), before + 2);
	assert_true(akz_fds_close_pair(m));
	assert_int_equal(open_fd_count(), before);
	assert_false(akz_fds_close_pair(m));  /* nothing left to close */
	assert_false(akz_fds_close_pair(NULL));

	/* A plain TCP peer that reads what the client sends. */
	int lsock = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t salen = sizeof(sa);
	assert_int_equal(bind(lsock, (struct sockaddr *)&sa, sizeof(sa)), 0);
	assert_int_equal(listen(lsock, 1), 0);
	assert_int_equal(getsockname(lsock, (struct sockaddr *)&sa, &salen), 0);
	assert_int_equal(mosquitto_connect(m, "127.0.0.1", ntohs(sa.sin_port), 60), MOSQ_ERR_SUCCESS);
	assert_false(akz_fds_close_pair(m));  /* connected: not fresh, left alone */
	int peer = accept(lsock, NULL, NULL);
	assert_true(peer >= 0);
	assert_int_equal(mosquitto_publish(m, NULL, "t/x", 5, "hello", 0, false), MOSQ_ERR_SUCCESS);
	unsigned char buf[256];
	size_t got = read_some(peer, buf, sizeof(buf), 23 + 12);
	/* CONNECT (0x10, 23 bytes with this id) then PUBLISH (0x30: topic "t/x", "hello"). */
	assert_true(got >= 23 + 12);
	assert_int_equal(buf[0], 0x10);
	assert_int_equal(buf[23], 0x30);
	assert_memory_equal(buf + 23 + 7, "hello", 5);

	/* Descriptors that now hold the pair's old numbers survive mosquitto_destroy(). */
	int a = dup(0), b = dup(0);
	assert_true(a >= 0 && b >= 0);
	mosquitto_destroy(m);
	assert_true(fcntl(a, F_GETFD) >= 0);
	assert_true(fcntl(b, F_GETFD) >= 0);
	close(a);
	close(b);
	close(peer);
	close(lsock);
	mosquitto_lib_cleanup();
}

/* The soft open-file limit is raised to what is needed, never lowered, never past the hard one. */
static void test_fds_reserve(void **state)
{
	(void)state;
	struct rlimit saved, rl;
	assert_int_equal(getrlimit(RLIMIT_NOFILE, &saved), 0);
	assert_true(saved.rlim_max == RLIM_INFINITY || saved.rlim_max > 600);
	rl = saved;
	rl.rlim_cur = 300;
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &rl), 0);

	size_t before, after;
	assert_int_equal(akz_fds_reserve(200, &before, &after), 0);
	assert_int_equal(before, 300);
	assert_int_equal(after, 300);            /* enough already: not lowered */
	assert_int_equal(akz_fds_reserve(600, &before, &after), 0);
	assert_int_equal(before, 300);
	assert_int_equal(after, 600);
	assert_int_equal(getrlimit(RLIMIT_NOFILE, &rl), 0);
	assert_int_equal(rl.rlim_cur, 600);
	if(saved.rlim_max != RLIM_INFINITY){
		assert_int_equal(akz_fds_reserve((size_t)saved.rlim_max + 1, &before, &after), -1);
		assert_int_equal(after, (size_t)saved.rlim_max);
	}
	assert_int_equal(setrlimit(RLIMIT_NOFILE, &saved), 0);
}

/* Polls the resolver until it has an answer, at most 30 s. */
static enum akz_resolve await_answer(struct akz_resolver *r)
{
	enum akz_resolve st = AKZ_RESOLVE_PENDING;
	for(int i = 0; i < 3000 && (st = akz_resolver_state(r)) == AKZ_RESOLVE_PENDING; i++) usleep(10000);
	return st;
}

/* A numeric host is its own address; a name is looked up off the caller's thread and kept;
 * an address a connection failed to is still handed out when it is the only one; a name that
 * does not resolve says why. */
static void test_resolver(void **state)
{
	(void)state;
	struct akz_resolver *r = NULL;
	char addr[AKZ_ADDR_MAX], err[256];

	assert_int_equal(akz_resolver_new("::1", 60, &r, err, sizeof(err)), 0);
	assert_int_equal(akz_resolver_state(r), AKZ_RESOLVE_OK);
	assert_int_equal(akz_resolver_pick(r, addr, err, sizeof(err)), AKZ_RESOLVE_OK);
	assert_string_equal(addr, "::1");
	akz_resolver_failed(r, "::1");
	akz_resolver_free(r);

	assert_int_equal(akz_resolver_new("localhost", 60, &r, err, sizeof(err)), 0);
	assert_int_equal(await_answer(r), AKZ_RESOLVE_OK);
	for(int i = 0; i < 3; i++){
		assert_int_equal(akz_resolver_pick(r, addr, err, sizeof(err)), AKZ_RESOLVE_OK);
		assert_true(strcmp(addr, "127.0.0.1") == 0 || strcmp(addr, "::1") == 0);
		akz_resolver_failed(r, addr);
	}
	akz_resolver_free(r);

	assert_int_equal(akz_resolver_new("no-such-host.invalid", 60, &r, err, sizeof(err)), 0);
	assert_int_equal(await_answer(r), AKZ_RESOLVE_FAILED);
	err[0] = '\0';
	assert_int_equal(akz_resolver_pick(r, addr, err, sizeof(err)), AKZ_RESOLVE_FAILED);
	assert_non_null(strstr(err, "cannot resolve 'no-such-host.invalid'"));
	akz_resolver_free(r);
	akz_resolver_free(NULL);
}

/* Reads what the peer end holds right now, without waiting. */
static size_t drain_peer(int fd, unsigned char *buf, size_t cap)
{
	size_t got = 0;
	while(got < cap){
		ssize_t n = recv(fd, buf + got, cap - got, MSG_DONTWAIT);
		if(n <= 0) break;
		got += (size_t)n;
	}
	return got;
}

/* The upstream socket filter: writes wait for akz_tlsio_flush and leave in one piece and in
 * order, also when the socket takes only part; reads stop at an emptied socket until
 * akz_tlsio_readable; the SSL object frees the filter and the socket BIO exactly once (ASan). */
static void test_tlsio(void **state)
{
	(void)state;
	signal(SIGPIPE, SIG_IGN);   /* as the broker does: a closed peer is an error, not the end */
	int sv[2];
	assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
	assert_int_equal(fcntl(sv[0], F_SETFL, O_NONBLOCK), 0);
	SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
	assert_non_null(ctx);
	SSL *ssl = SSL_new(ctx);
	assert_non_null(ssl);
	BIO *sock = BIO_new_socket(sv[0], BIO_NOCLOSE);
	assert_non_null(sock);
	SSL_set_bio(ssl, sock, sock);

	assert_int_equal(akz_tlsio_flush(ssl), 1);           /* no filter yet: nothing to do */
	assert_int_equal(akz_tlsio_pending(ssl), 0);
	assert_int_equal(akz_tlsio_attach(ssl), -1);         /* no method before init */
	assert_int_equal(akz_tlsio_init(), 0);
	assert_int_equal(akz_tlsio_init(), 0);               /* counted: two users */
	akz_tlsio_cleanup();
	assert_int_equal(akz_tlsio_attach(ssl), 0);
	assert_int_equal(akz_tlsio_attach(ssl), 0);          /* once is enough */
	BIO *f = SSL_get_wbio(ssl);
	assert_ptr_equal(SSL_get_rbio(ssl), f);
	assert_ptr_equal(BIO_next(f), sock);
	assert_null(BIO_next(sock));

	/* Two records: held, then one piece. */
	unsigned char buf[256 * 1024];
	assert_int_equal(BIO_write(f, "abc", 3), 3);
	assert_int_equal(BIO_write(f, "defg", 4), 4);
	assert_int_equal(akz_tlsio_pending(ssl), 7);
	assert_int_equal(BIO_ctrl_wpending(f), 7);
	assert_int_equal(drain_peer(sv[1], buf, sizeof(buf)), 0);
	assert_int_equal(akz_tlsio_flush(ssl), 1);
	assert_int_equal(akz_tlsio_pending(ssl), 0);
	assert_int_equal(recv(sv[1], buf, sizeof(buf), MSG_DONTWAIT), 7);
	assert_memory_equal(buf, "abcdefg", 7);

	/* Reads: a short read marks the socket empty; more data waits for "readable". */
	char in[64];
	assert_int_equal(write(sv[1], "12345", 5), 5);
	assert_int_equal(BIO_read(f, in, sizeof(in)), 5);
	assert_int_equal(write(sv[1], "678", 3), 3);
	assert_true(BIO_read(f, in, sizeof(in)) <= 0);
	assert_true(BIO_should_retry(f) && BIO_should_read(f));
	akz_tlsio_readable(ssl);
	assert_int_equal(BIO_read(f, in, sizeof(in)), 3);
	assert_memory_equal(in, "678", 3);
	akz_tlsio_readable(ssl);
	assert_true(BIO_read(f, in, sizeof(in)) <= 0);       /* EAGAIN from the socket itself */
	assert_true(BIO_should_retry(f));

	/* A peer that does not read: records fill the buffer, then the socket, then are refused
	 * with "retry"; what went out arrives whole and in order once the peer reads. */
	size_t written = 0;
	unsigned char chunk[1000];
	for(int i = 0; i < 10000; i++){
		memset(chunk, i & 0xff, sizeof(chunk));
		int n = BIO_write(f, chunk, sizeof(chunk));
		if(n <= 0){
			assert_true(BIO_should_retry(f) && BIO_should_write(f));
			break;
		}
		assert_int_equal(n, sizeof(chunk));
		written += (size_t)n;
	}
	assert_true(written > 64 * 1024 && written < 10000 * sizeof(chunk));
	assert_true(akz_tlsio_pending(ssl) > 0);
	assert_int_equal(akz_tlsio_flush(ssl), 0);
	size_t got = 0;
	int rc = 0;
	for(int round = 0; round < 1000 && rc != 1; round++){
		size_t n = drain_peer(sv[1], buf + got, sizeof(buf) - got);
		assert_true(got + n <= written);
		for(size_t i = got; i < got + n; i++) assert_int_equal(buf[i], (i / sizeof(chunk)) & 0xff);
		got += n;
		rc = akz_tlsio_flush(ssl);
		assert_true(rc >= 0);
	}
	assert_int_equal(rc, 1);
	got += drain_peer(sv[1], buf + got, sizeof(buf) - got);
	assert_int_equal(got, written);
	assert_int_equal(akz_tlsio_pending(ssl), 0);

	/* A record larger than the buffer goes straight through. */
	static unsigned char big[100 * 1024];
	memset(big, 0x5a, sizeof(big));
	int n = BIO_write(f, big, sizeof(big));
	assert_true(n > 0);
	assert_int_equal(akz_tlsio_pending(ssl), 0);
	assert_int_equal(drain_peer(sv[1], buf, sizeof(buf)), (size_t)n);

	/* The peer is gone: flushing fails with the socket's error. */
	assert_int_equal(BIO_write(f, "x", 1), 1);
	close(sv[1]);
	errno = 0;
	assert_int_equal(akz_tlsio_flush(ssl), -1);
	assert_int_equal(errno, EPIPE);
	assert_int_equal(akz_tlsio_pending(ssl), 1);          /* kept: freed with the SSL object */

	SSL_free(ssl);   /* frees the filter, its buffer and the socket BIO */
	SSL_CTX_free(ctx);
	akz_tlsio_cleanup();   /* the last user: the method goes (LeakSanitizer would see it) */
	close(sv[0]);
	assert_int_equal(akz_tlsio_attach(NULL), -1);
	assert_int_equal(akz_tlsio_flush(NULL), 1);
	assert_int_equal(akz_tlsio_pending(NULL), 0);
	akz_tlsio_readable(NULL);
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_config_defaults),
		cmocka_unit_test(test_config_values),
		cmocka_unit_test(test_config_refusals),
		cmocka_unit_test(test_config_long_receipts_prefix),
		cmocka_unit_test(test_registry_long_path_report),
		cmocka_unit_test(test_escape),
		cmocka_unit_test(test_topics),
		cmocka_unit_test(test_queue_fifo),
		cmocka_unit_test(test_tls_ctx),
		cmocka_unit_test(test_wakeup),
		cmocka_unit_test(test_wakeup_repoke),
		cmocka_unit_test(test_wakeup_heartbeat),
		cmocka_unit_test(test_fds_pair),
		cmocka_unit_test(test_fds_reserve),
		cmocka_unit_test(test_resolver),
		cmocka_unit_test(test_tlsio),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
