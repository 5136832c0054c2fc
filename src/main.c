/* main.c: the command line, the listening sockets, starting and stopping the
 * worker threads, and signals. */
#include "admin.h"
#include "config.h"
#include "health.h"
#include "listener.h"
#include "log.h"
#include "probe.h"
#include "reload.h"
#include "resolve.h"
#include "sim.h"
#include "vm.h"
#include "worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#define MAX_WORKERS 256

static const char usage[] =
    "usage: moonproxy [-c FILE] [-t] [-w N] [-l LEVEL] [--version] [--help]\n"
    "       moonproxy [-c FILE] --explain 'METHOD URL' [-H 'Name: value']... [--from ADDR]\n"
    "  -c FILE   configuration script (default: $MOONPROXY_CONFIG, else ./moonproxy.lua)\n"
    "  -t        load and validate the configuration (and its proxy.expect guards),\n"
    "            print ok or the error, exit\n"
    "  -t --diff --against FILE  also print what a reload from the script FILE (the\n"
    "            running one) to this one would change, one line per kind\n"
    "  --explain 'GET http://host/path?q'  where this request would go and why: the\n"
    "            route, the hooks' changes, the balancer's pick and what the upstream\n"
    "            would receive (or the answer made here); -H adds a request header,\n"
    "            --from sets the client address (default 127.0.0.1)\n"
    "  -w N      worker threads (default: settings.workers, else the number of CPUs)\n"
    "  -l LEVEL  log level: debug|info|warn|error (default: info)\n"
    "signals: SIGHUP reloads; SIGTERM/SIGINT stop gracefully (a second one exits at once);\n"
    "         SIGUSR1 reopens the access_log and error_log files (after logrotate moved them)\n"
    "systemd: with NOTIFY_SOCKET set (Type=notify), readiness, reloads and the stop are reported\n";

#define MAX_EXPLAIN_HEADERS 64

typedef struct {
    const char *path;
    int test_only;
    int diff;            /* -t --diff */
    const char *against; /* --against FILE */
    int workers;
    const char *explain; /* "METHOD URL" */
    const char *from;
    const char *headers[MAX_EXPLAIN_HEADERS];
    size_t nheaders;
} options_t;

static struct {
    mp_worker_t *workers;
    int nworkers;
    int stopping;
    int ready; /* for /ready: listeners accept and a configuration runs */
    int stuck; /* workers stuck in a hook (for /live) */
    ev_timer watchdog;
    mp_reloader_t *rl;
    mp_admin_t *admin;
    mp_probes_t *probes;
    mp_resolve_watch_t *names; /* upstream servers by name: re-resolved at their TTL */
    ev_timer deadline, poll;
    ev_signal sigterm, sigint, sighup, sigusr1;
    int alog_fd;                 /* the access log's descriptor, shared by the workers */
    char *alog_path, *elog_path; /* the log files SIGUSR1 reopens (NULL: stdout, stderr, off) */
} g;

static int parse_args(int argc, char **argv, options_t *o)
{
    const char *env = getenv("MOONPROXY_CONFIG");
    o->path = env && *env ? env : "moonproxy.lua";
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        const char *next = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fputs(usage, stdout);
            exit(0);
        } else if (strcmp(a, "--version") == 0 || strcmp(a, "-v") == 0) {
            printf("moonproxy %s\n", MP_VERSION);
            exit(0);
        } else if (strcmp(a, "-t") == 0) {
            o->test_only = 1;
        } else if (strcmp(a, "--diff") == 0) {
            o->diff = 1;
        } else if (strcmp(a, "--against") == 0 && next) {
            o->against = argv[++i];
        } else if (strcmp(a, "--explain") == 0 && next) {
            o->explain = argv[++i];
        } else if (strcmp(a, "--from") == 0 && next) {
            o->from = argv[++i];
        } else if (strcmp(a, "-H") == 0 && next) {
            if (o->nheaders == MAX_EXPLAIN_HEADERS) {
                fprintf(stderr, "moonproxy: at most %d -H options\n", MAX_EXPLAIN_HEADERS);
                return -1;
            }
            o->headers[o->nheaders++] = argv[++i];
        } else if (strcmp(a, "-c") == 0 && next) {
            o->path = argv[++i];
        } else if (strcmp(a, "-w") == 0 && next) {
            char *end;
            long n = strtol(argv[++i], &end, 10);
            if (*end || n < 1 || n > MAX_WORKERS) {
                fprintf(stderr, "moonproxy: -w takes a number from 1 to %d\n", MAX_WORKERS);
                return -1;
            }
            o->workers = (int)n;
        } else if (strcmp(a, "-l") == 0 && next) {
            if ((mp_log_level = mp_log_parse_level(argv[++i])) < 0) {
                fprintf(stderr, "moonproxy: -l takes debug, info, warn or error\n");
                return -1;
            }
        } else {
            fprintf(stderr, "moonproxy: unknown or incomplete option '%s'\n%s", a, usage);
            return -1;
        }
    }
    if ((o->diff || o->against) && (!o->test_only || !o->diff || !o->against)) {
        fprintf(stderr, "moonproxy: --diff and --against FILE go together, with -t\n");
        return -1;
    }
    return 0;
}

