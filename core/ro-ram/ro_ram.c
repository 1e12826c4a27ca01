/*
 * ro_ram.so: lets QEMU 7.2 restore a warm snapshot whose memory file it may read but not write.
 *
 * A restore maps the snapshot's memory file privately (memory-backend-file, share=off): guest
 * writes go to copy-on-write pages of the QEMU process and never reach the file. QEMU 7.2 still
 * opens the file O_RDWR, so a user who may only read a host-wide snapshot (built by the admin,
 * shared by every user of the host) gets "Permission denied". A private writable mapping only
 * needs read access, so this preload turns that one open into O_RDONLY: the open of the path
 * named by $SUPERMACHINE_RO_RAM, and only when it asks for O_RDWR without O_CREAT. Every other
 * open goes through untouched. (QEMU >= 8.2 says the same with readonly=on,rom=off.)
 *
 * The runtime (core/runtime/src/qemu.rs) preloads it into QEMU for every restore that maps a
 * memory file privately, so no restore holds a stored snapshot open for writing.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>

static int read_only_flags(const char *path, int flags)
{
    const char *ram = getenv("SUPERMACHINE_RO_RAM");
    if (ram != NULL && path != NULL && (flags & O_ACCMODE) == O_RDWR && !(flags & O_CREAT) &&
        strcmp(path, ram) == 0)
        return (flags & ~O_ACCMODE) | O_RDONLY;
    return flags;
}

/* What QEMU's fortified open(path, flags) calls. */
int __open64_2(const char *path, int flags)
{
    static int (*next)(const char *, int);
    if (next == NULL)
        next = (int (*)(const char *, int))dlsym(RTLD_NEXT, "__open64_2");
    return next(path, read_only_flags(path, flags));
}

int open64(const char *path, int flags, ...)
{
    static int (*next)(const char *, int, ...);
    mode_t mode = 0;
    if (flags & (O_CREAT | O_TMPFILE)) {
        va_list ap;
        va_start(ap, flags);
        mode = va_arg(ap, mode_t);
        va_end(ap);
    }
    if (next == NULL)
        next = (int (*)(const char *, int, ...))dlsym(RTLD_NEXT, "open64");
    return next(path, read_only_flags(path, flags), mode);
}

int open(const char *path, int flags, ...) __attribute__((alias("open64")));
