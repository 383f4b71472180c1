/* loadgen.c - MQTT load generator and sink for the bridge benchmarks (libmosquitto, one thread each). */
/* Client ids and user names come from printf formats given on the command line (a bench tool). */
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <mosquitto.h>

/* Usage:
 *   loadgen pub -p PORT -n CLIENTS -m MSGS_PER_CLIENT -q QOS [-r RATE_TOTAL] [-u USERFMT -P PASS]
 *               [--prefix /up/device/id/] [--idfmt d%03d] [--cafile F]
 *       publishes MSGS from each client on <prefix><id>, payload "<seq> <send time ns>";
 *       prints "sent N acked N seconds S".
 *   loadgen conn -p PORT -n CONNECTS -u USERFMT -P PASS [--idfmt ...]
 *       connects and disconnects CONNECTS times in a row (user USERFMT % i), prints
 *       "connects N refused R seconds S".
 *   loadgen sub -p PORT -t TOPIC -c COUNT [-w SECONDS] [-u USER -P PASS] [--cafile F]
 *       counts messages until COUNT arrived or WAIT seconds passed without one; prints
 *       "received N duplicates D first_to_last S lat_p50_us X lat_p99_us Y". */

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

struct opts {
	int port, clients, msgs, qos, rate, count, wait_s, inflight;
	const char *user_fmt, *pass, *prefix, *idfmt, *topic, *cafile, *host;
};

struct pubc {
	struct mosquitto *m;
	int acked;
	int connected;
};

static void on_pub(struct mosquitto *m, void *obj, int mid)
{
	(void)m;
	(void)mid;
	((struct pubc *)obj)->acked++;
}

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