static void addr_text(const mp_addr_t *a, char *out, size_t n)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (a->ss.ss_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)&a->ss;
        inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
        port = ntohs(s6->sin6_port);
        snprintf(out, n, "[%s]:%d", ip, port);
        return;
    }
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)&a->ss;
    inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
    snprintf(out, n, "%s:%d", ip, ntohs(s4->sin_port));
}

static int addr_port(const mp_addr_t *a)
{
    if (a->ss.ss_family == AF_INET6)
        return ntohs(((const struct sockaddr_in6 *)&a->ss)->sin6_port);
    if (a->ss.ss_family == AF_INET)
        return ntohs(((const struct sockaddr_in *)&a->ss)->sin_port);
    return -1;
}

/* mp_listener_open, and no socket keeps an auto-bound port: Linux gives
 * such a port back on shutdown(2) (the watchdog's, worker.c mark_stuck), and
 * listen(2) afterwards would pick another one. Once the first socket has
 * fixed the port, one bound to it explicitly (same SO_REUSEPORT group)
 * takes its place. */
static int open_listener(mp_addr_t *a)
{
    int auto_port = addr_port(a) == 0;
    int fd = mp_listener_open(a);
    if (fd < 0 || !auto_port)
        return fd;
    int fixed = mp_listener_open(a), saved = errno;
    close(fd);
    errno = saved;
    return fixed;
}

/* Opens nworkers sockets per listen address: fds[w * nlistens + i]. */
static int open_listeners(mp_config_t *cfg, int nworkers, int *fds)
{
    for (size_t i = 0; i < cfg->nlistens; i++) {
        mp_addr_t a = cfg->listens[i];
        char text[80];
        for (int w = 0; w < nworkers; w++) {
            int fd = open_listener(&a); /* the first one fixes port 0 for the rest */
            if (fd < 0) {
                fprintf(stderr, "moonproxy: cannot listen on %s: %s\n", cfg->listens[i].text, strerror(errno));
                return -1;
            }
            fds[w * cfg->nlistens + i] = fd;
        }
        addr_text(&a, text, sizeof(text));
        mp_log_info("listening on %s", text);
    }
    return 0;
}

static atomic_int workers_done;

static void on_poll(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)t;
    (void)revents;
    if (atomic_load(&workers_done) == g.nworkers)
        ev_break(loop, EVBREAK_ALL);
}

static void on_deadline(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)t;
    (void)revents;
    mp_log_warn("shutdown_timeout reached: closing the remaining connections");
    ev_break(loop, EVBREAK_ALL);
}

static void on_stop_signal(struct ev_loop *loop, ev_signal *s, int revents)
{
    (void)revents;
    if (g.stopping) {
        mp_log_warn("second signal %d: exiting now", s->signum);
        _exit(1);
    }
    g.stopping = 1;
    g.ready = 0;
    sd_notify(0, "STOPPING=1");
    mp_log_info("signal %d: stopping (draining in-flight requests)", s->signum);
    for (int i = 0; i < g.nworkers; i++)
        mp_worker_stop(&g.workers[i]);
    ev_timer_init(&g.poll, on_poll, 0.02, 0.02);
    ev_timer_start(loop, &g.poll);
    ev_timer_init(&g.deadline, on_deadline, mp_reloader_config(g.rl)->settings.shutdown_timeout, 0);
    ev_timer_start(loop, &g.deadline);
}

/* A SIGHUP's reload ended: systemd (ExecReload) learns it and how. The
 * previous configuration goes on serving when it was refused. */
