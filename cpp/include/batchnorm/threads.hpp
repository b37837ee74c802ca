// Thread control. OpenMP is optional at compile time: without it everything runs serially.
//
// The thread count is batchnorm's own, one setting for the whole process (an atomic, not
// OpenMP's per-thread ICV): set from any thread, seen by calls from every thread, and left
// alone by other libraries that share the OpenMP runtime (torch.set_num_threads calls
// omp_set_num_threads on the same libgomp). Every parallel region names its team size.
//
// Fork. GNU libgomp's thread pool does not survive fork(): a child that enters a parallel
// region of the parent's pool waits forever for threads that do not exist. A pthread_atfork
// child handler, registered when this header's settings are first used (at the latest when the
// library is loaded), marks a forked child, and from then on that process runs every call on
// one thread (what PyTorch does in DataLoader workers). A fresh process (spawn, exec) is not
// forked: it has its full count.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <numeric>
#include <string>
#include <thread>
#include <utility>

#include "cpu_load.hpp"
#include "dtype.hpp"
#include "errors.hpp"

#if defined(_OPENMP)
#include <omp.h>
// OpenMP directives that vanish, without an unknown-pragma warning, when OpenMP is off.
#define BATCHNORM_PRAGMA(text) _Pragma(#text)
#define BATCHNORM_OMP(directive) BATCHNORM_PRAGMA(omp directive)
#else
#define BATCHNORM_OMP(directive)
#endif

#if defined(_OPENMP) && defined(__unix__)
#include <pthread.h>
#include <sched.h>
#endif

namespace batchnorm {

// Whether this build can run in parallel (compiled with OpenMP). Without it, calls are serial
// and get_num_threads() is 1 whatever set_num_threads() was given.
constexpr bool openmp_enabled() {
#if defined(_OPENMP)
    return true;
#else
    return false;
#endif
}

namespace detail {

// The default count: the first value of OMP_NUM_THREADS when it is a positive number (it may
// be a list, one value per nesting level; blanks around a value are allowed, as libgomp allows
// them), else the CPUs this process may run on.
inline int default_num_threads() {
    if (const char* env = std::getenv("OMP_NUM_THREADS")) {
        char* end = nullptr;
        const long n = std::strtol(env, &end, 10);
        while (end && (*end == ' ' || *end == '\t')) ++end;
        if (end != env && n >= 1 && (*end == '\0' || *end == ',')) return int(std::min(n, 1L << 20));
    }
#if defined(_OPENMP) && defined(__linux__)
    cpu_set_t cpus;
    if (sched_getaffinity(0, sizeof(cpus), &cpus) == 0 && CPU_COUNT(&cpus) > 0) return CPU_COUNT(&cpus);
#endif
    return int(std::max(1u, std::thread::hardware_concurrency()));
}

struct ThreadSettings {
    std::atomic<int> count{default_num_threads()};
    std::atomic<bool> forked_child{false};

