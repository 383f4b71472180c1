/* SPDX-License-Identifier: EPL-2.0 OR BSD-3-Clause */
/* loadgen.c - MQTT load generator and sink for the benchmarks: pub and sub speak MQTT 3.1.1 on one thread. */
/* Client ids and user names come from printf formats given on the command line (a bench tool). */
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <mosquitto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* Usage:
 *   loadgen pub -p PORT -n CLIENTS -m MSGS_PER_CLIENT -q QOS [-r RATE_TOTAL] [-u USERFMT -P PASS]
 *               [--prefix /up/device/id/] [--idfmt d%03d] [--inflight 20] [--cafile F --host H]
 *       publishes MSGS from each client on <prefix><id>, payload "<seq> <send time ns>", QoS 0 or 1,
 *       at most --inflight unacknowledged per client; prints "sent N acked N seconds S".
 *   loadgen conn -p PORT -n CONNECTS -u USERFMT -P PASS [--idfmt ...]
 *       connects and disconnects CONNECTS times in a row (user USERFMT % i), prints
 *       "connects N refused R seconds S".
 *   loadgen sub -p PORT -t TOPIC -c COUNT [-w SECONDS] [-u USER -P PASS] [--cafile F --host H]
 *               [--session ID] [--samples FILE]
 *       prints "ready" once subscribed, then counts messages until COUNT arrived or WAIT seconds
 *       passed without one (6 x WAIT before the first); --session: client id ID and no clean
 *       session, so that the subscription and the messages for it outlive a disconnect (and a
 *       restart of a broker with persistence); prints
 *       "received N duplicates D first_to_last S lat_p50_us X lat_p99_us Y lat_max_us Z";
 *       --samples: also writes every latency to FILE, in ns, one per line, sorted (so that rounds
 *       can be pooled: a single round's p99 moves with whatever else the machine did meanwhile).
 * pub and sub run one thread and one epoll loop over non-blocking sockets (TLS with --cafile,
 * verifying the broker's certificate against it and the name --host). A refused connection, a
 * certificate that does not verify or a lost connection: a message on stderr and exit status 1.
 * A broker that stops answering: pub waits at most 120 s for the acknowledgements after its last
 * publish (as before) or, while publishing, 120 s without one; then prints its figures, exit 0. */

#define KEEPALIVE_S 60
#define CONNECT_TIMEOUT_S 60          /* every client connected (and subscribed) within this */
#define ACK_TIMEOUT_S 120             /* pub: the wait for acknowledgements, as before */
#define CLOSE_TIMEOUT_NS 2000000000LL /* the DISCONNECTs written out */
#define TCP_TIMEOUT_MS 10000
#define READ_ROOM ((size_t)64 << 10)  /* each read asks for at least this much */
#define OUT_HIGH ((size_t)64 << 10)   /* a client with this much unwritten waits for its socket */
#define PACKET_MAX ((size_t)16 << 20) /* larger incoming packets are refused */
#define BURST 1024                    /* publishes between two looks at the sockets, at most */
#define WAIT_MAX_NS 1000000000LL      /* no wait longer: keepalive and deadlines are checked */
#define NS 1000000000LL

struct opts {
	int port, clients, msgs, qos, rate, count, wait_s, inflight;
	const char *user_fmt, *pass, *prefix, *idfmt, *topic, *cafile, *host, *session, *samples;
};

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

static int64_t mono_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * NS + ts.tv_nsec;
}

/* ---- conn: libmosquitto, one connection at a time ------------------------------------------ */

struct pubc {
	int connected;
};

static void on_conn(struct mosquitto *m, void *obj, int rc)
{
	(void)m;
	((struct pubc *)obj)->connected = rc == 0 ? 1 : -1;
}

static struct mosquitto *new_client(const struct opts *o, const char *id, void *obj, const char *user)
{
	struct mosquitto *m = mosquitto_new(id, true, obj);
	if(m == NULL) return NULL;
	mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
	if(user) mosquitto_username_pw_set(m, user, o->pass);
	if(o->cafile) mosquitto_tls_set(m, o->cafile, NULL, NULL, NULL, NULL);
	mosquitto_max_inflight_messages_set(m, (unsigned)o->inflight);
	return m;
}

static int run_conn(const struct opts *o)
{
	long refused = 0;
	int64_t t0 = now_ns();
	for(int i = 0; i < o->clients; i++){
		char id[64], user[128];
		snprintf(id, sizeof(id), "conn-%d-%d", (int)getpid(), i);
		snprintf(user, sizeof(user), o->user_fmt, i % (o->msgs > 0 ? o->msgs : 1));
		struct pubc c = {0};
		struct mosquitto *m = new_client(o, id, &c, user);
		if(m == NULL) return 1;
		mosquitto_connect_callback_set(m, on_conn);
		if(mosquitto_connect(m, o->host, o->port, 60) != MOSQ_ERR_SUCCESS){
			mosquitto_destroy(m);
			return 1;
		}
		for(int k = 0; k < 5000 && c.connected == 0; k++){
			if(mosquitto_loop(m, 10, 1) != MOSQ_ERR_SUCCESS && c.connected == 0) break;
		}
		if(c.connected != 1) refused++;
		mosquitto_disconnect(m);
		mosquitto_destroy(m);
	}
	printf("connects %d refused %ld seconds %.3f\n", o->clients, refused, (double)(now_ns() - t0) / 1e9);
	return 0;
}

/* ---- pub and sub: MQTT 3.1.1 over non-blocking sockets -------------------------------------- */

/* Bytes [off, len) of p are pending (unparsed input, unwritten output). */
struct buf {
	unsigned char *p;
	size_t off, len, cap;
};

enum cstate { ST_TLS, ST_CONNACK, ST_SUBACK, ST_READY, ST_CLOSING, ST_CLOSED };

struct conn {
	int fd;
	SSL *ssl;
	enum cstate st;
	uint32_t events;        /* what epoll watches for this socket now */
	bool tls_wants_write;   /* the handshake or an SSL_read needs the socket writable */
	struct buf in, out;
	int64_t last_out;       /* CLOCK_MONOTONIC of the last packet queued: keepalive */
	bool has_user;
	char id[128], user[256], topic[256];
	uint16_t topic_len;
	long next_seq, sent, acked;
	int unacked;
	unsigned char *pending; /* pub, QoS 1: a bit per packet id that awaits its PUBACK */
};

struct sink {
	long received, dups;
	int64_t first, last;    /* CLOCK_REALTIME of the first and the last new message */
	int64_t last_mono;      /* when the last new message arrived: the idle timeout */
	int64_t *lat;
	long nlat, cap;
	unsigned char *seen;    /* per (topic index, seq) when the topic ends in a number */
	long seen_cap;
};

struct loop {
	const struct opts *o;
	int ep, nconn, ready;
	struct epoll_event *evs;
	struct conn *cs;
	SSL_CTX *ctx;
	struct addrinfo *ai;
	const struct addrinfo *ai_good; /* the address that took the last connection: tried first */
	bool pwait2;                    /* epoll_pwait2 (ns timeouts) works on this kernel */
	int64_t now;                    /* CLOCK_MONOTONIC after the latest wait */
	int64_t rx_real;                /* CLOCK_REALTIME of the latest read: when what it held arrived */
	int64_t next_ka;
	long acked, stray_acks;         /* pub: acknowledged publishes, all clients; unknown PUBACKs */
	struct sink *sink;              /* sub */
};

__attribute__((format(printf, 2, 3)))
static int fail(const struct conn *c, const char *fmt, ...)
{
	/* the broker closes the socket after our DISCONNECT: nothing to report then */
	if(c->st == ST_CLOSING) return -1;
	va_list ap;
	va_start(ap, fmt);
	fprintf(stderr, "loadgen: %s: ", c->id);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	return -1;
}

/* Makes room for n more bytes at p + len, moving pending bytes to the front first. */
static int buf_reserve(struct buf *b, size_t n)
{
	if(b->cap - b->len >= n) return 0;
	if(b->off > 0){
		memmove(b->p, b->p + b->off, b->len - b->off);
		b->len -= b->off;
		b->off = 0;
		if(b->cap - b->len >= n) return 0;
	}
	size_t cap = b->cap ? b->cap : 4096;
	while(cap - b->len < n){
		if(cap > SIZE_MAX / 2) return -1;
		cap *= 2;
	}
	unsigned char *p = realloc(b->p, cap);
	if(p == NULL) return -1;
	b->p = p;
	b->cap = cap;
	return 0;
}

static size_t buf_pending(const struct buf *b)
{
	return b->len - b->off;
}

static unsigned char *put_u16(unsigned char *p, unsigned v)
{
	p[0] = (unsigned char)(v >> 8);
	p[1] = (unsigned char)v;
	return p + 2;
}

static unsigned char *put_str(unsigned char *p, const char *s, size_t n)
{
	p = put_u16(p, (unsigned)n);
	memcpy(p, s, n);
	return p + n;
}

/* MQTT's remaining length: 7 bits a byte, low bits first, up to 4 bytes (n < 268435456). */
static unsigned char *put_varint(unsigned char *p, size_t n)
{
	do{
		unsigned char b = (unsigned char)(n & 0x7f);
		n >>= 7;
		*p++ = n ? (unsigned char)(b | 0x80) : b;
	}while(n);
	return p;
}

/* The fixed header at p[0..n): 1 and its length and the remaining length when complete, 0 when
 * more bytes are needed, -1 when malformed (a fifth length byte). */
static int get_header(const unsigned char *p, size_t n, size_t *hl, size_t *rl)
{
	size_t v = 0;
	for(size_t i = 1; i <= 4; i++){
		if(i >= n) return 0;
		v |= (size_t)(p[i] & 0x7f) << (7 * (i - 1));
		if((p[i] & 0x80) == 0){
			*hl = i + 1;
			*rl = v;
			return 1;
		}
	}
	return -1;
}

/* Room for a packet of remaining length rl in c's output, its fixed header written: the body goes at the result. */
static unsigned char *queue_begin(struct loop *L, struct conn *c, unsigned char type, size_t rl)
{
	if(buf_reserve(&c->out, rl + 5) < 0){
		fail(c, "out of memory");
		return NULL;
	}
	unsigned char *p = c->out.p + c->out.len;
	*p++ = type;
	c->last_out = L->now;
	return put_varint(p, rl);
}

static void queue_end(struct conn *c, const unsigned char *end)
{
	c->out.len = (size_t)(end - c->out.p);
}

static int queue_simple(struct loop *L, struct conn *c, unsigned char type)
{
	unsigned char *p = queue_begin(L, c, type, 0);
	if(p == NULL) return -1;
	queue_end(c, p);
	return 0;
}

static int queue_connect(struct loop *L, struct conn *c)
{
	const struct opts *o = L->o;
	size_t idn = strlen(c->id), un = c->has_user ? strlen(c->user) : 0;
	size_t pn = c->has_user && o->pass ? strlen(o->pass) : 0;
	if(pn > 65535) return fail(c, "password too long");
	size_t rl = 10 + 2 + idn + (c->has_user ? 2 + un : 0) + (c->has_user && o->pass ? 2 + pn : 0);
	unsigned char *p = queue_begin(L, c, 0x10, rl);
	if(p == NULL) return -1;
	p = put_str(p, "MQTT", 4);
	*p++ = 4;   /* protocol level: 3.1.1 */
	/* clean session unless --session; the password only with a user name, as 3.1.1 wants */
	*p++ = (unsigned char)((o->session ? 0 : 0x02) | (c->has_user ? 0x80 : 0) | (c->has_user && o->pass ? 0x40 : 0));
	p = put_u16(p, KEEPALIVE_S);
	p = put_str(p, c->id, idn);
	if(c->has_user) p = put_str(p, c->user, un);
	if(c->has_user && o->pass) p = put_str(p, o->pass, pn);
	queue_end(c, p);
	return 0;
}

static int queue_subscribe(struct loop *L, struct conn *c)
{
	size_t tn = strlen(L->o->topic);
	if(tn == 0 || tn > 65535) return fail(c, "bad topic filter");
	unsigned char *p = queue_begin(L, c, 0x82, 2 + 2 + tn + 1);
	if(p == NULL) return -1;
	p = put_u16(p, 1);
	p = put_str(p, L->o->topic, tn);
	*p++ = 1;   /* QoS 1, as before */
	queue_end(c, p);
	return 0;
}

static void conn_drop(struct loop *L, struct conn *c)
{
	if(c->fd >= 0){
		epoll_ctl(L->ep, EPOLL_CTL_DEL, c->fd, NULL);
		close(c->fd);
		c->fd = -1;
	}
	SSL_free(c->ssl);
	c->ssl = NULL;
	c->st = ST_CLOSED;
}

static int set_events(struct loop *L, struct conn *c, uint32_t want)
{
	if(c->fd < 0 || want == c->events) return 0;
	struct epoll_event ev = {.events = want, .data.ptr = c};
	if(epoll_ctl(L->ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) return fail(c, "epoll_ctl: %s", strerror(errno));
	c->events = want;
	return 0;
}

static const char *ssl_error_text(void)
{
	static char text[256];
	unsigned long e = ERR_get_error();
	if(e == 0) return "unknown error";
	ERR_error_string_n(e, text, sizeof(text));
	return text;
}

/* Writes out what c has queued, as far as the socket takes it now; watches for writability when
 * it does not take it all. */
static int conn_flush(struct loop *L, struct conn *c)
{
	while(buf_pending(&c->out) > 0){
		size_t n = buf_pending(&c->out);
		const unsigned char *p = c->out.p + c->out.off;
		if(c->ssl){
			/* partial writes and a moving buffer are enabled: a retry passes the same bytes */
			errno = 0;
			int w = SSL_write(c->ssl, p, n > INT_MAX ? INT_MAX : (int)n);
			if(w > 0){
				c->out.off += (size_t)w;
				continue;
			}
			int e = SSL_get_error(c->ssl, w);
			if(e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) break;
			if(e == SSL_ERROR_SYSCALL && errno) return fail(c, "write: %s", strerror(errno));
			return fail(c, "TLS write failed: %s", ssl_error_text());
		}
		ssize_t w = send(c->fd, p, n, MSG_NOSIGNAL);
		if(w < 0){
			if(errno == EINTR) continue;
			if(errno == EAGAIN || errno == EWOULDBLOCK) break;
			return fail(c, "write: %s", strerror(errno));
		}
		c->out.off += (size_t)w;
		if((size_t)w < n) break;   /* the socket buffer is full: wait for EPOLLOUT */
	}
	if(buf_pending(&c->out) == 0){
		c->out.off = c->out.len = 0;
		/* a QoS 0 publish counts as acknowledged once written, as libmosquitto's callback did */
		if(L->o->qos == 0 && L->sink == NULL && c->acked < c->sent){
			L->acked += c->sent - c->acked;
			c->acked = c->sent;
		}
	}
	return set_events(L, c, EPOLLIN | (buf_pending(&c->out) || c->tls_wants_write ? EPOLLOUT : 0));
}

static const char *connack_text(unsigned rc)
{
	static const char *const text[] = {"accepted", "unacceptable protocol version", "client identifier rejected",
		"server unavailable", "bad user name or password", "not authorized"};
	return rc < sizeof(text) / sizeof(text[0]) ? text[rc] : "unknown reason";
}

/* "<seq> <send time ns>" as pub writes it; seq -1 and time 0 where a number is missing. */
static void parse_payload(const unsigned char *p, size_t n, long *seq, int64_t *sent)
{
	size_t i = 0;
	long s = -1;
	int64_t t = 0;
	if(i < n && p[i] >= '0' && p[i] <= '9'){
		s = 0;
		for(; i < n && p[i] >= '0' && p[i] <= '9'; i++){
			if(s > LONG_MAX / 10 - 10){
				s = -1;
				break;
			}
			s = s * 10 + (p[i] - '0');
		}
	}
	while(i < n && p[i] == ' ') i++;
	for(; i < n && p[i] >= '0' && p[i] <= '9'; i++){
		if(t > INT64_MAX / 10 - 10){
			t = 0;
			break;
		}
		t = t * 10 + (p[i] - '0');
	}
	*seq = s;
	*sent = t;
}

static void sink_record(struct loop *L, const unsigned char *topic, size_t tn, const unsigned char *pl, size_t pn)
{
	struct sink *s = L->sink;
	long seq;
	int64_t sent;
	parse_payload(pl, pn, &seq, &sent);
	/* the device index: the digits that end the topic (d042 -> 42), 0 when there are none */
	size_t k = tn;
	while(k > 0 && topic[k - 1] >= '0' && topic[k - 1] <= '9') k--;
	long dev = 0;
	for(; k < tn && dev < 1000000; k++) dev = dev * 10 + (topic[k] - '0');
	bool dup = false;
	if(seq >= 0 && seq < 1000000 && dev < 1000000){
		long key = dev * 1000000 + seq;
		if(key < s->seen_cap * 8){
			unsigned char bit = (unsigned char)(1u << (key % 8));
			dup = (s->seen[key / 8] & bit) != 0;
			s->seen[key / 8] |= bit;
		}
	}
	if(dup){
		s->dups++;
		return;
	}
	int64_t t = L->rx_real;
	s->received++;
	if(s->first == 0) s->first = t;
	s->last = t;
	s->last_mono = L->now;
	if(sent > 0 && s->nlat < s->cap) s->lat[s->nlat++] = t - sent;
}

/* Acknowledges at once, at the TCP level, what the broker sent. After a packet we do not answer
 * (SUBACK, PINGRESP) the kernel would delay its ACK, and the broker's Nagle algorithm hold the
 * next message until that ACK: tens of ms on the first message's latency. */
static void quickack(const struct conn *c)
{
	int one = 1;
	setsockopt(c->fd, IPPROTO_TCP, TCP_QUICKACK, &one, sizeof(one));
}

static int on_publish(struct loop *L, struct conn *c, unsigned char h, const unsigned char *b, size_t n)
{
	unsigned qos = (h >> 1) & 3;
	if(qos > 1) return fail(c, "QoS %u PUBLISH from the broker: only QoS 0 and 1 are supported", qos);
	if(n < 2) return fail(c, "malformed PUBLISH");
	size_t tn = (size_t)b[0] << 8 | b[1], hdr = 2 + tn + (qos ? 2 : 0);
	if(hdr > n) return fail(c, "malformed PUBLISH");
	if(L->sink) sink_record(L, b + 2, tn, b + hdr, n - hdr);
	if(qos == 1){
		/* appended to the output: all the PUBACKs of one read leave in one write */
		unsigned char *p = queue_begin(L, c, 0x40, 2);
		if(p == NULL) return -1;
		p[0] = b[2 + tn];
		p[1] = b[3 + tn];
		queue_end(c, p + 2);
	}
	return 0;
}

static int on_packet(struct loop *L, struct conn *c, unsigned char h, const unsigned char *b, size_t n)
{
	switch(h >> 4){
	case 2:     /* CONNACK */
		if(n != 2 || c->st != ST_CONNACK) return fail(c, "unexpected CONNACK");
		if(b[1] != 0){
			return fail(c, "the broker refused the connection: %s (CONNACK return code %u)",
					connack_text(b[1]), b[1]);
		}
		if(L->sink){
			c->st = ST_SUBACK;
			return queue_subscribe(L, c);
		}
		c->st = ST_READY;
		L->ready++;
		return 0;
	case 3:
		return on_publish(L, c, h, b, n);
	case 4:{    /* PUBACK */
		if(n != 2) return fail(c, "malformed PUBACK");
		unsigned id = (unsigned)b[0] << 8 | b[1];
		unsigned char bit = (unsigned char)(1u << (id % 8));
		if(c->pending == NULL || (c->pending[id / 8] & bit) == 0){
			L->stray_acks++;   /* not ours to count */
			return 0;
		}
		c->pending[id / 8] &= (unsigned char)~bit;
		c->unacked--;
		c->acked++;
		L->acked++;
		return 0;
	}
	case 9:     /* SUBACK */
		if(n < 3 || c->st != ST_SUBACK) return fail(c, "unexpected SUBACK");
		if(b[2] & 0x80) return fail(c, "the broker refused the subscription to %s", L->o->topic);
		c->st = ST_READY;
		L->ready++;
		quickack(c);
		return 0;
	case 13:    /* PINGRESP */
		quickack(c);
		return 0;
	default:
		return fail(c, "unexpected packet type %u from the broker", (unsigned)h >> 4);
	}
}

/* Handles every complete packet in c's input; a partial one stays for the next read. */
static int conn_parse(struct loop *L, struct conn *c)
{
	while(buf_pending(&c->in) > 0){
		const unsigned char *p = c->in.p + c->in.off;
		size_t avail = buf_pending(&c->in), hl = 0, rl = 0;
		int r = get_header(p, avail, &hl, &rl);
		if(r < 0) return fail(c, "malformed remaining length from the broker");
		if(r == 0) break;
		if(rl > PACKET_MAX) return fail(c, "a %zu-byte packet from the broker: too large", rl);
		if(avail - hl < rl) break;
		if(on_packet(L, c, p[0], p + hl, rl) < 0) return -1;
		c->in.off += hl + rl;
	}
	if(buf_pending(&c->in) == 0) c->in.off = c->in.len = 0;
	return 0;
}

/* Reads what the socket holds, in as few calls as it takes, and handles the packets: 1 on data,
 * 0 when there was none, -1 on an error or the end of the connection. */
static int conn_read(struct loop *L, struct conn *c)
{
	for(;;){
		if(buf_reserve(&c->in, READ_ROOM) < 0) return fail(c, "out of memory");
		unsigned char *p = c->in.p + c->in.len;
		size_t room = c->in.cap - c->in.len, got;
		bool more;
		if(c->ssl){
			errno = 0;
			int n = SSL_read(c->ssl, p, room > INT_MAX ? INT_MAX : (int)room);
			if(n <= 0){
				int e = SSL_get_error(c->ssl, n);
				if(e == SSL_ERROR_WANT_READ) return 0;
				if(e == SSL_ERROR_WANT_WRITE){
					c->tls_wants_write = true;
					return 0;
				}
				if(e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && errno == 0)){
					return fail(c, "the broker closed the connection");
				}
				if(e == SSL_ERROR_SYSCALL) return fail(c, "read: %s", strerror(errno));
				return fail(c, "TLS read failed: %s", ssl_error_text());
			}
			c->tls_wants_write = false;
			got = (size_t)n;
			/* read-ahead holds further records the kernel no longer signals */
			more = SSL_has_pending(c->ssl) == 1;
		}else{
			ssize_t n = read(c->fd, p, room);
			if(n < 0){
				if(errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return 0;
				return fail(c, "read: %s", strerror(errno));
			}
			if(n == 0) return fail(c, "the broker closed the connection");
			got = (size_t)n;
			more = got == room;
		}
		c->in.len += got;
		L->rx_real = now_ns();
		if(conn_parse(L, c) < 0) return -1;
		if(!more || c->fd < 0) return 1;
	}
}

static int tls_step(struct loop *L, struct conn *c)
{
	errno = 0;   /* SSL_ERROR_SYSCALL with errno 0: the broker closed the connection */
	int r = SSL_connect(c->ssl);
	if(r == 1){
		c->tls_wants_write = false;
		c->st = ST_CONNACK;
		if(queue_connect(L, c) < 0) return -1;
		/* read-ahead may hold records the kernel will not signal again */
		if(SSL_has_pending(c->ssl) == 1 && conn_read(L, c) < 0) return -1;
		return conn_flush(L, c);
	}
	int e = SSL_get_error(c->ssl, r);
	if(e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE){
		c->tls_wants_write = e == SSL_ERROR_WANT_WRITE;
		return set_events(L, c, EPOLLIN | (c->tls_wants_write ? EPOLLOUT : 0));
	}
	long v = SSL_get_verify_result(c->ssl);
	if(v != X509_V_OK){
		return fail(c, "the certificate of %s does not verify with %s: %s", L->o->host, L->o->cafile,
				X509_verify_cert_error_string(v));
	}
	if(e == SSL_ERROR_SYSCALL){
		return fail(c, "TLS handshake with %s:%d: %s", L->o->host, L->o->port,
				errno ? strerror(errno) : "connection closed by the broker");
	}
	return fail(c, "TLS handshake with %s:%d failed: %s", L->o->host, L->o->port, ssl_error_text());
}

static int conn_event(struct loop *L, struct conn *c, uint32_t ev)
{
	if(c->st == ST_CLOSED) return 0;
	if(c->st == ST_TLS) return tls_step(L, c);
	if((ev & (EPOLLIN | EPOLLERR | EPOLLHUP)) || (c->tls_wants_write && (ev & EPOLLOUT))){
		if(conn_read(L, c) < 0) return -1;
	}
	return conn_flush(L, c);
}

/* A TCP connection to the first address of --host that takes one (a short blocking wait each). */
static int tcp_connect(struct loop *L, const struct conn *c)
{
	int err = 0;
	for(int pass = 0; pass < 2; pass++){
		for(const struct addrinfo *ai = L->ai; ai; ai = ai->ai_next){
			/* the address that worked last is tried first, alone */
			if(pass == 0 && ai != L->ai_good) continue;
			if(pass == 1 && ai == L->ai_good) continue;
			int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol);
			if(fd < 0){
				err = errno;
				continue;
			}
			if(connect(fd, ai->ai_addr, ai->ai_addrlen) == 0 || errno == EINPROGRESS){
				struct pollfd pfd = {.fd = fd, .events = POLLOUT};
				int pr = poll(&pfd, 1, TCP_TIMEOUT_MS);
				socklen_t len = sizeof(err);
				if(pr == 0) err = ETIMEDOUT;
				else if(pr < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
				if(pr > 0 && err == 0){
					int one = 1;
					setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
					L->ai_good = ai;
					return fd;
				}
			}else{
				err = errno;
			}
			close(fd);
		}
	}
	fail(c, "cannot connect to %s port %d: %s", L->o->host, L->o->port, strerror(err ? err : ECONNREFUSED));
	return -1;
}

/* Connects c; the TLS handshake and the CONNECT/CONNACK exchange continue in the loop. */
static int conn_open(struct loop *L, struct conn *c)
{
	c->fd = tcp_connect(L, c);
	if(c->fd < 0) return -1;
	struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
	if(epoll_ctl(L->ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) return fail(c, "epoll_ctl: %s", strerror(errno));
	c->events = EPOLLIN;
	c->last_out = L->now;
	if(L->ctx == NULL){
		c->st = ST_CONNACK;
		if(queue_connect(L, c) < 0) return -1;
		return conn_flush(L, c);
	}
	c->st = ST_TLS;
	c->ssl = SSL_new(L->ctx);
	if(c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1) return fail(c, "SSL_new: %s", ssl_error_text());
	/* the name --host must be in the certificate: a DNS name (sent as SNI too) or an IP address */
	const char *host = L->o->host;
	unsigned char addr[sizeof(struct in6_addr)];
	bool is_ip = inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
	int ok = is_ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c->ssl), host)
			: SSL_set1_host(c->ssl, host) == 1 && SSL_set_tlsext_host_name(c->ssl, host) == 1;
	if(ok != 1) return fail(c, "cannot set the host name to verify: %s", ssl_error_text());
	SSL_set_connect_state(c->ssl);
	return tls_step(L, c);
}

/* Waits up to timeout_ns (at most a second) for the sockets, handles what they have, and sends
 * the keepalive PINGREQs that are due. */
static int service(struct loop *L, int64_t timeout_ns)
{
	if(timeout_ns < 0) timeout_ns = 0;
	if(timeout_ns > WAIT_MAX_NS) timeout_ns = WAIT_MAX_NS;
	int n = -1;
	if(L->pwait2){
		/* nanosecond timeouts keep the -r schedule, which epoll_wait's milliseconds would blur */
		struct timespec ts = {.tv_sec = timeout_ns / NS, .tv_nsec = timeout_ns % NS};
		n = epoll_pwait2(L->ep, L->evs, L->nconn, &ts, NULL);
		if(n < 0 && errno == ENOSYS) L->pwait2 = false;
	}
	if(!L->pwait2) n = epoll_wait(L->ep, L->evs, L->nconn, (int)((timeout_ns + 999999) / 1000000));
	L->now = mono_ns();
	if(n < 0){
		if(errno == EINTR) return 0;
		fprintf(stderr, "loadgen: epoll_wait: %s\n", strerror(errno));
		return -1;
	}
	for(int i = 0; i < n; i++){
		struct conn *c = L->evs[i].data.ptr;
		if(conn_event(L, c, L->evs[i].events) < 0){
			if(c->st != ST_CLOSING) return -1;
			conn_drop(L, c);
		}
	}
	if(L->now >= L->next_ka){
		/* a PINGREQ after half the keepalive without a packet from us */
		L->next_ka = L->now + NS;
		for(int i = 0; i < L->nconn; i++){
			struct conn *c = &L->cs[i];
			if((c->st == ST_READY || c->st == ST_SUBACK) && L->now - c->last_out >= KEEPALIVE_S * NS / 2){
				if(queue_simple(L, c, 0xc0) < 0 || conn_flush(L, c) < 0) return -1;
			}
		}
	}
	return 0;
}

/* Until every client has its CONNACK (and, for sub, its SUBACK). */
static int wait_ready(struct loop *L)
{
	int64_t deadline = mono_ns() + CONNECT_TIMEOUT_S * NS;
	while(L->ready < L->nconn){
		if(L->now >= deadline){
			fprintf(stderr, "loadgen: %d of %d clients not connected after %d s\n", L->nconn - L->ready, L->nconn,
					CONNECT_TIMEOUT_S);
			return -1;
		}
		if(service(L, deadline - L->now) < 0) return -1;
	}
	return 0;
}

/* DISCONNECT on every connection, written out within CLOSE_TIMEOUT_NS; then all are closed. */
static void loop_close(struct loop *L)
{
	int open = 0;
	for(int i = 0; i < L->nconn; i++){
		struct conn *c = &L->cs[i];
		if(c->st != ST_READY) continue;
		if(queue_simple(L, c, 0xe0) < 0) continue;
		c->st = ST_CLOSING;
		if(conn_flush(L, c) < 0 || buf_pending(&c->out) == 0){
			if(c->ssl && buf_pending(&c->out) == 0) SSL_shutdown(c->ssl);
			conn_drop(L, c);
		}else{
			open++;
		}
	}
	int64_t deadline = mono_ns() + CLOSE_TIMEOUT_NS;
	while(open > 0 && L->now < deadline){
		if(service(L, deadline - L->now) < 0) break;
		open = 0;
		for(int i = 0; i < L->nconn; i++){
			struct conn *c = &L->cs[i];
			if(c->st != ST_CLOSING) continue;
			if(buf_pending(&c->out) == 0){
				if(c->ssl) SSL_shutdown(c->ssl);
				conn_drop(L, c);
			}else{
				open++;
			}
		}
	}
	for(int i = 0; i < L->nconn; i++) conn_drop(L, &L->cs[i]);
}

static void loop_free(struct loop *L)
{
	for(int i = 0; L->cs && i < L->nconn; i++){
		struct conn *c = &L->cs[i];
		conn_drop(L, c);
		free(c->in.p);
		free(c->out.p);
		free(c->pending);
	}
	free(L->cs);
	free(L->evs);
	if(L->ep >= 0) close(L->ep);
	SSL_CTX_free(L->ctx);
	if(L->ai) freeaddrinfo(L->ai);
}

static int loop_init(struct loop *L, const struct opts *o, int nconn, struct sink *s)
{
	*L = (struct loop){.o = o, .ep = -1, .nconn = nconn, .sink = s, .pwait2 = true};
	L->now = mono_ns();
	L->next_ka = L->now + NS;
	L->cs = calloc((size_t)nconn, sizeof(*L->cs));
	L->evs = calloc((size_t)nconn, sizeof(*L->evs));
	if(L->cs == NULL || L->evs == NULL){
		fprintf(stderr, "loadgen: out of memory\n");
		return -1;
	}
	for(int i = 0; i < nconn; i++) L->cs[i].fd = -1;
	L->ep = epoll_create1(EPOLL_CLOEXEC);
	if(L->ep < 0){
		fprintf(stderr, "loadgen: epoll_create1: %s\n", strerror(errno));
		return -1;
	}
	char port[16];
	snprintf(port, sizeof(port), "%d", o->port);
	struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
	int rc = getaddrinfo(o->host, port, &hints, &L->ai);
	if(rc != 0){
		L->ai = NULL;
		fprintf(stderr, "loadgen: %s: %s\n", o->host, gai_strerror(rc));
		return -1;
	}
	if(o->cafile == NULL) return 0;
	L->ctx = SSL_CTX_new(TLS_client_method());
	if(L->ctx == NULL || SSL_CTX_set_min_proto_version(L->ctx, TLS1_2_VERSION) != 1){
		fprintf(stderr, "loadgen: SSL_CTX_new: %s\n", ssl_error_text());
		return -1;
	}
	if(SSL_CTX_load_verify_locations(L->ctx, o->cafile, NULL) != 1){
		fprintf(stderr, "loadgen: cannot load the CA file %s: %s\n", o->cafile, ssl_error_text());
		return -1;
	}
	SSL_CTX_set_verify(L->ctx, SSL_VERIFY_PEER, NULL);
	/* our output buffer may move between a partial write and its retry */
	SSL_CTX_set_mode(L->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
	/* read-ahead: one read(2) takes in many records, not two small reads (header, body) each */
	SSL_CTX_set_read_ahead(L->ctx, 1);
	SSL_CTX_set_default_read_buffer_len(L->ctx, READ_ROOM);
	return 0;
}

/* A client may publish while its QoS 1 window has room and its socket keeps up. The window is
 * --inflight unacknowledged publishes: what the broker saw of the old libmosquitto tool too
 * (max_inflight_messages = --inflight); its further inflight*4 allowance only queued messages
 * inside libmosquitto, behind that window, and stamped them before they could be sent. */
static bool has_room(const struct loop *L, const struct conn *c)
{
	if(buf_pending(&c->out) >= OUT_HIGH) return false;
	return L->o->qos == 0 || c->unacked < L->o->inflight;
}

/* Message seq of client c, written at once: each client is a separate device. */
static int publish(struct loop *L, struct conn *c, long seq)
{
	const int qos = L->o->qos;
	char payload[64];
	int pn = snprintf(payload, sizeof(payload), "%ld %" PRId64, seq, now_ns());
	if(pn < 0 || (size_t)pn >= sizeof(payload)) return fail(c, "payload too long");
	size_t rl = 2 + c->topic_len + (qos ? 2 : 0) + (size_t)pn;
	unsigned char *p = queue_begin(L, c, (unsigned char)(0x30 | qos << 1), rl);
	if(p == NULL) return -1;
	p = put_str(p, c->topic, c->topic_len);
	if(qos){
		/* ids 1..65535 in turn; --inflight <= 65535 keeps the ones awaiting an ack distinct */
		unsigned id = (unsigned)(seq % 65535) + 1;
		p = put_u16(p, id);
		c->pending[id / 8] |= (unsigned char)(1u << (id % 8));
		c->unacked++;
	}
	memcpy(p, payload, (size_t)pn);
	queue_end(c, p + pn);
	c->sent++;
	c->next_seq = seq + 1;
	return conn_flush(L, c);
}

static int run_pub(const struct opts *o)
{
	if(o->clients < 1 || o->msgs < 0 || o->qos < 0 || o->qos > 1 || o->inflight < 1 || o->inflight > 65535){
		fprintf(stderr, "loadgen: pub needs -n >= 1, -m >= 0, -q 0 or 1 and 1 <= --inflight <= 65535\n");
		return 2;
	}
	struct loop L;
	int rc = 1;
	int64_t t0 = 0;
	long sent = 0;
	if(loop_init(&L, o, o->clients, NULL) < 0) goto out;
	for(int i = 0; i < o->clients; i++){
		struct conn *c = &L.cs[i];
		char dev[96];
		snprintf(dev, sizeof(dev), o->idfmt, i);
		snprintf(c->id, sizeof(c->id), "load-%s-%d", dev, (int)getpid());
		if(o->user_fmt){
			c->has_user = true;
			snprintf(c->user, sizeof(c->user), o->user_fmt, i);
		}
		int tn = snprintf(c->topic, sizeof(c->topic), "%s%s", o->prefix, dev);
		c->topic_len = (uint16_t)(tn < 0 ? 0 : (size_t)tn < sizeof(c->topic) ? (size_t)tn : sizeof(c->topic) - 1);
		if(o->qos > 0 && (c->pending = calloc(65536 / 8, 1)) == NULL){
			fprintf(stderr, "loadgen: out of memory\n");
			goto out;
		}
		if(conn_open(&L, c) < 0) goto out;
	}
	if(wait_ready(&L) < 0) goto out;

	/* Round-robin: message k of every client before message k+1 of any. A client without room
	 * is passed over and taken up again once the sockets have been serviced. */
	t0 = L.now = mono_ns();
	int64_t progress = t0;  /* the last publish or acknowledgement */
	long round = 0, acked_seen = 0;
	int pos = 0, left = o->clients;
	bool gave_up = false;
	while(round < o->msgs){
		int64_t timeout = 0;
		int burst = 0;
		bool blocked = false;
		L.now = mono_ns();
		while(round < o->msgs && burst < BURST){
			if(pos == o->clients){
				pos = 0;                /* the rest of this round waits for acknowledgements */
				blocked = true;
				timeout = WAIT_MAX_NS;
				break;
			}
			struct conn *c = &L.cs[pos];
			if(c->next_seq > round || !has_room(&L, c)){
				pos++;
				continue;
			}
			if(o->rate > 0){
				/* the schedule of before: message number `sent` is due at t0 + sent / rate */
				int64_t due = t0 + (int64_t)((double)sent * (1e9 / o->rate));
				if(due > L.now) L.now = mono_ns();
				if(due > L.now){
					timeout = due - L.now;
					break;
				}
			}
			if(publish(&L, c, round) < 0) goto out;
			sent++;
			burst++;
			pos++;
			if(--left == 0){
				round++;
				left = o->clients;
				pos = 0;
			}
		}
		if(burst > 0 || L.acked != acked_seen){
			progress = L.now;
			acked_seen = L.acked;
		}else if(blocked && L.now - progress > ACK_TIMEOUT_S * NS){
			fprintf(stderr, "loadgen: no acknowledgement for %d s: giving up\n", ACK_TIMEOUT_S);
			gave_up = true;
			break;
		}
		if(service(&L, timeout) < 0) goto out;
	}
	int64_t deadline = mono_ns() + ACK_TIMEOUT_S * NS;
	while(!gave_up && L.acked < sent){
		if(L.now >= deadline){
			fprintf(stderr, "loadgen: %ld publishes not acknowledged after %d s\n", sent - L.acked, ACK_TIMEOUT_S);
			break;
		}
		if(service(&L, deadline - L.now) < 0) goto out;
	}
	if(L.stray_acks) fprintf(stderr, "loadgen: %ld PUBACKs for no publish in flight\n", L.stray_acks);
	rc = 0;
out:
	if(t0 != 0){
		printf("sent %ld acked %ld seconds %.3f\n", sent, L.acked, (double)(mono_ns() - t0) / 1e9);
		fflush(stdout);
	}
	if(rc == 0) loop_close(&L);
	loop_free(&L);
	return rc;
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

/* Writes the n sorted latencies to path, one per line. Returns 0, or -1 with the reason on stderr. */
static int write_samples(const char *path, const int64_t *lat, size_t n)
{
	FILE *f = fopen(path, "w");
	if(f == NULL){
		fprintf(stderr, "loadgen: %s: %s\n", path, strerror(errno));
		return -1;
	}
	for(size_t i = 0; i < n; i++) fprintf(f, "%lld\n", (long long)lat[i]);
	bool failed = ferror(f) != 0;
	if(fclose(f) != 0 || failed){
		fprintf(stderr, "loadgen: %s: write failed\n", path);
		return -1;
	}
	return 0;
}

static int run_sub(const struct opts *o)
{
	struct sink s = {.cap = 2000000, .seen_cap = 10000L * 1000000 / 8 / 100};  /* 100 devices x 1e6 seq */
	struct loop L;
	int rc = 1;
	bool ready = false;
	s.lat = malloc(sizeof(int64_t) * (size_t)s.cap);
	s.seen = calloc((size_t)s.seen_cap, 1);
	if(loop_init(&L, o, 1, &s) < 0) goto out;
	if(s.lat == NULL || s.seen == NULL){
		fprintf(stderr, "loadgen: out of memory\n");
		goto out;
	}
	struct conn *c = &L.cs[0];
	if(o->session) snprintf(c->id, sizeof(c->id), "%s", o->session);
	else snprintf(c->id, sizeof(c->id), "sink-%d", (int)getpid());
	if(o->user_fmt){
		c->has_user = true;
		snprintf(c->user, sizeof(c->user), "%s", o->user_fmt);
	}
	if(conn_open(&L, c) < 0 || wait_ready(&L) < 0) goto out;
	printf("ready\n");   /* after the SUBACK: nothing published from now on is missed */
	fflush(stdout);
	ready = true;
	int64_t start = L.now, wait = (int64_t)o->wait_s * NS;
	while(s.received < o->count){
		int64_t idle_end = s.received == 0 ? start + 6 * wait : s.last_mono + wait;
		if(L.now >= idle_end) break;
		if(service(&L, idle_end - L.now) < 0) goto out;
	}
	rc = 0;
	loop_close(&L);
out:
	if(ready){
		qsort(s.lat, (size_t)s.nlat, sizeof(int64_t), cmp64);
		size_t n = (size_t)s.nlat, i50 = n / 2, i99 = n * 99 / 100;
		double p50 = n ? (double)s.lat[i50] / 1000.0 : 0;
		double p99 = n ? (double)s.lat[i99] / 1000.0 : 0;
		double max = n ? (double)s.lat[n - 1] / 1000.0 : 0;
		printf("received %ld duplicates %ld first_to_last %.3f lat_p50_us %.0f lat_p99_us %.0f lat_max_us %.0f\n",
				s.received, s.dups, (double)(s.last - s.first) / 1e9, p50, p99, max);
		if(o->samples && write_samples(o->samples, s.lat, n) < 0) rc = 1;
	}
	loop_free(&L);
	free(s.lat);
	free(s.seen);
	return rc;
}

int main(int argc, char **argv)
{
	struct opts o = {.port = 1883, .clients = 1, .msgs = 1000, .qos = 1, .count = 1, .wait_s = 5,
		.inflight = 20, .prefix = "/up/device/id/", .idfmt = "d%03d", .topic = "#", .host = "127.0.0.1"};
	static const struct option lo[] = {
		{"prefix", required_argument, NULL, 1}, {"idfmt", required_argument, NULL, 2},
		{"cafile", required_argument, NULL, 3}, {"host", required_argument, NULL, 4},
		{"inflight", required_argument, NULL, 5}, {"session", required_argument, NULL, 6},
		{"samples", required_argument, NULL, 7}, {NULL, 0, NULL, 0}};
	if(argc < 2) return 2;
	const char *mode = argv[1];
	optind = 2;
	int c;
	while((c = getopt_long(argc, argv, "p:n:m:q:r:c:w:u:P:t:", lo, NULL)) != -1){
		switch(c){
		case 'p': o.port = atoi(optarg); break;
		case 'n': o.clients = atoi(optarg); break;
		case 'm': o.msgs = atoi(optarg); break;
		case 'q': o.qos = atoi(optarg); break;
		case 'r': o.rate = atoi(optarg); break;
		case 'c': o.count = atoi(optarg); break;
		case 'w': o.wait_s = atoi(optarg); break;
		case 'u': o.user_fmt = optarg; break;
		case 'P': o.pass = optarg; break;
		case 't': o.topic = optarg; break;
		case 1: o.prefix = optarg; break;
		case 2: o.idfmt = optarg; break;
		case 3: o.cafile = optarg; break;
		case 4: o.host = optarg; break;
		case 5: o.inflight = atoi(optarg); break;
		case 6: o.session = optarg; break;
		case 7: o.samples = optarg; break;
		default: return 2;
		}
	}
	/* a broker that goes away must give an error, not a SIGPIPE (OpenSSL writes with write(2)) */
	signal(SIGPIPE, SIG_IGN);
	if(strcmp(mode, "pub") == 0) return run_pub(&o);
	if(strcmp(mode, "sub") == 0) return run_sub(&o);
	if(strcmp(mode, "conn") != 0) return 2;
	mosquitto_lib_init();
	int rc = run_conn(&o);
	mosquitto_lib_cleanup();
	return rc;
}