static void hup_done(void *arg, uint64_t generation, const char *err)
{
    (void)arg;
    if (err)
        sd_notifyf(0, "READY=1\nSTATUS=reload refused (generation %llu serves): %.200s", (unsigned long long)generation,
                   err);
    else
        sd_notifyf(0, "READY=1\nSTATUS=serving generation %llu", (unsigned long long)generation);
}

static void on_hup(struct ev_loop *loop, ev_signal *s, int revents)
{
    (void)loop;
    (void)s;
    (void)revents;
    if (g.stopping)
        return;
    sd_notify(0, "RELOADING=1");
    mp_reload(g.rl, 0, "SIGHUP", hup_done, NULL);
}

/* Opens path for appending and puts it at descriptor fd (dup3: atomic, so
 * a line another thread is writing goes whole to the old file or the new
 * one). Returns 0, or -1 with errno set and fd untouched. */
static int open_log(const char *path, int fd, int cloexec)
{
    int nfd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (nfd < 0)
        return -1;
    int rc = dup3(nfd, fd, cloexec ? O_CLOEXEC : 0);
    int err = errno;
    close(nfd);
    errno = err;
    return rc < 0 ? -1 : 0;
}

/* SIGUSR1 (logrotate's postrotate): the log files are opened again by
 * name, the renamed ones closed. Workers keep writing to the same
 * descriptor, which now is the new file: no line is lost or split. A file
 * that cannot be opened is reported, and writing goes on to the old one. */
static void on_usr1(struct ev_loop *loop, ev_signal *s, int revents)
{
    (void)loop;
    (void)s;
    (void)revents;
    int ok = 1;
    if (g.elog_path && open_log(g.elog_path, STDERR_FILENO, 0) != 0) {
        mp_log_error("SIGUSR1: cannot reopen error_log %s: %s (writing on to the old file)", g.elog_path,
                     strerror(errno));
        ok = 0;
    }
    if (g.alog_path && open_log(g.alog_path, g.alog_fd, 1) != 0) {
        mp_log_error("SIGUSR1: cannot reopen access_log %s: %s (writing on to the old file)", g.alog_path,
                     strerror(errno));
        ok = 0;
    }
    if (ok)
        mp_log_info("SIGUSR1: log files reopened");
}

static void *worker_main(void *arg);

/* After each accepted reload: the probes and the names follow the new
 * configuration. */
static void on_config(void *arg, const mp_config_t *cfg)
{
    (void)arg;
    mp_probes_sync(g.probes, cfg);
    mp_resolve_watch_sync(g.names, cfg);
}

/* A name's addresses changed: the running script is built again with them
 * (servers that stay keep their health and pools; the old ones drain). */
static int on_names_changed(void *arg, const char *why)
{
    (void)arg;
    return g.stopping ? 0 : mp_reload_refresh(g.rl, why);
}

/* The reloader's validate: a script's proxy.expect guards run in a
 * simulator of their own (sim.h). */
static int check_guards(void *arg, const char *path, const char *text, size_t len, char *err, size_t errlen)
{
    (void)arg;
    return mp_sim_check_script(path, text, len, err, errlen);
}

static void on_watchdog(struct ev_loop *loop, ev_timer *t, int revents)
{
    (void)loop;
    (void)t;
    (void)revents;
    g.stuck = mp_watchdog_check(g.workers, g.nworkers, mp_reloader_config(g.rl)->settings.hook_timeout);
}

/* -t --diff --against FILE: what a reload from FILE's configuration to
 * s's would change, one line per kind (reload.h's mp_config_diff). */
static int print_diff(mp_sim_t *s, const char *against)
{
    char err[8192];
    mp_sim_t *old = mp_sim_new(against, NULL, 0, 1, err, sizeof(err));
    if (!old) {
        fprintf(stderr, "--against %s: %s\n", against, err);
        return 1;
    }
    mp_strbuf_t json = {0}, summary = {0};
    mp_config_diff(mp_sim_config(old), mp_sim_vm(old), mp_sim_config(s), mp_sim_vm(s), &json, &summary);
    mp_sim_free(old);
    for (const char *p = summary.p ? summary.p : ""; *p;) {
        const char *e = strstr(p, "; ");
        printf("%.*s\n", e ? (int)(e - p) : (int)strlen(p), p);
        p = e ? e + 2 : p + strlen(p);
    }
    int oom = json.oom || summary.oom;
    mp_strbuf_free(&json);
    mp_strbuf_free(&summary);
    return oom ? 1 : 0;
}

