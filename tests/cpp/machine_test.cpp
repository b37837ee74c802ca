// What the library reads from the machine: cache sizes (engine/cache.hpp) and the load of the
// CPUs it may use (cpu_load.hpp).
#include <gtest/gtest.h>

#include <stdlib.h>  // mkstemp
#include <unistd.h>

#include <cstdio>
#include <string>
#include <utility>

#include <batchnorm/batchnorm.hpp>
#include <batchnorm/engine/cache.hpp>

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

}  // namespace
