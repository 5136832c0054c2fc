/* redis_driver.c: drives the Redis client (src/redis.c) on a libev loop from
 * a script, one command a line, and prints one line per result, for
 * spec/e2e/redis_spec.lua against a real redis-server.
 *
 * Usage: redis_driver [SCRIPT] (stdin without one). Lines (words split on
 * blanks; "..." quotes, with \n \r \t \\ \" \xHH):
 *   client HOST:PORT [password=P] [db=N] [pool=N] [timeout=S] [connect_timeout=S] [queue=N]
 *          [backoff=MIN,MAX]
 *   call [t=S] ARG...                       one command; waits, prints the result
 *   pipeline [t=S] ARG... | ARG... | ...    one call of several commands; results joined by " ; "
 *   async NAME [t=S] ARG...                 sends; "NAME: RESULT" when it ends
 *   cancel NAME                             cancels NAME; prints "NAME: cancelled"
 *   repeat N ARG...                         N calls one after another: "repeat N: F failed, T us per call"
 *   wait                                    until every async call ended
 *   sleep S                                 runs the loop S seconds
 *   busy S                                  sleeps S seconds without the loop (a long iteration)
 *   elapsed                                 "elapsed S": how long the last call/pipeline took
 *   stats                                   "conns=N idle=N queued=N cancelled=N connects=N failures=N"
 *   signal PATH / waitfile PATH S [noloop]  creates PATH / runs the loop until PATH exists (at most S;
 *                                           noloop: sleeps instead, as a busy worker sees no event)
 *   free                                    frees the client (pending calls end "client closed")
 *   echo WORDS                              prints WORDS
 * A result: +STATUS, -ERROR, :INTEGER, nil, "BULK" (escaped; over 1 KiB:
 * "bulk(N bytes, sum S)"), [A, B, ...]; or
 * "error: MESSAGE" when the call failed (at once or later). Exit status 0,
 * 1 when a cancelled call's callback ran, 2 on a bad script. */
#include "log.h"
#include "redis.h"

#include <arpa/inet.h>
#include <ev.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAXW 4096

typedef struct {
    char *w[MAXW];
    size_t len[MAXW];
    int n;
} words_t;

typedef struct pending {
    char name[64];
    mp_redis_call_t *call;
    int done, cancelled;
    struct pending *next;
} pending_t;

