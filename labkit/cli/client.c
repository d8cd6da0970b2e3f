/* The `labkit` command, compiled: labkit/cli/client.py in C, and nothing more.
 *
 * Every container command starts with the client, so its start is on the clock of
 * every `labkit run`. CPython needs about 6 ms before it runs the first line of
 * client.py; this program is running after a fraction of one. That is why the docker CLI
 * is a compiled program too, and why provisioning installs this one as
 * /usr/local/bin/labkit (labkit/cli/compiled.py builds it).
 *
 * It does what client.py does, step for step, and client.py's docstring explains why:
 *   1. decide whether labkitd should run the command: a command it serves, not
 *      LABKIT_NO_DAEMON, root, and not an interactive command at a terminal;
 *   2. connect to labkitd's socket and send the request (labkit/engine/protocol.py):
 *      "LKD1", the body's length (4 bytes, little-endian), then cwd, argc, the
 *      arguments and KEY=VALUE for each environment variable, NUL-separated; fds 0, 1
 *      and 2 travel along as SCM_RIGHTS (unix(7));
 *   3. read the answer lines: "pid N" (Ctrl-C and friends go on to that worker from
 *      then on), "exit N" (our exit code), or "fallback WHY".
 * Where labkitd does not run the command (no daemon, or any reason in step 1, or a
 * "fallback"), this process becomes the Python command instead, with execv(2): Python
 * runs it here, as `python -m labkit` would, without asking labkitd a second time.
 *
 * Built with -DLABKIT_PYTHON="/path/to/python" and -DLABKIT_CODE="python code", the
 * code that runs the command in-process (compiled.py writes both).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef LABKIT_PYTHON
#error "build with -DLABKIT_PYTHON=... (labkit/cli/compiled.py)"
#endif
#ifndef LABKIT_CODE
#error "build with -DLABKIT_CODE=... (labkit/cli/compiled.py)"
#endif

#define EXIT_DAEMON 125 /* protocol.EXIT_DAEMON: the daemon, not the container, failed */
#define GONE (-2)       /* in place of a pidfd: the worker ended before we could open one */

extern char **environ;

/* client.SERVED: the commands labkitd runs (a test checks that both lists agree) */
static const char *const SERVED[] = {
    "run", "ps", "exec", "logs", "stop", "kill", "rm", "pause", "unpause", "stats",
    "inspect", "images", "runtime", "port", "network", "checkpoint", "restore", "top",
    "pull", "push", "load", "save", "tag", "build", "history", "rmi", "image", "commit",
    NULL,
};

static pid_t worker = 0; /* labkitd's worker, once it said "pid N" */

/* -i, -t, --interactive, --tty, or a cluster of short flags with one (-it, -dit); as in
 * client.py, a word of the container's command (`ls -t`) counts too */
static int interactive(const char *arg) {
    if (!strcmp(arg, "--interactive") || !strcmp(arg, "--tty"))
        return 1;
    if (arg[0] != '-' || arg[1] == '\0')
        return 0;
    int letter = 0;
    for (const char *c = arg + 1; *c; c++) {
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z')))
            return 0;
        letter |= (*c == 'i' || *c == 't');
    }
    return letter;
}

static int served(int argc, char **argv) {
    if (argc < 2)
        return 0;
    int known = 0;
    for (const char *const *s = SERVED; *s; s++)
        known |= !strcmp(argv[1], *s);
    const char *off = getenv("LABKIT_NO_DAEMON");
    if (!known || (off && *off) || geteuid() != 0)
        return 0; /* labkitd serves root only: rootless commands run here */
    if (isatty(0)) {
        if (!strcmp(argv[1], "runtime"))
            return 0;
        for (int i = 2; i < argc; i++)
            if (interactive(argv[i]))
                return 0;
    }
    return 1;
}

/* The request: magic, length, then the NUL-separated fields (protocol.encode_request) */
static char *request(int argc, char **argv, size_t *size) {
    char cwd[4096], count[16];
    if (!getcwd(cwd, sizeof cwd))
        return NULL; /* no working directory: run here, where Python says why */
    snprintf(count, sizeof count, "%d", argc - 1);
    size_t body = strlen(cwd) + 1 + strlen(count);
    for (int i = 1; i < argc; i++)
        body += 1 + strlen(argv[i]);
    for (char **e = environ; *e; e++)
        if (strchr(*e, '='))
            body += 1 + strlen(*e);
    char *buf = malloc(8 + body + 1);
    if (!buf)
        return NULL;
    char *at = buf + 8;
    memcpy(buf, "LKD1", 4);
    for (int i = 0; i < 4; i++)
        buf[4 + i] = (char)((body >> (8 * i)) & 0xff);
    at = stpcpy(at, cwd) + 1;
    at = stpcpy(at, count);
    for (int i = 1; i < argc; i++)
        at = stpcpy(at + 1, argv[i]);
    for (char **e = environ; *e; e++)
        if (strchr(*e, '='))
            at = stpcpy(at + 1, *e);
    *size = 8 + body;
    return buf;
}

static void forward(int sig) {
    if (worker > 0)
        kill(worker, sig);
}

