// The functional API (functional.hpp) against the float64 reference in reference.hpp:
// batch_stats, forward_train (output, running update, saved statistics), forward_eval (with
// residual and ReLU), backward (batch and running statistics), in place, empty and large inputs.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "reference.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::Shape;

template <class T>
class Functional : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Functional, Types);

template <class T>
std::vector<Shape> all_shapes() {
    std::vector<Shape> s = ref::shapes();
    for (const Shape& l : ref::large_shapes()) s.push_back(l);
    return s;
}

TYPED_TEST(Functional, BatchStats) {
    using T = TypeParam;
    for (const Shape& s : all_shapes<T>()) {
        SCOPED_TRACE(ref::str(s));
        const std::vector<T> x = ref::random_input<T>(s, 1);
        std::vector<T> mean(std::size_t(s.channels)), var(std::size_t(s.channels));
        batchnorm::batch_stats(x.data(), s, mean.data(), var.data());
        const ref::Stats r = ref::stats(x, s);
        EXPECT_TRUE(ref::close(mean, r.mean, ref::tol<T>()));
        EXPECT_TRUE(ref::close(var, r.var, ref::tol<T>(), 0.0));  // relative to the variance
    }
}

// DESIGN.md's accuracy target: float32 variance relative error <= 1e-6 and output error <= 1e-5
// at mean 1e6, std 1 (where E[x^2] - E[x]^2 in float32 loses every digit).
TYPED_TEST(Functional, AccurateAtLargeMean) {
    using T = TypeParam;
    for (const Shape& s : {Shape{64, 3, 1000}, Shape{20000, 3, 1}, Shape{3000, 3, 5}}) {
        SCOPED_TRACE(ref::str(s));
        const std::vector<T> x = ref::random_input<T>(s, 2, 1e6, 1.0);
        const ref::Stats r = ref::stats(x, s);
        std::vector<T> mean(3), var(3), y(x.size());
        batchnorm::batch_stats(x.data(), s, mean.data(), var.data());
        EXPECT_TRUE(ref::close(var, r.var, 1e-6, 0.0));
        batchnorm::forward_train(x.data(), y.data(), s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5);
        EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, {}, {}, 1e-5), 1e-5));
    }
}

// A shift far from the mean must cost a second pass, not digits. Channels-first blocks of short
// planes (plane_blocks.hpp) take their shift from 8 values at (2i + 1) * n / 16 of a channel's n
// values, in (row, position) order, the rows driver from 8 rows spread over its first tile;
// here those values are 1e4 and the rest near 0, so the shift sits about 7 standard deviations
// off: summed in float32 lanes around it, the variance would be off by about 1e-5, ten times
// the target.
TYPED_TEST(Functional, ShiftFarFromTheMean) {
    using T = TypeParam;
    // Where the drivers probe: plane blocks (7x7 and 10x10 planes) 8 values spread over (row,
    // position); rows (inner 1 and 3) rows 0, 8, ..., 56 of every column. In some channels only,
    // so that the channels summed again come in runs between channels that are not.
    const auto far = [](std::int64_t c) { return (c < 12 && c % 3 == 1) || c == 50 || c == 99; };
    for (const Shape& s : {Shape{8, 4, 49}, Shape{16, 3, 100}, Shape{8, 40, 49}, Shape{64, 100, 1}, Shape{64, 9, 3}}) {
        SCOPED_TRACE(ref::str(s));
        std::vector<T> x = ref::random_input<T>(s, 3, 0.0, 1.0);
        const std::int64_t n = s.per_channel();
        const bool rows = s.inner < 8;
        for (std::int64_t c = 0; c < s.channels; ++c)
            for (std::int64_t i = 0; i < 8 && far(c); ++i) {
                if (rows) {
                    for (std::int64_t j = 0; j < s.inner; ++j) x[std::size_t(ref::at(s, 8 * i, c, j))] = T(1e4);
                } else {
                    const std::int64_t v = (2 * i + 1) * n / 16;
                    x[std::size_t(ref::at(s, v / s.inner, c, v % s.inner))] = T(1e4);
                }
            }
        const ref::Stats r = ref::stats(x, s);
        std::vector<T> mean(std::size_t(s.channels)), var(std::size_t(s.channels)), y(x.size());
        batchnorm::batch_stats(x.data(), s, mean.data(), var.data());
        EXPECT_TRUE(ref::close(mean, r.mean, ref::tol<T>()));
        EXPECT_TRUE(ref::close(var, r.var, 1e-6, 0.0));
        batchnorm::forward_train(x.data(), y.data(), s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5);
        EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, {}, {}, 1e-5), 1e-5));
    }
}

