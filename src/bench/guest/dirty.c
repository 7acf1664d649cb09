/* The test and bench guest's memory writer (src/bench/guest.rs): `dirty MBPS MIB` rewrites a
 * working set of MIB MiB, page after page with fresh 64-bit words, at MBPS MB/s (paced on
 * the monotonic clock), until killed. Every 5 s it prints the rate it reached to stderr
 * ("dirty: N MB/s") so a test log shows what the guest really dirtied. Static, no libc
 * beyond the basics: built with the host's `gcc -static`. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: dirty MBPS MIB\n");
        return 2;
    }
    double rate = atof(argv[1]) * 1e6;
    size_t pages = (size_t)atol(argv[2]) * 256, page = 0;
    uint64_t *mem = malloc(pages * 4096), x = 0x9E3779B97F4A7C15ull;
    if (!mem || rate <= 0) {
        fprintf(stderr, "dirty: bad arguments or no memory\n");
        return 1;
    }
    double start = now(), report = start;
    uint64_t done = 0, reported = 0;
    for (;;) {
        double t = now(), due = (t - start) * rate;
        if (due - done > rate)
            done = due - rate; /* after a stall (throttle, pause) catch up at most 1 s */
        if (done < due) {
            uint64_t *p = mem + page * 512;
            for (int i = 0; i < 512; i++) {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                p[i] = x;
            }
            page = (page + 1) % pages;
            done += 4096;
            continue;
        }
        if (t - report >= 5) {
            fprintf(stderr, "dirty: %.1f MB/s\n", (done - reported) / (t - report) / 1e6);
            report = t;
            reported = done;
        }
        struct timespec s = {0, 2000000};
        nanosleep(&s, 0);
    }
}
