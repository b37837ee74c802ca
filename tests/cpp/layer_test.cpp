// batchnorm::BatchNorm<T>, the stateful layer: several training steps (momentum and the
// cumulative average), eval with and without running statistics, affine = false, the counter,
// empty batches, backward from the saved statistics, the inference fusion.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <optional>
#include <vector>

#include "reference.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::BatchNorm;
using batchnorm::Shape;

template <class T>
class Layer : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Layer, Types);

TYPED_TEST(Layer, DefaultsLikePyTorch) {
    using T = TypeParam;
    BatchNorm<T> bn(3);
    EXPECT_EQ(bn.num_features(), 3);
    EXPECT_EQ(bn.eps(), 1e-5);
    EXPECT_EQ(bn.momentum(), std::optional<double>(0.1));
    EXPECT_TRUE(bn.affine() && bn.track_running_stats() && bn.training());
    EXPECT_EQ(bn.weight, std::vector<T>(3, T(1)));
    EXPECT_EQ(bn.bias, std::vector<T>(3, T(0)));
    EXPECT_EQ(bn.running_mean, std::vector<T>(3, T(0)));
    EXPECT_EQ(bn.running_var, std::vector<T>(3, T(1)));
    EXPECT_EQ(bn.num_batches_tracked, 0);
    EXPECT_FALSE(bn.eval().training());
    EXPECT_TRUE(bn.train().training());
    BatchNorm<T> bare(2, 1e-3, std::nullopt, false, false);
    EXPECT_TRUE(bare.weight.empty() && bare.bias.empty() && bare.running_mean.empty() && bare.running_var.empty());
    EXPECT_FALSE(bare.momentum().has_value());
}

// Steps of training with momentum 0.1 and with the cumulative average (momentum nullopt),
// against a float64 model of PyTorch's update, then eval with the running statistics.
TYPED_TEST(Layer, TrainingStepsThenEval) {
    using T = TypeParam;
    for (std::optional<double> momentum : {std::optional<double>(0.1), std::optional<double>()}) {
        SCOPED_TRACE(momentum ? "momentum 0.1" : "cumulative average");
        for (const Shape& s : {Shape{8, 3, 10}, Shape{16, 3, 1}, Shape{5, 3, 40}}) {
            SCOPED_TRACE(ref::str(s));
            const std::size_t C = 3;
            BatchNorm<T> bn(3, 1e-5, momentum);
            bn.weight = ref::random_vector<T>(C, 50, 0.5, 2);
            bn.bias = ref::random_vector<T>(C, 51, -1, 1);
            std::vector<double> rm(C, 0.0), rv(C, 1.0), sum_mean(C, 0.0), sum_var(C, 0.0);
            const int steps = 5;
            for (int step = 1; step <= steps; ++step) {
                const std::vector<T> x = ref::random_input<T>(s, std::uint64_t(100 + step), step, 1.0 + step);
                std::vector<T> y(x.size());
                bn.forward(x.data(), y.data(), s);
                const ref::Stats r = ref::stats(x, s);
                EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, ref::widen(bn.weight),
                                                         ref::widen(bn.bias), 1e-5),
                                       ref::tol<T>()));
                const double f = momentum ? *momentum : 1.0 / step;
                for (std::size_t c = 0; c < C; ++c) {
                    rm[c] = (1 - f) * rm[c] + f * r.mean[c];
                    rv[c] = (1 - f) * rv[c] + f * r.unbiased[c];
                    sum_mean[c] += r.mean[c];
                    sum_var[c] += r.unbiased[c];
                }
                EXPECT_EQ(bn.num_batches_tracked, step);
                EXPECT_TRUE(ref::close(bn.running_mean, rm, ref::tol<T>()));
                EXPECT_TRUE(ref::close(bn.running_var, rv, ref::tol<T>()));
            }
            if (!momentum) {  // cumulative: the plain average of the batches' statistics
                for (std::size_t c = 0; c < C; ++c) {
                    EXPECT_NEAR(double(bn.running_mean[c]), sum_mean[c] / steps, ref::tol<T>() * 10);
                    EXPECT_NEAR(double(bn.running_var[c]), sum_var[c] / steps, ref::tol<T>() * 10);
                }
            }
            // Eval: running statistics, no state change.
            bn.eval();
            const std::vector<T> rm_before = bn.running_mean, rv_before = bn.running_var;
            const std::vector<T> x = ref::random_input<T>(s, 200);
            std::vector<T> y(x.size());
            bn.forward(x.data(), y.data(), s);
            EXPECT_TRUE(ref::close(y, ref::normalize(x, s, ref::widen(bn.running_mean), ref::widen(bn.running_var),
                                                     ref::widen(bn.weight), ref::widen(bn.bias), 1e-5),
                                   ref::tol<T>()));
            EXPECT_EQ(bn.num_batches_tracked, steps);
            EXPECT_TRUE(ref::same_bits(bn.running_mean, rm_before));
            EXPECT_TRUE(ref::same_bits(bn.running_var, rv_before));
        }
    }
}

