// batchnorm::Inference<T>: an eval-mode batch norm whose per-channel factors are computed once.
//
//   batchnorm::Inference<float> bn(running_mean, running_var, weight, bias, channels, 1e-5);
//   bn.run(x, y, batchnorm::Shape{N, C, H * W});                       // y = bn(x)
//   bn.run(x, y, shape, residual, batchnorm::Activation::relu);        // y = relu(bn(x) + residual)
//
// The constructor turns (mean, var, weight, bias, eps) into y = (x - shift)*alpha + beta per
// channel, in float64, with the accuracy rule of forward_eval (shift is the mean rounded to T;
// that rounding moves into beta), so run() gives the same bits as forward_eval with the same
// arguments, without recomputing the factors. run() is one streaming pass over x.
//
// Memory. run() allocates nothing, with one exception chosen on purpose: a layout read as rows
// with a small inner size (1 < inner < 32 values, 16 for double, e.g. (N, C, 3) or
// (N, C, 2, 2)) needs the factors repeated per column, channels*inner values each. They are
// built on the first run() with that inner size (or by prepare()) and kept for later calls:
// at most one set per distinct inner size, at most 30 sizes (14 for double). Call
// prepare(shape) up front for a run() path that never allocates. Channels-first layouts
// (longer planes) and inner = 1 (NC, channels-last NHWC) use the per-channel factors
// directly.
//
// Threads. run() and prepare() are const and may be called concurrently on one object; the
// kernels split large inputs over OpenMP threads themselves (see threads.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "errors.hpp"
#include "functional.hpp"
#include "shape.hpp"

namespace batchnorm {

template <class T>
class Inference {
public:
    using P = compute_t<T>;  // per-channel arrays: float for the half storage types

    // mean and var (the running statistics) must hold `channels` values; weight null means 1,
    // bias null means 0. The arrays are copied: they may be freed or changed afterwards.
    // Throws invalid_argument for channels < 0, eps not positive and finite, or a null mean/var
    // (when channels > 0).
    Inference(const P* mean, const P* var, const P* weight, const P* bias, std::int64_t channels,
              double eps)
        : channels_(channels), cache_(std::make_unique<Cache>()) {
        detail::check_element_type<T>();
        detail::check_count("channels", channels);
        detail::check_eps(eps);
        if (channels > 0) {
            detail::check_pointer(mean, "mean");
            detail::check_pointer(var, "var");
        }
        const std::size_t n = std::size_t(channels);
        shift_.resize(n);
        alpha_.resize(n);
        beta_.resize(n);
        if (channels > 0) {  // exactly forward_eval's factors, the mean as the shift
            std::copy_n(mean, n, shift_.begin());
            detail::kernels<T>().eval_factors(var, weight, bias, channels, eps, alpha_.data(), beta_.data());
        }
    }

    // Copies share nothing: a copy starts with an empty per-column cache.
    Inference(const Inference& other)
        : channels_(other.channels_), shift_(other.shift_), alpha_(other.alpha_), beta_(other.beta_),
          cache_(std::make_unique<Cache>()) {}
    Inference& operator=(const Inference& other) {
        if (this != &other) *this = Inference(other);
        return *this;
    }
    Inference(Inference&&) noexcept = default;
    Inference& operator=(Inference&&) noexcept = default;
    ~Inference() = default;

    // y = act((x - mean)/sqrt(var + eps)*weight + bias + residual), elementwise over x of the
    // given shape, in one pass. residual (same shape as x) may be null; y may be x (in place).
    // Throws invalid_argument, before writing anything, for a bad shape, shape.channels !=
    // channels(), or a null x/y with a non-empty shape. An empty shape writes nothing.
    void run(const T* x, T* y, const Shape& shape, const T* residual = nullptr,
             Activation act = Activation::none) const {
        check_run(x, y, shape);
        if (shape.size() == 0) return;
        if (const Columns* cols = columns_for(shape)) {
            // Element (o, c, i) is column c*inner + i of row o: a (outer, channels*inner, 1)
            // view with the factors repeated per column, the layout apply_affine would build.
            const Shape rows{shape.outer, shape.channels * shape.inner, 1};
            detail::apply_affine(x, residual, y, rows, cols->shift.data(), cols->alpha.data(),
                                 cols->beta.data(), act);
        } else {
            detail::apply_affine(x, residual, y, shape, shift_.data(), alpha_.data(), beta_.data(), act);
        }
    }

