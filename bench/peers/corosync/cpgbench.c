/*
 * cpgbench: the corosync side of Corral's Totem benchmark (bench/totem.py).
 *
 * Two modes, both talking to the corosync of the network namespace it runs in
 * (libqb IPC uses abstract unix sockets, which are per network namespace):
 *
 *   cpgbench bench --nodes N --senders S [--send] --size B --duration-ms D
 *                  [--rate R] [--timeout-ms T] [--group NAME]
 *       Joins NAME, waits until the group has N members, then (with --send)
 *       multicasts B-byte messages with CPG_TYPE_AGREED for D ms, flat out
 *       (sleeping 100 us on CS_ERR_TRY_AGAIN) or paced at R msg/s with
 *       absolute-time sleeps, followed by one END message. A dispatch thread
 *       counts deliveries, checks per-sender sequence continuity and records
 *       send-to-own-delivery latency. When END has arrived from all S senders
 *       (or T ms passed) it prints one JSON object on stdout.
 *
 *   cpgbench watch [--group NAME]
 *       Joins NAME and prints one JSON line per totem or group configuration
 *       change, stamped with CLOCK_MONOTONIC (the same clock as Python's
 *       time.monotonic_ns(), and the same in every network namespace), until
 *       the daemon goes away or it is killed.
 *
 * The wire format of a message is shared with bench/corral_client.py:
 *   little-endian u32 magic, u32 flags, u32 nodeid, u32 reserved,
 *   u64 seq, u64 send_ns, then zero padding up to the message size.
 * Written for Corral; not derived from corosync's test programs.
 */
#define _GNU_SOURCE
#include <corosync/cpg.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define MSG_MAGIC 0x43524c42u /* "CRLB" */
#define FLAG_END 1u
#define HEADER_BYTES 32
#define MAX_NODEID 1024
/* Latency histogram: 1 us buckets below 100 ms, 1 ms buckets up to 100 s. */
#define FINE_BUCKETS 100000
#define COARSE_BUCKETS 100000
#define TRY_AGAIN_SLEEP_NS 100000L
#define SENDER_GRACE_MS 2000
#define WATCHDOG_EXTRA_MS 5000

struct header {
	uint32_t magic;
	uint32_t flags;
	uint32_t nodeid;
	uint32_t reserved;
	uint64_t seq;
	uint64_t send_ns;
};

struct options {
	const char *group;
	int nodes;
	int senders;
	int send;
	size_t size;
	long duration_ms;
	long rate;
	long timeout_ms;
	long settle_ms;
};

/* Everything the dispatch thread writes; the main thread reads it after join. */
struct stats {
	uint32_t my_nodeid;
	int members;          /* written by the dispatch thread, read atomically */
	int done;             /* set when all END messages arrived, or on error */
	int ends;
	int connection_lost;
	uint64_t msgs;
	uint64_t bytes;
	uint64_t first_ns;
	uint64_t last_ns;
	uint64_t gaps;
	uint64_t dups;
	uint64_t bad;
	uint64_t totem_confchgs;
	uint64_t cpg_confchgs;
	uint64_t next_seq[MAX_NODEID];
	uint64_t latency_samples;
	uint64_t latency_max_ns;
	uint64_t *fine;
	uint64_t *coarse;
};

static struct stats stats;
static cpg_handle_t handle;

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void sleep_ns(long ns)
{
	struct timespec ts = { ns / 1000000000L, ns % 1000000000L };
	while (nanosleep(&ts, &ts) == -1 && errno == EINTR)
		;
}

static void sleep_until_ns(uint64_t deadline)
{
	struct timespec ts = { (time_t)(deadline / 1000000000ull), (long)(deadline % 1000000000ull) };
	while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
		;
}

static void record_latency(uint64_t latency_ns)
{
	uint64_t us = latency_ns / 1000;
	if (us < FINE_BUCKETS) {
		stats.fine[us]++;
	} else {
		uint64_t ms = latency_ns / 1000000;
		stats.coarse[ms < COARSE_BUCKETS ? ms : COARSE_BUCKETS - 1]++;
	}
	if (latency_ns > stats.latency_max_ns)
		stats.latency_max_ns = latency_ns;
	stats.latency_samples++;
}