static void forward_signals(void) {
    struct sigaction sa = {0};
    sa.sa_handler = forward;
    sa.sa_flags = SA_RESTART;
    sigemptyset(&sa.sa_mask);
    int signals[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
    for (size_t i = 0; i < sizeof signals / sizeof *signals; i++)
        sigaction(signals[i], &sa, NULL);
}

/* The next bytes from labkitd; 0 once the worker is gone without a word. The socket alone
 * would not say so: the container's shim, forked by the worker, holds it too. */
static ssize_t receive(int conn, int pidfd, char *buf, size_t room) {
    if (pidfd == GONE) {
        fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) | O_NONBLOCK);
    } else if (pidfd >= 0) {
        struct pollfd fds[2] = {{conn, POLLIN, 0}, {pidfd, POLLIN, 0}};
        while (poll(fds, 2, -1) < 0)
            if (errno != EINTR)
                return 0;
        if (!(fds[0].revents & (POLLIN | POLLHUP | POLLERR)))
            fcntl(conn, F_SETFL, fcntl(conn, F_GETFL) | O_NONBLOCK); /* it ended */
    }
    ssize_t n;
    while ((n = recv(conn, buf, room, 0)) < 0 && errno == EINTR)
        ;
    return n < 0 ? 0 : n;
}

/* labkitd's lines: "pid N" first, then "exit N" (or "fallback WHY"). 1 with the exit code
 * in *code, or 0 for a fallback */
static int answer(int conn, int *code) {
    char buffered[1024];
    size_t have = 0;
    int pidfd = -1;
    for (;;) {
        ssize_t n = have < sizeof buffered - 1 ? receive(conn, pidfd, buffered + have, sizeof buffered - 1 - have) : 0;
        if (n <= 0 && worker == 0)
            return 0; /* closed before any worker took the command: nothing ran, run it here
                       * (a labkitd killed a moment ago leaves a spare that accepts, then dies) */
        if (n <= 0) {
            static const char gone[] = "labkit: labkitd went away before the command finished "
                                       "(hint: see labkitd.log next to its socket)\n";
            if (write(2, gone, sizeof gone - 1) < 0) { /* nothing more to be done */ }
            *code = EXIT_DAEMON;
            return 1;
        }
        have += (size_t)n;
        buffered[have] = '\0';
        char *line = buffered, *end;
        while ((end = strchr(line, '\n'))) {
            *end = '\0';
            if (!strncmp(line, "pid ", 4)) {
                worker = (pid_t)atoi(line + 4);
                forward_signals();
                pidfd = (int)syscall(SYS_pidfd_open, worker, 0);
                if (pidfd < 0)
                    pidfd = errno == ESRCH ? GONE : -1; /* gone already; or no pidfds: block */
            } else if (!strncmp(line, "exit ", 5)) {
                *code = atoi(line + 5);
                return 1;
            } else if (!strncmp(line, "fallback", 8)) {
                return 0;
            }
            line = end + 1;
        }
        have -= (size_t)(line - buffered);
        memmove(buffered, line, have);
    }
}

static void interrupted(int sig) {
    (void)sig;
    _exit(130); /* Ctrl-C before the worker was known, as client.py's KeyboardInterrupt */
}

/* Run the command in labkitd: 1 with its exit code in *code, or 0 to run it here */
static int via_daemon(int argc, char **argv, int *code) {
    const char *root = getenv("LABKIT_ROOT");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    int fit = root && *root ? snprintf(addr.sun_path, sizeof addr.sun_path, "%s/run/labkitd.sock", root)
                            : snprintf(addr.sun_path, sizeof addr.sun_path, "/run/labkit/labkitd.sock");
    if (fit < 0 || (size_t)fit >= sizeof addr.sun_path)
        return 0;
    size_t size;
    char *req = request(argc, argv, &size);
    if (!req)
        return 0;
    int conn = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (conn < 0 || connect(conn, (struct sockaddr *)&addr, sizeof addr) < 0)
        return 0; /* no daemon: no socket, or nobody listening */
    struct sigaction sa = {0};
    sa.sa_handler = interrupted;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
    int fds[3] = {0, 1, 2};
    char control[CMSG_SPACE(sizeof fds)] = {0};
    struct iovec iov = {req, size};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
                         .msg_controllen = sizeof control};
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    cmsg->cmsg_level = SOL_SOCKET;
    cmsg->cmsg_type = SCM_RIGHTS;
    cmsg->cmsg_len = CMSG_LEN(sizeof fds);
    memcpy(CMSG_DATA(cmsg), fds, sizeof fds);
    ssize_t sent = sendmsg(conn, &msg, MSG_NOSIGNAL);
    if (sent < 0) {
        close(conn);
        signal(SIGINT, SIG_DFL);
        return 0; /* a closed fd 0-2 */
    }
    /* the rest of a large environment; an error here is labkitd declining or gone, which
     * answer() tells apart */
    for (ssize_t n; (size_t)sent < size; sent += n)
        if ((n = send(conn, req + sent, size - (size_t)sent, MSG_NOSIGNAL)) <= 0)
            break;
    int done = answer(conn, code);
    close(conn);
    signal(SIGINT, SIG_DFL); /* (a fallback: Python takes Ctrl-C from here) */
    return done;
}

int main(int argc, char **argv) {
    int code;
    if (served(argc, argv) && via_daemon(argc, argv, &code))
        return code & 0xff;
    /* Python runs the command here: -S as the Python launcher, -P keeps the working
     * directory off sys.path; the code finds labkit and skips the daemon */
    char **args = calloc((size_t)argc + 5, sizeof *args);
    if (!args)
        return 1;
    args[0] = LABKIT_PYTHON;
    args[1] = "-S";
    args[2] = "-P";
    args[3] = "-c";
    args[4] = LABKIT_CODE;
    for (int i = 1; i < argc; i++)
        args[4 + i] = argv[i];
    execv(LABKIT_PYTHON, args);
    fprintf(stderr, "labkit: cannot run %s: %s (hint: run vagrant/provision.sh again)\n", LABKIT_PYTHON,
            strerror(errno));
    return 127;
}
