// batchnorm::fold: a convolution (or linear layer) with the batch norm folded in gives what the
// convolution followed by the eval-mode batch norm gives.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "reference.hpp"

namespace {

using batchnorm::BatchNorm;
using batchnorm::Shape;

template <class T>
class Fold : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Fold, Types);

// Valid 2-D convolution of x (N, Cin, H, W) with weight (Cout, Cin, K, K), in float64.
template <class T>
std::vector<double> conv2d(const std::vector<T>& x, std::int64_t N, std::int64_t Cin, std::int64_t H, std::int64_t W,
                           const std::vector<T>& weight, const T* bias, std::int64_t Cout, std::int64_t K) {
    const std::int64_t Ho = H - K + 1, Wo = W - K + 1;
    std::vector<double> z(std::size_t(N * Cout * Ho * Wo));
    for (std::int64_t n = 0; n < N; ++n)
        for (std::int64_t co = 0; co < Cout; ++co)
            for (std::int64_t i = 0; i < Ho; ++i)
                for (std::int64_t j = 0; j < Wo; ++j) {
                    double acc = bias ? double(bias[co]) : 0.0;
                    for (std::int64_t ci = 0; ci < Cin; ++ci)
                        for (std::int64_t a = 0; a < K; ++a)
                            for (std::int64_t b = 0; b < K; ++b)
                                acc += double(weight[std::size_t(((co * Cin + ci) * K + a) * K + b)]) *
                                       double(x[std::size_t(((n * Cin + ci) * H + i + a) * W + j + b)]);
                    z[std::size_t(((n * Cout + co) * Ho + i) * Wo + j)] = acc;
                }
    return z;
}

TYPED_TEST(Fold, ConvThenBatchNormEqualsFoldedConv) {
    using T = TypeParam;
    const std::int64_t N = 2, Cin = 3, H = 7, W = 6, Cout = 5, K = 3, per_channel = Cin * K * K;
    const double eps = 1e-3;
    const Shape xs{N, Cin, H * W};
    const std::vector<T> x = ref::random_input<T>(xs, 300, 0, 1);
    const std::vector<T> w = ref::random_vector<T>(std::size_t(Cout * per_channel), 301, -1, 1);
    const std::vector<T> b = ref::random_vector<T>(std::size_t(Cout), 302, -1, 1);
    const std::vector<T> mean = ref::random_vector<T>(std::size_t(Cout), 303, -2, 2),
                         var = ref::random_vector<T>(std::size_t(Cout), 304, 0.2, 3),
                         gamma = ref::random_vector<T>(std::size_t(Cout), 305, -2, 2),
                         beta = ref::random_vector<T>(std::size_t(Cout), 306, -1, 1);
    for (bool with_bias : {true, false}) {
        SCOPED_TRACE(with_bias ? "conv with bias" : "conv without bias");
        const T* bias = with_bias ? b.data() : nullptr;
        // bn(conv(x)) in float64, the conv from the original weights.
        const std::vector<double> z = conv2d(x, N, Cin, H, W, w, bias, Cout, K);
        const Shape zs{N, Cout, (H - K + 1) * (W - K + 1)};
        std::vector<double> want(z.size());
        for (std::size_t k = 0; k < z.size(); ++k) {
            const std::size_t c = std::size_t((std::int64_t(k) / zs.inner) % Cout);
            want[k] = (z[k] - double(mean[c])) / std::sqrt(double(var[c]) + eps) * double(gamma[c]) + double(beta[c]);
        }
        std::vector<T> fw(w.size()), fb(static_cast<std::size_t>(Cout));
        batchnorm::fold(mean.data(), var.data(), gamma.data(), beta.data(), Cout, eps, w.data(), bias, per_channel,
                        fw.data(), fb.data());
        const std::vector<double> got = conv2d(x, N, Cin, H, W, fw, fb.data(), Cout, K);
        double scale = 0;
        for (double v : want) scale = std::max(scale, std::abs(v));
        for (std::size_t k = 0; k < got.size(); ++k)
            ASSERT_NEAR(got[k], want[k], 8 * ref::tol<T>() * (1 + scale)) << "element " << k;

        // The folded values themselves: float64 formula rounded once.
        for (std::int64_t c = 0; c < Cout; ++c) {
            const double alpha = double(gamma[std::size_t(c)]) / std::sqrt(double(var[std::size_t(c)]) + eps);
            EXPECT_NEAR(double(fb[std::size_t(c)]),
                        ((bias ? double(bias[c]) : 0.0) - double(mean[std::size_t(c)])) * alpha + double(beta[std::size_t(c)]),
                        ref::tol<T>() * 0.1 * (1 + std::abs(double(fb[std::size_t(c)]))));
            for (std::int64_t j = 0; j < per_channel; ++j) {
                const std::size_t k = std::size_t(c * per_channel + j);
                EXPECT_NEAR(double(fw[k]), double(w[k]) * alpha, ref::tol<T>() * 0.1 * std::abs(double(fw[k])));
            }
        }

        // In place (outputs = inputs) gives the same bits.
        std::vector<T> w2 = w, b2 = with_bias ? b : std::vector<T>(std::size_t(Cout), T(0));
        batchnorm::fold(mean.data(), var.data(), gamma.data(), beta.data(), Cout, eps, w2.data(), b2.data(),
                        per_channel, w2.data(), b2.data());
        EXPECT_TRUE(ref::same_bits(w2, fw));
        EXPECT_TRUE(ref::same_bits(b2, fb));
    }
}