/* The latency (in microseconds) below which `fraction` of the samples fall. */
static double latency_percentile_us(double fraction)
{
	uint64_t rank, seen = 0;
	if (stats.latency_samples == 0)
		return -1.0;
	rank = (uint64_t)(fraction * (double)stats.latency_samples);
	if (rank >= stats.latency_samples)
		rank = stats.latency_samples - 1;
	for (uint64_t i = 0; i < FINE_BUCKETS; i++) {
		seen += stats.fine[i];
		if (seen > rank)
			return (double)i + 0.5;
	}
	for (uint64_t i = 0; i < COARSE_BUCKETS; i++) {
		seen += stats.coarse[i];
		if (seen > rank)
			return ((double)i + 0.5) * 1000.0;
	}
	return (double)stats.latency_max_ns / 1000.0;
}

static void bench_deliver(cpg_handle_t h, const struct cpg_name *group, uint32_t nodeid,
			  uint32_t pid, void *msg, size_t msg_len)
{
	struct header hdr;
	uint64_t now = now_ns();
	(void)h; (void)group; (void)pid;
	if (msg_len < HEADER_BYTES) {
		stats.bad++;
		return;
	}
	memcpy(&hdr, msg, sizeof(hdr));
	if (hdr.magic != MSG_MAGIC || hdr.nodeid != nodeid || nodeid >= MAX_NODEID) {
		stats.bad++;
		return;
	}
	if (hdr.flags & FLAG_END) {
		stats.ends++;
		return;
	}
	if (hdr.seq > stats.next_seq[nodeid])
		stats.gaps += hdr.seq - stats.next_seq[nodeid];
	else if (hdr.seq < stats.next_seq[nodeid])
		stats.dups++;
	stats.next_seq[nodeid] = hdr.seq + 1;
	if (stats.msgs == 0)
		stats.first_ns = now;
	stats.last_ns = now;
	stats.msgs++;
	stats.bytes += msg_len;
	if (nodeid == stats.my_nodeid)
		record_latency(now - hdr.send_ns);
}

static void bench_confchg(cpg_handle_t h, const struct cpg_name *group,
			  const struct cpg_address *members, size_t n_members,
			  const struct cpg_address *left, size_t n_left,
			  const struct cpg_address *joined, size_t n_joined)
{
	(void)h; (void)group; (void)members; (void)left; (void)n_left; (void)joined; (void)n_joined;
	stats.cpg_confchgs++;
	__atomic_store_n(&stats.members, (int)n_members, __ATOMIC_RELEASE);
}

static void bench_totem_confchg(cpg_handle_t h, struct cpg_ring_id ring_id,
				uint32_t n_members, const uint32_t *members)
{
	(void)h; (void)ring_id; (void)n_members; (void)members;
	stats.totem_confchgs++;
}

struct dispatch_args {
	int senders;
	uint64_t deadline_ns;
};

static void *dispatch_thread(void *arg)
{
	struct dispatch_args *args = arg;
	struct pollfd pfd = { .events = POLLIN };
	if (cpg_fd_get(handle, &pfd.fd) != CS_OK) {
		stats.connection_lost = 1;
		__atomic_store_n(&stats.done, 1, __ATOMIC_RELEASE);
		return NULL;
	}
	while (!(stats.ends >= args->senders) && now_ns() < args->deadline_ns) {
		int ready = poll(&pfd, 1, 100);
		if (ready < 0 && errno != EINTR)
			break;
		if (ready <= 0)
			continue;
		cs_error_t rc = cpg_dispatch(handle, CS_DISPATCH_ALL);
		if (rc != CS_OK && rc != CS_ERR_TRY_AGAIN) {
			stats.connection_lost = 1;
			break;
		}
	}
	__atomic_store_n(&stats.done, 1, __ATOMIC_RELEASE);
	return NULL;
}