/* -t: loads the script as a worker would and checks its guards. */
static int test_config(const options_t *o)
{
    char err[8192];
    mp_sim_t *s = mp_sim_new(o->path, NULL, 0, 1, err, sizeof(err));
    int rc = s ? mp_sim_check_guards(s, err, sizeof(err)) : MP_EINVAL;
    if (rc == 0)
        puts("ok");
    else
        fprintf(stderr, "%s\n", err);
    if (rc == 0 && o->diff)
        rc = print_diff(s, o->against);
    mp_sim_free(s);
    return rc == 0 ? 0 : 1;
}

static void print_head(const char *head, size_t len)
{
    const char *end = head + len;
    for (const char *p = head; p < end;) {
        const char *eol = memchr(p, '\r', (size_t)(end - p));
        if (!eol || eol == p)
            break;
        printf("  %.*s\n", (int)(eol - p), p);
        p = eol + 2;
    }
}

/* --explain 'METHOD URL': one request through the simulator (sim.h). */
static int explain(const options_t *o)
{
    char method[32], url[8192];
    if (sscanf(o->explain, "%31s %8191s", method, url) != 2) {
        fprintf(stderr, "moonproxy: --explain takes 'METHOD URL', e.g. 'GET http://api.example.com/v1/users'\n");
        return 2;
    }
    char host[512] = "";
    const char *target = url;
    if (strncmp(url, "http://", 7) == 0 || strncmp(url, "https://", 8) == 0) {
        const char *h = strstr(url, "://") + 3;
        size_t n = strcspn(h, "/?");
        if (n >= sizeof(host)) {
            fprintf(stderr, "moonproxy: --explain: the host is too long\n");
            return 2;
        }
        memcpy(host, h, n);
        host[n] = '\0';
        target = h[n] == '/' ? h + n : h[n] == '?' ? NULL : "/";
        if (!target) { /* "http://host?q": the path is "/" */
            static char with_slash[8192];
            snprintf(with_slash, sizeof(with_slash), "/%s", h + n);
            target = with_slash;
        }
    } else if (url[0] != '/') {
        fprintf(stderr, "moonproxy: --explain: the URL is http://host/path or /path, got '%s'\n", url);
        return 2;
    }
    mp_sim_header_t headers[MAX_EXPLAIN_HEADERS];
    char names[MAX_EXPLAIN_HEADERS][256];
    for (size_t i = 0; i < o->nheaders; i++) {
        const char *colon = strchr(o->headers[i], ':');
        size_t n = colon ? (size_t)(colon - o->headers[i]) : 0;
        if (!colon || n == 0 || n >= sizeof(names[i])) {
            fprintf(stderr, "moonproxy: -H takes 'Name: value', got '%s'\n", o->headers[i]);
            return 2;
        }
        memcpy(names[i], o->headers[i], n);
        names[i][n] = '\0';
        const char *v = colon + 1;
        while (*v == ' ')
            v++;
        headers[i] = (mp_sim_header_t){names[i], v};
    }
    char err[4096];
    mp_sim_t *s = mp_sim_new(o->path, NULL, 0, 1, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    mp_sim_request_t rq = {.method = method,
                           .host = host[0] ? host : NULL,
                           .target = target,
                           .headers = headers,
                           .nheaders = o->nheaders,
                           .remote_addr = o->from,
                           .https = strncmp(url, "https://", 8) == 0};
    mp_sim_result_t res;
    int rc = mp_sim_request(s, &rq, &res);
    if (rc != 0) {
        fprintf(stderr, "moonproxy: --explain: %s\n",
                rc == MP_EINVAL ? "--from is not an IP address" : "out of memory");
        mp_sim_free(s);
        return 2;
    }
    printf("route:    %s\n", res.route ? res.route : "(none)");
    if (res.forwarded) {
        printf("upstream: %s\nserver:   %s\nthe upstream receives:\n", res.upstream, res.server);
        print_head(res.head, res.head_len);
    } else {
        printf("answered: %d %s\n", res.status, mp_http1_reason(res.status));
        print_head(res.head, res.head_len);
        if (res.body_len && res.body_len <= 2048 && !memchr(res.body, '\0', res.body_len))
            printf("  \n  %.*s%s", (int)res.body_len, res.body, res.body[res.body_len - 1] == '\n' ? "" : "\n");
        else if (res.body_len) /* a file, say: its size is enough here */
            printf("  \n  (a body of %zu bytes)\n", res.body_len);
    }
    if (res.has_upgrade)
        printf("upgrade:  %s\n", res.upgrade ? "websocket" : res.upgrade_refused ? res.upgrade_refused : "no");
    if (res.error)
        printf("error:    %s\n", res.error);
    printf("trace:\n");
    for (size_t i = 0; i < res.ntrace; i++)
        printf("  %2zu. %-8s %s\n", i + 1, res.trace[i].kind, res.trace[i].text);
    mp_sim_free(s);
    return 0;
}

/* Raises RLIMIT_NOFILE's soft limit (up to the hard one) toward what the
 * configuration may hold open: per worker, max_connections clients, as many
 * upstream connections and the idle pools; plus listeners, loops, the admin
 * port and probes. Warns once when the hard limit is lower. Tells the
 * listeners the limit in force (mp_listener_fd_limit). */
static void raise_nofile(const mp_config_t *cfg, int nworkers)
{
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
        return;
    unsigned long long pools = 0;
    for (size_t i = 0; i < cfg->nupstreams; i++)
        pools += (unsigned long long)cfg->upstreams[i].keepalive * cfg->upstreams[i].nservers;
    unsigned long long want = ((unsigned long long)cfg->settings.max_connections * 2 + pools) * (unsigned)nworkers +
                              16ull * (unsigned)nworkers + cfg->nlistens * (unsigned)nworkers + 64;
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want) {
        struct rlimit up = rl;
        up.rlim_cur = rl.rlim_max == RLIM_INFINITY || rl.rlim_max > want ? want : rl.rlim_max;
        if (setrlimit(RLIMIT_NOFILE, &up) == 0)
            rl = up;
    }
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want)
        mp_log_warn(
            "RLIMIT_NOFILE is %llu, below the %llu descriptors max_connections (%d) x %d workers may need "
            "(hard limit %llu): past it new connections wait; raise it (ulimit -n, LimitNOFILE=)",
            (unsigned long long)rl.rlim_cur, want, cfg->settings.max_connections, nworkers,
            (unsigned long long)rl.rlim_max);
    mp_listener_fd_limit(rl.rlim_cur == RLIM_INFINITY ? 0 : (long long)rl.rlim_cur);
}