// Without running statistics, eval normalizes with the batch's statistics and nothing counts.
TYPED_TEST(Layer, UntrackedUsesBatchStatisticsInEval) {
    using T = TypeParam;
    const Shape s{6, 2, 7};
    BatchNorm<T> bn(2, 1e-5, 0.1, true, false);
    const std::vector<T> x = ref::random_input<T>(s, 60);
    std::vector<T> y_train(x.size()), y_eval(x.size());
    bn.forward(x.data(), y_train.data(), s);
    bn.eval().forward(x.data(), y_eval.data(), s);
    EXPECT_TRUE(ref::same_bits(y_train, y_eval));
    const ref::Stats r = ref::stats(x, s);
    EXPECT_TRUE(ref::close(y_eval, ref::normalize(x, s, r.mean, r.var, {}, {}, 1e-5), ref::tol<T>()));
    EXPECT_EQ(bn.num_batches_tracked, 0);
    EXPECT_TRUE(bn.running_mean.empty());
}

TYPED_TEST(Layer, NotAffine) {
    using T = TypeParam;
    const Shape s{6, 2, 7};
    BatchNorm<T> bn(2, 1e-5, 0.1, false);
    const std::vector<T> x = ref::random_input<T>(s, 61), dy = ref::random_input<T>(s, 62);
    std::vector<T> y(x.size()), gx(x.size());
    bn.forward(x.data(), y.data(), s);
    const ref::Stats r = ref::stats(x, s);
    EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, {}, {}, 1e-5), ref::tol<T>()));
    bn.backward(dy.data(), x.data(), gx.data(), s);
    EXPECT_TRUE(bn.weight_grad.empty() && bn.bias_grad.empty());
}

// An empty batch writes nothing and changes no state; it is not counted.
TYPED_TEST(Layer, EmptyBatchChangesNothing) {
    using T = TypeParam;
    BatchNorm<T> bn(3);
    const Shape s{8, 3, 4};
    const std::vector<T> x = ref::random_input<T>(s, 63);
    std::vector<T> y(x.size());
    bn.forward(x.data(), y.data(), s);
    const std::vector<T> rm = bn.running_mean, rv = bn.running_var;
    bn.forward(nullptr, nullptr, Shape{0, 3, 4});
    bn.forward(nullptr, nullptr, Shape{8, 3, 0});
    EXPECT_EQ(bn.num_batches_tracked, 1);
    EXPECT_TRUE(ref::same_bits(bn.running_mean, rm));
    EXPECT_TRUE(ref::same_bits(bn.running_var, rv));
}