/* Multicast one message, retrying on flow control. Returns CS_OK or the error. */
static cs_error_t send_one(struct iovec *iov, struct header *hdr, uint64_t *try_again)
{
	for (;;) {
		hdr->send_ns = now_ns();
		memcpy(iov->iov_base, hdr, sizeof(*hdr));
		cs_error_t rc = cpg_mcast_joined(handle, CPG_TYPE_AGREED, iov, 1);
		if (rc != CS_ERR_TRY_AGAIN)
			return rc;
		(*try_again)++;
		if (__atomic_load_n(&stats.done, __ATOMIC_ACQUIRE))
			return rc;
		sleep_ns(TRY_AGAIN_SLEEP_NS);
	}
}

/* Written by the sender thread; `sent` and `finished` are read atomically. */
struct send_result {
	const struct options *opt;
	uint64_t sent;
	uint64_t try_again;
	cs_error_t error;
	uint64_t start_ns;
	uint64_t end_ns;
	int finished;
};

static void send_loop(const struct options *opt, struct send_result *res)
{
	char *buffer = calloc(1, opt->size);
	struct iovec iov = { .iov_base = buffer, .iov_len = opt->size };
	struct header hdr = { .magic = MSG_MAGIC, .nodeid = stats.my_nodeid };
	uint64_t period_ns = opt->rate > 0 ? 1000000000ull / (uint64_t)opt->rate : 0;
	uint64_t start = now_ns();
	uint64_t stop = start + (uint64_t)opt->duration_ms * 1000000ull;
	res->start_ns = start;
	res->error = CS_OK;
	for (uint64_t seq = 0;; seq++) {
		if (period_ns)
			sleep_until_ns(start + seq * period_ns);
		if (now_ns() >= stop || __atomic_load_n(&stats.done, __ATOMIC_ACQUIRE))
			break;
		hdr.seq = seq;
		res->error = send_one(&iov, &hdr, &res->try_again);
		if (res->error != CS_OK)
			break;
		__atomic_add_fetch(&res->sent, 1, __ATOMIC_RELAXED);
	}
	res->end_ns = now_ns();
	if (res->error == CS_OK) {
		hdr.flags = FLAG_END;
		hdr.seq = res->sent;
		res->error = send_one(&iov, &hdr, &res->try_again);
	}
	free(buffer);
}

static void *sender_thread(void *arg)
{
	struct send_result *res = arg;
	sleep_ns(res->opt->settle_ms * 1000000L);
	send_loop(res->opt, res);
	__atomic_store_n(&res->finished, 1, __ATOMIC_RELEASE);
	return NULL;
}

/* Give a sender that is still inside cpg_mcast_joined a moment; 1 if it finished. */
static int wait_for_sender(struct send_result *res, long grace_ms)
{
	uint64_t deadline = now_ns() + (uint64_t)grace_ms * 1000000ull;
	while (!__atomic_load_n(&res->finished, __ATOMIC_ACQUIRE)) {
		if (now_ns() >= deadline)
			return 0;
		sleep_ns(1000000L);
	}
	return 1;
}

static int wait_for_members(int wanted, uint64_t deadline_ns)
{
	while (__atomic_load_n(&stats.members, __ATOMIC_ACQUIRE) < wanted) {
		if (now_ns() >= deadline_ns || __atomic_load_n(&stats.done, __ATOMIC_ACQUIRE))
			return -1;
		sleep_ns(1000000L);
	}
	return 0;
}

