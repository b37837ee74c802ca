// Error cases: every bad call throws batchnorm::invalid_argument (a std::invalid_argument), its
// message names the argument, and it writes nothing: outputs, running statistics, counters and
// layer state are bit-for-bit what they were.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "reference.hpp"

namespace {

using batchnorm::Activation;
using batchnorm::BatchNorm;
using batchnorm::Inference;
using batchnorm::Shape;

static_assert(std::is_base_of_v<std::invalid_argument, batchnorm::invalid_argument>);

// Runs `call`, expects invalid_argument whose message contains `mentions`, and checks that every
// watched buffer is unchanged.
template <class T>
class Watch {
public:
    void add(std::vector<T>& v) {
        buffers_.push_back(&v);
        copies_.push_back(v);
    }
    void expect_invalid(const char* what, const std::function<void()>& call, const std::string& mentions) {
        SCOPED_TRACE(what);
        try {
            call();
            ADD_FAILURE() << "no exception";
        } catch (const batchnorm::invalid_argument& e) {
            EXPECT_NE(std::string(e.what()).find(mentions), std::string::npos)
                << "message \"" << e.what() << "\" does not mention \"" << mentions << "\"";
        } catch (const std::exception& e) {
            ADD_FAILURE() << "wrong exception type: " << e.what();
        }
        for (std::size_t k = 0; k < buffers_.size(); ++k)
            EXPECT_TRUE(ref::same_bits(*buffers_[k], copies_[k])) << "buffer " << k << " was written";
    }

private:
    std::vector<std::vector<T>*> buffers_;
    std::vector<std::vector<T>> copies_;
};

template <class T>
class Errors : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Errors, Types);