static struct ev_loop *loop;
static mp_redis_t *client;
static pending_t *pendings;
static int sync_done, bug;
static double last_elapsed;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int blank(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/* Splits line into w (the words unquoted in place, NUL-terminated). */
static int split(char *line, words_t *w)
{
    char *p = line;
    w->n = 0;
    for (;;) {
        while (blank(*p))
            p++;
        if (!*p)
            return 0;
        if (w->n == MAXW)
            return -1;
        char *start = p, *out = p;
        if (*p == '"') {
            for (p++; *p && *p != '"';) {
                if (*p != '\\' || !p[1]) {
                    *out++ = *p++;
                    continue;
                }
                char c = p[1];
                p += 2;
                if (c == 'x' && p[0] && p[1]) {
                    char hex[3] = {p[0], p[1], 0};
                    *out++ = (char)strtol(hex, NULL, 16);
                    p += 2;
                } else {
                    *out++ = c == 'n' ? '\n' : c == 'r' ? '\r' : c == 't' ? '\t' : c;
                }
            }
            if (*p != '"')
                return -1;
            p++;
        } else {
            while (*p && !blank(*p))
                *out++ = *p++;
        }
        char at = *p; /* what ends the word: a blank or the end */
        *out = '\0';
        w->w[w->n] = start;
        w->len[w->n++] = (size_t)(out - start);
        if (!at)
            return 0;
        p++;
    }
}

static void print_bytes(const char *s, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c == '\n')
            printf("\\n");
        else if (c == '\r')
            printf("\\r");
        else if (c < 0x20 || c >= 0x7f)
            printf("\\x%02x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void print_reply(const redisReply *r)
{
    switch (r->type) {
    case REDIS_REPLY_STATUS: printf("+%.*s", (int)r->len, r->str); break;
    case REDIS_REPLY_ERROR: printf("-%.*s", (int)r->len, r->str); break;
    case REDIS_REPLY_INTEGER: printf(":%lld", r->integer); break;
    case REDIS_REPLY_NIL: printf("nil"); break;
    case REDIS_REPLY_STRING:
        if (r->len <= 1024) {
            print_bytes(r->str, r->len);
        } else { /* a large value: its length and the sum of its bytes */
            unsigned long sum = 0;
            for (size_t i = 0; i < r->len; i++)
                sum += (unsigned char)r->str[i];
            printf("bulk(%zu bytes, sum %lu)", r->len, sum);
        }
        break;
    case REDIS_REPLY_ARRAY:
        putchar('[');
        for (size_t i = 0; i < r->elements; i++) {
            if (i)
                printf(", ");
            print_reply(r->element[i]);
        }
        putchar(']');
        break;
    default: printf("?type%d", r->type);
    }
}

static void print_result(redisReply **replies, int n, const char *err)
{
    if (err) {
        printf("error: %s", err);
        return;
    }
    for (int i = 0; i < n; i++) {
        if (i)
            printf(" ; ");
        print_reply(replies[i]);
    }
}

static void on_sync(void *arg, redisReply **replies, int n, const char *err)
{
    (void)arg;
    print_result(replies, n, err);
    putchar('\n');
    fflush(stdout);
    sync_done = 1;
}

static int repeat_failed;

static void on_repeat(void *arg, redisReply **replies, int n, const char *err)
{
    (void)arg;
    repeat_failed = err || (n > 0 && replies[0]->type == REDIS_REPLY_ERROR);
    sync_done = 1;
}

static void on_async(void *arg, redisReply **replies, int n, const char *err)
{
    pending_t *p = arg;
    if (p->cancelled) {
        printf("BUG: %s: callback after cancel\n", p->name);
        bug = 1;
    }
    printf("%s: ", p->name);
    print_result(replies, n, err);
    putchar('\n');
    fflush(stdout);
    p->done = 1;
    p->call = NULL;
}

static void on_tick(struct ev_loop *l, ev_timer *w, int revents)
{
    (void)l;
    (void)w;
    (void)revents;
}

/* Runs the loop for at most s seconds, or until *flag (when not NULL). */
static void run_for(double s, int *flag)
{
    ev_timer t;
    double end = now_s() + s;
    while ((!flag || !*flag) && now_s() < end) {
        double left = end - now_s();
        ev_timer_init(&t, on_tick, left > 0.01 ? 0.01 : (left > 0 ? left : 0), 0);
        ev_timer_start(loop, &t);
        ev_run(loop, EVRUN_ONCE);
        ev_timer_stop(loop, &t);
    }
}

static int parse_addr(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[128];
    const char *colon = strrchr(s, ':');
    if (!colon || (size_t)(colon - s) >= sizeof(host))
        return -1;
    memcpy(host, s, (size_t)(colon - s));
    host[colon - s] = '\0';
    int port = atoi(colon + 1);
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *in = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, host, &in->sin_addr) != 1)
        return -1;
    in->sin_family = AF_INET;
    in->sin_port = htons((uint16_t)port);
    *len = sizeof(*in);
    return 0;
}

