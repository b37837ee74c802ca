// LayerNorm, RMSNorm, GroupNorm and InstanceNorm (functions of norms/ and layer classes of
// layers/) against a float64 reference written here: segments of values that share one mean and
// variance, normalized with plain loops. Both layouts of group and instance norm, 1 and 2
// threads, large offsets, the residual fusion and bad input.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference.hpp"

namespace {

using batchnorm::GroupShape;
using i64 = std::int64_t;

// ---- float64 reference over segments -------------------------------------------------------
// seg(k) lists the element indices of segment k; gain(i), offset(i) the affine parameters of
// element i. xhat = (x - mean)*invstd (rms: x*invstd, invstd = 1/sqrt(mean(x^2) + eps)).
struct Segments {
    std::vector<std::vector<i64>> index;
};

struct RefResult {
    std::vector<double> y, mean, invstd, gx, gw, gb;
};

template <class T, class Param>
RefResult reference(const std::vector<T>& x, const std::vector<T>& dy, const Segments& s, double eps, bool rms,
                    std::size_t params, Param&& param_of, const std::vector<T>& w, const std::vector<T>& b) {
    RefResult r;
    r.y.assign(x.size(), 0);
    r.gx.assign(x.size(), 0);
    r.gw.assign(params, 0);
    r.gb.assign(params, 0);
    const auto wv = [&](i64 i) { return w.empty() ? 1.0 : double(w[std::size_t(param_of(i))]); };
    const auto bv = [&](i64 i) { return b.empty() ? 0.0 : double(b[std::size_t(param_of(i))]); };
    for (const auto& seg : s.index) {
        const double n = double(seg.size());
        double mean = 0;
        if (!rms) {
            for (i64 i : seg) mean += double(x[std::size_t(i)]);
            mean /= n;
        }
        double m2 = 0;
        for (i64 i : seg) m2 += (double(x[std::size_t(i)]) - mean) * (double(x[std::size_t(i)]) - mean);
        const double invstd = 1 / std::sqrt(m2 / n + eps);
        r.mean.push_back(mean);
        r.invstd.push_back(invstd);
        double a = 0, bsum = 0;  // mean of g and of g*xhat, g = dy*w
        for (i64 i : seg) {
            const double xhat = (double(x[std::size_t(i)]) - mean) * invstd, g = double(dy[std::size_t(i)]) * wv(i);
            r.y[std::size_t(i)] = xhat * wv(i) + bv(i);
            a += g / n;
            bsum += g * xhat / n;
            r.gw[std::size_t(param_of(i))] += double(dy[std::size_t(i)]) * xhat;
            r.gb[std::size_t(param_of(i))] += double(dy[std::size_t(i)]);
        }
        for (i64 i : seg) {
            const double xhat = (double(x[std::size_t(i)]) - mean) * invstd, g = double(dy[std::size_t(i)]) * wv(i);
            r.gx[std::size_t(i)] = invstd * (g - (rms ? 0.0 : a) - xhat * bsum);
        }
    }
    return r;
}

// Element index of (n, c, p) in channels-first or channels-last memory.
i64 index_of(const GroupShape& s, i64 n, i64 c, i64 p) {
    return s.channels_last ? (n * s.spatial + p) * s.channels + c : (n * s.channels + c) * s.spatial + p;
}

Segments group_segments(const GroupShape& s, i64 groups) {
    Segments seg;
    const i64 per = s.channels / groups;
    for (i64 n = 0; n < s.batch; ++n)
        for (i64 g = 0; g < groups; ++g) {
            std::vector<i64> v;
            for (i64 c = g * per; c < (g + 1) * per; ++c)
                for (i64 p = 0; p < s.spatial; ++p) v.push_back(index_of(s, n, c, p));
            seg.index.push_back(v);
        }
    return seg;
}

Segments row_segments(i64 rows, i64 cols) {
    Segments seg;
    for (i64 r = 0; r < rows; ++r) {
        std::vector<i64> v;
        for (i64 j = 0; j < cols; ++j) v.push_back(r * cols + j);
        seg.index.push_back(v);
    }
    return seg;
}

template <class T>
std::vector<T> data(std::size_t n, std::uint64_t seed, double offset = 3.0) {
    std::vector<T> v = ref::random_vector<T>(n, seed, -2.0, 2.0);
    for (auto& e : v) e = T(double(e) + offset);
    return v;
}

template <class T>
class Norms : public ::testing::Test {
protected:
    void TearDown() override { batchnorm::set_num_threads(threads_); }
    int threads_ = batchnorm::get_num_threads();
};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Norms, Types);