TYPED_TEST(Errors, Functional) {
    using T = TypeParam;
    const Shape s{4, 3, 5};
    const std::vector<T> x = ref::random_input<T>(s, 400);
    std::vector<T> y(x.size(), T(-7)), mean(3, T(-7)), var(3, T(-7)), rm(3, T(0)), rv(3, T(1)), sm(3, T(-7)),
        si(3, T(-7)), gx(x.size(), T(-7)), gw(3, T(-7)), gb(3, T(-7));
    const std::vector<T> w(3, T(1)), b(3, T(0)), invstd(3, T(1));
    Watch<T> watch;
    for (auto* v : {&y, &mean, &var, &rm, &rv, &sm, &si, &gx, &gw, &gb}) watch.add(*v);
    const double nan = std::numeric_limits<double>::quiet_NaN();

    watch.expect_invalid("negative shape", [&] { batchnorm::batch_stats(x.data(), Shape{-1, 3, 5}, mean.data(), var.data()); }, "shape");
    watch.expect_invalid("stats: null mean", [&] { batchnorm::batch_stats(x.data(), s, static_cast<T*>(nullptr), var.data()); }, "mean");
    watch.expect_invalid("stats: null x", [&] { batchnorm::batch_stats(static_cast<const T*>(nullptr), s, mean.data(), var.data()); }, "x");

    auto train = [&](const Shape& shape, const T* in, T* out, T* r_mean, T* r_var, double momentum, double eps) {
        batchnorm::forward_train(in, out, shape, w.data(), b.data(), r_mean, r_var, momentum, eps, sm.data(), si.data());
    };
    watch.expect_invalid("train: eps 0", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), 0.1, 0.0); }, "eps");
    watch.expect_invalid("train: eps < 0", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), 0.1, -1e-5); }, "eps");
    watch.expect_invalid("train: eps NaN", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), 0.1, nan); }, "eps");
    watch.expect_invalid("train: momentum < 0", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), -0.1, 1e-5); }, "momentum");
    watch.expect_invalid("train: momentum > 1", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), 1.5, 1e-5); }, "momentum");
    watch.expect_invalid("train: momentum NaN", [&] { train(s, x.data(), y.data(), rm.data(), rv.data(), nan, 1e-5); }, "momentum");
    watch.expect_invalid("train: mean without var", [&] { train(s, x.data(), y.data(), rm.data(), nullptr, 0.1, 1e-5); }, "running_var");
    watch.expect_invalid("train: one value per channel", [&] { train(Shape{1, 3, 1}, x.data(), y.data(), rm.data(), rv.data(), 0.1, 1e-5); }, "more than 1 value per channel");
    watch.expect_invalid("train: null x", [&] { train(s, nullptr, y.data(), rm.data(), rv.data(), 0.1, 1e-5); }, "x");
    watch.expect_invalid("train: null y", [&] { train(s, x.data(), nullptr, rm.data(), rv.data(), 0.1, 1e-5); }, "y");
    watch.expect_invalid("train: negative shape", [&] { train(Shape{4, -3, 5}, x.data(), y.data(), rm.data(), rv.data(), 0.1, 1e-5); }, "shape");

    auto eval = [&](const T* in, T* out, const T* m, const T* v, double eps) {
        batchnorm::forward_eval(in, out, s, m, v, w.data(), b.data(), eps, x.data(), Activation::relu);
    };
    watch.expect_invalid("eval: null mean", [&] { eval(x.data(), y.data(), nullptr, rv.data(), 1e-5); }, "mean");
    watch.expect_invalid("eval: null var", [&] { eval(x.data(), y.data(), rm.data(), nullptr, 1e-5); }, "var");
    watch.expect_invalid("eval: eps inf", [&] { eval(x.data(), y.data(), rm.data(), rv.data(), HUGE_VAL); }, "eps");
    watch.expect_invalid("eval: null x", [&] { eval(nullptr, y.data(), rm.data(), rv.data(), 1e-5); }, "x");
    watch.expect_invalid("eval: null y", [&] { eval(x.data(), nullptr, rm.data(), rv.data(), 1e-5); }, "y");

    const std::int64_t C = std::int64_t(rv.size());  // eval_invstd writes sm (watched)
    watch.expect_invalid("eval_invstd: eps 0", [&] { batchnorm::eval_invstd(rv.data(), sm.data(), C, 0.0); }, "eps");
    watch.expect_invalid("eval_invstd: negative channels", [&] { batchnorm::eval_invstd(rv.data(), sm.data(), std::int64_t(-1), 1e-5); }, "channels");
    watch.expect_invalid("eval_invstd: null var", [&] { batchnorm::eval_invstd<T>(nullptr, sm.data(), C, 1e-5); }, "var");
    watch.expect_invalid("eval_invstd: null invstd", [&] { batchnorm::eval_invstd<T>(rv.data(), nullptr, C, 1e-5); }, "invstd");

    auto back = [&](const T* dy, const T* in, const T* m, const T* is) {
        batchnorm::backward(dy, in, gx.data(), s, m, is, w.data(), gw.data(), gb.data(), true);
    };
    watch.expect_invalid("backward: null mean", [&] { back(x.data(), x.data(), nullptr, invstd.data()); }, "mean");
    watch.expect_invalid("backward: null invstd", [&] { back(x.data(), x.data(), rm.data(), nullptr); }, "invstd");
    watch.expect_invalid("backward: null grad_y", [&] { back(nullptr, x.data(), rm.data(), invstd.data()); }, "grad_y");
    watch.expect_invalid("backward: null x", [&] { back(x.data(), nullptr, rm.data(), invstd.data()); }, "x");

    EXPECT_THROW(batchnorm::set_num_threads(0), batchnorm::invalid_argument);
}

