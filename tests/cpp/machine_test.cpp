// What the library reads from the machine: cache sizes (engine/cache.hpp) and the load of the
// CPUs it may use (cpu_load.hpp); and what it keeps of the machine's memory between calls
// (engine/call_scratch.hpp).
#include <gtest/gtest.h>

#include <sched.h>
#include <stdlib.h>  // mkstemp
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <string>
#include <thread>
#include <utility>

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/engine/cache.hpp>
#include <batchnorm/engine/call_scratch.hpp>

namespace {

std::string write_temp(const char* text) {
    char path[] = "/tmp/batchnorm_cache_XXXXXX";
    const int fd = mkstemp(path);
    if (fd < 0) return "/nonexistent/size";
    const std::string body(text);
    const bool written = write(fd, body.data(), body.size()) == ssize_t(body.size());
    close(fd);
    return written ? path : "/nonexistent/size";
}

TEST(CacheSizes, ParsesSysfsSizes) {
    for (const auto& [text, bytes] : {std::pair<const char*, std::int64_t>{"48K\n", 48 << 10},
                                      {"1024K\n", 1 << 20},
                                      {"32M\n", std::int64_t(32) << 20},
                                      {"4096\n", 4096},
                                      {"junk\n", 0}}) {
        const std::string path = write_temp(text);
        EXPECT_EQ(batchnorm::detail::read_cache_size(path), bytes) << text;
        std::remove(path.c_str());
    }
    EXPECT_EQ(batchnorm::detail::read_cache_size("/nonexistent/size"), 0);
}

TEST(CacheSizes, MachineSizesAreSane) {
    const auto& c = batchnorm::detail::cache_sizes();
    EXPECT_GE(c.l1d, 4 << 10);
    EXPECT_GE(c.l2, c.l1d);
}

TEST(CpuLoad, NeverMoreThanWantedNorFewerThanOne) {
    auto& load = batchnorm::detail::CpuLoad::instance();
    for (int wanted : {1, 2, 3, 64}) {
        const int got = load.threads(wanted);
        EXPECT_GE(got, 1);
        EXPECT_LE(got, wanted);
    }
}

#if defined(__linux__)
int allowed_cpus() {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : 0;
}

// The check's first answer comes from the tasks running at that moment (it once counted every
// CPU free for a whole window), and never exceeds the CPUs the process may use, also when it may
// use one (a count above 1 was then run as asked).
TEST(CpuLoad, FirstAnswerSeesABusyNeighbourAndTheAffinitySet) {
    const int cpus = allowed_cpus();
    if (cpus < 1) GTEST_SKIP() << "no affinity set";
    {
        batchnorm::detail::CpuLoad load(true);
        EXPECT_LE(load.threads(cpus + 8), cpus);
    }
    if (cpus >= 2) {
        std::atomic<bool> stop{false};
        std::thread spinner([&] {
            while (!stop.load(std::memory_order_relaxed)) {
            }
        });
        batchnorm::detail::CpuLoad load(true);
        const int got = load.threads(cpus);
        stop = true;
        spinner.join();
        EXPECT_LE(got, cpus - 1) << "a spinning thread holds a CPU";
    }
    cpu_set_t all, one;
    ASSERT_EQ(sched_getaffinity(0, sizeof all, &all), 0);
    CPU_ZERO(&one);
    for (int c = 0; c < CPU_SETSIZE; ++c)
        if (CPU_ISSET(c, &all)) {
            CPU_SET(c, &one);
            break;
        }
    ASSERT_EQ(sched_setaffinity(0, sizeof one, &one), 0);
    batchnorm::detail::CpuLoad pinned(true);
    const int got = pinned.threads(4);
    ASSERT_EQ(sched_setaffinity(0, sizeof all, &all), 0);
    EXPECT_EQ(got, 1);
}

TEST(CpuLoad, OffCountsEveryCpuFree) {
    batchnorm::detail::CpuLoad off(false);
    EXPECT_EQ(off.threads(64), 64);
}
#endif

}  // namespace

// A call's scratch: a thread keeps a small call's buffer for the next call, never a large
// one's (it would hold that memory for as long as the thread lives).
TEST(CallScratch, ThreadKeepsOnlySmallBuffers) {
    using batchnorm::detail::CallScratch;
    using batchnorm::detail::kKeptScratchBytes;
    struct Site;
    using Scratch = CallScratch<float, Site>;
    const std::size_t small = 1000, large = 4 * kKeptScratchBytes / sizeof(float);
    {
        Scratch s(small);
        s.data()[small - 1] = 1.f;
    }
    EXPECT_GE(Scratch::kept_capacity(), small);
    {
        Scratch s(large);
        s.data()[large - 1] = 2.f;  // the whole of it is there
    }
    EXPECT_LE(Scratch::kept_capacity() * sizeof(float), kKeptScratchBytes);
    std::size_t other_thread = 1;
    std::thread([&] { other_thread = Scratch::kept_capacity(); }).join();
    EXPECT_EQ(other_thread, 0u);  // each thread its own
}
