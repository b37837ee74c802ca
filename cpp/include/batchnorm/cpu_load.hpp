// CPUs that other processes keep busy. A team of OpenMP threads on a core that another
// process holds loses whole scheduler slices: the thread doing the work waits at the barrier
// for one that is not running, and a 2-thread call on a 2-core machine with one busy
// neighbour took 10-1000x as long as the same call on one thread. So before a parallel region
// the driver asks how many of the CPUs this process may use were free lately, and runs no more
// threads than that.
//
// "Free lately": over the last window of at least kLoadWindowMs, the CPU time that the CPUs of
// this process's affinity set spent busy (/proc/stat), less this process's own CPU time, is the
// others' load in CPUs; free = allowed - load. A sample costs a read of /proc/stat (tens of
// microseconds) and is taken at most once a window, by whichever call comes first (others use
// the last answer), so calls small enough to run on one thread never pay it.
//
// Linux only; elsewhere, or with BATCHNORM_ADAPTIVE_THREADS=0 in the environment, every CPU
// counts as free.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

#if defined(__linux__)
#include <sched.h>
#include <time.h>
#include <unistd.h>
#endif

namespace batchnorm::detail {

// /proc/stat counts in ticks of 10 ms: over 100 ms, the load of two CPUs is known to about a
// fifth of a CPU.
constexpr std::int64_t kLoadWindowMs = 100;

class CpuLoad {
public:
    // Threads to run when `wanted` are asked for: wanted, or fewer when other processes kept
    // CPUs of this process's set busy during the last window (at least 1).
    int threads(int wanted) {
        if (wanted <= 1 || !enabled_.load(std::memory_order_relaxed)) return wanted;
        sample();
        const int free_cpus = free_.load(std::memory_order_relaxed);
        return std::max(1, std::min(wanted, free_cpus));
    }

    static CpuLoad& instance() {
        static CpuLoad one;
        return one;
    }

private:
    std::atomic<int> free_{1 << 20};
    std::atomic<bool> enabled_{false};
#if defined(__linux__)
    std::mutex mutex_;
    std::atomic<std::int64_t> last_ns_{0};  // monotonic time of the last sample
    std::int64_t last_busy_ = 0;    // busy jiffies of the allowed CPUs
    std::int64_t last_self_ns_ = 0; // this process's CPU time
    cpu_set_t allowed_{};
    int allowed_count_ = 0;
    double jiffy_ns_ = 1e7;

    static std::int64_t clock_ns(clockid_t id) {
        timespec t{};
        clock_gettime(id, &t);
        return std::int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
    }

    // Busy jiffies (all but idle and iowait) summed over the allowed CPUs; -1 if unreadable.
    std::int64_t busy_jiffies() const {
        std::FILE* f = std::fopen("/proc/stat", "r");
        if (!f) return -1;
        char line[512];
        std::int64_t busy = 0;
        bool any = false;
        while (std::fgets(line, sizeof line, f)) {
            if (std::strncmp(line, "cpu", 3) != 0) break;  // the cpu lines come first
            if (line[3] < '0' || line[3] > '9') continue;  // the all-CPU summary line
            char* p = line + 3;
            const long cpu = std::strtol(p, &p, 10);
            if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(int(cpu), &allowed_)) continue;
            std::int64_t field[10] = {};
            for (int i = 0; i < 10; ++i) field[i] = std::strtoll(p, &p, 10);
            // user nice system idle iowait irq softirq steal (guest is inside user)
            busy += field[0] + field[1] + field[2] + field[5] + field[6] + field[7];
            any = true;
        }
        std::fclose(f);
        return any ? busy : -1;
    }

    void sample() {
        const std::int64_t now = clock_ns(CLOCK_MONOTONIC);
        const std::int64_t last = last_ns_.load(std::memory_order_relaxed);
        if (now - last < kLoadWindowMs * 1000000) return;
        std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
        if (!lock.owns_lock() || last != last_ns_.load(std::memory_order_relaxed)) return;
        const std::int64_t busy = busy_jiffies(), self = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
        if (busy < 0) {
            enabled_.store(false);
            return;
        }
        if (last != 0) {
            const double window = double(now - last);
            const double others = (double(busy - last_busy_) * jiffy_ns_ - double(self - last_self_ns_)) / window;
            // A CPU counts as free unless others kept it busy more than a quarter of the time.
            const int free_cpus = allowed_count_ - int(std::max(0.0, others) + 0.75);
            free_.store(std::max(1, free_cpus), std::memory_order_relaxed);
        }
        last_ns_.store(now, std::memory_order_relaxed);
        last_busy_ = busy;
        last_self_ns_ = self;
    }

    CpuLoad() {
        const char* env = std::getenv("BATCHNORM_ADAPTIVE_THREADS");
        if (env && std::strcmp(env, "0") == 0) return;
        const long hz = sysconf(_SC_CLK_TCK);
        if (hz <= 0 || sched_getaffinity(0, sizeof allowed_, &allowed_) != 0) return;
        allowed_count_ = CPU_COUNT(&allowed_);
        jiffy_ns_ = 1e9 / double(hz);
        enabled_.store(allowed_count_ > 1);
        if (allowed_count_ > 1) sample();  // the first window starts now
    }
#else
    void sample() {}
#endif
};

}  // namespace batchnorm::detail