TYPED_TEST(Errors, Inference) {
    using T = TypeParam;
    const Shape s{4, 3, 5};
    const std::vector<T> x = ref::random_input<T>(s, 401), mean(3, T(0)), var(3, T(1));
    std::vector<T> y(x.size(), T(-7));
    Watch<T> watch;
    watch.add(y);
    watch.expect_invalid("negative channels", [&] { Inference<T>(mean.data(), var.data(), nullptr, nullptr, -1, 1e-5); }, "channels");
    watch.expect_invalid("eps 0", [&] { Inference<T>(mean.data(), var.data(), nullptr, nullptr, 3, 0.0); }, "eps");
    watch.expect_invalid("null mean", [&] { Inference<T>(nullptr, var.data(), nullptr, nullptr, 3, 1e-5); }, "mean");
    watch.expect_invalid("null var", [&] { Inference<T>(mean.data(), nullptr, nullptr, nullptr, 3, 1e-5); }, "var");
    const Inference<T> bn(mean.data(), var.data(), nullptr, nullptr, 3, 1e-5);
    watch.expect_invalid("run: wrong channels", [&] { bn.run(x.data(), y.data(), Shape{5, 4, 3}); }, "channels");
    watch.expect_invalid("run: negative shape", [&] { bn.run(x.data(), y.data(), Shape{4, 3, -5}); }, "shape");
    watch.expect_invalid("run: null x", [&] { bn.run(nullptr, y.data(), s); }, "x");
    watch.expect_invalid("run: null y", [&] { bn.run(x.data(), nullptr, s); }, "y");
    watch.expect_invalid("prepare: wrong channels", [&] { bn.prepare(Shape{5, 4, 3}); }, "channels");
}

// Shapes whose element count overflows int64 are refused before anything is read or written
// (they used to segfault or overflow the heap): every entry point checks the products.
TYPED_TEST(Errors, ShapesBeyondInt64) {
    using T = TypeParam;
    const std::int64_t big = (std::int64_t(1) << 62) + 3;
    const Shape huge_outer{big, 4, 1}, huge_channels{8, std::int64_t(1) << 61, 1}, huge_inner{2, 4, big};
    std::vector<T> x(64, T(1)), y(64, T(-7)), stats(64, T(-7)), stats2(64, T(-7));
    Watch<T> watch;
    watch.add(y);
    watch.add(stats);
    watch.add(stats2);
    for (const Shape& s : {huge_outer, huge_channels, huge_inner}) {
        SCOPED_TRACE(ref::str(s));
        watch.expect_invalid("batch_stats", [&] { batchnorm::batch_stats(x.data(), s, stats.data(), stats2.data()); },
                             "shape");
        watch.expect_invalid("forward_train", [&] {
            batchnorm::forward_train(x.data(), y.data(), s, nullptr, nullptr, stats.data(), stats2.data(), 0.1, 1e-5);
        }, "shape");
        watch.expect_invalid("forward_eval", [&] {
            batchnorm::forward_eval(x.data(), y.data(), s, stats.data(), stats2.data(), nullptr, nullptr, 1e-5);
        }, "shape");
        watch.expect_invalid("backward", [&] {
            batchnorm::backward(x.data(), x.data(), y.data(), s, x.data(), x.data(), nullptr, stats.data(),
                                stats2.data());
        }, "shape");
    }
    const Inference<T> bn(x.data(), x.data(), nullptr, nullptr, 4, 1e-5);
    watch.expect_invalid("Inference::run", [&] { bn.run(x.data(), y.data(), huge_outer); }, "shape");
    watch.expect_invalid("Inference::prepare", [&] { bn.prepare(Shape{big, 4, 2}); }, "shape");
    BatchNorm<T> layer(4);
    watch.expect_invalid("BatchNorm::forward", [&] { layer.forward(x.data(), y.data(), huge_outer); }, "shape");
    // The largest accepted shapes: products right at the bound do not overflow either.
    const std::int64_t max = batchnorm::detail::kMaxElements;
    EXPECT_NO_THROW(batchnorm::detail::check_shape(Shape{max, 1, 1}));
    EXPECT_NO_THROW(batchnorm::detail::check_shape(Shape{0, max, 0}));
    EXPECT_THROW(batchnorm::detail::check_shape(Shape{max, 1, 2}), batchnorm::invalid_argument);
    EXPECT_THROW(batchnorm::detail::check_shape(Shape{1, max + 1, 0}), batchnorm::invalid_argument);
}

