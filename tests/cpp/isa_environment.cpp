// ctest runs the GoogleTest suite once as is (the best backend) and once per backend forced with
// BATCHNORM_ISA (tests/cpp/CMakeLists.txt). A backend this CPU cannot run skips the whole run.
#include <batchnorm/isa.hpp>

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>

namespace {

class IsaEnvironment : public ::testing::Environment {
public:
    void SetUp() override {
        // Tests compare the bits of two calls (in place vs not, null outputs vs not); with the
        // thread count chosen from other processes' load (cpu_load.hpp) two calls may split their
        // sums differently. tests/conftest.py does the same for the Python suite.
        setenv("BATCHNORM_ADAPTIVE_THREADS", "0", 0);
        try {
            const batchnorm::Isa isa = batchnorm::active_isa();
            const char* forced = std::getenv("BATCHNORM_ISA");
            std::printf("batchnorm backend: %s%s\n", batchnorm::isa_name(isa),
                        forced && *forced ? " (forced by BATCHNORM_ISA)" : "");
        } catch (const batchnorm::unsupported_isa& e) {
            GTEST_SKIP() << e.what();
        }
    }
};

[[maybe_unused]] ::testing::Environment* const isa_environment =
    ::testing::AddGlobalTestEnvironment(new IsaEnvironment);

}  // namespace
