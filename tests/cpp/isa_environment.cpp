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