// A moved-from Inference has nothing to run with: run() and prepare() throw (they segfaulted).
TYPED_TEST(Errors, MovedFromInference) {
    using T = TypeParam;
    const Shape s{4, 3, 5};
    const std::vector<T> x = ref::random_input<T>(s, 402), mean(3, T(0)), var(3, T(1));
    std::vector<T> y(x.size(), T(-7));
    Watch<T> watch;
    watch.add(y);
    Inference<T> from(mean.data(), var.data(), nullptr, nullptr, 3, 1e-5);
    Inference<T> to(std::move(from));
    watch.expect_invalid("run", [&] { from.run(x.data(), y.data(), s); }, "moved from");
    watch.expect_invalid("prepare", [&] { from.prepare(Shape{4, 3, 2}); }, "moved from");
    std::vector<T> z(x.size());
    to.run(x.data(), z.data(), s);  // the object moved to runs as the original would
    EXPECT_TRUE(ref::close(z, ref::normalize(x, s, ref::widen(mean), ref::widen(var), {}, {}, 1e-5), ref::tol<T>()));
    from = to;  // and a moved-from object is usable again once assigned
    from.run(x.data(), y.data(), s);
    EXPECT_TRUE(ref::same_bits(y, z));
}

// A failed layer call changes neither the output nor any state.
TYPED_TEST(Errors, Layer) {
    using T = TypeParam;
    const Shape s{4, 3, 5};
    const std::vector<T> x = ref::random_input<T>(s, 402);
    std::vector<T> y(x.size(), T(-7)), gx(x.size(), T(-7));

    EXPECT_THROW(BatchNorm<T>(0), batchnorm::invalid_argument);
    EXPECT_THROW(BatchNorm<T>(3, 0.0), batchnorm::invalid_argument);
    EXPECT_THROW(BatchNorm<T>(3, 1e-5, 1.5), batchnorm::invalid_argument);
    EXPECT_THROW(BatchNorm<T>(3, 1e-5, -0.5), batchnorm::invalid_argument);

    BatchNorm<T> bn(3);
    Watch<T> watch;
    watch.add(y);
    watch.add(gx);
    watch.add(bn.running_mean);
    watch.add(bn.running_var);
    auto unchanged = [&] { EXPECT_EQ(bn.num_batches_tracked, 0); };

    watch.expect_invalid("backward before forward", [&] { bn.backward(x.data(), x.data(), gx.data(), s); }, "forward first");
    watch.expect_invalid("wrong channels", [&] { bn.forward(x.data(), y.data(), Shape{5, 4, 3}); }, "channels");
    watch.expect_invalid("one value per channel", [&] { bn.forward(x.data(), y.data(), Shape{1, 3, 1}); }, "more than 1 value");
    watch.expect_invalid("null x", [&] { bn.forward(nullptr, y.data(), s); }, "x");
    watch.expect_invalid("residual in training", [&] { bn.forward(x.data(), y.data(), s, x.data()); }, "residual");
    watch.expect_invalid("relu in training", [&] { bn.forward(x.data(), y.data(), s, nullptr, Activation::relu); }, "activation");
    unchanged();
    bn.weight.push_back(T(1));  // a caller broke the state: every call refuses
    watch.expect_invalid("weight of the wrong size", [&] { bn.forward(x.data(), y.data(), s); }, "weight");
    bn.weight.pop_back();
    unchanged();
    EXPECT_NO_THROW(bn.inference());  // training mode is fine, but...
    bn.running_var.clear();
    EXPECT_THROW(bn.inference(), batchnorm::invalid_argument);  // ...a missing running_var is not
    bn.running_var.assign(3, T(1));
}