static int cmd_client(words_t *w)
{
    struct sockaddr_storage ss;
    mp_redis_opts_t o = {0};
    if (w->n < 2 || parse_addr(w->w[1], &ss, &o.addrlen) < 0)
        return -1;
    o.addr = (struct sockaddr *)&ss;
    for (int i = 2; i < w->n; i++) {
        char *v = strchr(w->w[i], '=');
        if (!v)
            return -1;
        *v++ = '\0';
        if (!strcmp(w->w[i], "password"))
            o.password = v;
        else if (!strcmp(w->w[i], "db"))
            o.db = atoi(v);
        else if (!strcmp(w->w[i], "pool"))
            o.pool = atoi(v);
        else if (!strcmp(w->w[i], "queue"))
            o.queue = atoi(v);
        else if (!strcmp(w->w[i], "timeout"))
            o.timeout = atof(v);
        else if (!strcmp(w->w[i], "connect_timeout"))
            o.connect_timeout = atof(v);
        else if (!strcmp(w->w[i], "backoff")) {
            o.backoff_min = atof(v);
            char *comma = strchr(v, ',');
            o.backoff_max = comma ? atof(comma + 1) : o.backoff_min;
        } else
            return -1;
    }
    mp_redis_free(client);
    client = mp_redis_new(loop, &o);
    if (!client)
        return -1;
    printf("client %s\n", mp_redis_addr(client));
    return 0;
}

/* Sends words w[from..] (commands split on "|"; a leading t=S is the
 * timeout). Returns the call, or NULL with the error printed after prefix
 * (not printed: NULL). */
static mp_redis_call_t *send_words(words_t *w, int from, mp_redis_cb cb, void *arg, const char *prefix)
{
    double timeout = 0;
    if (from < w->n && !strncmp(w->w[from], "t=", 2))
        timeout = atof(w->w[from++] + 2);
    static int argc[MAXW];
    static const char *argv[MAXW];
    static size_t lens[MAXW];
    int ncmds = 0, nargs = 0;
    argc[0] = 0;
    for (int i = from; i < w->n; i++) {
        if (w->len[i] == 1 && w->w[i][0] == '|') {
            argc[++ncmds] = 0;
            continue;
        }
        argv[nargs] = w->w[i];
        lens[nargs++] = w->len[i];
        argc[ncmds]++;
    }
    ncmds++;
    const char *err = NULL;
    mp_redis_call_t *c = mp_redis_send(client, ncmds, argc, argv, lens, timeout, cb, arg, &err);
    if (!c && prefix)
        printf("%serror: %s\n", prefix, err);
    return c;
}

static pending_t *find(const char *name)
{
    for (pending_t *p = pendings; p; p = p->next)
        if (!strcmp(p->name, name))
            return p;
    return NULL;
}

static int all_done_flag;

static void check_all_done(void)
{
    all_done_flag = 1;
    for (pending_t *p = pendings; p; p = p->next)
        if (!p->done && !p->cancelled)
            all_done_flag = 0;
}