// Backward after a training forward is the functional backward with the saved batch statistics;
// after an eval forward, grad_x = dy*weight/sqrt(running_var + eps).
TYPED_TEST(Layer, BackwardUsesTheSavedStatistics) {
    using T = TypeParam;
    for (const Shape& s : {Shape{8, 3, 10}, Shape{30, 3, 1}, Shape{4, 3, 50}}) {
        SCOPED_TRACE(ref::str(s));
        const std::size_t C = 3;
        BatchNorm<T> bn(3);
        bn.weight = ref::random_vector<T>(C, 70, 0.5, 2);
        const std::vector<T> x = ref::random_input<T>(s, 71), dy = ref::random_input<T>(s, 72, 0, 1);
        std::vector<T> y(x.size()), gx(x.size());

        bn.forward(x.data(), y.data(), s);
        bn.backward(dy.data(), x.data(), gx.data(), s);
        std::vector<T> mean(C), invstd(C), want_gx(x.size()), want_gw(C), want_gb(C), y2(x.size());
        batchnorm::forward_train<T>(x.data(), y2.data(), s, bn.weight.data(), bn.bias.data(), nullptr, nullptr,
                                    0.1, 1e-5, mean.data(), invstd.data());
        batchnorm::backward(dy.data(), x.data(), want_gx.data(), s, mean.data(), invstd.data(), bn.weight.data(),
                            want_gw.data(), want_gb.data(), true);
        EXPECT_TRUE(ref::same_bits(gx, want_gx));
        EXPECT_TRUE(ref::same_bits(bn.weight_grad, want_gw));
        EXPECT_TRUE(ref::same_bits(bn.bias_grad, want_gb));
        const ref::Grads g = ref::backward(dy, x, s, ref::widen(mean), ref::widen(invstd), ref::widen(bn.weight), true);
        EXPECT_TRUE(ref::close(gx, g.gx, ref::tol<T>(), g.gx_scale));

        bn.eval();
        bn.forward(x.data(), y.data(), s);
        bn.backward(dy.data(), x.data(), gx.data(), s);
        std::vector<double> eval_invstd(C);
        for (std::size_t c = 0; c < C; ++c) eval_invstd[c] = double(T(1 / std::sqrt(double(bn.running_var[c]) + 1e-5)));
        const ref::Grads e = ref::backward(dy, x, s, ref::widen(bn.running_mean), eval_invstd, ref::widen(bn.weight), false);
        EXPECT_TRUE(ref::close(gx, e.gx, ref::tol<T>(), e.gx_scale));
        for (std::size_t c = 0; c < C; ++c)
            EXPECT_NEAR(double(bn.bias_grad[c]), e.gb[c], 4 * ref::tol<T>() * e.gb_scale[c]);
    }
}

// The eval-mode fusion act(bn(x) + residual) is forward_eval's; inference() gives the same bits.
TYPED_TEST(Layer, FusedEvalAndInference) {
    using T = TypeParam;
    const Shape s{5, 4, 3};
    BatchNorm<T> bn(4);
    const std::vector<T> warm = ref::random_input<T>(s, 80), x = ref::random_input<T>(s, 81),
                         res = ref::random_input<T>(s, 82, -5, 1);
    std::vector<T> y(x.size()), want(x.size()), got(x.size());
    bn.forward(warm.data(), y.data(), s);
    bn.eval().forward(x.data(), y.data(), s, res.data(), Activation::relu);
    batchnorm::forward_eval(x.data(), want.data(), s, bn.running_mean.data(), bn.running_var.data(),
                            bn.weight.data(), bn.bias.data(), bn.eps(), res.data(), Activation::relu);
    EXPECT_TRUE(ref::same_bits(y, want));
    bn.inference().run(x.data(), got.data(), s, res.data(), Activation::relu);
    EXPECT_TRUE(ref::same_bits(got, want));
}

TYPED_TEST(Layer, ResetRestoresTheInitialState) {
    using T = TypeParam;
    const Shape s{5, 2, 3};
    BatchNorm<T> bn(2);
    const std::vector<T> x = ref::random_input<T>(s, 90);
    std::vector<T> y(x.size());
    bn.weight[0] = T(3);
    bn.forward(x.data(), y.data(), s);
    bn.reset_running_stats();
    EXPECT_EQ(bn.running_mean, std::vector<T>(2, T(0)));
    EXPECT_EQ(bn.running_var, std::vector<T>(2, T(1)));
    EXPECT_EQ(bn.num_batches_tracked, 0);
    EXPECT_EQ(bn.weight[0], T(3));
    bn.reset_parameters();
    EXPECT_EQ(bn.weight, std::vector<T>(2, T(1)));
}

}  // namespace