static int run_pub(const struct opts *o)
{
	struct pubc *cs = calloc((size_t)o->clients, sizeof(*cs));
	char id[128], user[128], topic[256], payload[64];
	if(cs == NULL) return 1;
	for(int i = 0; i < o->clients; i++){
		char dev[96];
		snprintf(dev, sizeof(dev), o->idfmt, i);
		snprintf(id, sizeof(id), "load-%s-%d", dev, (int)getpid());
		if(o->user_fmt) snprintf(user, sizeof(user), o->user_fmt, i);
		cs[i].m = new_client(o, id, &cs[i], o->user_fmt ? user : NULL);
		if(cs[i].m == NULL) return 1;
		mosquitto_publish_callback_set(cs[i].m, on_pub);
		mosquitto_connect_callback_set(cs[i].m, on_conn);
		if(mosquitto_connect(cs[i].m, o->host, o->port, 60) != MOSQ_ERR_SUCCESS){
			fprintf(stderr, "loadgen: connect failed\n");
			return 1;
		}
		if(mosquitto_loop_start(cs[i].m) != MOSQ_ERR_SUCCESS) return 1;
	}
	for(int i = 0; i < o->clients; i++){
		for(int k = 0; k < 1000 && cs[i].connected == 0; k++) usleep(10000);
		if(cs[i].connected != 1){
			fprintf(stderr, "loadgen: client %d not connected\n", i);
			return 1;
		}
	}
	int64_t t0 = now_ns();
	long total = (long)o->clients * o->msgs, sent = 0;
	for(int k = 0; k < o->msgs; k++){
		for(int i = 0; i < o->clients; i++){
			char dev[96];
			snprintf(dev, sizeof(dev), o->idfmt, i);
			snprintf(topic, sizeof(topic), "%s%s", o->prefix, dev);
			if(o->rate > 0){
				int64_t due = t0 + (int64_t)(sent * (1e9 / o->rate));
				int64_t now = now_ns();
				if(due > now){
					struct timespec ts = {.tv_sec = (due - now) / 1000000000, .tv_nsec = (due - now) % 1000000000};
					nanosleep(&ts, NULL);
				}
			}
			int n = snprintf(payload, sizeof(payload), "%d %" PRId64, k, now_ns());
			/* libmosquitto queues beyond the in-flight window; wait for room rather than
			 * growing its queue without bound (so the rate is what the path can take) */
			while(o->qos > 0 && (long)k * 1 - cs[i].acked > o->inflight * 4) usleep(200);
			if(mosquitto_publish(cs[i].m, NULL, topic, n, payload, o->qos, false) == MOSQ_ERR_SUCCESS) sent++;
		}
	}
	int64_t deadline = now_ns() + 120LL * 1000000000;
	long acked;
	do{
		acked = 0;
		for(int i = 0; i < o->clients; i++) acked += cs[i].acked;
		if(acked >= total) break;
		usleep(1000);
	}while(now_ns() < deadline);
	double secs = (double)(now_ns() - t0) / 1e9;
	printf("sent %ld acked %ld seconds %.3f\n", sent, acked, secs);
	for(int i = 0; i < o->clients; i++){
		mosquitto_disconnect(cs[i].m);
		mosquitto_loop_stop(cs[i].m, false);
		mosquitto_destroy(cs[i].m);
	}
	free(cs);
	return 0;
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

struct sink {
	pthread_mutex_t lock;
	long received, dups;
	int64_t first, last;
	int64_t *lat;
	long nlat, cap;
	unsigned char *seen;    /* per (topic index, seq) when the topic ends in a number */
	long seen_cap;
};

static void on_msg(struct mosquitto *m, void *obj, const struct mosquitto_message *msg)
{
	struct sink *s = obj;
	(void)m;
	int64_t t = now_ns();
	char buf[64];
	size_t n = (size_t)msg->payloadlen < sizeof(buf) - 1 ? (size_t)msg->payloadlen : sizeof(buf) - 1;
	memcpy(buf, msg->payload, n);
	buf[n] = '\0';
	long seq = -1;
	long long sent = 0;
	if(sscanf(buf, "%ld %lld", &seq, &sent) != 2) sent = 0;
	const char *tail = msg->topic + strlen(msg->topic);
	while(tail > msg->topic && tail[-1] >= '0' && tail[-1] <= '9') tail--;
	long dev = *tail ? atol(tail) : 0;
	pthread_mutex_lock(&s->lock);
	long key = dev * 1000000 + seq;
	bool dup = false;
	if(seq >= 0 && seq < 1000000 && key >= 0 && key < s->seen_cap * 8){
		dup = s->seen[key / 8] & (1u << (key % 8));
		s->seen[key / 8] |= (unsigned char)(1u << (key % 8));
	}
	if(dup){
		s->dups++;
	}else{
		s->received++;
		if(s->first == 0) s->first = t;
		s->last = t;
		if(sent > 0 && s->nlat < s->cap) s->lat[s->nlat++] = t - sent;
	}
	pthread_mutex_unlock(&s->lock);
}

static int cmp64(const void *a, const void *b)
{
	int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
	return (x > y) - (x < y);
}

static int run_sub(const struct opts *o)
{
	struct sink s = {.cap = 2000000};
	pthread_mutex_init(&s.lock, NULL);
	s.lat = malloc(sizeof(int64_t) * (size_t)s.cap);
	s.seen_cap = 10000L * 1000000 / 8 / 100;  /* 100 devices x 1e6 seq */
	s.seen = calloc((size_t)s.seen_cap, 1);
	struct pubc c = {0};
	char id[64];
	snprintf(id, sizeof(id), "sink-%d", (int)getpid());
	struct mosquitto *m = new_client(o, id, &s, o->user_fmt);
	if(m == NULL || s.lat == NULL || s.seen == NULL) return 1;
	mosquitto_message_callback_set(m, on_msg);
	mosquitto_user_data_set(m, &s);
	(void)c;
	if(mosquitto_connect(m, o->host, o->port, 60) != MOSQ_ERR_SUCCESS) return 1;
	mosquitto_subscribe(m, NULL, o->topic, 1);
	mosquitto_loop_start(m);
	printf("ready\n");
	fflush(stdout);
	long last_n = -1;
	int idle = 0;
	for(;;){
		usleep(100000);
		pthread_mutex_lock(&s.lock);
		long n = s.received;
		pthread_mutex_unlock(&s.lock);
		if(n >= o->count) break;
		if(n == last_n && n > 0){
			if(++idle > o->wait_s * 10) break;
		}else{
			idle = 0;
		}
		if(n == 0 && ++idle > o->wait_s * 10 * 6) break;
		last_n = n;
	}
	mosquitto_disconnect(m);
	mosquitto_loop_stop(m, false);
	qsort(s.lat, (size_t)s.nlat, sizeof(int64_t), cmp64);
	double p50 = s.nlat ? (double)s.lat[s.nlat / 2] / 1000.0 : 0;
	double p99 = s.nlat ? (double)s.lat[(s.nlat * 99) / 100] / 1000.0 : 0;
	double max = s.nlat ? (double)s.lat[s.nlat - 1] / 1000.0 : 0;
	printf("received %ld duplicates %ld first_to_last %.3f lat_p50_us %.0f lat_p99_us %.0f lat_max_us %.0f\n",
			s.received, s.dups, (double)(s.last - s.first) / 1e9, p50, p99, max);
	mosquitto_destroy(m);
	free(s.lat);
	free(s.seen);
	return 0;
}

int main(int argc, char **argv)
{
	struct opts o = {.port = 1883, .clients = 1, .msgs = 1000, .qos = 1, .count = 1, .wait_s = 5,
		.inflight = 20, .prefix = "/up/device/id/", .idfmt = "d%03d", .topic = "#", .host = "127.0.0.1"};
	static const struct option lo[] = {
		{"prefix", required_argument, NULL, 1}, {"idfmt", required_argument, NULL, 2},
		{"cafile", required_argument, NULL, 3}, {"host", required_argument, NULL, 4},
		{"inflight", required_argument, NULL, 5}, {NULL, 0, NULL, 0}};
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
		default: return 2;
		}
	}
	mosquitto_lib_init();
	int rc = strcmp(mode, "pub") == 0 ? run_pub(&o) : strcmp(mode, "sub") == 0 ? run_sub(&o)
			: strcmp(mode, "conn") == 0 ? run_conn(&o) : 2;
	mosquitto_lib_cleanup();
	return rc;
}