    ThreadSettings() {
#if defined(_OPENMP) && defined(__unix__)
        pthread_atfork(nullptr, nullptr, [] { settings().forked_child.store(true); });
#endif
    }
    static ThreadSettings& settings() {
        static ThreadSettings one;  // thread-safe first use; the handler is registered once
        return one;
    }
};

// Loading a program or module that includes this header registers the fork handler, so a
// fork before the first call is handled too.
inline const bool fork_handler_registered = (ThreadSettings::settings(), true);

}  // namespace detail

// Threads a large call may use: the process-wide count; 1 in a forked child, or without OpenMP.
inline int get_num_threads() {
#if defined(_OPENMP)
    const detail::ThreadSettings& s = detail::ThreadSettings::settings();
    return s.forked_child.load(std::memory_order_relaxed) ? 1 : s.count.load(std::memory_order_relaxed);
#else
    return 1;
#endif
}

// Sets the threads for later calls from every thread of the process.
inline void set_num_threads(int n) {
    detail::require(n >= 1, "set_num_threads: n must be at least 1, got ", n);
    detail::ThreadSettings::settings().count.store(n, std::memory_order_relaxed);
}

namespace detail {

// Below this many bytes moved (inputs read plus outputs written), a call runs on one thread.
// A team that has gone to sleep between calls takes tens of microseconds to wake, about what
// one thread needs to move 2 MiB; smaller calls lost time on two threads (measured: (8,512,7,7)
// eval, 0.8 MiB in, took twice as long on two threads as on one in bench runs).
constexpr std::int64_t kMinParallelBytes = std::int64_t(2) << 20;

// What a fused operation's bytes for threads_for count, in arrays of the input's size: every
// pass, the second read of a block from cache too (it takes time all the same). Statistics
// with normalize read x twice and write y; backward reads x and dy twice and writes grad_x.
// Backward counted one read of each (3) until then, and (32,64,8,8) batch norm and
// (2,320,16,16) group norm float32 backward, 0.5 and 0.6 MiB an array, stayed on one thread
// with two set; on two: 34-38 -> 24-30 us and 46-50 -> 25 us (Intel Xeon, C++, back-to-back).
constexpr std::int64_t kNormalizeArrays = 3, kBackwardArrays = 5;

// The bytes threads_for counts for `passes` passes over `values` values of storage type T. A
// half-precision value counts as the float32 it is widened to in registers: near
// kMinParallelBytes the data sits in cache and the work per value, not its bytes, sets the time.
// Counted at their own size, bfloat16 calls of half float32's bytes stayed on one thread where
// float32 went on two, and took 1.6x (eval of 256x1024) to 2.1x (training of 8x512x7x7) its time.
template <class T>
constexpr std::int64_t parallel_bytes(std::int64_t passes, std::int64_t values) {
    return passes * values * std::int64_t(sizeof(compute_t<T>));
}

// Threads for a call that moves `bytes` over `max_items` independent items: the set count,
// no more than the items, and no more than the CPUs other processes left free (cpu_load.hpp).
inline int threads_for(std::int64_t bytes, std::int64_t max_items) {
    if (bytes < kMinParallelBytes) return 1;
    const int wanted = int(std::max<std::int64_t>(1, std::min<std::int64_t>(get_num_threads(), max_items)));
    return CpuLoad::instance().threads(wanted);
}

inline int thread_index() {
#if defined(_OPENMP)
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Threads in the current team (1 outside a parallel region).
inline int team_size() {
#if defined(_OPENMP)
    return omp_get_num_threads();
#else
    return 1;
#endif
}

// Runs body() on a team of `threads` threads, or directly on this one when one is asked for:
// entering an OpenMP region costs more than a small call's whole computation. Inside body,
// thread_index()/team_size() tell the share, and orphaned `omp for` loops split across the team
// (or run whole without one).
template <class Body>
void run_parallel(int threads, Body&& body) {
    if (threads <= 1) {
        body();
        return;
    }
    BATCHNORM_OMP(parallel num_threads(threads))
    body();
}

// The share [begin, end) of `count` items for this thread of the team.
inline std::pair<std::int64_t, std::int64_t> my_share(std::int64_t count) {
    const std::int64_t t = thread_index(), n = team_size();
    return {count * t / n, count * (t + 1) / n};
}

// How many parts to cut each channel into so that every thread gets the same number of
// (channel, part) items: 1 when the channels already share out evenly (or nearly: many of
// them), else threads / gcd(channels, threads), never parts smaller than min_part values.
inline std::int64_t channel_splits(std::int64_t channels, std::int64_t per_channel, int threads,
                                   std::int64_t min_part) {
    if (threads <= 1 || channels % threads == 0 || channels >= 8 * std::int64_t(threads)) return 1;
    const std::int64_t even = threads / std::gcd(channels, std::int64_t(threads));
    return std::max<std::int64_t>(1, std::min(even, per_channel / min_part));
}

}  // namespace detail
}  // namespace batchnorm