// Gradient sums grow with the count of values summed: compare them against that scale.
template <class T>
double sum_tol(std::size_t terms) {
    return ref::tol<T>() * std::sqrt(double(terms)) * 4;
}

TYPED_TEST(Norms, GroupNormBothLayoutsAndThreads) {
    using T = TypeParam;
    struct Case {
        GroupShape shape;
        i64 groups;
    };
    const std::vector<Case> cases = {{{2, 6, 5}, 3}, {{3, 8, 16}, 2}, {{2, 64, 256}, 32}, {{1, 4, 70000}, 2},
                                     {{4, 6, 1}, 3}, {{2, 20000, 3}, 4}, {{2, 40, 1000}, 40}};
    for (int threads : {1, 2}) {
        batchnorm::set_num_threads(threads);
        for (Case c : cases)
            for (bool last : {false, true}) {
                c.shape.channels_last = last;
                const GroupShape& s = c.shape;
                SCOPED_TRACE(::testing::Message() << "threads " << threads << " shape (" << s.batch << ", " << s.channels
                                                  << ", " << s.spatial << ") groups " << c.groups << " last " << last);
                const std::size_t n = std::size_t(s.size());
                const std::vector<T> x = data<T>(n, 1), dy = data<T>(n, 2, 0.0);
                const std::vector<T> w = data<T>(std::size_t(s.channels), 3, 1.0), b = data<T>(std::size_t(s.channels), 4);
                const auto param = [&](i64 i) { return last ? i % s.channels : (i / s.spatial) % s.channels; };
                const RefResult r =
                    reference(x, dy, group_segments(s, c.groups), 1e-5, false, std::size_t(s.channels), param, w, b);
                std::vector<T> y(n), mean(std::size_t(s.batch * c.groups)), invstd(mean.size());
                batchnorm::group_norm(x.data(), y.data(), s, c.groups, w.data(), b.data(), 1e-5, mean.data(), invstd.data());
                EXPECT_TRUE(ref::close(y, r.y, ref::tol<T>()));
                EXPECT_TRUE(ref::close(mean, r.mean, ref::tol<T>()));
                EXPECT_TRUE(ref::close(invstd, r.invstd, ref::tol<T>()));
                std::vector<T> gx(n), gw(w.size()), gb(w.size());
                batchnorm::group_norm_backward(dy.data(), x.data(), gx.data(), s, c.groups, mean.data(), invstd.data(),
                                               w.data(), gw.data(), gb.data());
                EXPECT_TRUE(ref::close(gx, r.gx, ref::tol<T>() * 10));
                const std::size_t terms = n / std::size_t(s.channels);
                EXPECT_TRUE(ref::close(gw, r.gw, sum_tol<T>(terms), double(terms)));
                EXPECT_TRUE(ref::close(gb, r.gb, sum_tol<T>(terms), double(terms)));
            }
    }
}

