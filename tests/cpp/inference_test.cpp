// batchnorm::Inference<T>: same bits as forward_eval, the per-column cache (built once per
// distinct inner size, shared by concurrent callers), no allocation in run() once prepared,
// copies and moves.
#include <batchnorm/batchnorm.hpp>

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>
#include <thread>
#include <vector>

#include "reference.hpp"

// Counts every operator new in this test program (all threads) while `counting` is set.
namespace {
std::atomic<bool> counting{false};
std::atomic<long> allocations{0};
}  // namespace

// The replacements pair malloc with free; GCC's -Wmismatched-new-delete cannot see that they
// replace the global pair and warns at every inlined delete.
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
void* operator new(std::size_t n) {
    if (counting.load(std::memory_order_relaxed)) allocations.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }

namespace {

using batchnorm::Activation;
using batchnorm::Inference;
using batchnorm::Shape;

template <class T>
class InferenceTest : public ::testing::Test {};
using Types = ::testing::Types<float, double>;
TYPED_TEST_SUITE(InferenceTest, Types);

template <class T>
struct Params {
    explicit Params(std::int64_t channels)
        : mean(ref::random_vector<T>(std::size_t(channels), 20, 1e3, 1e3 + 9)),  // far from 0: exercises shift
          var(ref::random_vector<T>(std::size_t(channels), 21, 0.5, 4)),
          weight(ref::random_vector<T>(std::size_t(channels), 22, -2, 2)),
          bias(ref::random_vector<T>(std::size_t(channels), 23, -1, 1)) {}
    std::vector<T> mean, var, weight, bias;
};

TYPED_TEST(InferenceTest, SameBitsAsForwardEval) {
    using T = TypeParam;
    const double eps = 1e-5;
    std::vector<Shape> shapes = ref::shapes();
    for (const Shape& s : ref::large_shapes()) shapes.push_back(s);
    for (const Shape& s : shapes) {
        SCOPED_TRACE(ref::str(s));
        const Params<T> p(s.channels);
        const std::vector<T> x = ref::random_input<T>(s, 24, 1e3, 2.0), res = ref::random_input<T>(s, 25, 0, 1);
        const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), s.channels, eps);
        EXPECT_EQ(bn.channels(), s.channels);
        for (const T* r : {static_cast<const T*>(nullptr), res.data()}) {
            for (Activation act : {Activation::none, Activation::relu}) {
                std::vector<T> want(x.size()), got(x.size());
                batchnorm::forward_eval(x.data(), want.data(), s, p.mean.data(), p.var.data(), p.weight.data(),
                                        p.bias.data(), eps, r, act);
                bn.run(x.data(), got.data(), s, r, act);
                EXPECT_TRUE(ref::same_bits(got, want)) << "residual " << (r != nullptr);
                bn.run(x.data(), got.data(), s, r, act);  // second call: from the cache
                EXPECT_TRUE(ref::same_bits(got, want));
                std::vector<T> inplace = x;
                bn.run(inplace.data(), inplace.data(), s, r, act);
                EXPECT_TRUE(ref::same_bits(inplace, want));
            }
        }
        // And against the float64 reference.
        std::vector<T> y(x.size());
        bn.run(x.data(), y.data(), s, res.data(), Activation::relu);
        EXPECT_TRUE(ref::close(y, ref::normalize(x, s, ref::widen(p.mean), ref::widen(p.var), ref::widen(p.weight),
                                                 ref::widen(p.bias), eps, &res, true),
                               ref::tol<T>(), 4.0));
    }
}

TYPED_TEST(InferenceTest, NullWeightAndBiasMeanOneAndZero) {
    using T = TypeParam;
    const Shape s{9, 4, 5};
    const Params<T> p(4);
    const std::vector<T> x = ref::random_input<T>(s, 26);
    std::vector<T> want(x.size()), got(x.size());
    batchnorm::forward_eval<T>(x.data(), want.data(), s, p.mean.data(), p.var.data(), nullptr, nullptr, 0.1);
    Inference<T>(p.mean.data(), p.var.data(), nullptr, nullptr, 4, 0.1).run(x.data(), got.data(), s);
    EXPECT_TRUE(ref::same_bits(got, want));
}

// Factors follow engine/affine.hpp's rule: shift is the mean rounded to T, alpha = w/sqrt(var + eps).
TYPED_TEST(InferenceTest, ExposesItsFactors) {
    using T = TypeParam;
    const Params<T> p(6);
    const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), 6, 1e-5);
    for (std::size_t c = 0; c < 6; ++c) {
        EXPECT_EQ(bn.shift()[c], p.mean[c]);
        EXPECT_EQ(bn.alpha()[c], T(double(p.weight[c]) * (1.0 / std::sqrt(double(p.var[c]) + 1e-5))));
        EXPECT_EQ(bn.beta()[c], p.bias[c]);  // mean already in T: no rounding to fold
    }
}