    // Builds now what run() on this shape would otherwise build on first use (see the top of
    // this file), so later run() calls allocate nothing. Checks the shape like run().
    void prepare(const Shape& shape) const {
        check_not_moved_from("prepare");
        detail::check_shape(shape);
        check_channels(shape);
        if (shape.size() > 0) columns_for(shape);
    }

    std::int64_t channels() const { return channels_; }
    // The per-channel factors of y = (x - shift)*alpha + beta, `channels()` values each.
    const P* shift() const { return shift_.data(); }
    const P* alpha() const { return alpha_.data(); }
    const P* beta() const { return beta_.data(); }

private:
    // Factors repeated per column for one inner size: index c*inner + i holds channel c's.
    struct Columns {
        std::vector<P> shift, alpha, beta;
    };
    // Inner sizes that read as rows are < min_plane_values<T>(); slot i serves inner = i.
    static constexpr std::size_t kSlots = std::size_t(detail::min_plane_values<T>());
    struct Cache {
        std::mutex build;                                    // serializes building a slot
        std::array<std::atomic<const Columns*>, kSlots> slot{};  // published once, read lock-free
        std::vector<std::unique_ptr<const Columns>> owned;   // guarded by `build`
    };

    // A moved-from Inference has no factors and no cache left to run with.
    void check_not_moved_from(const char* method) const {
        detail::require(cache_ != nullptr, "Inference::", method,
                        ": this object was moved from; assign it a new Inference first");
    }

    void check_channels(const Shape& shape) const {
        detail::require(shape.channels == channels_, "shape: expected ", channels_, " channels, got ",
                        shape.channels);
    }

    void check_run(const T* x, const T* y, const Shape& shape) const {
        check_not_moved_from("run");
        detail::check_shape(shape);
        check_channels(shape);
        if (shape.size() == 0) return;
        detail::check_pointer(x, "x");
        detail::check_pointer(y, "y");
    }

    // The per-column factors for `shape`, or null when the per-channel ones serve.
    const Columns* columns_for(const Shape& shape) const {
        if (shape.inner <= 1 || !detail::reads_as_rows<T>(shape)) return nullptr;
        const std::size_t inner = std::size_t(shape.inner);
        if (inner >= kSlots) return nullptr;  // cannot happen while reads_as_rows is as above
        Cache& cache = *cache_;
        if (const Columns* ready = cache.slot[inner].load(std::memory_order_acquire)) return ready;
        std::lock_guard<std::mutex> lock(cache.build);
        if (const Columns* ready = cache.slot[inner].load(std::memory_order_relaxed)) return ready;
        auto cols = std::make_unique<Columns>();
        const std::size_t n = shift_.size() * inner;
        cols->shift.resize(n);
        cols->alpha.resize(n);
        cols->beta.resize(n);
        for (std::size_t c = 0; c < shift_.size(); ++c) {
            for (std::size_t i = 0; i < inner; ++i) {
                cols->shift[c * inner + i] = shift_[c];
                cols->alpha[c * inner + i] = alpha_[c];
                cols->beta[c * inner + i] = beta_[c];
            }
        }
        const Columns* published = cols.get();
        cache.owned.push_back(std::move(cols));
        cache.slot[inner].store(published, std::memory_order_release);
        return published;
    }

    std::int64_t channels_;
    std::vector<P> shift_, alpha_, beta_;
    std::unique_ptr<Cache> cache_;  // behind a pointer: Inference stays movable
};

}  // namespace batchnorm
