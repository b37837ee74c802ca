// A small CPU inference pipeline: 1x1 convolution -> batch norm -> ReLU over an NCHW batch,
// computed two ways that must agree:
//   1. the convolution (a matrix product per image), then batchnorm::Inference<float> with the
//      ReLU fused into the same pass over the activations;
//   2. the batch norm folded into the convolution's weights and bias (batchnorm::fold), then
//      the convolution and a ReLU: one layer fewer at inference time.
// Prints the largest difference and exits with 1 if it exceeds float rounding.
#include <batchnorm/batchnorm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <vector>

namespace {

// out[n, co, p] = bias[co] + sum_ci weight[co, ci] * in[n, ci, p]: a 1x1 convolution.
void conv1x1(const std::vector<float>& in, std::int64_t N, std::int64_t Cin, std::int64_t HW,
             const std::vector<float>& weight, const std::vector<float>& bias, std::int64_t Cout,
             std::vector<float>& out) {
    for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t co = 0; co < Cout; ++co) {
            float* o = &out[std::size_t((n * Cout + co) * HW)];
            std::fill(o, o + HW, bias[std::size_t(co)]);
            for (std::int64_t ci = 0; ci < Cin; ++ci) {
                const float w = weight[std::size_t(co * Cin + ci)];
                const float* x = &in[std::size_t((n * Cin + ci) * HW)];
                for (std::int64_t p = 0; p < HW; ++p) o[p] += w * x[p];
            }
        }
}

std::vector<float> random(std::size_t n, std::mt19937& rng, float lo, float hi) {
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<float> v(n);
    for (float& e : v) e = u(rng);
    return v;
}

}  // namespace

int main() {
    const std::int64_t N = 4, Cin = 32, Cout = 64, H = 14, W = 14, HW = H * W;
    const double eps = 1e-5;
    std::mt19937 rng(42);

    // The model: conv weights (Cout, Cin, 1, 1) and bias; the batch norm's running statistics
    // and affine parameters, as they would come from a trained checkpoint.
    const std::vector<float> conv_w = random(std::size_t(Cout * Cin), rng, -0.3f, 0.3f);
    const std::vector<float> conv_b = random(std::size_t(Cout), rng, -0.1f, 0.1f);
    const std::vector<float> mean = random(std::size_t(Cout), rng, -0.5f, 0.5f);
    const std::vector<float> var = random(std::size_t(Cout), rng, 0.2f, 2.0f);
    const std::vector<float> gamma = random(std::size_t(Cout), rng, 0.5f, 1.5f);
    const std::vector<float> beta = random(std::size_t(Cout), rng, -0.2f, 0.2f);
    const std::vector<float> x = random(std::size_t(N * Cin * HW), rng, -1.0f, 1.0f);
    const batchnorm::Shape shape{N, Cout, HW};  // the conv's output, NCHW

    // 1. conv, then batch norm + ReLU in one pass (factors computed once, at construction).
    const batchnorm::Inference<float> bn(mean.data(), var.data(), gamma.data(), beta.data(), Cout, eps);
    std::vector<float> y1(std::size_t(N * Cout * HW));
    conv1x1(x, N, Cin, HW, conv_w, conv_b, Cout, y1);
    bn.run(y1.data(), y1.data(), shape, nullptr, batchnorm::Activation::relu);  // in place

    // 2. fold the batch norm into the conv (once, offline), then conv + ReLU.
    std::vector<float> folded_w(conv_w.size()), folded_b(conv_b.size());
    batchnorm::fold(mean.data(), var.data(), gamma.data(), beta.data(), Cout, eps, conv_w.data(),
                    conv_b.data(), /*per_channel=*/Cin, folded_w.data(), folded_b.data());
    std::vector<float> y2(y1.size());
    conv1x1(x, N, Cin, HW, folded_w, folded_b, Cout, y2);
    for (float& v : y2) v = std::max(v, 0.0f);

    // Both round differently (the conv sums Cin products in float, before or after scaling by
    // alpha): allow a few float roundings per term of the largest output's sum.
    double max_diff = 0, max_abs = 0, positive = 0;
    for (std::size_t k = 0; k < y1.size(); ++k) {
        max_diff = std::max(max_diff, double(std::abs(y1[k] - y2[k])));
        max_abs = std::max(max_abs, double(std::abs(y1[k])));
        positive += y1[k] > 0;
    }
    double term_sum = 0;  // the largest sum of |terms| behind one output: |b'| + sum |W' x|
    for (std::int64_t co = 0; co < Cout; ++co) {
        double s = std::abs(folded_b[std::size_t(co)]);
        for (std::int64_t ci = 0; ci < Cin; ++ci) s += std::abs(folded_w[std::size_t(co * Cin + ci)]);
        term_sum = std::max(term_sum, s);  // |x| <= 1
    }
    const double tolerance = 4.0 * double(Cin + 2) * 0x1p-24 * term_sum;

    std::printf("batchnorm %d.%d.%d, backend %s, %d thread(s)\n", BATCHNORM_VERSION_MAJOR,
                BATCHNORM_VERSION_MINOR, BATCHNORM_VERSION_PATCH,
                batchnorm::isa_name(batchnorm::active_isa()), batchnorm::get_num_threads());
    std::printf("conv 1x1 %lld -> %lld channels on (%lld, %lld, %lld, %lld), batch norm, ReLU\n",
                (long long)Cin, (long long)Cout, (long long)N, (long long)Cin, (long long)H, (long long)W);
    std::printf("  %.0f%% of outputs positive, max |y| = %.3f\n", 100.0 * positive / double(y1.size()), max_abs);
    std::printf("  conv -> Inference(+ReLU) vs folded conv -> ReLU: max abs diff %.3g (tolerance %.3g)\n",
                max_diff, tolerance);
    if (!(max_diff <= tolerance)) {
        std::printf("FAILED: the two paths disagree\n");
        return 1;
    }
    std::printf("OK\n");
    return 0;
}