TYPED_TEST(Norms, LayerAndRmsNorm) {
    using T = TypeParam;
    const std::vector<std::pair<i64, i64>> shapes = {{4, 7}, {15, 768}, {3, 4096}, {2, 300000}, {1, 1}, {64, 33}};
    for (int threads : {1, 2}) {
        batchnorm::set_num_threads(threads);
        for (const auto& [rows, cols] : shapes)
            for (bool rms : {false, true}) {
                SCOPED_TRACE(::testing::Message() << "threads " << threads << " rows " << rows << " cols " << cols
                                                  << " rms " << rms);
                const std::size_t n = std::size_t(rows * cols);
                const std::vector<T> x = data<T>(n, 5), dy = data<T>(n, 6, 0.0);
                const std::vector<T> w = data<T>(std::size_t(cols), 7, 1.0);
                const std::vector<T> b = rms ? std::vector<T>{} : data<T>(std::size_t(cols), 8);
                const RefResult r = reference(x, dy, row_segments(rows, cols), 1e-5, rms, std::size_t(cols),
                                              [&](i64 i) { return i % cols; }, w, b);
                std::vector<T> y(n), mean(static_cast<std::size_t>(rows)), invstd(mean.size()), gx(n), gw(w.size()), gb(w.size());
                if (rms) {
                    batchnorm::rms_norm(x.data(), y.data(), rows, cols, w.data(), 1e-5, invstd.data());
                    batchnorm::rms_norm_backward(dy.data(), x.data(), gx.data(), rows, cols, invstd.data(), w.data(),
                                                 gw.data());
                } else {
                    batchnorm::layer_norm(x.data(), y.data(), rows, cols, w.data(), b.data(), 1e-5, mean.data(),
                                          invstd.data());
                    EXPECT_TRUE(ref::close(mean, r.mean, ref::tol<T>()));
                    batchnorm::layer_norm_backward(dy.data(), x.data(), gx.data(), rows, cols, mean.data(),
                                                   invstd.data(), w.data(), gw.data(), gb.data());
                    EXPECT_TRUE(ref::close(gb, r.gb, sum_tol<T>(std::size_t(rows)), double(rows)));
                }
                EXPECT_TRUE(ref::close(y, r.y, ref::tol<T>()));
                EXPECT_TRUE(ref::close(invstd, r.invstd, ref::tol<T>()));
                EXPECT_TRUE(ref::close(gx, r.gx, ref::tol<T>() * 10));
                EXPECT_TRUE(ref::close(gw, r.gw, sum_tol<T>(std::size_t(rows)), double(rows)));
                // grad_x may be grad_y (in place): the parameter gradients still see the original.
                std::vector<T> inplace = dy, gw_inplace(w.size()), gb_inplace(w.size());
                if (rms)
                    batchnorm::rms_norm_backward(inplace.data(), x.data(), inplace.data(), rows, cols, invstd.data(),
                                                 w.data(), gw_inplace.data());
                else
                    batchnorm::layer_norm_backward(inplace.data(), x.data(), inplace.data(), rows, cols, mean.data(),
                                                   invstd.data(), w.data(), gw_inplace.data(), gb_inplace.data());
                EXPECT_TRUE(ref::same_bits(inplace, gx));
                EXPECT_TRUE(ref::same_bits(gw_inplace, gw));
                if (!rms) EXPECT_TRUE(ref::same_bits(gb_inplace, gb));
                // grad_x alone (no parameter gradient: the row sums without the column sums) has
                // the same bits.
                std::vector<T> alone(n);
                if (rms)
                    batchnorm::rms_norm_backward(dy.data(), x.data(), alone.data(), rows, cols, invstd.data(), w.data(),
                                                 nullptr);
                else
                    batchnorm::layer_norm_backward(dy.data(), x.data(), alone.data(), rows, cols, mean.data(),
                                                   invstd.data(), w.data(), nullptr, nullptr);
                EXPECT_TRUE(ref::same_bits(alone, gx));
            }
    }
}