static int worker_count(const options_t *o, const mp_config_t *cfg)
{
    if (o->workers)
        return o->workers;
    if (cfg->settings.workers)
        return cfg->settings.workers;
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n < 1 ? 1 : (n > MAX_WORKERS ? MAX_WORKERS : (int)n);
}

int main(int argc, char **argv)
{
    options_t o = {0};
    if (parse_args(argc, argv, &o) != 0)
        return 2;
    signal(SIGPIPE, SIG_IGN);
    mp_config_set_resolver(mp_resolve_lookup); /* upstream servers by name, -t and --explain too */
    if (o.explain)
        return explain(&o);
    if (o.test_only)
        return test_config(&o);

    char err[2048];
    lua_State *L = mp_vm_new();
    mp_config_t *cfg = NULL;
    if (!L || mp_config_load(L, o.path, &cfg, err, sizeof(err)) != 0) {
        fprintf(stderr, "%s\n", L ? err : "out of memory");
        return 1;
    }
    g.nworkers = worker_count(&o, cfg);
    raise_nofile(cfg, g.nworkers);
    if (cfg->settings.error_log && open_log(cfg->settings.error_log, STDERR_FILENO, 0) != 0) {
        fprintf(stderr, "moonproxy: cannot open error_log %s: %s\n", cfg->settings.error_log, strerror(errno));
        return 1;
    }
    int alog = mp_alog_open(cfg->settings.access_log);
    if (alog == MP_EIO) {
        fprintf(stderr, "moonproxy: cannot open access_log %s: %s\n", cfg->settings.access_log, strerror(errno));
        return 1;
    }
    /* the files SIGUSR1 opens again: fixed at start, like the descriptors */
    g.alog_fd = alog;
    g.alog_path = alog > STDERR_FILENO ? strdup(cfg->settings.access_log) : NULL;
    g.elog_path = cfg->settings.error_log ? strdup(cfg->settings.error_log) : NULL;
    int *fds = calloc((size_t)g.nworkers * (cfg->nlistens ? cfg->nlistens : 1), sizeof(int));
    g.workers = calloc((size_t)g.nworkers, sizeof(*g.workers));
    if (!fds || !g.workers || open_listeners(cfg, g.nworkers, fds) != 0)
        return 1;

    /* Workers inherit a mask without the stop and reload signals: only the
     * main thread's loop receives them. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    for (int i = 0; i < g.nworkers; i++) {
        if (mp_worker_init(&g.workers[i], i, cfg->settings.max_header_size, cfg->settings.body_buffer_size,
                           fds + (size_t)i * cfg->nlistens, cfg->nlistens) != 0) {
            fprintf(stderr, "moonproxy: out of memory\n");
            return 1;
        }
        g.workers[i].io.alog.fd = alog;
    }
    /* Every worker gets its own VM and configuration: generation 1. */
    if (!(g.rl = mp_reloader_new(o.path, g.workers, g.nworkers, check_guards, NULL, err, sizeof(err)))) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    struct ev_loop *loop = ev_default_loop(EVFLAG_AUTO | EVFLAG_SIGNALFD);
    mp_reloader_start(g.rl, loop);
    if (!(g.probes = mp_probes_new(loop))) {
        fprintf(stderr, "moonproxy: out of memory\n");
        return 1;
    }
    if (!(g.names = mp_resolve_watch_new(loop, on_names_changed, NULL))) {
        fprintf(stderr, "moonproxy: out of memory\n");
        return 1;
    }
    on_config(NULL, mp_reloader_config(g.rl));
    mp_reloader_on_config(g.rl, on_config, NULL);
    if (cfg->admin && !(g.admin = mp_admin_start(loop, cfg->admin, g.rl, &g.ready, &g.stuck, err, sizeof(err)))) {
        fprintf(stderr, "moonproxy: %s\n", err);
        return 1;
    }
    for (int i = 0; i < g.nworkers; i++) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker_main, &g.workers[i]) != 0) {
            fprintf(stderr, "moonproxy: cannot start worker threads\n");
            return 1;
        }
        g.workers[i].thread = t;
    }
    g.ready = 1;
    double budget = mp_reloader_config(g.rl)->settings.hook_timeout;
    ev_timer_init(&g.watchdog, on_watchdog, budget / 4 < 0.25 ? budget / 4 : 0.25,
                  budget / 4 < 0.25 ? budget / 4 : 0.25);
    ev_timer_start(loop, &g.watchdog);
    mp_log_info("moonproxy %s started with %d worker%s (%s)", MP_VERSION, g.nworkers, g.nworkers == 1 ? "" : "s",
                o.path);
    /* the listeners were bound and listening before the workers started: connections are accepted now */
    sd_notifyf(0, "READY=1\nMAINPID=%lu\nSTATUS=serving generation 1 with %d worker%s", (unsigned long)getpid(),
               g.nworkers, g.nworkers == 1 ? "" : "s");

    ev_signal_init(&g.sigterm, on_stop_signal, SIGTERM);
    ev_signal_init(&g.sigint, on_stop_signal, SIGINT);
    ev_signal_init(&g.sighup, on_hup, SIGHUP);
    ev_signal_start(loop, &g.sigterm);
    ev_signal_start(loop, &g.sigint);
    ev_signal_start(loop, &g.sighup);
    ev_signal_init(&g.sigusr1, on_usr1, SIGUSR1);
    ev_signal_start(loop, &g.sigusr1);
    ev_run(loop, 0);

    if (atomic_load(&workers_done) != g.nworkers)
        _exit(0); /* shutdown_timeout: the remaining connections end with the process */
    for (int i = 0; i < g.nworkers; i++) {
        mp_worker_join(&g.workers[i]);
        mp_worker_dispose(&g.workers[i]);
    }
    mp_log_info("stopped");
    mp_probes_free(g.probes);
    mp_resolve_watch_free(g.names);
    mp_reloader_free(g.rl);
    mp_admin_free(g.admin);
    mp_health_close_all();
    free(g.workers);
    free(fds);
    mp_config_free(cfg);
    mp_vm_close(L);
    return 0;
}

static void *worker_main(void *arg)
{
    mp_worker_t *w = arg;
    mp_worker_run(w);
    atomic_fetch_add(&workers_done, 1);
    return NULL;
}