static int run_line(char *line)
{
    static words_t w;
    if (split(line, &w) < 0)
        return -1;
    if (w.n == 0 || w.w[0][0] == '#')
        return 0;
    const char *cmd = w.w[0];
    if (!strcmp(cmd, "client"))
        return cmd_client(&w);
    if (!strcmp(cmd, "echo")) {
        for (int i = 1; i < w.n; i++)
            printf(i > 1 ? " %s" : "%s", w.w[i]);
        putchar('\n');
    } else if (!strcmp(cmd, "sleep") && w.n == 2) {
        run_for(atof(w.w[1]), NULL);
    } else if (!strcmp(cmd, "busy") && w.n == 2) {
        usleep((useconds_t)(atof(w.w[1]) * 1e6));
    } else if (!strcmp(cmd, "signal") && w.n == 2) {
        FILE *f = fopen(w.w[1], "w");
        if (!f)
            return -1;
        fclose(f);
    } else if (!strcmp(cmd, "waitfile") && (w.n == 3 || (w.n == 4 && !strcmp(w.w[3], "noloop")))) {
        struct stat st;
        double end = now_s() + atof(w.w[2]);
        while (stat(w.w[1], &st) != 0 && now_s() < end) {
            if (w.n == 4)
                usleep(10000);
            else
                run_for(0.01, NULL);
        }
        if (stat(w.w[1], &st) != 0)
            printf("waitfile %s: timeout\n", w.w[1]);
    } else if (!client) {
        return -1;
    } else if ((!strcmp(cmd, "call") || !strcmp(cmd, "pipeline")) && w.n >= 2) {
        sync_done = 0;
        double t0 = now_s();
        if (send_words(&w, 1, on_sync, NULL, ""))
            run_for(30, &sync_done);
        last_elapsed = now_s() - t0;
    } else if (!strcmp(cmd, "repeat") && w.n >= 3) {
        /* N calls one after another: how many failed, and the time per call */
        int n = atoi(w.w[1]), failed = 0;
        double t0 = now_s();
        for (int i = 0; i < n; i++) {
            sync_done = 0;
            repeat_failed = 0;
            if (!send_words(&w, 2, on_repeat, NULL, NULL))
                failed++;
            else
                run_for(30, &sync_done);
            failed += repeat_failed;
        }
        last_elapsed = now_s() - t0;
        printf("repeat %d: %d failed, %.1f us per call\n", n, failed, n > 0 ? last_elapsed * 1e6 / n : 0);
    } else if (!strcmp(cmd, "async") && w.n >= 3) {
        pending_t *p = calloc(1, sizeof(*p));
        if (!p)
            return -1;
        snprintf(p->name, sizeof(p->name), "%s", w.w[1]);
        char prefix[80];
        snprintf(prefix, sizeof(prefix), "%s: ", p->name);
        p->call = send_words(&w, 2, on_async, p, prefix);
        p->done = !p->call;
        p->next = pendings;
        pendings = p;
    } else if (!strcmp(cmd, "cancel") && w.n == 2) {
        pending_t *p = find(w.w[1]);
        if (!p || p->done || p->cancelled)
            return -1;
        mp_redis_cancel(p->call);
        p->cancelled = 1;
        printf("%s: cancelled\n", p->name);
    } else if (!strcmp(cmd, "wait")) {
        double end = now_s() + 30;
        for (check_all_done(); !all_done_flag && now_s() < end; check_all_done())
            run_for(0.01, NULL);
        if (!all_done_flag)
            printf("wait: timeout\n");
    } else if (!strcmp(cmd, "elapsed")) {
        printf("elapsed %.3f\n", last_elapsed);
    } else if (!strcmp(cmd, "stats")) {
        mp_redis_stats_t st;
        mp_redis_stats(client, &st);
        printf("conns=%u idle=%u queued=%u cancelled=%u connects=%lu failures=%lu\n", st.conns, st.idle, st.queued,
               st.cancelled, st.connects, st.failures);
    } else if (!strcmp(cmd, "free")) {
        mp_redis_free(client);
        client = NULL;
    } else {
        return -1;
    }
    fflush(stdout);
    return 0;
}

int main(int argc, char **argv)
{
    FILE *in = stdin;
    if (argc > 1 && !(in = fopen(argv[1], "r"))) {
        perror(argv[1]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN); /* as main.c: a write to a closed connection is an EPIPE, not an exit */
    loop = ev_loop_new(EVFLAG_AUTO);
    static char line[1 << 20];
    int lineno = 0, rc = 0;
    while (fgets(line, sizeof(line), in)) {
        lineno++;
        static char copy[sizeof(line)];
        memcpy(copy, line, sizeof(line));
        if (run_line(line) < 0) {
            copy[strcspn(copy, "\n")] = '\0';
            fprintf(stderr, "redis_driver: line %d: bad command: %s\n", lineno, copy);
            rc = 2;
            break;
        }
    }
    mp_redis_free(client);
    while (pendings) {
        pending_t *p = pendings;
        pendings = p->next;
        free(p);
    }
    ev_loop_destroy(loop);
    if (in != stdin)
        fclose(in);
    fflush(stdout);
    return rc ? rc : bug;
}