static void print_result(const struct options *opt, const struct send_result *res,
			 int members_ok, int sender_blocked, uint64_t start_ns)
{
	double span_s = stats.msgs > 1 ? (double)(stats.last_ns - stats.first_ns) / 1e9 : 0.0;
	double rate = span_s > 0 ? (double)stats.msgs / span_s : 0.0;
	double mbps = span_s > 0 ? (double)stats.bytes / span_s / 1e6 : 0.0;
	uint64_t send_end = sender_blocked ? now_ns() : res->end_ns;
	double send_s = res->start_ns ? (double)(send_end - res->start_ns) / 1e9 : 0.0;
	printf("{\"system\": \"corosync\", \"nodeid\": %u, \"sender\": %s, \"size\": %zu, "
	       "\"rate_target\": %ld, \"duration_ms\": %ld, \"msgs\": %" PRIu64 ", \"bytes\": %" PRIu64
	       ", \"span_s\": %.6f, \"msgs_per_s\": %.1f, \"mb_per_s\": %.3f, \"sent\": %" PRIu64
	       ", \"send_s\": %.6f, \"try_again\": %" PRIu64 ", \"latency_samples\": %" PRIu64
	       ", \"latency_us_p50\": %.1f, \"latency_us_p99\": %.1f, \"latency_us_max\": %.1f"
	       ", \"gaps\": %" PRIu64 ", \"dups\": %" PRIu64 ", \"bad\": %" PRIu64 ", \"ends\": %d"
	       ", \"complete\": %s, \"members_ok\": %s, \"connection_lost\": %s"
	       ", \"totem_confchgs\": %" PRIu64 ", \"cpg_confchgs\": %" PRIu64 ", \"send_error\": %d"
	       ", \"sender_blocked\": %s, \"client_start_ns\": %" PRIu64 ", \"send_start_ns\": %" PRIu64
	       ", \"first_ns\": %" PRIu64 ", \"last_ns\": %" PRIu64 "}\n",
	       stats.my_nodeid, opt->send ? "true" : "false", opt->size, opt->rate, opt->duration_ms,
	       stats.msgs, stats.bytes, span_s, rate, mbps, __atomic_load_n(&res->sent, __ATOMIC_RELAXED),
	       opt->send ? send_s : 0.0,
	       res->try_again, stats.latency_samples, latency_percentile_us(0.50),
	       latency_percentile_us(0.99), (double)stats.latency_max_ns / 1000.0, stats.gaps, stats.dups,
	       stats.bad, stats.ends, stats.ends >= opt->senders ? "true" : "false",
	       members_ok ? "true" : "false", stats.connection_lost ? "true" : "false",
	       stats.totem_confchgs, stats.cpg_confchgs, res->error == CS_OK ? 0 : (int)res->error,
	       sender_blocked ? "true" : "false", start_ns, res->start_ns, stats.first_ns, stats.last_ns);
	fflush(stdout);
}

/* Prints the result exactly once, whichever of main and the watchdog gets there first. */
static void print_result_once(const struct options *opt, const struct send_result *res,
			      int members_ok, int sender_blocked, uint64_t start_ns)
{
	static int printed;
	int expected = 0;
	if (__atomic_compare_exchange_n(&printed, &expected, 1, 0, __ATOMIC_ACQ_REL,
					__ATOMIC_ACQUIRE))
		print_result(opt, res, members_ok, sender_blocked, start_ns);
}

struct watchdog_args {
	const struct options *opt;
	struct send_result *res;
	uint64_t start_ns;
	uint64_t deadline_ns;
};

/*
 * Any libcpg call can block for a long time while corosync is busy (joins
 * and sends did, under packet loss). Past the deadline, report what was
 * counted so far and exit, so the harness always gets a result line.
 */
static void *watchdog_thread(void *arg)
{
	struct watchdog_args *args = arg;
	sleep_until_ns(args->deadline_ns);
	int members_ok = __atomic_load_n(&stats.members, __ATOMIC_ACQUIRE) >= args->opt->nodes;
	int blocked = args->opt->send && !__atomic_load_n(&args->res->finished, __ATOMIC_ACQUIRE);
	print_result_once(args->opt, args->res, members_ok, blocked, args->start_ns);
	_exit(0);
	return NULL;
}