// A layer without bias passed as a literal nullptr (no explicit <T>: T comes from the weight),
// in both forms, equals the fold with an explicit zero bias.
TYPED_TEST(Fold, LiteralNullBiasIsALayerWithoutBias) {
    using T = TypeParam;
    const std::int64_t out = 3, in = 4;
    const std::vector<T> w = ref::random_vector<T>(std::size_t(out * in), 340, -1, 1), zero(std::size_t(out), T(0));
    BatchNorm<T> bn(out);
    bn.running_mean = ref::random_vector<T>(std::size_t(out), 341, -1, 1);
    bn.running_var = ref::random_vector<T>(std::size_t(out), 342, 0.5, 2);
    bn.eval();
    std::vector<T> fw(w.size()), fb(static_cast<std::size_t>(out)), zw(w.size()), zb(static_cast<std::size_t>(out));
    batchnorm::fold(bn, w.data(), nullptr, in, fw.data(), fb.data());
    batchnorm::fold(bn, w.data(), zero.data(), in, zw.data(), zb.data());
    EXPECT_TRUE(ref::same_bits(fw, zw));
    EXPECT_TRUE(ref::same_bits(fb, zb));
    batchnorm::fold(bn.running_mean.data(), bn.running_var.data(), nullptr, nullptr, out, bn.eps(), w.data(), nullptr,
                    in, fw.data(), fb.data());
    EXPECT_TRUE(ref::same_bits(fw, zw));
    EXPECT_TRUE(ref::same_bits(fb, zb));
}

// A linear layer (out_features, in_features) followed by BatchNorm1d, from a BatchNorm<T> layer
// trained for a few steps; affine = false means weight 1, bias 0.
TYPED_TEST(Fold, LinearFromATrainedLayer) {
    using T = TypeParam;
    const std::int64_t in = 4, out = 6, N = 9;
    for (bool affine : {true, false}) {
        SCOPED_TRACE(affine ? "affine" : "not affine");
        BatchNorm<T> bn(out, 1e-5, 0.3, affine);
        if (affine) {
            bn.weight = ref::random_vector<T>(std::size_t(out), 310, 0.5, 2);
            bn.bias = ref::random_vector<T>(std::size_t(out), 311, -1, 1);
        }
        for (int step = 0; step < 3; ++step) {
            const std::vector<T> z = ref::random_input<T>(Shape{N, out, 1}, std::uint64_t(312 + step));
            std::vector<T> y(z.size());
            bn.forward(z.data(), y.data(), Shape{N, out, 1});
        }
        const std::vector<T> w = ref::random_vector<T>(std::size_t(out * in), 320, -1, 1),
                             b = ref::random_vector<T>(std::size_t(out), 321, -1, 1);
        std::vector<T> fw(w.size()), fb(b.size());
        EXPECT_THROW(batchnorm::fold(bn, w.data(), b.data(), in, fw.data(), fb.data()), batchnorm::invalid_argument);
        bn.eval();
        batchnorm::fold(bn, w.data(), b.data(), in, fw.data(), fb.data());
        std::vector<T> fw2(w.size()), fb2(b.size());
        batchnorm::fold(bn.running_mean.data(), bn.running_var.data(), affine ? bn.weight.data() : nullptr,
                        affine ? bn.bias.data() : nullptr, out, bn.eps(), w.data(), b.data(), in, fw2.data(), fb2.data());
        EXPECT_TRUE(ref::same_bits(fw, fw2));
        EXPECT_TRUE(ref::same_bits(fb, fb2));

        // bn(linear(v)) through the layer's own eval forward vs linear'(v).
        const std::vector<T> v = ref::random_input<T>(Shape{N, in, 1}, 330, 0, 1);
        std::vector<T> z(std::size_t(N * out)), want(z.size());
        for (std::int64_t n = 0; n < N; ++n)
            for (std::int64_t o = 0; o < out; ++o) {
                double acc = double(b[std::size_t(o)]);
                for (std::int64_t i = 0; i < in; ++i)
                    acc += double(w[std::size_t(o * in + i)]) * double(v[std::size_t(n * in + i)]);
                z[std::size_t(n * out + o)] = T(acc);
            }
        bn.forward(z.data(), want.data(), Shape{N, out, 1});
        for (std::int64_t n = 0; n < N; ++n)
            for (std::int64_t o = 0; o < out; ++o) {
                double acc = double(fb[std::size_t(o)]);
                for (std::int64_t i = 0; i < in; ++i)
                    acc += double(fw[std::size_t(o * in + i)]) * double(v[std::size_t(n * in + i)]);
                EXPECT_NEAR(acc, double(want[std::size_t(n * out + o)]), 10 * ref::tol<T>() * (1 + std::abs(acc)));
            }
    }
}

}  // namespace
