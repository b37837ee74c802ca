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
// the last answer), so calls small enough to run on one thread never pay it. Where there is no
// recent window to look back on (the first parallel call of the process, or the first after
// more than kStaleWindows windows without one), the tasks runnable at that moment
// (procs_running, this thread one of them; the affinity set's share of them when it holds
// fewer than all CPUs) stand in for the load: a window averaged over an
// idle spell said nothing of the neighbour that started just before the call. The affinity set
// is read again at each sample, and a call never gets more threads than it holds CPUs.
//
// Linux only; elsewhere, or with BATCHNORM_ADAPTIVE_THREADS=0 in the environment, every CPU
// counts as free and the count asked for is the count run.
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
// A window longer than this many kLoadWindowMs looks back over an idle spell: stale.
constexpr std::int64_t kStaleWindows = 3;

class CpuLoad {
public:
    // Threads to run when `wanted` are asked for: wanted, or fewer when this process may use
    // fewer CPUs or other processes kept some of them busy during the last window (at least 1).
    int threads(int wanted) {
        if (wanted <= 1 || !enabled_.load(std::memory_order_relaxed)) return wanted;
        sample();
        const int free_cpus = free_.load(std::memory_order_relaxed);
        return std::max(1, std::min(wanted, free_cpus));
    }

    static CpuLoad& instance() {
        static CpuLoad one(adaptive_by_environment());
        return one;
    }

    // A check of its own (tests); adaptive false: every CPU counts as free.
    explicit CpuLoad(bool adaptive) {
#if defined(__linux__)
        if (!adaptive) return;
        const long hz = sysconf(_SC_CLK_TCK);
        if (hz <= 0 || sched_getaffinity(0, sizeof allowed_, &allowed_) != 0) return;
        allowed_count_ = std::max(1, CPU_COUNT(&allowed_));
        jiffy_ns_ = 1e9 / double(hz);
        enabled_.store(true);  // one allowed CPU too: a count above 1 is then run on 1
#else
        (void)adaptive;
#endif
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

    struct Stat {
        std::int64_t busy = -1;  // busy jiffies of the allowed CPUs; -1: unreadable
        int running = 1;         // tasks runnable now on any CPU, this thread one of them
        int cpus = 0;            // CPUs listed (online)
    };

    static std::int64_t clock_ns(clockid_t id) {
        timespec t{};
        clock_gettime(id, &t);
        return std::int64_t(t.tv_sec) * 1000000000 + t.tv_nsec;
    }

    // Busy jiffies (all but idle and iowait) summed over the allowed CPUs, and procs_running.
    Stat read_stat() const {
        Stat stat;
        std::FILE* f = std::fopen("/proc/stat", "r");
        if (!f) return stat;
        char line[512];
        std::int64_t busy = 0;
        bool any = false;
        while (std::fgets(line, sizeof line, f)) {
            if (std::strncmp(line, "procs_running ", 14) == 0) {
                stat.running = int(std::max(1L, std::strtol(line + 14, nullptr, 10)));
                break;  // after the cpu lines, and nothing after it is wanted
            }
            if (std::strncmp(line, "cpu", 3) != 0) continue;
            if (line[3] < '0' || line[3] > '9') continue;  // the all-CPU summary line
            char* p = line + 3;
            const long cpu = std::strtol(p, &p, 10);
            ++stat.cpus;
            if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(int(cpu), &allowed_)) continue;
            std::int64_t field[10] = {};
            for (int i = 0; i < 10; ++i) field[i] = std::strtoll(p, &p, 10);
            // user nice system idle iowait irq softirq steal (guest is inside user)
            busy += field[0] + field[1] + field[2] + field[5] + field[6] + field[7];
            any = true;
        }
        std::fclose(f);
        if (any) stat.busy = busy;
        return stat;
    }

    void sample() {
        const std::int64_t now = clock_ns(CLOCK_MONOTONIC);
        const std::int64_t last = last_ns_.load(std::memory_order_relaxed);
        if (now - last < kLoadWindowMs * 1000000) return;
        std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
        if (!lock.owns_lock() || last != last_ns_.load(std::memory_order_relaxed)) return;
        cpu_set_t allowed{};  // taskset / sched_setaffinity may have changed the set since
        const bool same_set = sched_getaffinity(0, sizeof allowed, &allowed) != 0 || CPU_EQUAL(&allowed, &allowed_);
        if (!same_set) {
            allowed_ = allowed;
            allowed_count_ = std::max(1, CPU_COUNT(&allowed_));
        }
        const Stat stat = read_stat();
        const std::int64_t self = clock_ns(CLOCK_PROCESS_CPUTIME_ID);
        if (stat.busy < 0) {
            enabled_.store(false);
            return;
        }
        double others;  // the CPUs of this set other tasks keep busy
        if (last == 0 || !same_set || now - last > kStaleWindows * kLoadWindowMs * 1000000) {
            // No recent window over this set: who runs now, on any CPU; this set's share of
            // them where it holds fewer than all (a cpuset of a large busy host).
            others = double(stat.running - 1) * double(allowed_count_) / double(std::max(allowed_count_, stat.cpus));
        } else {
            const double window = double(now - last);
            others = (double(stat.busy - last_busy_) * jiffy_ns_ - double(self - last_self_ns_)) / window;
        }
        // A CPU counts as free unless others kept it busy more than a quarter of the time.
        const int free_cpus = allowed_count_ - int(std::max(0.0, others) + 0.75);
        free_.store(std::max(1, free_cpus), std::memory_order_relaxed);
        last_ns_.store(now, std::memory_order_relaxed);
        last_busy_ = stat.busy;
        last_self_ns_ = self;
    }

#else
    void sample() {}
#endif

    static bool adaptive_by_environment() {
        const char* env = std::getenv("BATCHNORM_ADAPTIVE_THREADS");
        return !(env && std::strcmp(env, "0") == 0);
    }
};

}  // namespace batchnorm::detail