TYPED_TEST(Norms, ResidualFusionWritesTheSum) {
    using T = TypeParam;
    const i64 rows = 6, cols = 1000;
    const std::size_t n = std::size_t(rows * cols);
    const std::vector<T> x = data<T>(n, 9), res = data<T>(n, 10, -1.0), w = data<T>(std::size_t(cols), 11, 1.0);
    std::vector<T> sum(n);
    for (std::size_t i = 0; i < n; ++i) sum[i] = T(x[i] + res[i]);
    for (bool rms : {false, true}) {
        const RefResult r = reference(sum, sum, row_segments(rows, cols), 1e-5, rms, std::size_t(cols),
                                      [&](i64 i) { return i % cols; }, w, std::vector<T>{});
        std::vector<T> y(n), sum_out(n, T(0));
        if (rms) batchnorm::rms_norm(x.data(), y.data(), rows, cols, w.data(), 1e-5, static_cast<T*>(nullptr), res.data(), sum_out.data());
        else batchnorm::layer_norm(x.data(), y.data(), rows, cols, w.data(), static_cast<const T*>(nullptr), 1e-5,
                                   static_cast<T*>(nullptr), static_cast<T*>(nullptr), res.data(), sum_out.data());
        EXPECT_TRUE(ref::close(y, r.y, ref::tol<T>()));
        EXPECT_TRUE(ref::same_bits(sum_out, sum));
        std::vector<T> z = x;  // in place, no sum_out: the sum goes through y
        if (rms) batchnorm::rms_norm(z.data(), z.data(), rows, cols, w.data(), 1e-5, static_cast<T*>(nullptr), res.data());
        else batchnorm::layer_norm(z.data(), z.data(), rows, cols, w.data(), static_cast<const T*>(nullptr), 1e-5,
                                   static_cast<T*>(nullptr), static_cast<T*>(nullptr), res.data());
        EXPECT_TRUE(ref::close(z, r.y, ref::tol<T>()));
    }
}

double max_abs_error(const std::vector<float>& a, const std::vector<double>& b) {
    double worst = 0;
    for (std::size_t k = 0; k < a.size(); ++k) worst = std::max(worst, std::abs(double(a[k]) - b[k]));
    return worst;
}

// The accuracy target at a large offset: variance to 1e-6, output to 1e-5, in both layouts.
TEST(NormsAccuracy, Float32AtMean1e6) {
    const GroupShape cf{4, 8, 4096}, cl{4, 8, 4096, true};
    for (int threads : {1, 2}) {
        batchnorm::set_num_threads(threads);
        for (const GroupShape& s : {cf, cl}) {
            const std::size_t n = std::size_t(s.size());
            std::vector<float> x(n);
            std::mt19937_64 rng(12);
            std::normal_distribution<double> normal(1e6, 1.0);
            for (auto& v : x) v = float(normal(rng));
            const RefResult r = reference(x, x, group_segments(s, 2), 1e-5, false, 8, [](i64) { return 0; },
                                          std::vector<float>{}, std::vector<float>{});
            std::vector<float> y(n), mean(8), invstd(8);
            batchnorm::group_norm(x.data(), y.data(), s, 2, static_cast<const float*>(nullptr),
                                  static_cast<const float*>(nullptr), 1e-5, mean.data(), invstd.data());
            for (std::size_t k = 0; k < 8; ++k) {
                const double var = 1 / (double(invstd[k]) * double(invstd[k])) - 1e-5;
                const double var_ref = 1 / (r.invstd[k] * r.invstd[k]) - 1e-5;
                EXPECT_LE(std::abs(var / var_ref - 1), 4e-6);  // invstd itself is rounded to float
            }
            EXPECT_LE(max_abs_error(y, r.y), 1e-5);
            std::vector<float> yl(n), ml(4), il(4);
            batchnorm::layer_norm(x.data(), yl.data(), 4, 8 * 4096, static_cast<const float*>(nullptr),
                                  static_cast<const float*>(nullptr), 1e-5, ml.data(), il.data());
            const RefResult rl = reference(x, x, row_segments(4, 8 * 4096), 1e-5, false, 1, [](i64) { return 0; },
                                           std::vector<float>{}, std::vector<float>{});
            EXPECT_LE(max_abs_error(yl, rl.y), 1e-5);
        }
    }
}