// Backward is refused after in-place and fused forwards, and for another shape.
TYPED_TEST(Errors, LayerBackward) {
    using T = TypeParam;
    const Shape s{4, 3, 5};
    const std::vector<T> x = ref::random_input<T>(s, 403);
    std::vector<T> y(x.size()), inplace = x, gx(x.size(), T(-7));
    BatchNorm<T> bn(3);
    Watch<T> watch;
    watch.add(gx);

    bn.forward(inplace.data(), inplace.data(), s);
    watch.expect_invalid("after in-place forward", [&] { bn.backward(x.data(), x.data(), gx.data(), s); }, "in-place");
    bn.forward(x.data(), y.data(), s);
    watch.expect_invalid("other shape", [&] { bn.backward(x.data(), x.data(), gx.data(), Shape{5, 3, 4}); }, "shape");
    watch.expect_invalid("null grad_y", [&] { bn.backward(nullptr, x.data(), gx.data(), s); }, "grad_y");
    bn.eval().forward(x.data(), y.data(), s, nullptr, Activation::relu);
    watch.expect_invalid("after fused forward", [&] { bn.backward(x.data(), x.data(), gx.data(), s); }, "residual or activation");
    bn.forward(x.data(), y.data(), s);
    bn.backward(x.data(), x.data(), gx.data(), s);  // a plain eval forward is differentiable
}

TYPED_TEST(Errors, Fold) {
    using T = TypeParam;
    const std::vector<T> mean(3, T(0)), var(3, T(1)), w(3 * 4, T(1)), b(3, T(0));
    std::vector<T> fw(w.size(), T(-7)), fb(3, T(-7));
    Watch<T> watch;
    watch.add(fw);
    watch.add(fb);
    auto fold = [&](std::int64_t channels, double eps, const T* m, const T* v, const T* weight, std::int64_t per,
                    T* out_w, T* out_b) {
        batchnorm::fold(m, v, static_cast<const T*>(nullptr), static_cast<const T*>(nullptr), channels, eps, weight,
                        b.data(), per, out_w, out_b);
    };
    watch.expect_invalid("negative channels", [&] { fold(-3, 1e-5, mean.data(), var.data(), w.data(), 4, fw.data(), fb.data()); }, "channels");
    watch.expect_invalid("negative per_channel", [&] { fold(3, 1e-5, mean.data(), var.data(), w.data(), -4, fw.data(), fb.data()); }, "per_channel");
    watch.expect_invalid("eps 0", [&] { fold(3, 0.0, mean.data(), var.data(), w.data(), 4, fw.data(), fb.data()); }, "eps");
    watch.expect_invalid("null mean", [&] { fold(3, 1e-5, nullptr, var.data(), w.data(), 4, fw.data(), fb.data()); }, "mean");
    watch.expect_invalid("null var", [&] { fold(3, 1e-5, mean.data(), nullptr, w.data(), 4, fw.data(), fb.data()); }, "var");
    watch.expect_invalid("null weight", [&] { fold(3, 1e-5, mean.data(), var.data(), nullptr, 4, fw.data(), fb.data()); }, "weight");
    watch.expect_invalid("null folded_weight", [&] { fold(3, 1e-5, mean.data(), var.data(), w.data(), 4, nullptr, fb.data()); }, "folded_weight");
    watch.expect_invalid("null folded_bias", [&] { fold(3, 1e-5, mean.data(), var.data(), w.data(), 4, fw.data(), nullptr); }, "folded_bias");

    BatchNorm<T> bn(3);
    watch.expect_invalid("layer in training mode", [&] { batchnorm::fold(bn, w.data(), b.data(), 4, fw.data(), fb.data()); }, "eval");
    BatchNorm<T> untracked(3, 1e-5, 0.1, true, false);
    untracked.eval();
    watch.expect_invalid("layer without running stats", [&] { batchnorm::fold(untracked, w.data(), b.data(), 4, fw.data(), fb.data()); }, "running statistics");
}

}  // namespace