static cs_error_t connect_and_join(const char *group_name, cpg_model_v1_data_t *model)
{
	struct cpg_name group;
	cs_error_t rc;
	group.length = (uint32_t)strlen(group_name);
	memcpy(group.value, group_name, group.length);
	for (int attempt = 0; attempt < 100; attempt++) {
		rc = cpg_model_initialize(&handle, CPG_MODEL_V1, (cpg_model_data_t *)model, NULL);
		if (rc == CS_OK)
			break;
		sleep_ns(100000000L); /* the daemon may still be starting */
	}
	if (rc != CS_OK)
		return rc;
	for (int attempt = 0; attempt < 1000; attempt++) {
		rc = cpg_join(handle, &group);
		if (rc != CS_ERR_TRY_AGAIN)
			break;
		sleep_ns(10000000L);
	}
	return rc;
}

static int run_bench(const struct options *opt)
{
	cpg_model_v1_data_t model = {
		.model = CPG_MODEL_V1,
		.cpg_deliver_fn = bench_deliver,
		.cpg_confchg_fn = bench_confchg,
		.cpg_totem_confchg_fn = bench_totem_confchg,
	};
	struct send_result res = { .opt = opt, .error = CS_OK };
	pthread_t thread, sender;
	struct dispatch_args args;
	uint64_t start = now_ns();
	cs_error_t rc;

	struct watchdog_args watchdog = {
		.opt = opt, .res = &res, .start_ns = start,
		.deadline_ns = start + (uint64_t)(opt->timeout_ms + WATCHDOG_EXTRA_MS) * 1000000ull,
	};
	pthread_t watchdog_id;
	pthread_create(&watchdog_id, NULL, watchdog_thread, &watchdog);
	stats.fine = calloc(FINE_BUCKETS, sizeof(uint64_t));
	stats.coarse = calloc(COARSE_BUCKETS, sizeof(uint64_t));
	if (!stats.fine || !stats.coarse)
		return 3;
	rc = connect_and_join(opt->group, &model);
	if (rc != CS_OK) {
		fprintf(stderr, "cpgbench: cannot join group %s: error %d\n", opt->group, rc);
		return 2;
	}
	cpg_local_get(handle, &stats.my_nodeid);
	args.senders = opt->senders;
	args.deadline_ns = start + (uint64_t)opt->timeout_ms * 1000000ull;
	pthread_create(&thread, NULL, dispatch_thread, &args);
	int members_ok = wait_for_members(opt->nodes, args.deadline_ns) == 0;
	int sending = members_ok && opt->send;
	if (sending)
		pthread_create(&sender, NULL, sender_thread, &res);
	pthread_join(thread, NULL);
	/*
	 * corosync can keep a sender blocked inside cpg_mcast_joined for minutes
	 * (seen under packet loss); report what we have instead of hanging.
	 */
	int sender_blocked = sending && !wait_for_sender(&res, SENDER_GRACE_MS);
	if (sending && !sender_blocked)
		pthread_join(sender, NULL);
	print_result_once(opt, &res, members_ok, sender_blocked, start);
	if (sender_blocked)
		_exit(0);
	cpg_finalize(handle);
	return 0;
}

static void print_members(const char *key, const struct cpg_address *list, size_t n)
{
	printf(", \"%s\": [", key);
	for (size_t i = 0; i < n; i++)
		printf("%s[%u, %u]", i ? ", " : "", list[i].nodeid, list[i].reason);
	printf("]");
}

static void watch_confchg(cpg_handle_t h, const struct cpg_name *group,
			  const struct cpg_address *members, size_t n_members,
			  const struct cpg_address *left, size_t n_left,
			  const struct cpg_address *joined, size_t n_joined)
{
	(void)h; (void)group;
	printf("{\"event\": \"group\", \"t_ns\": %" PRIu64, now_ns());
	print_members("members", members, n_members);
	print_members("left", left, n_left);
	print_members("joined", joined, n_joined);
	printf("}\n");
	fflush(stdout);
}

static void watch_totem_confchg(cpg_handle_t h, struct cpg_ring_id ring_id,
				uint32_t n_members, const uint32_t *members)
{
	(void)h;
	printf("{\"event\": \"ring\", \"t_ns\": %" PRIu64 ", \"ring\": \"%x.%" PRIx64
	       "\", \"members\": [", now_ns(), ring_id.nodeid, ring_id.seq);
	for (uint32_t i = 0; i < n_members; i++)
		printf("%s%u", i ? ", " : "", members[i]);
	printf("]}\n");
	fflush(stdout);
}