// After prepare() (or a first run) for a shape, run() allocates nothing, for every layout.
TYPED_TEST(InferenceTest, RunDoesNotAllocate) {
    using T = TypeParam;
    std::vector<Shape> shapes = ref::shapes();
    for (const Shape& s : ref::large_shapes()) shapes.push_back(s);
    for (const Shape& s : shapes) {
        SCOPED_TRACE(ref::str(s));
        const Params<T> p(s.channels);
        const std::vector<T> x = ref::random_input<T>(s, 27), res = ref::random_input<T>(s, 28);
        std::vector<T> y(x.size());
        const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), s.channels, 1e-5);
        bn.prepare(s);
        bn.run(x.data(), y.data(), s);  // warms up lazy statics (ISA choice, OpenMP pool)
        allocations = 0;
        counting = true;
        bn.run(x.data(), y.data(), s);
        bn.run(x.data(), y.data(), s, res.data(), Activation::relu);
        bn.run(y.data(), y.data(), s, nullptr, Activation::relu);
        counting = false;
        EXPECT_EQ(allocations.load(), 0);
    }
}

// The per-column factors are built once per inner size; first use builds them without prepare.
TYPED_TEST(InferenceTest, BuildsPerColumnFactorsOncePerInnerSize) {
    using T = TypeParam;
    const Params<T> p(5);
    const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), 5, 1e-5);
    const Shape s3{10, 5, 3}, s4{10, 5, 4}, s3b{2, 5, 3};
    const std::vector<T> x = ref::random_input<T>(s4, 29);
    std::vector<T> y(x.size());
    auto allocations_of = [&](const Shape& s) {
        allocations = 0;
        counting = true;
        bn.run(x.data(), y.data(), s);
        counting = false;
        return allocations.load();
    };
    bn.run(x.data(), y.data(), Shape{10, 5, 1});  // warm-up
    EXPECT_GT(allocations_of(s3), 0);             // first inner = 3: builds
    EXPECT_EQ(allocations_of(s3), 0);
    EXPECT_EQ(allocations_of(s3b), 0);            // another outer, same inner: reused
    EXPECT_GT(allocations_of(s4), 0);             // inner = 4: builds its own
    EXPECT_EQ(allocations_of(s4), 0);
    EXPECT_EQ(allocations_of(s3), 0);
}

// Many threads first-using the same object on the same and different inner sizes.
TYPED_TEST(InferenceTest, ConcurrentFirstUse) {
    using T = TypeParam;
    const std::int64_t C = 6;
    const Params<T> p(C);
    const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), C, 1e-5);
    std::vector<std::thread> threads;
    std::atomic<int> mismatches{0};
    for (int t = 0; t < 8; ++t) {
        threads.emplace_back([&, t] {
            for (std::int64_t inner = 2; inner < 10; ++inner) {
                const Shape s{3 + t, C, inner + t % 3};
                const std::vector<T> x = ref::random_input<T>(s, std::uint64_t(30 + t));
                std::vector<T> want(x.size()), got(x.size());
                batchnorm::forward_eval(x.data(), want.data(), s, p.mean.data(), p.var.data(), p.weight.data(),
                                        p.bias.data(), 1e-5);
                bn.run(x.data(), got.data(), s);
                if (!ref::same_bits(got, want)) ++mismatches;
            }
        });
    }
    for (auto& th : threads) th.join();
    EXPECT_EQ(mismatches.load(), 0);
}

TYPED_TEST(InferenceTest, CopyAndMove) {
    using T = TypeParam;
    const Shape s{4, 3, 2};
    const Params<T> p(3);
    const std::vector<T> x = ref::random_input<T>(s, 40);
    std::vector<T> want(x.size()), got(x.size());
    Inference<T> a(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), 3, 1e-5);
    a.run(x.data(), want.data(), s);
    const Inference<T> copy = a;
    copy.run(x.data(), got.data(), s);
    EXPECT_TRUE(ref::same_bits(got, want));
    Inference<T> assigned(p.mean.data(), p.var.data(), nullptr, nullptr, 3, 1.0);
    assigned = copy;
    assigned.run(x.data(), got.data(), s);
    EXPECT_TRUE(ref::same_bits(got, want));
    const Inference<T> moved = std::move(a);
    moved.run(x.data(), got.data(), s);
    EXPECT_TRUE(ref::same_bits(got, want));
}

TYPED_TEST(InferenceTest, EmptyShapeWritesNothing) {
    using T = TypeParam;
    const Params<T> p(3);
    const Inference<T> bn(p.mean.data(), p.var.data(), p.weight.data(), p.bias.data(), 3, 1e-5);
    bn.run(nullptr, nullptr, Shape{0, 3, 4});
    bn.run(nullptr, nullptr, Shape{2, 3, 0});
    const Inference<T> none(nullptr, nullptr, nullptr, nullptr, 0, 1e-5);  // zero channels
    none.run(nullptr, nullptr, Shape{5, 0, 2});
}

}  // namespace
