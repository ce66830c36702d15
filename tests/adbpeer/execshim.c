/*
 * adbpeer exec shim: run aarch64 ELF programs under qemu-aarch64-static.
 *
 * Loaded with LD_PRELOAD into every process the peer's shell starts.  It
 * interposes the exec family and posix_spawn{,p}: when the program to run is
 * a 64-bit aarch64 ELF, the call runs
 *     QEMU -0 ARGV0 [-cpu CPU] [-L PREFIX] PATH ARGV1...
 * instead, so `./bin/llama-bench -p 8` in `adb shell` behaves as on a phone
 * without binfmt_misc.  Everything else goes to the real call unchanged.
 *
 * Configuration is read once at load time (so a program that clears its
 * environment before exec, like `env -i`, still gets it):
 *     ADBPEER_QEMU      path of qemu-aarch64-static (required to do anything)
 *     ADBPEER_QEMU_CPU  optional -cpu model (e.g. cortex-a53)
 *     ADBPEER_QEMU_LD_PREFIX  optional -L prefix, used for dynamic binaries
 *
 * The code may run in a vfork() child (Python's subprocess uses vfork), so
 * it allocates nothing on the heap: fixed static buffers and the stack.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <elf.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

extern char **environ;

static char qemu_path[PATH_MAX];
static char qemu_cpu[128];
static char qemu_prefix[PATH_MAX];

typedef int (*spawn_fn)(pid_t *, const char *, const posix_spawn_file_actions_t *,
                        const posix_spawnattr_t *, char *const[], char *const[]);
static spawn_fn real_posix_spawn;
static spawn_fn real_posix_spawnp;

static void copy_env(const char *name, char *dst, size_t size) {
    const char *v = getenv(name);
    if (v && strlen(v) < size) strcpy(dst, v);
}

__attribute__((constructor)) static void shim_init(void) {
    copy_env("ADBPEER_QEMU", qemu_path, sizeof qemu_path);
    copy_env("ADBPEER_QEMU_CPU", qemu_cpu, sizeof qemu_cpu);
    copy_env("ADBPEER_QEMU_LD_PREFIX", qemu_prefix, sizeof qemu_prefix);
    real_posix_spawn = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawn");
    real_posix_spawnp = (spawn_fn)dlsym(RTLD_NEXT, "posix_spawnp");
}

static int raw_execve(const char *path, char *const argv[], char *const envp[]) {
    return (int)syscall(SYS_execve, path, argv, envp);
}

/* 0: not aarch64; 1: static aarch64; 2: dynamic aarch64 (has PT_INTERP). */
static int aarch64_kind(const char *path) {
    if (!qemu_path[0] || !path) return 0;
    int saved = errno;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int kind = 0;
    Elf64_Ehdr eh;
    if (fd < 0) goto out;
    if (pread(fd, &eh, sizeof eh, 0) != (ssize_t)sizeof eh) goto out;
    if (memcmp(eh.e_ident, ELFMAG, SELFMAG) != 0 || eh.e_ident[EI_CLASS] != ELFCLASS64 ||
        eh.e_ident[EI_DATA] != ELFDATA2LSB || eh.e_machine != EM_AARCH64)
        goto out;
    kind = 1;
    for (int i = 0; i < eh.e_phnum && i < 256; i++) {
        Elf64_Phdr ph;
        off_t at = (off_t)eh.e_phoff + (off_t)i * eh.e_phentsize;
        if (pread(fd, &ph, sizeof ph, at) != (ssize_t)sizeof ph) break;
        if (ph.p_type == PT_INTERP) { kind = 2; break; }
    }
out:
    if (fd >= 0) close(fd);
    errno = saved;
    return kind;
}

static size_t count_args(char *const argv[]) {
    size_t n = 0;
    while (argv && argv[n]) n++;
    return n;
}

/* Fill out[] (room for count_args(argv) + 10) with the qemu command line. */
static void qemu_argv(const char *path, char *const argv[], int kind, char **out) {
    size_t k = 0, n = count_args(argv);
    out[k++] = qemu_path;
    out[k++] = "-0";
    out[k++] = (char *)(n ? argv[0] : path);
    if (qemu_cpu[0]) { out[k++] = "-cpu"; out[k++] = qemu_cpu; }
    if (kind == 2 && qemu_prefix[0]) { out[k++] = "-L"; out[k++] = qemu_prefix; }
    out[k++] = (char *)path;
    for (size_t i = 1; i < n; i++) out[k++] = argv[i];
    out[k] = NULL;
}

int execve(const char *path, char *const argv[], char *const envp[]) {
    int kind = (access(path, X_OK) == 0) ? aarch64_kind(path) : 0;
    if (!kind) return raw_execve(path, argv, envp);
    char *args[count_args(argv) + 10];
    qemu_argv(path, argv, kind, args);
    return raw_execve(qemu_path, args, envp);
}