TYPED_TEST(Norms, InstanceNormRunningStatistics) {
    using T = TypeParam;
    for (bool last : {false, true}) {
        const GroupShape s{3, 5, 42, last};
        const std::size_t n = std::size_t(s.size());
        const std::vector<T> x = data<T>(n, 13);
        std::vector<T> rm(5, T(0.5)), rv(5, T(2)), y(n);
        batchnorm::instance_norm(x.data(), y.data(), s, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr),
                                 rm.data(), rv.data(), 0.25, 1e-5);
        const RefResult r = reference(x, x, group_segments(s, 5), 1e-5, false, 5, [](i64) { return 0; },
                                      std::vector<T>{}, std::vector<T>{});
        EXPECT_TRUE(ref::close(y, r.y, ref::tol<T>()));
        std::vector<double> want_m(5), want_v(5);
        for (i64 c = 0; c < 5; ++c) {
            double m = 0, v = 0;
            for (i64 b = 0; b < 3; ++b) {
                const double inv = r.invstd[std::size_t(b * 5 + c)];
                m += r.mean[std::size_t(b * 5 + c)] / 3;
                v += (1 / (inv * inv) - 1e-5) * 42.0 / 41.0 / 3;  // unbiased instance variance
            }
            want_m[std::size_t(c)] = 0.75 * 0.5 + 0.25 * m;
            want_v[std::size_t(c)] = 0.75 * 2 + 0.25 * v;
        }
        EXPECT_TRUE(ref::close(rm, want_m, ref::tol<T>()));
        EXPECT_TRUE(ref::close(rv, want_v, ref::tol<T>() * 10));
    }
}

TYPED_TEST(Norms, InstanceNormWithoutChannelsWritesNoStatistics) {
    // N x 0 instances: no statistics to write (the guards around them must stay untouched)
    using T = TypeParam;
    using P = batchnorm::compute_t<T>;
    for (bool last : {false, true}) {
        const GroupShape s{8, 0, 3, last};
        std::vector<P> guard_mean(8, P(7)), guard_invstd(8, P(7));
        std::vector<T> x(1), y(1, T(5));
        batchnorm::instance_norm(x.data(), y.data(), s, static_cast<const P*>(nullptr), static_cast<const P*>(nullptr),
                                 static_cast<P*>(nullptr), static_cast<P*>(nullptr), 0.1, 1e-5, guard_mean.data(),
                                 guard_invstd.data());
        EXPECT_EQ(guard_mean, std::vector<P>(8, P(7)));
        EXPECT_EQ(guard_invstd, std::vector<P>(8, P(7)));
        EXPECT_EQ(y[0], T(5));
    }
}

TYPED_TEST(Norms, LayerClasses) {
    using T = TypeParam;
    // GroupNorm<T> equals the function; backward fills the parameter gradients.
    const GroupShape s{2, 6, 10};
    const std::vector<T> x = data<T>(120, 14), dy = data<T>(120, 15, 0.0);
    batchnorm::GroupNorm<T> gn(3, 6);
    gn.weight = data<T>(6, 16, 1.0);
    std::vector<T> y(120), y2(120), gx(120), gx2(120), m(6), is(6), gw(6), gb(6);
    gn.forward(x.data(), y.data(), s);
    batchnorm::group_norm(x.data(), y2.data(), s, 3, gn.weight.data(), gn.bias.data(), 1e-5, m.data(), is.data());
    EXPECT_TRUE(ref::same_bits(y, y2));
    gn.backward(dy.data(), x.data(), gx.data(), s);
    batchnorm::group_norm_backward(dy.data(), x.data(), gx2.data(), s, 3, m.data(), is.data(), gn.weight.data(),
                                   gw.data(), gb.data());
    EXPECT_TRUE(ref::same_bits(gx, gx2) && ref::same_bits(gn.weight_grad, gw) && ref::same_bits(gn.bias_grad, gb));
    EXPECT_THROW(gn.backward(dy.data(), x.data(), gx.data(), GroupShape{2, 6, 9}), batchnorm::invalid_argument);

    // InstanceNorm<T>: training updates the running statistics; eval uses them.
    batchnorm::InstanceNorm<T> in(6, 1e-5, 0.1, true, true);
    in.forward(x.data(), y.data(), s);
    EXPECT_NE(in.running_mean[0], T(0));
    in.eval();
    in.forward(x.data(), y.data(), s);
    std::vector<T> want(120);
    batchnorm::forward_eval(x.data(), want.data(), batchnorm::Shape{2, 6, 10}, in.running_mean.data(),
                            in.running_var.data(), in.weight.data(), in.bias.data(), 1e-5);
    EXPECT_TRUE(ref::same_bits(y, want));
    in.backward(dy.data(), x.data(), gx.data(), s);
    EXPECT_EQ(in.weight_grad.size(), 6u);

    // LayerNorm<T> / RMSNorm<T>: PyTorch's defaults; backward after forward.
    batchnorm::LayerNorm<T> ln({2, 5});
    EXPECT_EQ(ln.size(), 10);
    EXPECT_EQ(ln.weight.size(), 10u);
    ln.forward(x.data(), y.data(), 12);
    ln.backward(dy.data(), x.data(), gx.data(), 12);
    EXPECT_EQ(ln.bias_grad.size(), 10u);
    EXPECT_TRUE(batchnorm::LayerNorm<T>({10}, 1e-5, true, false).bias.empty());
    batchnorm::RMSNorm<T> rms({10});
    EXPECT_EQ(rms.eps(), double(std::numeric_limits<T>::epsilon()));
    rms.forward(x.data(), y.data(), 12);
    rms.backward(dy.data(), x.data(), gx.data(), 12);
    EXPECT_EQ(rms.weight_grad.size(), 10u);
    std::vector<T> z = x;
    rms.forward(z.data(), z.data(), 12);
    EXPECT_THROW(rms.backward(dy.data(), z.data(), gx.data(), 12), batchnorm::invalid_argument);
}

