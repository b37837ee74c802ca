// A tiny program using batchnorm as a consumer project would: normalizes a small array and
// checks the result. Built by .ci/cpp.sh against the build tree, an install tree, the Python
// wheel (find_package/) and the source tree (add_subdirectory/).
//   usage: consumer [--openmp=on|off]   (checks how the package was configured)
#include <batchnorm/batchnorm.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
    // (N, C) = (4, 2): channel 0 holds 1, 2, 3, 4; channel 1 holds 10, 20, 30, 40.
    const float x[8] = {1, 10, 2, 20, 3, 30, 4, 40};
    float y[8], mean[2], invstd[2];
    const batchnorm::Shape shape{4, 2, 1};
    batchnorm::forward_train<float>(x, y, shape, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, mean, invstd);

    // Channel 0: mean 2.5, biased variance 1.25; channel 1 is ten times channel 0.
    const double var[2] = {1.25, 125.0};
    int bad = 0;
    for (int o = 0; o < 4; ++o)
        for (int c = 0; c < 2; ++c) {
            const double want = (x[o * 2 + c] - (c ? 25.0 : 2.5)) / std::sqrt(var[c] + 1e-5);
            if (std::abs(y[o * 2 + c] - want) > 1e-5) {
                std::printf("y[%d, %d] = %.7f, expected %.7f\n", o, c, y[o * 2 + c], want);
                ++bad;
            }
        }

    // Eval with fused ReLU through Inference<float>, from the statistics just computed.
    const float var_f[2] = {1.25f, 125.0f};
    const batchnorm::Inference<float> bn(mean, var_f, nullptr, nullptr, 2, 1e-5);
    float z[8];
    bn.run(x, z, shape, nullptr, batchnorm::Activation::relu);
    for (int k = 0; k < 8; ++k)
        if (std::abs(z[k] - (y[k] > 0 ? y[k] : 0.0f)) > 1e-6f) {
            std::printf("Inference: z[%d] = %.7f, expected %.7f\n", k, z[k], y[k] > 0 ? y[k] : 0.0f);
            ++bad;
        }

#if defined(_OPENMP)
    const char* openmp = "on";
#else
    const char* openmp = "off";
#endif
    for (int i = 1; i < argc; ++i)
        if (std::strncmp(argv[i], "--openmp=", 9) == 0 && std::strcmp(argv[i] + 9, openmp) != 0) {
            std::printf("OpenMP is %s in this build, expected %s\n", openmp, argv[i] + 9);
            ++bad;
        }

    std::printf("batchnorm %d.%d.%d consumer: backend %s, OpenMP %s, %s\n", BATCHNORM_VERSION_MAJOR,
                BATCHNORM_VERSION_MINOR, BATCHNORM_VERSION_PATCH, batchnorm::isa_name(batchnorm::active_isa()),
                openmp, bad ? "FAILED" : "ok");
    return bad ? 1 : 0;
}