int execv(const char *path, char *const argv[]) {
    return execve(path, argv, environ);
}

/* PATH search as glibc's execvpe does it, through our execve. */
int execvpe(const char *file, char *const argv[], char *const envp[]) {
    if (!file || !*file) { errno = ENOENT; return -1; }
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        if (errno == ENOEXEC) {
            size_t n = count_args(argv);
            char *sh_args[n + 3];
            sh_args[0] = "/bin/sh";
            sh_args[1] = (char *)file;
            for (size_t i = 1; i <= n; i++) sh_args[i + 1] = i < n ? argv[i] : NULL;
            if (n == 0) sh_args[2] = NULL;
            raw_execve("/bin/sh", sh_args, envp);
            errno = ENOEXEC;
        }
        return -1;
    }
    const char *path = getenv("PATH");
    if (!path) path = "/bin:/usr/bin";
    size_t flen = strlen(file);
    int got_eacces = 0;
    const char *p = path;
    for (;;) {
        const char *end = strchrnul(p, ':');
        size_t dlen = (size_t)(end - p);
        char candidate[PATH_MAX];
        if (dlen + flen + 2 <= sizeof candidate) {
            if (dlen == 0) {
                memcpy(candidate, file, flen + 1);
            } else {
                memcpy(candidate, p, dlen);
                candidate[dlen] = '/';
                memcpy(candidate + dlen + 1, file, flen + 1);
            }
            execve(candidate, argv, envp);
            if (errno == ENOEXEC) {
                size_t n = count_args(argv);
                char *sh_args[n + 3];
                sh_args[0] = "/bin/sh";
                sh_args[1] = candidate;
                for (size_t i = 1; i <= n; i++) sh_args[i + 1] = i < n ? argv[i] : NULL;
                if (n == 0) sh_args[2] = NULL;
                raw_execve("/bin/sh", sh_args, envp);
                return -1;
            }
            if (errno == EACCES) got_eacces = 1;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ESTALE && errno != ENODEV &&
                     errno != ETIMEDOUT)
                return -1;
        }
        if (!*end) break;
        p = end + 1;
    }
    errno = got_eacces ? EACCES : ENOENT;
    return -1;
}

int execvp(const char *file, char *const argv[]) {
    return execvpe(file, argv, environ);
}

#define COLLECT_VARARGS(first, ap, args)                         \
    size_t n_ = 1;                                               \
    {                                                            \
        va_list c_;                                              \
        va_copy(c_, ap);                                         \
        while (va_arg(c_, char *)) n_++;                         \
        va_end(c_);                                              \
    }                                                            \
    char *args[n_ + 1];                                          \
    args[0] = (char *)(first);                                   \
    for (size_t i_ = 1; i_ <= n_; i_++) args[i_] = va_arg(ap, char *);

int execl(const char *path, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    COLLECT_VARARGS(arg, ap, args);
    va_end(ap);
    return execve(path, args, environ);
}

int execlp(const char *file, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    COLLECT_VARARGS(arg, ap, args);
    va_end(ap);
    return execvpe(file, args, environ);
}

int execle(const char *path, const char *arg, ...) {
    va_list ap;
    va_start(ap, arg);
    COLLECT_VARARGS(arg, ap, args);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, args, envp);
}

int posix_spawn(pid_t *pid, const char *path, const posix_spawn_file_actions_t *fa,
                const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    int kind = (access(path, X_OK) == 0) ? aarch64_kind(path) : 0;
    if (!kind) return real_posix_spawn(pid, path, fa, attr, argv, envp);
    char *args[count_args(argv) + 10];
    qemu_argv(path, argv, kind, args);
    return real_posix_spawn(pid, qemu_path, fa, attr, args, envp);
}

int posix_spawnp(pid_t *pid, const char *file, const posix_spawn_file_actions_t *fa,
                 const posix_spawnattr_t *attr, char *const argv[], char *const envp[]) {
    if (file && !strchr(file, '/')) {
        const char *path = getenv("PATH");
        if (!path) path = "/bin:/usr/bin";
        size_t flen = strlen(file);
        const char *p = path;
        for (;;) {
            const char *end = strchrnul(p, ':');
            size_t dlen = (size_t)(end - p);
            char candidate[PATH_MAX];
            if (dlen && dlen + flen + 2 <= sizeof candidate) {
                memcpy(candidate, p, dlen);
                candidate[dlen] = '/';
                memcpy(candidate + dlen + 1, file, flen + 1);
                if (access(candidate, X_OK) == 0) {
                    if (aarch64_kind(candidate)) return posix_spawn(pid, candidate, fa, attr, argv, envp);
                    break;
                }
            }
            if (!*end) break;
            p = end + 1;
        }
    } else if (file && aarch64_kind(file)) {
        return posix_spawn(pid, file, fa, attr, argv, envp);
    }
    return real_posix_spawnp(pid, file, fa, attr, argv, envp);
}