TYPED_TEST(Functional, ForwardTrain) {
    using T = TypeParam;
    const double eps = 1e-5, momentum = 0.25;
    for (const Shape& s : all_shapes<T>()) {
        SCOPED_TRACE(ref::str(s));
        const std::size_t C = std::size_t(s.channels);
        const std::vector<T> x = ref::random_input<T>(s, 3);
        const std::vector<T> w = ref::random_vector<T>(C, 4, 0.5, 2.0), b = ref::random_vector<T>(C, 5, -1, 1);
        std::vector<T> rm = ref::random_vector<T>(C, 6, -1, 1), rv = ref::random_vector<T>(C, 7, 0.5, 2);
        const std::vector<T> rm0 = rm, rv0 = rv;
        std::vector<T> y(x.size()), save_mean(C), save_invstd(C);
        batchnorm::forward_train(x.data(), y.data(), s, w.data(), b.data(), rm.data(), rv.data(), momentum,
                                 eps, save_mean.data(), save_invstd.data());

        const ref::Stats r = ref::stats(x, s);
        EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, ref::widen(w), ref::widen(b), eps),
                               ref::tol<T>()));
        std::vector<double> want_rm(C), want_rv(C), want_invstd(C);
        for (std::size_t c = 0; c < C; ++c) {
            want_rm[c] = (1 - momentum) * double(rm0[c]) + momentum * r.mean[c];
            want_rv[c] = (1 - momentum) * double(rv0[c]) + momentum * r.unbiased[c];
            want_invstd[c] = 1 / std::sqrt(r.var[c] + eps);
        }
        EXPECT_TRUE(ref::close(rm, want_rm, ref::tol<T>()));
        EXPECT_TRUE(ref::close(rv, want_rv, ref::tol<T>()));
        EXPECT_TRUE(ref::close(save_mean, r.mean, ref::tol<T>()));
        EXPECT_TRUE(ref::close(save_invstd, want_invstd, ref::tol<T>()));

        // In place gives the same bits; no weight/bias/running stats means 1, 0 and no update.
        std::vector<T> inplace = x;
        std::vector<T> rm2 = rm0, rv2 = rv0;
        batchnorm::forward_train(inplace.data(), inplace.data(), s, w.data(), b.data(), rm2.data(), rv2.data(),
                                 momentum, eps);
        EXPECT_TRUE(ref::same_bits(inplace, y));
        EXPECT_TRUE(ref::same_bits(rm2, rm));
        // ReLU fused: the same output, clamped at 0 in the same pass.
        std::vector<T> relu_y(x.size());
        batchnorm::forward_train(x.data(), relu_y.data(), s, w.data(), b.data(), nullptr, nullptr, momentum, eps,
                                 nullptr, nullptr, batchnorm::Activation::relu);
        std::vector<double> want_relu(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) want_relu[i] = std::max(double(y[i]), 0.0);
        EXPECT_TRUE(ref::close(relu_y, want_relu, 0.0));
        // T comes from x alone: null optional arguments need no <T>.
        batchnorm::forward_train(x.data(), y.data(), s, nullptr, nullptr, nullptr, nullptr, momentum, eps);
        EXPECT_TRUE(ref::close(y, ref::normalize(x, s, r.mean, r.var, {}, {}, eps), ref::tol<T>()));
    }
}

TYPED_TEST(Functional, ForwardEvalWithResidualAndRelu) {
    using T = TypeParam;
    const double eps = 1e-3;
    for (const Shape& s : all_shapes<T>()) {
        SCOPED_TRACE(ref::str(s));
        const std::size_t C = std::size_t(s.channels);
        const std::vector<T> x = ref::random_input<T>(s, 8), res = ref::random_input<T>(s, 9, -3.0, 1.0);
        const std::vector<T> mean = ref::random_vector<T>(C, 10, 2, 6), var = ref::random_vector<T>(C, 11, 1, 5);
        const std::vector<T> w = ref::random_vector<T>(C, 12, -2, 2), b = ref::random_vector<T>(C, 13, -1, 1);
        for (const T* r : {static_cast<const T*>(nullptr), res.data()}) {
            for (Activation act : {Activation::none, Activation::relu}) {
                std::vector<T> y(x.size());
                batchnorm::forward_eval(x.data(), y.data(), s, mean.data(), var.data(), w.data(), b.data(), eps, r,
                                        act);
                const std::vector<double> want =
                    ref::normalize(x, s, ref::widen(mean), ref::widen(var), ref::widen(w), ref::widen(b), eps,
                                   r ? &res : nullptr, act == Activation::relu);
                EXPECT_TRUE(ref::close(y, want, ref::tol<T>(), 4.0)) << "residual " << (r != nullptr)
                                                                     << ", relu " << (act == Activation::relu);
                std::vector<T> inplace = x;
                batchnorm::forward_eval(inplace.data(), inplace.data(), s, mean.data(), var.data(), w.data(),
                                        b.data(), eps, r, act);
                EXPECT_TRUE(ref::same_bits(inplace, y));
            }
        }
    }
}