TEST(NormsErrors, NamedAndNothingWritten) {
    std::vector<float> x(60, 1.f), y(60, 0.f), m(10, 0.f), is(10, 0.f), rm(6, 0.f), rv(6, 1.f);
    const GroupShape s{2, 6, 5};
    EXPECT_THROW(batchnorm::group_norm(x.data(), y.data(), s, 4, static_cast<const float*>(nullptr),
                                       static_cast<const float*>(nullptr), 1e-5, m.data(), is.data()),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::group_norm(x.data(), y.data(), s, 3, static_cast<const float*>(nullptr),
                                       static_cast<const float*>(nullptr), 0.0),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::instance_norm(x.data(), y.data(), GroupShape{10, 6, 1}, static_cast<const float*>(nullptr),
                                          static_cast<const float*>(nullptr), rm.data(), rv.data(), 0.1, 1e-5),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::instance_norm(x.data(), y.data(), s, static_cast<const float*>(nullptr),
                                          static_cast<const float*>(nullptr), rm.data(), static_cast<float*>(nullptr),
                                          0.1, 1e-5),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::layer_norm(x.data(), y.data(), 6, 10, static_cast<const float*>(nullptr),
                                       static_cast<const float*>(nullptr), 1e-5, m.data(), is.data(),
                                       static_cast<const float*>(nullptr), y.data()),
                 batchnorm::invalid_argument);  // sum_out without residual
    EXPECT_THROW(batchnorm::rms_norm(x.data(), y.data(), -1, 10, static_cast<const float*>(nullptr), 1e-5),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::GroupNorm<float>(4, 6), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::LayerNorm<float>({3}, -1.0), batchnorm::invalid_argument);
    // Sizes whose products pass int64: refused by name, not wrapped to "nothing to do" (which
    // then wrote the saved statistics of every "row" past the buffers) or thrown by a vector.
    const std::int64_t huge = std::int64_t(1) << 40, max = batchnorm::detail::kMaxElements;
    EXPECT_THROW(batchnorm::layer_norm(x.data(), y.data(), huge, huge, static_cast<const float*>(nullptr),
                                       static_cast<const float*>(nullptr), 1e-5, m.data(), is.data()),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::rms_norm(x.data(), y.data(), huge, huge, static_cast<const float*>(nullptr), 1e-5),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::group_norm(x.data(), y.data(), GroupShape{huge, 2, huge}, 1,
                                       static_cast<const float*>(nullptr), static_cast<const float*>(nullptr), 1e-5,
                                       m.data(), is.data()),
                 batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::GroupNorm<float>(2, -4), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::GroupNorm<float>(1, max + 1), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::LayerNorm<float>({std::int64_t(1) << 62, 4}), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::RMSNorm<float>({huge, huge}), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::InstanceNorm<float>(max + 1), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::BatchNorm<float>(max + 1), batchnorm::invalid_argument);
    EXPECT_NO_THROW(batchnorm::detail::check_rows(max, 1));
    EXPECT_THROW(batchnorm::detail::check_rows(max, 2), batchnorm::invalid_argument);
    for (float v : y) EXPECT_EQ(v, 0.f);
    for (float v : m) EXPECT_EQ(v, 0.f);
    for (float v : rm) EXPECT_EQ(v, 0.f);
}