static void watch_deliver(cpg_handle_t h, const struct cpg_name *group, uint32_t nodeid,
			  uint32_t pid, void *msg, size_t msg_len)
{
	(void)h; (void)group; (void)nodeid; (void)pid; (void)msg; (void)msg_len;
}

static int run_watch(const struct options *opt)
{
	cpg_model_v1_data_t model = {
		.model = CPG_MODEL_V1,
		.cpg_deliver_fn = watch_deliver,
		.cpg_confchg_fn = watch_confchg,
		.cpg_totem_confchg_fn = watch_totem_confchg,
		.flags = CPG_MODEL_V1_DELIVER_INITIAL_TOTEM_CONF,
	};
	cs_error_t rc = connect_and_join(opt->group, &model);
	if (rc != CS_OK) {
		fprintf(stderr, "cpgbench: cannot join group %s: error %d\n", opt->group, rc);
		return 2;
	}
	printf("{\"event\": \"joined\", \"t_ns\": %" PRIu64 "}\n", now_ns());
	fflush(stdout);
	rc = cpg_dispatch(handle, CS_DISPATCH_BLOCKING);
	printf("{\"event\": \"exit\", \"t_ns\": %" PRIu64 ", \"error\": %d}\n", now_ns(), rc);
	fflush(stdout);
	cpg_finalize(handle);
	return 0;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: cpgbench bench --nodes N --senders S [--send] --size BYTES --duration-ms MS\n"
		"                      [--rate MSG_PER_S] [--timeout-ms MS] [--settle-ms MS] [--group NAME]\n"
		"       cpgbench watch [--group NAME]\n");
}

static int parse_options(int argc, char **argv, struct options *opt)
{
	static const struct option longopts[] = {
		{ "group", required_argument, NULL, 'g' },
		{ "nodes", required_argument, NULL, 'n' },
		{ "senders", required_argument, NULL, 'S' },
		{ "send", no_argument, NULL, 's' },
		{ "size", required_argument, NULL, 'b' },
		{ "duration-ms", required_argument, NULL, 'd' },
		{ "rate", required_argument, NULL, 'r' },
		{ "timeout-ms", required_argument, NULL, 't' },
		{ "settle-ms", required_argument, NULL, 'w' },
		{ NULL, 0, NULL, 0 },
	};
	int c;
	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'g': opt->group = optarg; break;
		case 'n': opt->nodes = atoi(optarg); break;
		case 'S': opt->senders = atoi(optarg); break;
		case 's': opt->send = 1; break;
		case 'b': opt->size = (size_t)atol(optarg); break;
		case 'd': opt->duration_ms = atol(optarg); break;
		case 'r': opt->rate = atol(optarg); break;
		case 't': opt->timeout_ms = atol(optarg); break;
		case 'w': opt->settle_ms = atol(optarg); break;
		default: return -1;
		}
	}
	if (strlen(opt->group) >= CPG_MAX_NAME_LENGTH || opt->size < HEADER_BYTES ||
	    opt->size > (1u << 20) || opt->nodes < 1 || opt->senders < 0 || opt->rate < 0)
		return -1;
	return 0;
}

int main(int argc, char **argv)
{
	struct options opt = {
		.group = "bench", .nodes = 3, .senders = 1, .size = 1024,
		.duration_ms = 10000, .timeout_ms = 120000, .settle_ms = 500,
	};
	if (argc < 2) {
		usage();
		return 2;
	}
	const char *mode = argv[1];
	if (parse_options(argc - 1, argv + 1, &opt) != 0) {
		usage();
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (strcmp(mode, "bench") == 0)
		return run_bench(&opt);
	if (strcmp(mode, "watch") == 0) {
		if (strcmp(opt.group, "bench") == 0)
			opt.group = "bench-watch";
		return run_watch(&opt);
	}
	usage();
	return 2;
}