TYPED_TEST(Functional, EvalInvstdIsTheScalarFormulaBitForBit) {
    using T = TypeParam;
    const double eps = 1e-3;
    for (std::int64_t n : {0, 1, 7, 255, 256, 257, 600}) {  // chunks of 256 channels, vector tails
        SCOPED_TRACE(n);
        const std::vector<T> var = ref::random_vector<T>(std::size_t(n), 14, 0, 9);
        std::vector<T> invstd(var.size(), T(-1));
        batchnorm::eval_invstd(var.data(), invstd.data(), n, eps);
        for (std::size_t c = 0; c < var.size(); ++c)
            EXPECT_EQ(invstd[c], T(1.0 / std::sqrt(double(var[c]) + eps))) << "channel " << c;
        std::vector<T> inplace = var;
        batchnorm::eval_invstd(inplace.data(), inplace.data(), n, eps);
        EXPECT_TRUE(ref::same_bits(inplace, invstd));
    }
}

TYPED_TEST(Functional, Backward) {
    using T = TypeParam;
    for (const Shape& s : all_shapes<T>()) {
        SCOPED_TRACE(ref::str(s));
        const std::size_t C = std::size_t(s.channels);
        const std::vector<T> x = ref::random_input<T>(s, 14), dy = ref::random_input<T>(s, 15, 0.5, 1.0);
        const std::vector<T> w = ref::random_vector<T>(C, 16, 0.5, 2.0);
        const ref::Stats r = ref::stats(x, s);
        std::vector<T> mean(C), invstd(C);
        for (std::size_t c = 0; c < C; ++c) {
            mean[c] = T(r.mean[c]);
            invstd[c] = T(1 / std::sqrt(r.var[c] + 1e-5));
        }
        for (bool training : {true, false}) {
            SCOPED_TRACE(training ? "batch statistics" : "running statistics");
            std::vector<T> gx(x.size()), gw(C), gb(C);
            batchnorm::backward(dy.data(), x.data(), gx.data(), s, mean.data(), invstd.data(), w.data(), gw.data(),
                                gb.data(), training);
            const ref::Grads g =
                ref::backward(dy, x, s, ref::widen(mean), ref::widen(invstd), ref::widen(w), training);
            EXPECT_TRUE(ref::close(gx, g.gx, ref::tol<T>(), g.gx_scale));
            for (std::size_t c = 0; c < C; ++c) {
                EXPECT_NEAR(double(gw[c]), g.gw[c], 4 * ref::tol<T>() * g.gw_scale[c]) << "channel " << c;
                EXPECT_NEAR(double(gb[c]), g.gb[c], 4 * ref::tol<T>() * g.gb_scale[c]) << "channel " << c;
            }
            // grad_x may be grad_y (in place), the parameter gradients still of the original;
            // null outputs are skipped.
            std::vector<T> inplace = dy, gw_inplace(C), gb_inplace(C);
            batchnorm::backward(inplace.data(), x.data(), inplace.data(), s, mean.data(), invstd.data(), w.data(),
                                gw_inplace.data(), gb_inplace.data(), training);
            EXPECT_TRUE(ref::same_bits(inplace, gx));
            EXPECT_TRUE(ref::same_bits(gw_inplace, gw));
            EXPECT_TRUE(ref::same_bits(gb_inplace, gb));
            inplace = dy;
            batchnorm::backward(inplace.data(), x.data(), inplace.data(), s, mean.data(), invstd.data(), w.data(),
                                static_cast<T*>(nullptr), static_cast<T*>(nullptr), training);
            EXPECT_TRUE(ref::same_bits(inplace, gx));
        }
    }
}