// The layer classes check a shape before they size the statistics' buffers by it (they threw
// std::length_error / std::bad_alloc from std::vector instead).
TEST(NormsErrors, LayerClassesCheckTheShapeBeforeAllocating) {
    std::vector<float> x(64, 1.f), y(64, 0.f);
    batchnorm::GroupNorm<float> gn(2, 8);
    batchnorm::InstanceNorm<float> in(8);
    batchnorm::LayerNorm<float> ln({8});
    batchnorm::RMSNorm<float> rms({8});
    EXPECT_THROW(gn.forward(x.data(), y.data(), GroupShape{-1, 8, 4}), batchnorm::invalid_argument);
    EXPECT_THROW(in.forward(x.data(), y.data(), GroupShape{-1, 8, 4}), batchnorm::invalid_argument);
    EXPECT_THROW(ln.forward(x.data(), y.data(), std::int64_t(1) << 60), batchnorm::invalid_argument);
    EXPECT_THROW(rms.forward(x.data(), y.data(), std::int64_t(1) << 60), batchnorm::invalid_argument);
    EXPECT_THROW(ln.forward(x.data(), y.data(), -1), batchnorm::invalid_argument);
    for (float v : y) EXPECT_EQ(v, 0.f);
}

// Optional arrays of the storage type (residual, sum_out, grad_x) take a literal nullptr
// without an explicit <T>, as the per-channel ones do: T comes from the first array.
TEST(NormsApi, LiteralNullptrForOptionalArrays) {
    std::vector<float> x(16), y(16), y2(16), dy(16), m(4, 0.f), v(4, 1.f), gw(4), gb(4), gw2(4), gx(16);
    for (std::size_t i = 0; i < x.size(); ++i) {
        x[i] = float(i % 5) - 1.5f;
        dy[i] = float(i % 3) - 0.5f;
    }
    const batchnorm::Shape s{1, 4, 4};
    batchnorm::forward_eval(x.data(), y.data(), s, m.data(), v.data(), nullptr, nullptr, 1e-5, nullptr,
                            batchnorm::Activation::relu);
    batchnorm::forward_eval<float>(x.data(), y2.data(), s, m.data(), v.data(), nullptr, nullptr, 1e-5, nullptr,
                                   batchnorm::Activation::relu);
    EXPECT_EQ(y, y2);
    batchnorm::backward(dy.data(), x.data(), nullptr, s, m.data(), v.data(), nullptr, gw.data(), gb.data());
    batchnorm::backward(dy.data(), x.data(), gx.data(), s, m.data(), v.data(), nullptr, gw2.data(), gb.data());
    EXPECT_EQ(gw, gw2);
    batchnorm::layer_norm(x.data(), y.data(), 4, 4, nullptr, nullptr, 1e-5, m.data(), v.data(), nullptr, nullptr);
    batchnorm::layer_norm_backward(dy.data(), x.data(), nullptr, 4, 4, m.data(), v.data(), nullptr, gw.data(),
                                   nullptr);
    batchnorm::rms_norm(x.data(), y.data(), 4, 4, nullptr, 1e-5, v.data(), nullptr, nullptr);
    batchnorm::rms_norm_backward(dy.data(), x.data(), nullptr, 4, 4, v.data(), nullptr, gw.data());
    batchnorm::group_norm(x.data(), y.data(), GroupShape{1, 4, 4}, 2, nullptr, nullptr, 1e-5, m.data(), v.data());
    batchnorm::group_norm_backward(dy.data(), x.data(), nullptr, GroupShape{1, 4, 4}, 2, m.data(), v.data(), nullptr,
                                   gw.data(), nullptr);
    for (float g : gw) EXPECT_TRUE(std::isfinite(g));
}

}  // namespace