TYPED_TEST(Functional, EmptyInputs) {
    using T = TypeParam;
    for (const Shape& s : {Shape{0, 3, 4}, Shape{5, 3, 0}}) {
        SCOPED_TRACE(ref::str(s));
        std::vector<T> mean(3, T(7)), var(3, T(7)), rm(3, T(2)), rv(3, T(3)), gw(3, T(9)), gb(3, T(9));
        batchnorm::batch_stats(static_cast<const T*>(nullptr), s, mean.data(), var.data());
        for (std::size_t c = 0; c < 3; ++c) EXPECT_TRUE(std::isnan(mean[c]) && std::isnan(var[c]));
        batchnorm::forward_train<T>(nullptr, nullptr, s, nullptr, nullptr, rm.data(), rv.data(), 0.1, 1e-5,
                                    mean.data(), var.data());
        EXPECT_EQ(rm, std::vector<T>(3, T(2)));  // no statistics, no update
        EXPECT_EQ(rv, std::vector<T>(3, T(3)));
        batchnorm::forward_eval<T>(nullptr, nullptr, s, rm.data(), rv.data(), nullptr, nullptr, 1e-5);
        batchnorm::backward<T>(nullptr, nullptr, nullptr, s, rm.data(), rv.data(), nullptr, gw.data(), gb.data());
        EXPECT_EQ(gw, std::vector<T>(3, T(0)));
        EXPECT_EQ(gb, std::vector<T>(3, T(0)));
    }
}

// A batch with no channels (N > 0, C = 0) has nothing to compute; it used to divide by zero
// in the channels-last tiling.
TYPED_TEST(Functional, NoChannels) {
    using T = TypeParam;
    for (const Shape& s : {Shape{4, 0, 1}, Shape{4, 0, 3}, Shape{4, 0, 100}}) {
        SCOPED_TRACE(ref::str(s));
        T x[1] = {T(5)}, y[1] = {T(6)}, none[1] = {T(7)};
        batchnorm::batch_stats(x, s, none, none);
        batchnorm::forward_train<T>(x, y, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, none, none);
        batchnorm::forward_eval<T>(x, y, s, none, none, nullptr, nullptr, 1e-5);
        batchnorm::backward<T>(x, x, y, s, none, none, nullptr, none, none);
        EXPECT_EQ(y[0], T(6));
        EXPECT_EQ(none[0], T(7));
        // Per-channel arrays of no values may be null (an empty std::vector's data()), in every
        // entry point, as forward_train and Inference take them.
        batchnorm::batch_stats<T>(x, s, nullptr, nullptr);
        batchnorm::batch_moments<T>(x, s, nullptr);
        batchnorm::forward_train<T>(x, y, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, nullptr, nullptr);
        batchnorm::forward_eval<T>(x, y, s, nullptr, nullptr, nullptr, nullptr, 1e-5);
        batchnorm::backward<T>(x, x, y, s, nullptr, nullptr, nullptr, nullptr, nullptr);
        batchnorm::batch_norm_apply<T>(x, y, s, nullptr, nullptr, nullptr, nullptr);
        batchnorm::batch_norm_backward_reduce<T>(x, x, s, nullptr, nullptr, nullptr);
        batchnorm::batch_norm_backward_apply<T>(x, x, y, s, nullptr, nullptr, nullptr, nullptr, nullptr, 8.0);
        EXPECT_EQ(y[0], T(6));
    }
    // With channels, null is still an error that names the array.
    T x[4] = {}, y[4] = {};
    EXPECT_THROW(batchnorm::forward_eval<T>(x, y, Shape{2, 2, 1}, nullptr, nullptr, nullptr, nullptr, 1e-5),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::batch_moments<T>(x, Shape{2, 2, 1}, nullptr), batchnorm::invalid_argument);
}

// The ISA in use is one this machine supports (BATCHNORM_ISA may force another; ctest runs the
// suite once per backend).
TEST(Isa, ActiveIsSupported) {
    const std::vector<batchnorm::Isa> isas = batchnorm::supported_isas();
    EXPECT_NE(std::find(isas.begin(), isas.end(), batchnorm::active_isa()), isas.end());
    EXPECT_EQ(isas.back(), batchnorm::Isa::scalar);
}

TEST(Version, MatchesTheCMakeProject) {
    EXPECT_EQ(std::to_string(BATCHNORM_VERSION_MAJOR) + "." + std::to_string(BATCHNORM_VERSION_MINOR) + "." +
                  std::to_string(BATCHNORM_VERSION_PATCH),
              std::string(BATCHNORM_TEST_PROJECT_VERSION));
}

}  // namespace
