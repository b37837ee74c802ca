// Kernel bodies shared by every ISA backend. Each backend file includes this file inside its
// own namespace and target region, after defining `Ops<T>`, its vector operations:
//   V, W (lanes); zero, set1, load, load_partial(p, n, fill), store, store_partial(p, v, n),
//   add, sub, mul, fma(a, b, c) = a*b + c, max, sum_lanes(v) -> double, sum_each(v[W]) -> V,
//   add_lanes_to(double* dst, v), add_lanes_to_partial(double* dst, v, n);
//   kOverlapTails, and keep_last(v, n) (lanes before the last n cleared) where it is true.
// So the algorithms exist once, and each ISA is compiled with its own instructions enabled.
// No include guard: it is meant to be included once per backend namespace. No lambdas either:
// Clang does not carry a target attribute into a lambda's body (functor structs instead).
//
// Storage and compute types: a kernel's template parameter S is what memory holds (the inputs
// and outputs x, y, dy, gx, residual); T = compute_t<S> (dtype.hpp) is the type of its lanes,
// scalars, per-column factors and per-element parameters. load_n/store_n and
// load_block/store_block convert between them in registers (Ops<T>::load(const S*)); for float
// and double storage the two types are the same.

using i64 = std::int64_t;
using ::batchnorm::detail::KernelTable;
using ::batchnorm::detail::Sums;
using ::batchnorm::compute_t;

using ::batchnorm::detail::invstd_of;
using ::batchnorm::detail::kFlushVectors;
using ::batchnorm::detail::value_or;

template <class P>
inline typename Ops<compute_t<P>>::V load_n(const P* p, i64 n, typename Ops<compute_t<P>>::V fill) {
    using O = Ops<compute_t<P>>;
    return n >= O::W ? O::load(p) : O::load_partial(p, n, fill);
}

template <class P>
inline void store_n(P* p, typename Ops<compute_t<P>>::V v, i64 n) {
    using O = Ops<compute_t<P>>;
    if (n >= O::W) O::store(p, v);
    else O::store_partial(p, v, n);
}

// ---- channels-first: one contiguous run ----------------------------------------------------

// Two float64 sums, sum(u) and sum(v*w), fed from lanes of T: four chains of vector
// accumulator pairs (an add takes three or four cycles: one chain, as backward's reduce had,
// waits on every vector; AMD EPYC, Zen 3, AVX2, 1 thread, best of 7: batch_stats 1x64x112x112
// 84.9 -> 75.4 us, training 185 -> 177 us, backward 276 -> 255 us), flushed into float64
// once a value may have been through kFlushVectors additions: a chain's own, and the two
// levels that join the four chains. They persist across runs, so a channel of many short
// planes pays one final reduction, not one per plane.
template <class T>
struct PairSum {
    using O = Ops<T>;
    using V = typename O::V;
    V a1, a2, b1, b2, c1, c2, d1, d2;
    i64 rounds = 0;  // adds since the last flush: a chain takes at most one vector per add
    Sums total;

    // Spelled out, so GCC compiles it inside the backend's target region.
    PairSum()
        : a1(O::zero()), a2(O::zero()), b1(O::zero()), b2(O::zero()), c1(O::zero()), c2(O::zero()), d1(O::zero()),
          d2(O::zero()) {}

    void add(V u, V v, V w) {
        a1 = O::add(a1, u);
        a2 = O::fma(v, w, a2);
        count_round();
    }
    // Four vectors (u_k, v_k, w_k), one per chain.
    void add4(V u, V v, V w, V u2, V v2, V w2, V u3, V v3, V w3, V u4, V v4, V w4) {
        a1 = O::add(a1, u);
        a2 = O::fma(v, w, a2);
        b1 = O::add(b1, u2);
        b2 = O::fma(v2, w2, b2);
        c1 = O::add(c1, u3);
        c2 = O::fma(v3, w3, c2);
        d1 = O::add(d1, u4);
        d2 = O::fma(v4, w4, d2);
        count_round();
    }
    void count_round() {
        if (++rounds >= kFlushVectors - 2) flush();
    }
    Sums flush() {
        total += Sums{O::sum_lanes(O::add(O::add(a1, b1), O::add(c1, d1))),
                      O::sum_lanes(O::add(O::add(a2, b2), O::add(c2, d2)))};
        a1 = a2 = b1 = b2 = c1 = c2 = d1 = d2 = O::zero();
        rounds = 0;
        return total;
    }
};

// {sum(x - shift), sum((x - shift)^2)} over one run, into acc.
template <class S>
BATCHNORM_ALWAYS_INLINE void run_dev(const S* x, i64 n, typename Ops<compute_t<S>>::V s, PairSum<compute_t<S>>& acc) {
    using T = compute_t<S>;
    using O = Ops<T>;
    constexpr i64 W = O::W;
    i64 i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        const auto d = O::sub(O::load(x + i), s), e = O::sub(O::load(x + i + W), s);
        const auto f = O::sub(O::load(x + i + 2 * W), s), g = O::sub(O::load(x + i + 3 * W), s);
        acc.add4(d, d, d, e, e, e, f, f, f, g, g, g);
    }
    for (; i < n; i += W) {
        // Tail lanes load `shift`, so they add zero to both sums.
        const auto d = O::sub(load_n(x + i, n - i, s), s);
        acc.add(d, d, d);
    }
}

// {sum(dy), sum(dy * (x - shift))} over one run, into acc.
template <class S>
BATCHNORM_ALWAYS_INLINE void run_dot(const S* dy, const S* x, i64 n, typename Ops<compute_t<S>>::V s, PairSum<compute_t<S>>& acc) {
    using T = compute_t<S>;
    using O = Ops<T>;
    constexpr i64 W = O::W;
    i64 i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        const auto g = O::load(dy + i), h = O::load(dy + i + W), k = O::load(dy + i + 2 * W), l = O::load(dy + i + 3 * W);
        acc.add4(g, g, O::sub(O::load(x + i), s), h, h, O::sub(O::load(x + i + W), s), k, k,
                 O::sub(O::load(x + i + 2 * W), s), l, l, O::sub(O::load(x + i + 3 * W), s));
    }
    for (; i < n; i += W) {
        // Tail lanes: dy loads zero, so they add zero to both sums.
        const auto g = load_n(dy + i, n - i, O::zero());
        acc.add(g, g, O::sub(load_n(x + i, n - i, s), s));
    }
}

// The two element-wise formulas every apply kernel computes, written once.
// act((x - s) * a + b + r): the residual r added when kResidual, then ReLU when kRelu.
template <bool kResidual, bool kRelu, class V, class O>
BATCHNORM_ALWAYS_INLINE V affine_value(V x, V r, V s, V a, V b, O) {
    V out = O::fma(O::sub(x, s), a, b);
    if constexpr (kResidual) out = O::add(out, r);
    if constexpr (kRelu) out = O::max(out, O::zero());
    return out;
}

// dy * k + (x - s) * m + q: the input gradient from per-channel coefficients.
template <class V, class O>
BATCHNORM_ALWAYS_INLINE V grad_value(V dy, V x, V s, V k, V m, V q, O) {
    return O::fma(dy, k, O::fma(O::sub(x, s), m, q));
}

// Whether Ops has non-temporal stores of P (the x86 backends): O::stream(p, v), then O::fence().
// Elsewhere a streamed output is written by plain stores.
template <class O, class P, class = void>
struct streams : std::false_type {};
template <class O, class P>
struct streams<O, P, std::void_t<decltype(O::stream(std::declval<P*>(), std::declval<typename O::V>()))>>
    : std::true_type {};

// After a kernel's streamed stores: they are weakly ordered, so the kernel fences them before
// it returns, and the threads that join after it see the output. The row kernels leave it to
// their callers (fence_rows, KernelTable::fence).
template <class S>
BATCHNORM_ALWAYS_INLINE void end_writes(Writes writes) {
    using O = Ops<compute_t<S>>;
    if constexpr (streams<O, S>::value)
        if (writes == Writes::streamed) O::fence();
}

// Whether Ops loads and stores P two vectors at a time, in an order of its own (AVX2 bfloat16:
// even and odd elements, avx2.hpp): O::load_pair(p, first, second) reads 2W values, and
// O::store_pair(p, first, second) (O::stream_pair, aligned, where Ops streams P) writes two
// vectors so read back in their place. For element-wise work whose factors are the same in
// every lane (a channel's run or plane), or put into the pairs' order (channels-last rows,
// with_pair_columns).
template <class O, class P, class = void>
struct pairs : std::false_type {};
template <class O, class P>
struct pairs<O, P,
             std::void_t<decltype(O::store_pair(std::declval<P*>(), std::declval<typename O::V>(),
                                                std::declval<typename O::V>()))>> : std::true_type {};

// affine_value over one pair at x, residual, y: the first vector's factors s0, a0, b0, the
// second's s1, a1, b1. kStream: y streamed (where Ops streams S; y then aligned).
template <bool kStream, bool kResidual, bool kRelu, class S, class V>
BATCHNORM_ALWAYS_INLINE void affine_pair(const S* x, const S* residual, S* y, V s0, V a0, V b0, V s1, V a1, V b1) {
    using O = Ops<compute_t<S>>;
    V x0, x1, r0 = O::zero(), r1 = O::zero();
    O::load_pair(x, x0, x1);
    if constexpr (kResidual) O::load_pair(residual, r0, r1);
    const V y0 = affine_value<kResidual, kRelu>(x0, r0, s0, a0, b0, O{});
    const V y1 = affine_value<kResidual, kRelu>(x1, r1, s1, a1, b1, O{});
    if constexpr (kStream && streams<O, S>::value) O::stream_pair(y, y0, y1);
    else O::store_pair(y, y0, y1);
}

// grad_value over one pair, as affine_pair.
template <bool kStream, class S, class V>
BATCHNORM_ALWAYS_INLINE void grad_pair(const S* dy, const S* x, S* gx, V s0, V k0, V m0, V q0, V s1, V k1, V m1,
                                       V q1) {
    using O = Ops<compute_t<S>>;
    V dy0, dy1, x0, x1;
    O::load_pair(dy, dy0, dy1);
    O::load_pair(x, x0, x1);
    const V g0 = grad_value(dy0, x0, s0, k0, m0, q0, O{}), g1 = grad_value(dy1, x1, s1, k1, m1, q1, O{});
    if constexpr (kStream && streams<O, S>::value) O::stream_pair(gx, g0, g1);
    else O::store_pair(gx, g0, g1);
}

// run_affine's whole pairs of values from i on, where Ops has pairs of S; returns where they end.
template <bool kStream, bool kResidual, bool kRelu, class S, class V>
BATCHNORM_ALWAYS_INLINE i64 affine_pairs(const S* x, const S* residual, S* y, i64 i, i64 n, V s, V a, V b) {
    using O = Ops<compute_t<S>>;
    if constexpr (pairs<O, S>::value)
        for (; i + 2 * O::W <= n; i += 2 * O::W)
            affine_pair<kStream, kResidual, kRelu>(x + i, kResidual ? residual + i : nullptr, y + i, s, a, b, s, a, b);
    return i;
}

// run_grad's whole pairs, as affine_pairs.
template <bool kStream, class S, class V>
BATCHNORM_ALWAYS_INLINE i64 grad_pairs(const S* dy, const S* x, S* gx, i64 i, i64 n, V s, V k, V m, V q) {
    using O = Ops<compute_t<S>>;
    if constexpr (pairs<O, S>::value)
        for (; i + 2 * O::W <= n; i += 2 * O::W) grad_pair<kStream>(dy + i, x + i, gx + i, s, k, m, q, s, k, m, q);
    return i;
}

// y[i..n) = act((x - shift) * alpha + beta + residual): plain stores from i = 0; with kStream
// (where Ops streams S), plain stores up to the first line boundary, non-temporal stores of the
// whole lines from there, plain ones for the last partial line (end_of_lines).
template <class S, bool kResidual, bool kRelu, bool kStream = false>
BATCHNORM_ALWAYS_INLINE void run_affine(const S* x, const S* residual, S* y, i64 n, typename Ops<compute_t<S>>::V shift, typename Ops<compute_t<S>>::V alpha, typename Ops<compute_t<S>>::V beta) {
    using T = compute_t<S>;
    using O = Ops<T>;
    using V = typename O::V;
    i64 i = 0;
    if constexpr (kStream && streams<O, S>::value) {
        const i64 head = values_before_line(y, n), end = end_of_lines<S>(head, n);
        run_affine<S, kResidual, kRelu>(x, residual, y, head, shift, alpha, beta);
        for (i = affine_pairs<true, kResidual, kRelu>(x, residual, y, head, end, shift, alpha, beta); i + O::W <= end;
             i += O::W) {
            const V r = kResidual ? O::load(residual + i) : O::zero();
            O::stream(y + i, affine_value<kResidual, kRelu>(O::load(x + i), r, shift, alpha, beta, O{}));
        }
    } else {
        i = affine_pairs<false, kResidual, kRelu>(x, residual, y, i, n, shift, alpha, beta);
    }
    for (; i < n; i += O::W) {
        const V r = kResidual ? load_n(residual + i, n - i, O::zero()) : O::zero();
        store_n(y + i, affine_value<kResidual, kRelu>(load_n(x + i, n - i, shift), r, shift, alpha, beta, O{}), n - i);
    }
}

// gx = dy * k + (x - shift) * m + q over one run, kStream as for run_affine.
template <class S, bool kStream = false>
BATCHNORM_ALWAYS_INLINE void run_grad(const S* dy, const S* x, S* gx, i64 n, typename Ops<compute_t<S>>::V shift, typename Ops<compute_t<S>>::V k, typename Ops<compute_t<S>>::V m, typename Ops<compute_t<S>>::V q) {
    using T = compute_t<S>;
    using O = Ops<T>;
    i64 i = 0;
    if constexpr (kStream && streams<O, S>::value) {
        const i64 head = values_before_line(gx, n), end = end_of_lines<S>(head, n);
        run_grad(dy, x, gx, head, shift, k, m, q);
        for (i = grad_pairs<true>(dy, x, gx, head, end, shift, k, m, q); i + O::W <= end; i += O::W)
            O::stream(gx + i, grad_value(O::load(dy + i), O::load(x + i), shift, k, m, q, O{}));
    } else {
        i = grad_pairs<false>(dy, x, gx, i, n, shift, k, m, q);
    }
    for (; i < n; i += O::W)
        store_n(gx + i, grad_value(load_n(dy + i, n - i, O::zero()), load_n(x + i, n - i, shift), shift, k, m, q, O{}),
                n - i);
}

// f(std::true_type{}) when flag, else f(std::false_type{}): the flag as a compile-time
// constant in f (decltype(argument)::value), so each kernel body is written once for both.
template <class F>
BATCHNORM_ALWAYS_INLINE void with_flag(bool flag, F&& f) {
    if (flag) f(std::true_type{});
    else f(std::false_type{});
}

// ---- channels-first: runs of one channel -----------------------------------------------------
// A channel's runs are planes `stride` apart: the hardware prefetchers see a short run begin
// only when it is already being read (a 7x7 plane is four cache lines), and with a stride of
// tens of KiB they do not follow from one run to the next. So backward's reduce (two inputs
// per run, read from memory) prefetches the run kPrefetchRuns ahead, whole, when runs are
// short; long runs train the prefetchers themselves. (Measured on an AMD EPYC, Zen 5: backward
// on 128x256x7x7 -30 %, 32x256x7x7 -19 %; the same prefetch in the statistics pass of
// training cost 8 % on 32x256x7x7, whose 1.6 MB stay in cache, and gained nothing elsewhere.)
constexpr i64 kPrefetchRuns = 4;
constexpr i64 kPrefetchMaxBytes = 4096;

// Whether run r + kPrefetchRuns exists and is short enough to prefetch.
inline bool prefetch_ahead(i64 r, i64 count, i64 bytes) {
    return bytes <= kPrefetchMaxBytes && r + kPrefetchRuns < count;
}

// Long runs (past kPrefetchMaxBytes) go in chunks, and each chunk first prefetches the same
// chunk of the next run, a run ahead: the prefetchers follow a long run, but each run starts
// with misses at a new address, which at DRAM size cost about as much as the data. The
// reductions prefetch what they read, the apply kernels what they write (their inputs were
// just read by the reduction; prefetching those too cost). AMD EPYC (Zen 5), 1 thread,
// float32: batch_stats 32x64x56x56 884 -> 519 us, training 2589 -> 2131 us, backward
// 4644 -> 4098 us; 4x256x56x56 training 1299 -> 916 us, backward 1641 -> 1531 us.
constexpr i64 kChunkBytes = 1024;

// body(at, n) over the chunks of `count` runs of len values, `stride` apart, in order, each
// after next(at', n) on the same chunk of the following run. (The reductions spell this loop
// out: through the lambdas GCC kept their accumulators in memory, and lost the gain.)
template <class S, class Next, class Body>
BATCHNORM_ALWAYS_INLINE void for_each_chunk(i64 count, i64 len, i64 stride, Next&& next, Body&& body) {
    const i64 chunk = kChunkBytes / i64(sizeof(S));
    for (i64 r = 0; r < count; ++r)
        for (i64 i = 0; i < len; i += chunk) {
            const i64 at = r * stride + i, n = std::min(chunk, len - i);
            if (r + 1 < count) next(at + stride, n);
            body(at, n);
        }
}

template <class S>
Sums cf_dev(const S* x, i64 count, i64 len, i64 stride, compute_t<S> shift, bool prefetch) {
    using T = compute_t<S>;
    PairSum<T> acc;
    const auto s = Ops<T>::set1(shift);
    if (prefetch && len * i64(sizeof(S)) > kPrefetchMaxBytes) {
        const i64 chunk = kChunkBytes / i64(sizeof(S));
        for (i64 r = 0; r < count; ++r)
            for (i64 i = 0; i < len; i += chunk) {
                const i64 at = r * stride + i, n = std::min(chunk, len - i);
                if (r + 1 < count) prefetch_run(x + at + stride, n);
                run_dev(x + at, n, s, acc);
            }
    } else
        for (i64 r = 0; r < count; ++r) run_dev(x + r * stride, len, s, acc);
    return acc.flush();
}

template <class S>
Sums cf_dot(const S* dy, const S* x, i64 count, i64 len, i64 stride, compute_t<S> shift, bool prefetch) {
    using T = compute_t<S>;
    PairSum<T> acc;
    const auto s = Ops<T>::set1(shift);
    const i64 bytes = len * i64(sizeof(S)), ahead = kPrefetchRuns * stride;
    if (prefetch && bytes > kPrefetchMaxBytes) {
        const i64 chunk = kChunkBytes / i64(sizeof(S));
        for (i64 r = 0; r < count; ++r)
            for (i64 i = 0; i < len; i += chunk) {
                const i64 at = r * stride + i, n = std::min(chunk, len - i);
                if (r + 1 < count) {
                    prefetch_run(dy + at + stride, n);
                    prefetch_run(x + at + stride, n);
                }
                run_dot(dy + at, x + at, n, s, acc);
            }
        return acc.flush();
    }
    for (i64 r = 0; r < count; ++r) {
        if (prefetch_ahead(r, count, bytes)) {
            prefetch_run(dy + r * stride + ahead, len);
            prefetch_run(x + r * stride + ahead, len);
        }
        run_dot(dy + r * stride, x + r * stride, len, s, acc);
    }
    return acc.flush();
}

template <class S>
void cf_affine(const S* x, S* y, i64 count, i64 len, i64 stride, compute_t<S> shift, compute_t<S> alpha,
               compute_t<S> beta, bool relu, Writes writes) {
    using O = Ops<compute_t<S>>;
    const auto s = O::set1(shift), a = O::set1(alpha), b = O::set1(beta);
    with_flag(relu, [&](auto relu_flag) {
        with_flag(writes == Writes::streamed, [&](auto stream_flag) {
            const auto apply = [&](i64 at, i64 n) {
                run_affine<S, false, decltype(relu_flag)::value, decltype(stream_flag)::value>(x + at, nullptr, y + at,
                                                                                               n, s, a, b);
            };
            if (writes == Writes::prefetched && len * i64(sizeof(S)) > kPrefetchMaxBytes)
                for_each_chunk<S>(
                    count, len, stride, [&](i64 at, i64 n) { prefetch_run<true>(y + at, n); }, apply);
            else
                for (i64 r = 0; r < count; ++r) apply(r * stride, len);
        });
    });
    end_writes<S>(writes);
}

template <class S>
void cf_grad(const S* dy, const S* x, S* gx, i64 count, i64 len, i64 stride, compute_t<S> shift, compute_t<S> k,
             compute_t<S> m, compute_t<S> q, Writes writes) {
    using T = compute_t<S>;
    using O = Ops<T>;
    const auto s = O::set1(shift), kv = O::set1(k), mv = O::set1(m), qv = O::set1(q);
    with_flag(writes == Writes::streamed, [&](auto stream_flag) {
        const auto apply = [&](i64 at, i64 n) {
            run_grad<S, decltype(stream_flag)::value>(dy + at, x + at, gx + at, n, s, kv, mv, qv);
        };
        if (writes == Writes::prefetched && len * i64(sizeof(S)) > kPrefetchMaxBytes)
            for_each_chunk<S>(
                count, len, stride, [&](i64 at, i64 n) { prefetch_run<true>(gx + at, n); }, apply);
        else
            for (i64 r = 0; r < count; ++r) apply(r * stride, len);
    });
    end_writes<S>(writes);
}

// ---- channels-first: blocks of short planes -----------------------------------------------
// A block of `planes` consecutive channels: plane j of row r starts at r * stride + j * len.
// Rows are read in memory order, so the block streams. Up to kFlushVectors vectors a plane's
// vector count is a compile-time constant (no loop or tail test per vector), and its sums go
// into the plane's own vector accumulators (kBlockPlanes at a time), flushed into float64
// every few rows: one horizontal sum per plane per flush, not one per plane and row. Longer
// planes (run_long) go through the one-run kernels, plane by plane in the same order.

constexpr i64 kBlockPlanes = 32;

// Vector v of a plane of kV vectors whose last vector has `last` lanes (1..W).
template <int kV, class P>
BATCHNORM_ALWAYS_INLINE typename Ops<compute_t<P>>::V plane_load(const P* p, int v, i64 last,
                                                                 typename Ops<compute_t<P>>::V fill) {
    using O = Ops<compute_t<P>>;
    return v == kV - 1 && last < O::W ? O::load_partial(p + v * O::W, last, fill) : O::load(p + v * O::W);
}

template <int kV, class P>
BATCHNORM_ALWAYS_INLINE void plane_store(P* p, int v, i64 last, typename Ops<compute_t<P>>::V value) {
    using O = Ops<compute_t<P>>;
    if (v == kV - 1 && last < O::W) O::store_partial(p + v * O::W, value, last);
    else O::store(p + v * O::W, value);
}

// Whether Ops stores a whole plane of P at once, O::store_plane<kV>(p, values, last): a backend
// whose narrowing to P checks each vector for a rare case checks a plane's vectors together
// (AVX-512 BF16: vcvtneps2bf16 flushes float32 denormals, so each vector was tested for one
// and branched on it; once per plane, bfloat16 eval of 8x512x7x7 on an AMD EPYC Zen 4, 1
// thread: 29.0 -> 24.6 us, 22.2 with no test at all).
template <class O, class P, class = void>
struct stores_planes : std::false_type {};
template <class O, class P>
struct stores_planes<O, P, std::void_t<decltype(O::template store_plane<1>(std::declval<P*>(), nullptr, i64(0)))>>
    : std::true_type {};

// Stores value(v), v < kV, the vectors of one plane at p (the last with `last` lanes): at once
// where Ops stores planes, else vector by vector.
template <int kV, class P, class Value>
BATCHNORM_ALWAYS_INLINE void plane_store_values(P* p, i64 last, Value&& value) {
    using O = Ops<compute_t<P>>;
    if constexpr (stores_planes<O, P>::value) {
        typename O::V out[kV];
        BATCHNORM_UNROLL_PLANE
        for (int v = 0; v < kV; ++v) out[v] = value(v);
        O::template store_plane<kV>(p, out, last);
    } else {
        BATCHNORM_UNROLL_PLANE
        for (int v = 0; v < kV; ++v) plane_store<kV>(p, v, last, value(v));
    }
}

// Overlapping tails: with Ops::kOverlapTails, the partial last vector of a plane of kV >= 2
// vectors is read as the W values that end the plane, one plain load that overlaps the vector
// before it. The sums clear the lanes that vector counted (keep_last); the apply stores the
// whole vector, rewriting those lanes with the values they already hold, and loads its inputs
// before it stores anything of the plane, so an output that is its own input stays right.
template <int kV, class P>
BATCHNORM_ALWAYS_INLINE bool overlap_tail(i64 last) {
    using O = Ops<compute_t<P>>;
    return O::kOverlapTails && kV >= 2 && last < O::W;
}

// Where the overlapping last vector of a plane starting at p begins.
template <int kV, class P>
BATCHNORM_ALWAYS_INLINE P* tail_at(P* p, i64 last) {
    return p + (kV - 2) * Ops<compute_t<std::remove_const_t<P>>>::W + last;
}

// v with the lanes before its last n cleared (reached only where overlap_tail holds).
template <class O>
BATCHNORM_ALWAYS_INLINE typename O::V keep_last(typename O::V v, i64 n) {
    if constexpr (O::kOverlapTails) return O::keep_last(v, n);
    else return v;
}

// y = (x - s) * a + b, plus the residual and then ReLU when asked, over one plane of kV vectors.
template <int kV, bool kResidual, bool kRelu, class S>
BATCHNORM_ALWAYS_INLINE void plane_affine(const S* x, const S* residual, S* y, i64 last,
                                          typename Ops<compute_t<S>>::V s, typename Ops<compute_t<S>>::V a,
                                          typename Ops<compute_t<S>>::V b) {
    using O = Ops<compute_t<S>>;
    if (overlap_tail<kV, S>(last)) {
        const auto tail = affine_value<kResidual, kRelu>(
            O::load(tail_at<kV>(x, last)), kResidual ? O::load(tail_at<kV>(residual, last)) : O::zero(), s, a, b, O{});
        constexpr int kPaired = pairs<O, S>::value ? (kV - 1) / 2 * 2 : 0;
        affine_pairs<false, kResidual, kRelu>(x, residual, y, 0, kPaired * O::W, s, a, b);
        BATCHNORM_UNROLL_PLANE
        for (int v = kPaired; v < kV - 1; ++v)
            O::store(y + v * O::W, affine_value<kResidual, kRelu>(O::load(x + v * O::W),
                                                                 kResidual ? O::load(residual + v * O::W) : O::zero(),
                                                                 s, a, b, O{}));
        O::store(tail_at<kV>(y, last), tail);
        return;
    }
    if constexpr (pairs<O, S>::value)
        if (last == O::W) return run_affine<S, kResidual, kRelu>(x, residual, y, kV * O::W, s, a, b);
    const auto value = [&](int v) {
        const auto r = kResidual ? plane_load<kV>(residual, v, last, O::zero()) : O::zero();
        return affine_value<kResidual, kRelu>(plane_load<kV>(x, v, last, s), r, s, a, b, O{});
    };
    plane_store_values<kV>(y, last, value);
}

// dy * k + (x - s) * m + q over one plane of kV vectors (overlapping tails as plane_affine).
template <int kV, class S>
BATCHNORM_ALWAYS_INLINE void plane_grad(const S* dy, const S* x, S* gx, i64 last, typename Ops<compute_t<S>>::V s,
                                        typename Ops<compute_t<S>>::V k, typename Ops<compute_t<S>>::V m,
                                        typename Ops<compute_t<S>>::V q) {
    using O = Ops<compute_t<S>>;
    if (overlap_tail<kV, S>(last)) {
        const auto tail = grad_value(O::load(tail_at<kV>(dy, last)), O::load(tail_at<kV>(x, last)), s, k, m, q, O{});
        constexpr int kPaired = pairs<O, S>::value ? (kV - 1) / 2 * 2 : 0;
        grad_pairs<false>(dy, x, gx, 0, kPaired * O::W, s, k, m, q);
        BATCHNORM_UNROLL_PLANE
        for (int v = kPaired; v < kV - 1; ++v)
            O::store(gx + v * O::W, grad_value(O::load(dy + v * O::W), O::load(x + v * O::W), s, k, m, q, O{}));
        O::store(tail_at<kV>(gx, last), tail);
        return;
    }
    if constexpr (pairs<O, S>::value)
        if (last == O::W) return run_grad(dy, x, gx, kV * O::W, s, k, m, q);
    const auto value = [&](int v) {
        return grad_value(plane_load<kV>(dy, v, last, O::zero()), plane_load<kV>(x, v, last, s), s, k, m, q, O{});
    };
    plane_store_values<kV>(gx, last, value);
}

// Calls op.template run<kV>() with kV = vectors (1..kFlushVectors), or op.run_long() for
// longer planes.
template <int kV = 1, class Op>
BATCHNORM_ALWAYS_INLINE void with_plane_vectors(i64 vectors, Op& op) {
    if constexpr (kV <= kFlushVectors) {
        if (vectors == kV) op.template run<kV>();
        else with_plane_vectors<kV + 1>(vectors, op);
    } else {
        op.run_long();
    }
}

// Runs op over planes of len values of S: a compile-time vector count for short planes of a
// vector backend; run_long, the plane-by-plane loop, for long planes and on one lane, where an
// unrolled copy per plane length would only add compile time (the scalar backend is the
// reference, not a fast path: 16 copies of each block kernel were a third of each type's code).
template <class S, class Op>
BATCHNORM_ALWAYS_INLINE void with_plane_length(i64 len, Op& op) {
    constexpr i64 W = Ops<compute_t<S>>::W;
    if constexpr (W > 1) with_plane_vectors((len + W - 1) / W, op);
    else op.run_long();
}

// log2(W): the additions Ops::sum_each puts into each of its sums.
template <class O>
constexpr i64 lane_adds() {
    i64 adds = 0;
    for (i64 w = O::W; w > 1; w /= 2) ++adds;
    return adds;
}

// Two vector sums per plane, added to the planes' float64 totals W planes at a time:
// Ops::sum_each sums W vectors across with a transpose's shuffles, where a horizontal sum
// (sum_lanes) per vector cost about four times as much, and a 7x7 plane takes a pair of them
// at every flush (AMD EPYC Zen 4, 1 thread, float32, statistics: 8x512x7x7 19.4 -> 15.3 us,
// 1x64x7x7 1.0 -> 0.8 us). Planes come in order from the first totals.
template <class T>
class PlaneTotals {
    using O = Ops<T>;
    using V = typename O::V;

public:
    PlaneTotals(double* s1, double* s2) : s1_(s1), s2_(s2) {}
    void add(V a, V b) {
        a_[n_] = a;
        b_[n_] = b;
        if (++n_ == O::W) drain();
    }
    // Adds what is held; call once the planes are done.
    void drain() {
        if (n_ == 0) return;
        for (i64 i = n_; i < O::W; ++i) a_[i] = b_[i] = O::zero();
        if (n_ == O::W) {
            O::add_lanes_to(s1_, O::sum_each(a_));
            O::add_lanes_to(s2_, O::sum_each(b_));
        } else {
            O::add_lanes_to_partial(s1_, O::sum_each(a_), n_);
            O::add_lanes_to_partial(s2_, O::sum_each(b_), n_);
        }
        s1_ += n_;
        s2_ += n_;
        n_ = 0;
    }

private:
    V a_[O::W], b_[O::W];
    i64 n_ = 0;
    double *s1_, *s2_;
};

// kDot false: s1[j] += sum(x - shift[j]), s2[j] += sum((x - shift[j])^2);
// kDot true:  s1[j] += sum(dy), s2[j] += sum(dy * (x - shift[j])); over plane j of every row.
template <class S, bool kDot>
struct PlaneSums {
    using T = compute_t<S>;
    using V = typename Ops<T>::V;
    const S *dy_, *x_;
    i64 rows_, stride_, planes_, len_;
    const T* shift_;
    double *s1_, *s2_;
    BlockReads reads_;

    // One plane of kV vectors (the last with `last` lanes) into two chains of sums, even and odd
    // vectors: a plane's sums wait on half as many adds (Zen 3, AVX2: batch_stats 32x64x7x7
    // 32.6 -> 19.3 us). Tail lanes: x loads the shift and dy zero, so they add zero to both sums.
    template <int kV>
    BATCHNORM_ALWAYS_INLINE static void add_plane(const S* dy, const S* x, i64 last, V s, V& u1, V& u2, V& w1,
                                                  V& w2) {
        using O = Ops<T>;
        const bool overlap = overlap_tail<kV, S>(last);
        BATCHNORM_UNROLL_PLANE
        for (int v = 0; v < kV; ++v) {
            V d, g;
            if (overlap && v == kV - 1) {  // both cleared: 0 * inf would be NaN
                d = keep_last<O>(O::sub(O::load(tail_at<kV>(x, last)), s), last);
                g = kDot ? keep_last<O>(O::load(tail_at<kV>(dy, last)), last) : d;
            } else {
                d = O::sub(plane_load<kV>(x, v, last, s), s);
                g = kDot ? plane_load<kV>(dy, v, last, O::zero()) : d;
            }
            if (v % 2 == 0) {
                u1 = O::add(u1, g);
                u2 = O::fma(g, d, u2);
            } else {
                w1 = O::add(w1, g);
                w2 = O::fma(g, d, w2);
            }
        }
    }

    // Additions a value takes in add_plane: its chain (the longer one, every other vector of
    // the plane), and the add that joins the two chains.
    template <int kV>
    static constexpr i64 plane_adds() {
        return (kV + 1) / 2 + 1;
    }

    template <int kV>
    void run() const {
        if (reads_ == BlockReads::resident) run_resident<kV>();
        else run_streamed<kV>();
    }

    // A flush's worth of rows at a time, plane by plane down them, each plane's sums in
    // registers (8x512x7x7 float32 statistics, Intel Xeon, 1 thread: 26.3 -> 21.0 us). Two
    // planes go down the rows together: each plane's sums are chains of dependent adds, and a
    // second plane's chains fill their wait (AMD EPYC Zen 1, AVX2, the block sums alone, best
    // of 7: 8x512x7x7 statistics 51.4 -> 47.3 us, backward sums 63.3 -> 58.0; 8x256x4x4
    // backward sums 15.5 -> 9.7). Four planes spill registers and lose.
    template <int kV>
    void run_resident() const {
        // The chains run on down the rows (each row adds half a plane to a chain), then the add
        // that joins them and PlaneTotals' sum across the lanes.
        const i64 flush_rows = std::max<i64>(1, (kFlushVectors - 1 - lane_adds<Ops<T>>()) / (plane_adds<kV>() - 1));
        for (i64 r0 = 0; r0 < rows_; r0 += flush_rows) {
            const i64 r1 = std::min(rows_, r0 + flush_rows);
            PlaneTotals<T> totals(s1_, s2_);
            i64 j = 0;
            V sums[2][2];
            for (; j + 2 <= planes_; j += 2) {
                resident_planes<kV, 2>(j, r0, r1, sums);
                totals.add(sums[0][0], sums[1][0]);
                totals.add(sums[0][1], sums[1][1]);
            }
            if (j < planes_) {
                resident_planes<kV, 1>(j, r0, r1, sums);
                totals.add(sums[0][0], sums[1][0]);
            }
            totals.drain();
        }
    }

    // Rows [r0, r1) of kG planes from plane j, each plane's sums in its own registers, returned
    // in sums[0][g], sums[1][g] (added to the totals here, they were kept in memory by GCC).
    template <int kV, int kG>
    BATCHNORM_ALWAYS_INLINE void resident_planes(i64 j, i64 r0, i64 r1, V (&sums)[2][2]) const {
        using O = Ops<T>;
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S *const dy = dy_, *const x = x_;
        const i64 stride = stride_, len = len_, last = len - (kV - 1) * O::W;
        V s[kG], u1[kG], u2[kG], w1[kG], w2[kG];
        for (int g = 0; g < kG; ++g) {
            s[g] = O::set1(shift_[j + g]);
            u1[g] = u2[g] = w1[g] = w2[g] = O::zero();
        }
        for (i64 r = r0; r < r1; ++r)
            for (int g = 0; g < kG; ++g) {
                const i64 at = r * stride + (j + g) * len;
                add_plane<kV>(kDot ? dy + at : nullptr, x + at, last, s[g], u1[g], u2[g], w1[g], w2[g]);
            }
        for (int g = 0; g < kG; ++g) {
            sums[0][g] = O::add(u1[g], w1[g]);
            sums[1][g] = O::add(u2[g], w2[g]);
        }
    }

    // Rows in memory order, one stream, kBlockPlanes planes at a time with their sums in vector
    // accumulators, flushed every few rows.
    template <int kV>
    void run_streamed() const {
        using O = Ops<T>;
        const S *const dy = dy_, *const x = x_;
        const i64 rows = rows_, stride = stride_, planes = planes_, len = len_, last = len - (kV - 1) * O::W;
        double *const s1 = s1_, *const s2 = s2_;
        const bool prefetch = reads_ == BlockReads::prefetched;  // the planes kPrefetchRuns rows ahead
        // Each row's plane sums (plane_adds) go into the plane's accumulators, one add a row.
        // (Their flush is rare enough that PlaneTotals' sum across the lanes, with its adds in
        // float32 taken from the budget, cost more in flushes than it saved: 32x256x14x14.)
        const i64 flush_rows = std::max<i64>(1, kFlushVectors - plane_adds<kV>() + 1);
        for (i64 j0 = 0; j0 < planes; j0 += kBlockPlanes) {
            const i64 nj = std::min(kBlockPlanes, planes - j0);
            V s[kBlockPlanes], a1[kBlockPlanes], a2[kBlockPlanes];
            for (i64 j = 0; j < nj; ++j) s[j] = O::set1(shift_[j0 + j]);
            for (i64 r = 0; r < rows;) {
                const i64 first = r, end = std::min(rows, r + flush_rows);
                for (; r < end; ++r)
                    for (i64 j = 0; j < nj; ++j) {
                        const i64 at = r * stride + (j0 + j) * len;
                        if (prefetch && r + kPrefetchRuns < rows) {
                            if (kDot) prefetch_run(dy + at + kPrefetchRuns * stride, len);
                            prefetch_run(x + at + kPrefetchRuns * stride, len);
                        }
                        V u1 = O::zero(), u2 = O::zero(), w1 = O::zero(), w2 = O::zero();
                        add_plane<kV>(kDot ? dy + at : nullptr, x + at, last, s[j], u1, u2, w1, w2);
                        u1 = O::add(u1, w1);
                        u2 = O::add(u2, w2);
                        // The first row of a flush sets the plane's accumulators: nothing to clear.
                        a1[j] = r == first ? u1 : O::add(a1[j], u1);
                        a2[j] = r == first ? u2 : O::add(a2[j], u2);
                    }
                for (i64 j = 0; j < nj; ++j) {
                    s1[j0 + j] += O::sum_lanes(a1[j]);
                    s2[j0 + j] += O::sum_lanes(a2[j]);
                }
            }
        }
    }

    // Planes longer than kFlushVectors vectors: each plane of a row is a run of its own, summed
    // as the channel-by-channel kernels sum one (run_dev, run_dot) and added to its channel's
    // sums; a run that long pays for its own flush.
    void run_long() const {
        using O = Ops<T>;
        const S *const dy = dy_, *const x = x_;
        const i64 rows = rows_, stride = stride_, planes = planes_, len = len_;
        const bool prefetch = reads_ == BlockReads::prefetched;
        for (i64 r = 0; r < rows; ++r)
            for (i64 j = 0; j < planes; ++j) {
                const i64 at = r * stride + j * len;
                if (prefetch && r + kPrefetchRuns < rows) {
                    if (kDot) prefetch_run(dy + at + kPrefetchRuns * stride, len);
                    prefetch_run(x + at + kPrefetchRuns * stride, len);
                }
                PairSum<T> acc;
                if constexpr (kDot) run_dot(dy + at, x + at, len, O::set1(shift_[j]), acc);
                else run_dev(x + at, len, O::set1(shift_[j]), acc);
                const Sums sums = acc.flush();
                s1_[j] += sums.first;
                s2_[j] += sums.second;
            }
    }
};

template <class S>
void pb_dev(const S* x, i64 rows, i64 stride, i64 planes, i64 len, const compute_t<S>* shift, double* s1,
            double* s2, BlockReads reads) {
    PlaneSums<S, false> op{nullptr, x, rows, stride, planes, len, shift, s1, s2, reads};
    with_plane_length<S>(len, op);
}

template <class S>
void pb_dot(const S* dy, const S* x, i64 rows, i64 stride, i64 planes, i64 len, const compute_t<S>* shift,
            double* sdy, double* sdyx, BlockReads reads) {
    PlaneSums<S, true> op{dy, x, rows, stride, planes, len, shift, sdy, sdyx, reads};
    with_plane_length<S>(len, op);
}

// kGrad false: y = act((x - shift[j]) * a[j] + b[j]), act ReLU when kRelu;
// kGrad true:  y = dy * a[j] + (x - shift[j]) * b[j] + c[j]; over plane j of every row.
template <class S, bool kGrad, bool kRelu = false>
struct PlaneApply {
    using T = compute_t<S>;
    const S *dy_, *x_;
    S* y_;
    i64 rows_, stride_, planes_, len_;
    const T *shift_, *a_, *b_, *c_;
    Writes writes_;  // prefetched: the output planes kPrefetchRuns rows ahead, for writing

    template <int kV>
    void run() const {
        using O = Ops<T>;
        using V = typename O::V;
        const S *const dy = dy_, *const x = x_;
        S* const y = y_;
        const T *const shift = shift_, *const a = a_, *const b = b_, *const c = c_;
        const i64 rows = rows_, stride = stride_, planes = planes_, len = len_, last = len - (kV - 1) * O::W;
        const bool prefetch = writes_ == Writes::prefetched;
        for (i64 r = 0; r < rows; ++r)
            for (i64 j = 0; j < planes; ++j) {
                const i64 at = r * stride + j * len;
                if (prefetch && r + kPrefetchRuns < rows) prefetch_run<true>(y + at + kPrefetchRuns * stride, len);
                const V s = O::set1(shift[j]), av = O::set1(a[j]), bv = O::set1(b[j]);
                if constexpr (kGrad) {
                    plane_grad<kV>(dy + at, x + at, y + at, last, s, av, bv, O::set1(c[j]));
                } else {
                    plane_affine<kV, false, kRelu>(x + at, static_cast<const S*>(nullptr), y + at, last, s, av, bv);
                }
            }
    }

    // Planes longer than kFlushVectors vectors, and streamed output: each plane a run, as the
    // channel-by-channel kernels apply one (run_grad, run_affine).
    void run_long() const {
        with_flag(writes_ == Writes::streamed, [&](auto stream_flag) { run_runs<decltype(stream_flag)::value>(); });
    }

    template <bool kStream>
    void run_runs() const {
        using O = Ops<T>;
        const S *const dy = dy_, *const x = x_;
        S* const y = y_;
        const i64 rows = rows_, stride = stride_, planes = planes_, len = len_;
        const bool prefetch = writes_ == Writes::prefetched;
        for (i64 r = 0; r < rows; ++r)
            for (i64 j = 0; j < planes; ++j) {
                const i64 at = r * stride + j * len;
                if (prefetch && r + kPrefetchRuns < rows) prefetch_run<true>(y + at + kPrefetchRuns * stride, len);
                if constexpr (kGrad)
                    run_grad<S, kStream>(dy + at, x + at, y + at, len, O::set1(shift_[j]), O::set1(a_[j]),
                                         O::set1(b_[j]), O::set1(c_[j]));
                else
                    run_affine<S, false, kRelu, kStream>(x + at, nullptr, y + at, len, O::set1(shift_[j]),
                                                         O::set1(a_[j]), O::set1(b_[j]));
            }
    }
};

// Runs op over planes of len values of S, as with_plane_length does, but a streamed output
// plane by plane (run_long): its stores begin at a line boundary, which a plane's compile-time
// vectors do not.
template <class S, class Op>
BATCHNORM_ALWAYS_INLINE void with_plane_writes(i64 len, Writes writes, Op& op) {
    if (writes == Writes::streamed) op.run_long();
    else with_plane_length<S>(len, op);
    end_writes<S>(writes);
}

template <class S>
void pb_affine(const S* x, S* y, i64 rows, i64 stride, i64 planes, i64 len, const compute_t<S>* shift,
               const compute_t<S>* alpha, const compute_t<S>* beta, bool relu, Writes writes) {
    with_flag(relu, [&](auto flag) {
        PlaneApply<S, false, decltype(flag)::value> op{nullptr, x,    y,     rows, stride,  planes,
                                                       len,     shift, alpha, beta, nullptr, writes};
        with_plane_writes<S>(len, writes, op);
    });
}

template <class S>
void pb_grad(const S* dy, const S* x, S* gx, i64 rows, i64 stride, i64 planes, i64 len, const compute_t<S>* shift,
             const compute_t<S>* k, const compute_t<S>* m, const compute_t<S>* q, Writes writes) {
    PlaneApply<S, true> op{dy, x, gx, rows, stride, planes, len, shift, k, m, q, writes};
    with_plane_writes<S>(len, writes, op);
}

// Eval over `planes` contiguous planes of len values, plane r of channel
// (first_channel + r) % channels. Planes of up to kFlushVectors vectors take a compile-time
// vector count, as the blocks' apply does: no loop or tail test per vector (8x512x7x7 float32
// eval, Intel Xeon, 1 thread: 33.8 -> 28.5 us).
template <class S, bool kResidual, bool kRelu>
struct RowsAffine {
    using T = compute_t<S>;
    const S *x_, *residual_;
    S* y_;
    i64 planes_, len_, first_channel_, channels_;
    const T *shift_, *alpha_, *beta_;
    Writes writes_;

    template <int kV>
    void run() const {
        using O = Ops<T>;
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S *const x = x_, *const residual = residual_;
        S* const y = y_;
        const T *const shift = shift_, *const alpha = alpha_, *const beta = beta_;
        const i64 planes = planes_, len = len_, channels = channels_, last = len - (kV - 1) * O::W;
        i64 c = first_channel_;
        for (i64 r = 0; r < planes; ++r) {
            const i64 at = r * len;
            plane_affine<kV, kResidual, kRelu>(x + at, kResidual ? residual + at : nullptr, y + at, last,
                                               O::set1(shift[c]), O::set1(alpha[c]), O::set1(beta[c]));
            if (++c == channels) c = 0;
        }
    }

    void run_long() const {
        with_flag(writes_ == Writes::streamed, [&](auto stream_flag) { run_runs<decltype(stream_flag)::value>(); });
    }

    template <bool kStream>
    void run_runs() const {
        using O = Ops<T>;
        i64 c = first_channel_;
        for (i64 r = 0; r < planes_; ++r) {
            const i64 at = r * len_;
            run_affine<S, kResidual, kRelu, kStream>(x_ + at, kResidual ? residual_ + at : nullptr, y_ + at, len_,
                                                     O::set1(shift_[c]), O::set1(alpha_[c]), O::set1(beta_[c]));
            if (++c == channels_) c = 0;
        }
    }
};

template <class S, bool kResidual, bool kRelu>
void rows_affine_as(const S* x, const S* residual, S* y, i64 planes, i64 len, i64 first_channel, i64 channels,
                    const compute_t<S>* shift, const compute_t<S>* alpha, const compute_t<S>* beta, Writes writes) {
    RowsAffine<S, kResidual, kRelu> op{x, residual, y, planes, len, first_channel, channels, shift, alpha, beta, writes};
    with_plane_writes<S>(len, writes, op);
}

template <class S>
void rows_affine(const S* x, const S* residual, S* y, i64 planes, i64 len, i64 first_channel,
                 i64 channels, const compute_t<S>* shift, const compute_t<S>* alpha, const compute_t<S>* beta,
                 bool relu, Writes writes) {
    with_flag(residual != nullptr, [&](auto residual_flag) {
        with_flag(relu, [&](auto relu_flag) {
            rows_affine_as<S, decltype(residual_flag)::value, decltype(relu_flag)::value>(
                x, residual, y, planes, len, first_channel, channels, shift, alpha, beta, writes);
        });
    });
}

// ---- channels-last: row-major tiles, one column per channel ----------------------------------
// Each kernel walks tiles of rows (see tile_rows_for_blocks) in column blocks (see
// for_each_block). Reductions flush their lanes into the float64 column sums every
// kFlushVectors rows.

constexpr i64 kBlock = 4;   // whole vectors a row may have to run as one register block
constexpr i64 kWide = 32;   // vectors per chunk of a wider row

// The apply kernels (kApply: no accumulators to keep) take a wider row in chunks of a page of
// each stream, not kWide vectors: a 4 KiB row of float32 in AVX-512's 2 KiB chunks was left
// half read, its second half reached a tile of rows later, when the prefetchers had long
// moved on. Not whole rows: the chunk's factors (three or four arrays of its width) stay in L1
// while it walks down the tile. AMD EPYC (Zen 4), 1 thread, float32 eval, in one process
// (bench/cpp/ab_timing.cpp, medians of 11 rounds): 256x1024 40.2 -> 29.3 us, 128x2048
// 42.2 -> 37.3, 64x4096 40.5 -> 34.5 (whole rows: 43.3, the factors no longer fit L1).
constexpr i64 kApplyChunkBytes = 4096;

// Rows per tile: L1-sized, but at least four flushes' worth, so that a wide row's many column
// blocks do not each flush after a handful of rows.
template <class T>
i64 tile_rows_for_blocks(i64 cols) {
    const i64 l1_rows = (i64(32) << 10) / (std::max<i64>(cols, 1) * i64(sizeof(T)));  // cols may be 0
    return std::max<i64>(4 * kFlushVectors, l1_rows);
}

// Loads vector k of a column block: whole vectors, except the last one of a tail block
// (kTail), which has `last` lanes. With kTail false there is no branch left to take, so the
// block's accumulators stay in registers.
template <class T, bool kTail, class P>
inline typename Ops<T>::V load_block(const P* p, int k, int nb, i64 last, typename Ops<T>::V fill) {
    if (kTail && k == nb - 1) return Ops<T>::load_partial(p, last, fill);
    return Ops<T>::load(p);
}

// kStream: whole vectors by non-temporal stores (where Ops streams P; p then aligned for them).
template <class T, bool kTail, bool kStream = false, class P>
inline void store_block(P* p, typename Ops<T>::V v, int k, int nb, i64 last) {
    if (kTail && k == nb - 1) Ops<T>::store_partial(p, v, last);
    else if constexpr (kStream && streams<Ops<T>, P>::value) Ops<T>::stream(p, v);
    else Ops<T>::store(p, v);
}

// Whether a row-major apply streams its output: Writes::streamed, and rows `ld` values apart
// that all begin on a cache line (the driver shifts rows whose first one does not: see
// engine/channels_last.hpp, apply_rows), so every whole vector is aligned, and whose `width`
// written values are whole lines, so no line is streamed in part (end_of_lines in table.hpp:
// a block of columns that ends mid-line leaves the rest of the line to another block).
template <class S>
BATCHNORM_ALWAYS_INLINE bool streams_rows(const S* y, i64 width, i64 ld, Writes writes) {
    return streams<Ops<compute_t<S>>, S>::value && writes == Writes::streamed &&
           reinterpret_cast<std::uintptr_t>(y) % kLineBytes == 0 && ld * i64(sizeof(S)) % kLineBytes == 0 &&
           width * i64(sizeof(S)) % kLineBytes == 0;
}

template <class T, bool kTail>
inline void add_lanes_block(double* dst, typename Ops<T>::V v, int k, int nb, i64 last) {
    if (kTail && k == nb - 1) Ops<T>::add_lanes_to_partial(dst, v, last);
    else Ops<T>::add_lanes_to(dst, v);
}

// A column block's per-column factors (shifts, scales, coefficients), vector k by factors[k].
// A narrow block (a compile-time count of vectors) holds them in registers, loaded once; a wide
// block reads them where it uses them, from L1: held in a stack array, they were copied there
// once per tile (a memcpy: 7 % of a training call on a 32 x 2048 input, AMD EPYC, Zen 1) and
// read back from memory all the same.
template <class T, bool kTail, class Count>
class BlockFactors {
    template <class C>
    struct held : std::integral_constant<int, 0> {};
    template <int N>
    struct held<std::integral_constant<int, N>> : std::integral_constant<int, N> {};
    static constexpr int kHeld = held<Count>::value;
    using V = typename Ops<T>::V;

public:
    BlockFactors(const T* p, Count nb, i64 last) : p_(p), nb_(int(nb)), last_(last) {
        for (int k = 0; k < kHeld; ++k) v_[k] = load_block<T, kTail>(p + k * Ops<T>::W, k, nb_, last, Ops<T>::zero());
    }
    V operator[](int k) const {
        if constexpr (kHeld > 0) return v_[k];
        else return load_block<T, kTail>(p_ + k * Ops<T>::W, k, nb_, last_, Ops<T>::zero());
    }

private:
    const T* p_;
    int nb_;
    i64 last_;
    V v_[kHeld > 0 ? kHeld : 1];
};

// A block of N vectors from column 0, the last with `last` lanes (partial when last < W).
template <int N, class T, class Op>
void narrow_block(Op& op, i64 row0, i64 rows, i64 last) {
    if constexpr (Ops<T>::W > 1) {  // one lane has no partial vector
        if (last < Ops<T>::W) return op.template block<true>(row0, rows, 0, last, std::integral_constant<int, N>{});
    }
    op.template block<false>(row0, rows, 0, last, std::integral_constant<int, N>{});
}

// Vectors per chunk of a wide row for the apply kernels, and for the reductions reading from
// memory (in_order): a page of each stream (kApplyChunkBytes).
template <class T>
constexpr i64 page_chunk() {
    return std::max<i64>(kWide, kApplyChunkBytes / i64(Ops<T>::W * sizeof(T)));
}

// Whether op goes down its rows one at a time (rows_by_group): the apply kernels always, the
// reductions when they read from memory (their in_order_).
template <class Op>
BATCHNORM_ALWAYS_INLINE bool rows_in_order(const Op& op) {
    if constexpr (Op::kApply) return true;
    else return op.in_order_;
}

// Runs op.template block<kTail>(row0, rows, j, last, nb) over every tile of rows: nb vectors from
// column j, the last with `last` lanes when kTail. A row of at most kBlock vectors is one block
// whose count is a compile-time constant, so its accumulators (or factors) live in registers and
// the row streams linearly. Wider rows go in chunks of up to kWide vectors (page_chunk when the
// rows go in order), row by row, their accumulators in an L1-resident array: walking a few
// vectors down many rows would touch a new page per row and defeat the prefetchers.
template <class T, class Op>
void for_each_block(i64 rows, i64 cols, Op& op) {
    constexpr i64 W = Ops<T>::W;
    static_assert(kWide % 2 == 0 && page_chunk<T>() % 2 == 0,
                  "blocks start at an even vector: a block's pairs are whole (with_pair_columns)");
    const i64 chunk = rows_in_order(op) ? page_chunk<T>() : kWide;
    const i64 tile = tile_rows_for_blocks<T>(cols), vectors = (cols + W - 1) / W;
    const i64 last = cols - (vectors - 1) * W;  // lanes of the last vector, 1..W
    for (i64 r = 0; r < rows; r += tile) {
        const i64 n = std::min(tile, rows - r);
        switch (vectors) {
            case 0: break;
            case 1: narrow_block<1, T>(op, r, n, last); break;
            case 2: narrow_block<2, T>(op, r, n, last); break;
            case 3: narrow_block<3, T>(op, r, n, last); break;
            case 4: narrow_block<4, T>(op, r, n, last); break;
            static_assert(kBlock == 4, "one case per block width up to kBlock");
            default:
                for (i64 v = 0; v < vectors; v += chunk) {
                    const int nb = int(std::min(chunk, vectors - v));
                    if constexpr (W > 1) {  // one lane has no partial vector
                        if (v + nb == vectors && last < W) {
                            op.template block<true>(r, n, v * W, last, nb);
                            continue;
                        }
                    }
                    op.template block<false>(r, n, v * W, W, nb);
                }
        }
    }
}

// Visits rows [r, end) of a block of nb vectors vector by vector in groups of kRowGroup rows:
// visit(k, row0, rows) covers vector k of rows [row0, row0 + rows), rows a compile-time count.
// A wide block's per-vector accumulators and factors live in arrays on the stack; visiting a
// vector over a few rows at once loads and stores them once per group instead of once per row,
// while each row still streams forward (AMD EPYC, Zen 5, 1 thread: batch_stats of 256x1024
// float32 31 -> 26 us, training 67 -> 60 us).
// A narrow block (Count a compile-time count) goes row by row instead, its vector loop unrolled
// and its accumulator arrays sized to it (block_capacity): they stay in registers, and each
// row's vectors feed independent chains. In groups, the arrays were kept in memory, and a
// 64-column row's sums waited on stores and reloads (AMD EPYC Zen 4, 1 thread, float32
// batch_stats of 12544x64: 63.6 -> 47.4 us).
// A wide block read from memory (in_order: reads_in_order) goes row by row as well, in
// page-wide chunks (page_chunk), as the apply kernels go: in groups, its rows came from memory
// as several streams at once, more slowly than as one. AMD EPYC Zen 3, 1 thread, float32
// channels-last, bench/cpp/ab_timing.cpp, 9 interleaved rounds, groups -> in order, us (the
// second figure with the two libraries' order swapped): backward 12544x256 6022 -> 4853,
// 5324 -> 4835; 6272x512 5674 -> 5067, 6374 -> 6073; 25088x128 5387 -> 5008, 5540 -> 4251;
// training 12544x256 3410 -> 3048, 3845 -> 3441; 6272x512 3539 -> 3268, 3993 -> 3329.
constexpr i64 kRowGroup = 4;

template <class Count, class Visit>
BATCHNORM_ALWAYS_INLINE void rows_by_group(i64 r, i64 end, Count nb, bool in_order, Visit&& visit) {
    if constexpr (!std::is_integral_v<Count>) {
        for (; r < end; ++r) {
            BATCHNORM_UNROLL_PLANE
            for (int k = 0; k < Count::value; ++k) visit(k, r, std::integral_constant<int, 1>{});
        }
    } else {
        if (!in_order)
            for (; r + kRowGroup <= end; r += kRowGroup)
                for (int k = 0; k < nb; ++k) visit(k, r, std::integral_constant<int, int(kRowGroup)>{});
        for (; r < end; ++r)
            for (int k = 0; k < nb; ++k) visit(k, r, std::integral_constant<int, 1>{});
    }
}

// Whether a channels-last reduction over rows of `cols` values of S goes row by row
// (rows_by_group): when it reads from memory (BlockReads::prefetched) rows of less than a page.
// Rows of a page or more keep their groups: 3136x1024 float32 training lost in order (same
// machine and method as rows_by_group's figures: 3792 -> 4360, 2370 -> 2741 us), though its
// backward gained (6456 -> 5446, 5393 -> 4803).
template <class S>
bool reads_in_order(BlockReads reads, i64 cols) {
    return reads == BlockReads::prefetched && cols * i64(sizeof(S)) < kApplyChunkBytes;
}

// Accumulators a column block of Count vectors of T needs: its count where that is a
// compile-time constant, else the widest chunk (page_chunk).
template <class T, class Count>
constexpr int block_capacity() {
    if constexpr (std::is_integral_v<Count>) return int(page_chunk<T>());
    else return int(Count::value);
}

// ---- channels-last: narrow rows, folded ----------------------------------------------------
// A row of a few channels fills its vectors partly: 4 float32 columns are a quarter of an
// AVX-512 vector, and each row pays a masked load (and store), for float16 and bfloat16 a whole
// vector's conversion. Rows that follow each other in memory (ld == cols) are read g at a time
// as one row of g*cols values, whole vectors whose lane i holds column i % cols: the kernels run
// over the folded rows with each per-column factor repeated g times, and a column's g sums are
// added at the end. g is the fewest rows that fill whole vectors, times what fills kBlock
// vectors: a folded row is one narrow block, its accumulators and factors in registers, with
// independent chains. Where the fewest rows are already wider than that, nothing is folded: the
// wide blocks' loop cost more than the partial vectors saved (AMD EPYC Zen 4, 1 thread, 32x20x56x56
// channels-last float32, 5-vector folds, separate runs: eval 0.95 -> 1.28x a copy, backward
// 3.99 -> 5.69x).
// Rows past the last whole fold, and column blocks of a wider row (ld > cols), run unfolded.
// The flushes count folded rows, so each lane takes as many additions between flushes as unfolded.
template <class T>
i64 rows_per_fold(i64 cols, i64 ld) {
    constexpr i64 W = Ops<T>::W;
    if (W == 1 || cols <= 0 || ld != cols || cols % W == 0) return 1;
    const i64 g = W / std::gcd(cols, W);
    if (g * cols > kBlock * W) return 1;
    return g * (kBlock * W / (g * cols));
}

// run(first_row, rows, cols, ld, factors, sums) over rows [0, rows): the folded rows first, as
// rows of their own width with repeated factors and sums of their own, then the rest. The
// caller's sum arrays (cols values, added into as the kernels add) receive both.
template <class T, std::size_t NF, std::size_t NS, class Run>
BATCHNORM_ALWAYS_INLINE void fold_rows(i64 rows, i64 cols, i64 ld, const std::array<const T*, NF>& factors,
                                       const std::array<double*, NS>& sums, Run&& run) {
    constexpr i64 kMax = kBlock * Ops<T>::W;
    const i64 g = rows_per_fold<T>(cols, ld);
    i64 done = 0;
    if (g > 1 && rows >= g) {
        const i64 width = g * cols;
        T repeated[NF > 0 ? NF : 1][kMax];
        double own[NS > 0 ? NS : 1][kMax];
        std::array<const T*, NF> f;
        std::array<double*, NS> s;
        for (std::size_t i = 0; i < NF; ++i) {
            for (i64 j = 0; j < width; ++j) repeated[i][j] = factors[i][j % cols];
            f[i] = repeated[i];
        }
        for (std::size_t i = 0; i < NS; ++i) {
            std::fill_n(own[i], width, 0.0);
            s[i] = own[i];
        }
        run(i64(0), rows / g, width, width, f, s);
        for (std::size_t i = 0; i < NS; ++i)
            for (i64 j = 0; j < width; ++j) sums[i][j % cols] += own[i][j];
        done = rows / g * g;
    }
    if (done < rows) run(done, rows - done, cols, ld, factors, sums);
}

// ---- channels-last: pairs of vectors -------------------------------------------------------
// Where Ops has pairs of S (AVX2 bfloat16), the apply kernels load and store a row's whole
// vectors two at a time, as a channel's runs do (pairs, above): AMD EPYC Zen 3, 1 thread,
// bfloat16 (bench/cpp/ab_timing.cpp, medians of 9 interleaved rounds), old -> new us: 6272x256
// eval 450 -> 346, train 711 -> 606, backward 945 -> 861; 12544x64 eval 223 -> 180, backward
// 415 -> 358; 256x1024 eval 74.3 -> 58.7; 49x64 eval 1.1 -> 1.0.
// A pair's lanes hold its 2W columns out of order (even, then odd), so their factors are put
// into that order first, once per call for the whole row (in chunks, the second half of a
// wide row was reached only after every row, not a tile later: 2048x4096 eval about 25 %
// slower); the columns after the last whole group of 2W stay in place, for the single vectors
// that end the row. Every column block starts at an even vector (for_each_block), so a
// block's pairs are whole groups.

// The copy is made per kernel call, and training and backward call the apply kernels on chunks
// of rows (engine/channels_last.hpp, apply_chunk_rows: L2/16 bytes, 4 rows of 4096 bfloat16
// columns on a 512 KiB L2): below kPairMinRows rows the copy cost more than the pairs saved.
// AMD EPYC Zen 3, 1 thread, ab_timing bfloat16, no pairs -> pairs: 2048x4096 training 7557 ->
// 9513 us, backward 11051 -> 12937 (4 rows a call); 512x2048 (8 rows) 526 -> 508, 602 -> 590.
// (Putting the factors in pair order once per call in the engine would end the copies.)
constexpr i64 kPairMinRows = 8;

// run(factors, paired) over `rows` rows of cols columns: paired (a std::bool_constant) says
// whether the factors are in pair order.
template <class S, std::size_t NF, class Run>
BATCHNORM_ALWAYS_INLINE void with_pair_columns(i64 rows, i64 cols, const std::array<const compute_t<S>*, NF>& factors,
                                               Run&& run) {
    using T = compute_t<S>;
    constexpr i64 kGroup = 2 * Ops<T>::W;
    if constexpr (pairs<Ops<T>, S>::value) {
        if (cols >= kGroup && rows >= kPairMinRows) {
            // As engine/channels_last.hpp's rotated factors; each array on a line of its own, so
            // no vector of factors straddles two lines.
            constexpr std::size_t kLine = std::size_t(kLineBytes) / sizeof(T);
            const std::size_t stride = (std::size_t(cols) + kLine - 1) / kLine * kLine;
            thread_local std::vector<T> buffer;
            buffer.resize(NF * stride + kLine);
            T* const ordered = buffer.data() + values_before_line(buffer.data(), i64(kLine));
            const i64 grouped = cols / kGroup * kGroup;
            std::array<const T*, NF> f;
            for (std::size_t i = 0; i < NF; ++i) {
                const T* from = factors[i];
                T* to = ordered + i * stride;
                for (i64 g = 0; g < grouped; g += kGroup)
                    for (i64 l = 0; l < kGroup / 2; ++l) {
                        to[g + l] = from[g + 2 * l];
                        to[g + kGroup / 2 + l] = from[g + 2 * l + 1];
                    }
                std::copy(from + grouped, from + cols, to + grouped);
                f[i] = to;
            }
            return run(f, std::true_type{});
        }
    }
    run(factors, std::false_type{});
}

// The vectors of a block of nb that go in pairs: all but a partial last one, in twos.
template <bool kPaired, bool kTail, class Count>
BATCHNORM_ALWAYS_INLINE int paired_vectors(Count nb) {
    return kPaired ? (int(nb) - int(kTail)) / 2 * 2 : 0;
}

template <class S>
struct ClSum {
    using T = compute_t<S>;
    static constexpr bool kApply = false;
    const S* x_;
    i64 cols_, ld_;
    double* sum_;
    bool in_order_;

    template <bool kTail, class Count>
    void block(i64 row0, i64 rows, i64 j, i64 last, Count nb) {
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S* const x = x_;
        const i64 ld = ld_;
        double* const sum = sum_;
        using O = Ops<T>;
        for (i64 r = row0; r < row0 + rows;) {
            const i64 end = std::min(row0 + rows, r + kFlushVectors);
            typename O::V a[block_capacity<T, Count>()];
            for (int k = 0; k < int(nb); ++k) a[k] = O::zero();
            rows_by_group(r, end, nb, in_order_, [&](int k, i64 r0, auto group) {
                auto acc = a[k];
                for (int q = 0; q < group; ++q)
                    acc = O::add(acc, load_block<T, kTail>(x + (r0 + q) * ld + j + k * O::W, k, int(nb), last, O::zero()));
                a[k] = acc;
            });
            r = end;
            for (int k = 0; k < int(nb); ++k) add_lanes_block<T, kTail>(sum + j + k * O::W, a[k], k, int(nb), last);
        }
    }
};

template <class S>
void cl_sum(const S* x, i64 rows, i64 cols, i64 ld, double* sum) {
    using T = compute_t<S>;
    fold_rows<T, 0, 1>(rows, cols, ld, {}, {sum}, [&](i64 r, i64 n, i64 width, i64 step, const auto&, const auto& s) {
        ClSum<S> op{x + r * ld, width, step, s[0], false};
        for_each_block<T>(n, width, op);
    });
}

template <class S>
struct ClDev {
    using T = compute_t<S>;
    static constexpr bool kApply = false;
    const S* x_;
    i64 cols_, ld_;
    const T* shift_;
    double *s1_, *s2_;
    bool in_order_;

    template <bool kTail, class Count>
    void block(i64 row0, i64 rows, i64 j, i64 last, Count nb) {
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S* const x = x_;
        const i64 ld = ld_;
        double *const s1 = s1_, *const s2 = s2_;
        const T* const shift = shift_;
        using O = Ops<T>;
        const BlockFactors<T, kTail, Count> s(shift + j, nb, last);
        for (i64 r = row0; r < row0 + rows;) {
            const i64 end = std::min(row0 + rows, r + kFlushVectors);
            typename O::V d1[block_capacity<T, Count>()], d2[block_capacity<T, Count>()];
            for (int k = 0; k < int(nb); ++k) d1[k] = d2[k] = O::zero();
            rows_by_group(r, end, nb, in_order_, [&](int k, i64 r0, auto group) {
                auto a1 = d1[k], a2 = d2[k];
                const auto sk = s[k];
                for (int q = 0; q < group; ++q) {
                    const auto d = O::sub(load_block<T, kTail>(x + (r0 + q) * ld + j + k * O::W, k, int(nb), last, sk), sk);
                    a1 = O::add(a1, d);
                    a2 = O::fma(d, d, a2);
                }
                d1[k] = a1;
                d2[k] = a2;
            });
            r = end;
            for (int k = 0; k < int(nb); ++k) {
                add_lanes_block<T, kTail>(s1 + j + k * O::W, d1[k], k, int(nb), last);
                add_lanes_block<T, kTail>(s2 + j + k * O::W, d2[k], k, int(nb), last);
            }
        }
    }
};

template <class S>
void cl_dev(const S* x, i64 rows, i64 cols, i64 ld, const compute_t<S>* shift, double* s1, double* s2,
            BlockReads reads) {
    using T = compute_t<S>;
    fold_rows<T, 1, 2>(rows, cols, ld, {shift}, {s1, s2},
                       [&](i64 r, i64 n, i64 width, i64 step, const auto& f, const auto& s) {
                           const bool in_order = reads_in_order<S>(reads, width);
                           ClDev<S> op{x + r * ld, width, step, f[0], s[0], s[1], in_order};
                           for_each_block<T>(n, width, op);
                       });
}

template <class S>
struct ClDot {
    using T = compute_t<S>;
    static constexpr bool kApply = false;
    const S *dy_, *x_;
    i64 cols_, ld_;
    const T* shift_;
    double *sdy_, *sdyx_;
    bool in_order_;

    template <bool kTail, class Count>
    void block(i64 row0, i64 rows, i64 j, i64 last, Count nb) {
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S *const dy = dy_, *const x = x_;
        const i64 ld = ld_;
        double *const sdy = sdy_, *const sdyx = sdyx_;
        const T* const shift = shift_;
        using O = Ops<T>;
        const BlockFactors<T, kTail, Count> s(shift + j, nb, last);
        for (i64 r = row0; r < row0 + rows;) {
            const i64 end = std::min(row0 + rows, r + kFlushVectors);
            typename O::V g[block_capacity<T, Count>()], gd[block_capacity<T, Count>()];
            for (int k = 0; k < int(nb); ++k) g[k] = gd[k] = O::zero();
            rows_by_group(r, end, nb, in_order_, [&](int k, i64 r0, auto group) {
                auto a1 = g[k], a2 = gd[k];
                const auto sk = s[k];
                for (int q = 0; q < group; ++q) {
                    const i64 at = (r0 + q) * ld + j + k * O::W;
                    const auto gy = load_block<T, kTail>(dy + at, k, int(nb), last, O::zero());
                    a1 = O::add(a1, gy);
                    a2 = O::fma(gy, O::sub(load_block<T, kTail>(x + at, k, int(nb), last, sk), sk), a2);
                }
                g[k] = a1;
                gd[k] = a2;
            });
            r = end;
            for (int k = 0; k < int(nb); ++k) {
                add_lanes_block<T, kTail>(sdy + j + k * O::W, g[k], k, int(nb), last);
                add_lanes_block<T, kTail>(sdyx + j + k * O::W, gd[k], k, int(nb), last);
            }
        }
    }
};

template <class S>
void cl_dot(const S* dy, const S* x, i64 rows, i64 cols, i64 ld, const compute_t<S>* shift, double* sdy,
            double* sdyx, BlockReads reads) {
    using T = compute_t<S>;
    fold_rows<T, 1, 2>(rows, cols, ld, {shift}, {sdy, sdyx},
                       [&](i64 r, i64 n, i64 width, i64 step, const auto& f, const auto& s) {
                           const bool in_order = reads_in_order<S>(reads, width);
                           ClDot<S> op{dy + r * ld, x + r * ld, width, step, f[0], s[0], s[1], in_order};
                           for_each_block<T>(n, width, op);
                       });
}

// The apply kernels (affine, gradient) go row by row, in memory order. They once visited two
// rows per vector, so that each row of a pair reused the factors loaded for the other, while
// a wide block's factors were copied to the stack once per tile (AMD EPYC, Zen 1: eval of
// 4096x64 79 -> 71 us). Since the factors are read from L1 where they are (BlockFactors), the
// pairs only cost: AMD EPYC (Zen 4), 1 thread, float32, in one process (ab_timing, medians of
// 11 rounds), pairs -> rows: backward 6272x256 963 -> 700 us, 256x1024 103 -> 96; eval
// 6272x256 262 -> 218; 4096x64, 32x2048 and 392x512 within 1 us either way.

template <class S, bool kResidual, bool kRelu, bool kStream, bool kPaired>
struct ClAffine {
    using T = compute_t<S>;
    static constexpr bool kApply = true;
    const S* x_;
    const S* residual_;
    S* y_;
    i64 cols_, ld_;
    const T *shift_, *alpha_, *beta_;

    template <bool kTail, class Count>
    void block(i64 row0, i64 rows, i64 j, i64 last, Count nb) {
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S *const x = x_, *const residual = residual_;
        S* const y = y_;
        const i64 ld = ld_;
        const T *const shift = shift_, *const alpha = alpha_, *const beta = beta_;
        using O = Ops<T>;
        const BlockFactors<T, kTail, Count> s(shift + j, nb, last), a(alpha + j, nb, last), b(beta + j, nb, last);
        const int paired = paired_vectors<kPaired, kTail>(nb);
        for (i64 r = row0; r < row0 + rows; ++r) {
            int k = 0;
            if constexpr (kPaired)
                for (; k < paired; k += 2) {
                    const i64 at = r * ld + j + k * O::W;
                    affine_pair<kStream, kResidual, kRelu>(x + at, kResidual ? residual + at : nullptr, y + at, s[k],
                                                          a[k], b[k], s[k + 1], a[k + 1], b[k + 1]);
                }
            for (; k < int(nb); ++k) {
                const auto sk = s[k];
                const i64 at = r * ld + j + k * O::W;
                const auto res = kResidual ? load_block<T, kTail>(residual + at, k, int(nb), last, O::zero()) : O::zero();
                store_block<T, kTail, kStream>(
                    y + at,
                    affine_value<kResidual, kRelu>(load_block<T, kTail>(x + at, k, int(nb), last, sk), res, sk, a[k],
                                                   b[k], O{}),
                    k, int(nb), last);
            }
        }
    }
};

template <class S>
void cl_affine(const S* x, const S* residual, S* y, i64 rows, i64 cols, i64 ld, const compute_t<S>* shift,
               const compute_t<S>* alpha, const compute_t<S>* beta, bool relu, Writes writes) {
    using T = compute_t<S>;
    fold_rows<T, 3, 0>(rows, cols, ld, {shift, alpha, beta}, {},
                       [&](i64 r, i64 n, i64 width, i64 step, const auto& row_factors, const auto&) {
        with_pair_columns<S>(n, width, row_factors, [&](const auto& f, auto paired) {
            const i64 at = r * ld;
            with_flag(residual != nullptr, [&](auto residual_flag) {
                with_flag(relu, [&](auto relu_flag) {
                    with_flag(streams_rows(y + at, width, step, writes), [&](auto stream_flag) {
                        ClAffine<S, decltype(residual_flag)::value, decltype(relu_flag)::value,
                                 decltype(stream_flag)::value, decltype(paired)::value>
                            op{x + at, residual ? residual + at : nullptr, y + at, width, step, f[0], f[1], f[2]};
                        for_each_block<T>(n, width, op);
                    });
                });
            });
        });
    });
    end_writes<S>(writes);
}

template <class S, bool kStream, bool kPaired>
struct ClGrad {
    using T = compute_t<S>;
    static constexpr bool kApply = true;
    const S *dy_, *x_;
    S* gx_;
    i64 cols_, ld_;
    const T *shift_, *k_coef_, *m_coef_, *q_coef_;

    template <bool kTail, class Count>
    void block(i64 row0, i64 rows, i64 j, i64 last, Count nb) {
        // Locals, not members: the compiler cannot prove the stores leave the members alone.
        const S *const dy = dy_, *const x = x_;
        S* const gx = gx_;
        const i64 ld = ld_;
        const T *const shift = shift_, *const k_coef = k_coef_, *const m_coef = m_coef_, *const q_coef = q_coef_;
        using O = Ops<T>;
        const BlockFactors<T, kTail, Count> s(shift + j, nb, last), kc(k_coef + j, nb, last), mc(m_coef + j, nb, last),
            qc(q_coef + j, nb, last);
        const int paired = paired_vectors<kPaired, kTail>(nb);
        for (i64 r = row0; r < row0 + rows; ++r) {
            int k = 0;
            if constexpr (kPaired)
                for (; k < paired; k += 2) {
                    const i64 at = r * ld + j + k * O::W;
                    grad_pair<kStream>(dy + at, x + at, gx + at, s[k], kc[k], mc[k], qc[k], s[k + 1], kc[k + 1],
                                       mc[k + 1], qc[k + 1]);
                }
            for (; k < int(nb); ++k) {
                const auto sk = s[k];
                const i64 at = r * ld + j + k * O::W;
                const auto gy = load_block<T, kTail>(dy + at, k, int(nb), last, O::zero());
                const auto xv = load_block<T, kTail>(x + at, k, int(nb), last, sk);
                store_block<T, kTail, kStream>(gx + at, grad_value(gy, xv, sk, kc[k], mc[k], qc[k], O{}), k, int(nb),
                                               last);
            }
        }
    }
};

template <class S>
void cl_grad(const S* dy, const S* x, S* gx, i64 rows, i64 cols, i64 ld, const compute_t<S>* shift,
             const compute_t<S>* k, const compute_t<S>* m, const compute_t<S>* q, Writes writes) {
    using T = compute_t<S>;
    fold_rows<T, 4, 0>(rows, cols, ld, {shift, k, m, q}, {},
                       [&](i64 r, i64 n, i64 width, i64 step, const auto& row_factors, const auto&) {
        with_pair_columns<S>(n, width, row_factors, [&](const auto& f, auto paired) {
            const i64 at = r * ld;
            with_flag(streams_rows(gx + at, width, step, writes), [&](auto stream_flag) {
                ClGrad<S, decltype(stream_flag)::value, decltype(paired)::value> op{
                    dy + at, x + at, gx + at, width, step, f[0], f[1], f[2], f[3]};
                for_each_block<T>(n, width, op);
            });
        });
    });
    end_writes<S>(writes);
}

// ---- rows with per-element parameters (layer norm, RMS norm) ---------------------------------
// One row of n contiguous values with its own scalars, and optional per-element weight w and
// bias b (null: 1 and 0), selected once per call so the loops carry no branch.

template <class S>
void add(const S* a, const S* b, S* out, i64 n) {
    using T = compute_t<S>;
    using O = Ops<T>;
    for (i64 i = 0; i < n; i += O::W)
        store_n(out + i, O::add(load_n(a + i, n - i, O::zero()), load_n(b + i, n - i, O::zero())), n - i);
}

// ((x - s) * a + o) * w + b, w and b per element when kWeight, kBias.
template <bool kWeight, bool kBias, class V, class O>
BATCHNORM_ALWAYS_INLINE V row_value(V x, V w, V b, V s, V a, V o, O) {
    V v = O::fma(O::sub(x, s), a, o);
    if constexpr (kWeight) v = O::mul(v, w);
    if constexpr (kBias) v = O::add(v, b);
    return v;
}

// row_value over the vector at x (the first `left` lanes where left < W), which the caller
// stores (row_scale_vector, or a stream). Called with left = W for whole vectors, so that
// their loop has no test of the tail: as one loop of load_n/store_n, GCC kept the test and a
// jump in every vector, and layer and RMS norm on half storage lost 5-15 % to them (AMD EPYC
// Zen 3, 1 thread, ab_timing rows mode, (4096, 768) bfloat16 layer norm 2381 -> 2142 us,
// float16 2092 -> 1798; float32 the same within noise).
// The row kernels write their partial last vector before the whole ones. Written last, it
// was the function's last act, which GCC made a tail call into Ops::store_partial; that returns
// without vzeroupper, and the (SSE) engine code after the kernel ran at half speed:
// bench/cpp/ab_timing.cpp rows mode, 1 thread, (1024, 100) bfloat16, every row norm op
// 80-150 -> 210-290 us; (4096, 768) float32 RMS norm forward a third slower.
template <bool kWeight, bool kBias, class S, class T, class V>
BATCHNORM_ALWAYS_INLINE V row_scale_value(const S* x, const T* w, const T* b, i64 left, V s, V a, V o) {
    using O = Ops<T>;
    return row_value<kWeight, kBias>(load_n(x, left, s), kWeight ? load_n(w, left, O::zero()) : O::zero(),
                                     kBias ? load_n(b, left, O::zero()) : O::zero(), s, a, o, O{});
}

template <bool kWeight, bool kBias, class S, class T, class V>
BATCHNORM_ALWAYS_INLINE void row_scale_vector(const S* x, S* y, const T* w, const T* b, i64 left, V s, V a, V o) {
    store_n(y, row_scale_value<kWeight, kBias>(x, w, b, left, s, a, o), left);
}

// kStream as for run_affine.
template <class S, bool kWeight, bool kBias, bool kStream = false>
void row_scale_as(const S* x, S* y, i64 n, compute_t<S> shift, compute_t<S> scale, compute_t<S> offset,
                  const compute_t<S>* w, const compute_t<S>* b) {
    using T = compute_t<S>;
    using O = Ops<T>;
    const auto s = O::set1(shift), a = O::set1(scale), o = O::set1(offset);
    i64 i = 0;
    if constexpr (kStream && streams<O, S>::value) {
        const i64 head = values_before_line(y, n), end = end_of_lines<S>(head, n);
        row_scale_as<S, kWeight, kBias>(x, y, head, shift, scale, offset, w, b);
        for (i = head; i + O::W <= end; i += O::W)
            O::stream(y + i, row_scale_value<kWeight, kBias>(x + i, kWeight ? w + i : w, kBias ? b + i : b, O::W, s,
                                                             a, o));
    }
    const i64 whole = i + (n - i) / O::W * O::W;  // the partial vector first (row_scale_vector)
    if (whole < n)
        row_scale_vector<kWeight, kBias>(x + whole, y + whole, kWeight ? w + whole : w, kBias ? b + whole : b,
                                         n - whole, s, a, o);
    for (; i < whole; i += O::W)
        row_scale_vector<kWeight, kBias>(x + i, y + i, kWeight ? w + i : w, kBias ? b + i : b, O::W, s, a, o);
}

template <class S>
void row_scale(const S* x, S* y, i64 n, compute_t<S> shift, compute_t<S> scale, compute_t<S> offset,
               const compute_t<S>* w, const compute_t<S>* b, Writes writes) {
    with_flag(w != nullptr, [&](auto weight_flag) {
        with_flag(b != nullptr, [&](auto bias_flag) {
            with_flag(writes == Writes::streamed, [&](auto stream_flag) {
                row_scale_as<S, decltype(weight_flag)::value, decltype(bias_flag)::value, decltype(stream_flag)::value>(
                    x, y, n, shift, scale, offset, w, b);
            });
        });
    });
}

// One vector of row_wdot_as at i: its row terms g = dy * w and d = x - shift for the caller's
// accumulators, and with kColumns its column terms added into cdy, cdyx. Whole vectors only.
template <bool kWeight, bool kColumns, class S, class T = compute_t<S>>
BATCHNORM_ALWAYS_INLINE void wdot_vector(const S* dy, const S* x, const T* w, T* cdy, T* cdyx, i64 i,
                                         typename Ops<T>::V s, typename Ops<T>::V a, typename Ops<T>::V& g,
                                         typename Ops<T>::V& d) {
    using O = Ops<T>;
    const auto gy = O::load(dy + i);
    d = O::sub(O::load(x + i), s);
    if constexpr (kColumns) {
        O::store(cdy + i, O::add(O::load(cdy + i), gy));
        O::store(cdyx + i, O::fma(gy, O::mul(d, a), O::load(cdyx + i)));
    }
    g = kWeight ? O::mul(gy, O::load(w + i)) : gy;
}

// row_wdot (kColumns false) and row_wdot_cols: one body, so that a row's sums have the same
// bits whether or not the column sums are wanted (the backward takes them only when the
// weight's or the bias's gradient is), and the same as run_dot's without a weight.
template <class S, bool kWeight, bool kColumns>
Sums row_wdot_as(const S* dy, const S* x, const compute_t<S>* w, i64 n, compute_t<S> shift, compute_t<S> scale,
                 compute_t<S>* lanes) {
    using T = compute_t<S>;
    using O = Ops<T>;
    using V = typename O::V;
    constexpr i64 W = O::W;
    T* const cdy = lanes;
    T* const cdyx = kColumns ? lanes + n : nullptr;
    const auto s = O::set1(shift), a = O::set1(scale);
    PairSum<T> acc;
    i64 i = 0;
    for (; i + 4 * W <= n; i += 4 * W) {
        V g[4], d[4];
        for (int c = 0; c < 4; ++c) wdot_vector<kWeight, kColumns>(dy, x, w, cdy, cdyx, i + c * W, s, a, g[c], d[c]);
        acc.add4(g[0], g[0], d[0], g[1], g[1], d[1], g[2], g[2], d[2], g[3], g[3], d[3]);
    }
    for (; i < n; i += W) {
        // Tail lanes: dy loads zero and x the shift, so they add zero to every sum.
        const auto gy = load_n(dy + i, n - i, O::zero());
        const auto d = O::sub(load_n(x + i, n - i, s), s);
        if constexpr (kColumns) {
            store_n(cdy + i, O::add(load_n(cdy + i, n - i, O::zero()), gy), n - i);
            store_n(cdyx + i, O::fma(gy, O::mul(d, a), load_n(cdyx + i, n - i, O::zero())), n - i);
        }
        const auto g = kWeight ? O::mul(gy, load_n(w + i, n - i, O::zero())) : gy;
        acc.add(g, g, d);
    }
    return acc.flush();
}

template <class S>
Sums row_wdot(const S* dy, const S* x, const compute_t<S>* w, i64 n, compute_t<S> shift) {
    if (!w) return cf_dot(dy, x, 1, n, n, shift, false);
    return row_wdot_as<S, true, false>(dy, x, w, n, shift, compute_t<S>(0), nullptr);
}

template <class S>
Sums row_wdot_cols(const S* dy, const S* x, const compute_t<S>* w, i64 n, compute_t<S> shift, compute_t<S> scale,
                   compute_t<S>* lanes) {
    if (w) return row_wdot_as<S, true, true>(dy, x, w, n, shift, scale, lanes);
    return row_wdot_as<S, false, true>(dy, x, w, n, shift, scale, lanes);
}

// grad_value over the vector at x with dy * w for dy, `left` lanes as row_scale_value; stored
// by row_wgrad_vector (its partial vector first too) or a stream.
template <class S, class T, class V>
BATCHNORM_ALWAYS_INLINE V row_wgrad_value(const S* dy, const S* x, const T* w, i64 left, V s, V k, V m, V q) {
    using O = Ops<T>;
    const auto g = O::mul(load_n(dy, left, O::zero()), load_n(w, left, O::zero()));
    return grad_value(g, load_n(x, left, s), s, k, m, q, O{});
}

template <class S, class T, class V>
BATCHNORM_ALWAYS_INLINE void row_wgrad_vector(const S* dy, const S* x, const T* w, S* gx, i64 left, V s, V k, V m,
                                              V q) {
    store_n(gx, row_wgrad_value(dy, x, w, left, s, k, m, q), left);
}

template <class S, bool kStream>
void row_wgrad_as(const S* dy, const S* x, const compute_t<S>* w, S* gx, i64 n, compute_t<S> shift, compute_t<S> k,
                  compute_t<S> m, compute_t<S> q) {
    using T = compute_t<S>;
    using O = Ops<T>;
    const auto s = O::set1(shift), kv = O::set1(k), mv = O::set1(m), qv = O::set1(q);
    i64 i = 0;
    if constexpr (kStream && streams<O, S>::value) {
        const i64 head = values_before_line(gx, n), end = end_of_lines<S>(head, n);
        row_wgrad_as<S, false>(dy, x, w, gx, head, shift, k, m, q);
        for (i = head; i + O::W <= end; i += O::W)
            O::stream(gx + i, row_wgrad_value(dy + i, x + i, w + i, O::W, s, kv, mv, qv));
    }
    const i64 whole = i + (n - i) / O::W * O::W;  // the partial vector first (row_scale_vector)
    if (whole < n) row_wgrad_vector(dy + whole, x + whole, w + whole, gx + whole, n - whole, s, kv, mv, qv);
    for (; i < whole; i += O::W) row_wgrad_vector(dy + i, x + i, w + i, gx + i, O::W, s, kv, mv, qv);
}

template <class S>
void row_wgrad(const S* dy, const S* x, const compute_t<S>* w, S* gx, i64 n, compute_t<S> shift, compute_t<S> k,
               compute_t<S> m, compute_t<S> q, Writes writes) {
    using O = Ops<compute_t<S>>;
    if (w) {
        with_flag(writes == Writes::streamed, [&](auto stream_flag) {
            row_wgrad_as<S, decltype(stream_flag)::value>(dy, x, w, gx, n, shift, k, m, q);
        });
    } else if (writes == Writes::streamed) {  // as cf_grad, which would fence
        run_grad<S, true>(dy, x, gx, n, O::set1(shift), O::set1(k), O::set1(m), O::set1(q));
    } else {
        cf_grad(dy, x, gx, 1, n, n, shift, k, m, q, writes);
    }
}

// KernelTable::fence: the row kernels' streamed stores.
template <class S>
void fence_rows() {
    end_writes<S>(Writes::streamed);
}

// Column sums over rows with per-row scalars: sdy[j] += sum_r dy[r][j] and
// sdyx[j] += sum_r dy[r][j]*(x[r][j] - shift[r])*scale[r]; rows are ld apart. Chunks of up to
// kWide vectors go row by row (as for_each_block's wide rows), flushed every kFlushVectors rows.
template <class S>
void cols_dot(const S* dy, const S* x, i64 rows, i64 cols, i64 ld, const compute_t<S>* shift,
              const compute_t<S>* scale, double* sdy, double* sdyx) {
    using T = compute_t<S>;
    using O = Ops<T>;
    using V = typename O::V;
    constexpr i64 W = O::W;
    const i64 vectors = (cols + W - 1) / W;
    for (i64 v = 0; v < vectors; v += kWide) {
        const i64 nb = std::min(kWide, vectors - v), j0 = v * W;
        const i64 width = std::min(cols - j0, nb * W);
        for (i64 r = 0; r < rows;) {
            const i64 end = std::min(rows, r + kFlushVectors);
            V g[kWide], gd[kWide];
            for (i64 k = 0; k < nb; ++k) g[k] = gd[k] = O::zero();
            for (; r < end; ++r) {
                const auto s = O::set1(shift[r]), a = O::set1(scale[r]);
                for (i64 k = 0; k < nb; ++k) {
                    const i64 at = r * ld + j0 + k * W, left = width - k * W;
                    const auto gy = load_n(dy + at, left, O::zero());
                    g[k] = O::add(g[k], gy);
                    gd[k] = O::fma(gy, O::mul(O::sub(load_n(x + at, left, s), s), a), gd[k]);
                }
            }
            for (i64 k = 0; k < nb; ++k) {
                const i64 left = width - k * W;
                if (left >= W) {
                    O::add_lanes_to(sdy + j0 + k * W, g[k]);
                    O::add_lanes_to(sdyx + j0 + k * W, gd[k]);
                } else {
                    O::add_lanes_to_partial(sdy + j0 + k * W, g[k], left);
                    O::add_lanes_to_partial(sdyx + j0 + k * W, gd[k], left);
                }
            }
        }
    }
}

// ---- per-channel factors -----------------------------------------------------------------

// alpha = weight * (1 / sqrt(var + eps)), beta = bias - 0*alpha per channel (weight, bias null:
// 1, 0), in float64 lanes: the operations of the scalar given_affine (affine.hpp) with the mean
// as the shift, so every backend gives its bits (a non-finite alpha makes beta NaN as there).
// On inputs with few values per channel, a square root and a division per channel, one after
// the other, were a third of an eval call. The tail takes the same operations one by one.
template <class S>
void eval_factors(const compute_t<S>* var, const compute_t<S>* weight, const compute_t<S>* bias, i64 channels,
                  double eps, compute_t<S>* alpha, compute_t<S>* beta) {
    using T = compute_t<S>;
    using D = Ops<double>;
    i64 c = 0;
    for (; c + D::W <= channels; c += D::W) {
        const typename D::V w = weight ? D::load(weight + c) : D::set1(1.0);
        const typename D::V b = bias ? D::load(bias + c) : D::zero();
        const typename D::V a = D::mul(w, D::div(D::set1(1.0), D::sqrt(D::add(D::load(var + c), D::set1(eps)))));
        D::store(alpha + c, a);
        D::store(beta + c, D::sub(b, D::mul(D::zero(), a)));
    }
    for (; c < channels; ++c) {
        const double a = value_or(weight, c, 1.0) * invstd_of(double(var[c]), eps);
        alpha[c] = T(a);
        beta[c] = T(value_or(bias, c, 0.0) - 0.0 * a);
    }
}

// v[i] = 1 / sqrt(v[i] + eps) in float64 lanes: invstd_of (affine.hpp) for many channels at once,
// with its bits (each operation is correctly rounded in every backend). A training forward of
// thousands of channels over a few rows spent a fifth of its time on these two operations, one
// channel after the other.
inline void invstd_in_place(double* v, i64 n, double eps) {
    using D = Ops<double>;
    i64 i = 0;
    for (; i + D::W <= n; i += D::W)
        D::store(v + i, D::div(D::set1(1.0), D::sqrt(D::add(D::load(v + i), D::set1(eps)))));
    for (; i < n; ++i) v[i] = invstd_of(v[i], eps);
}

template <class S>
KernelTable<S> make_table() {
    return {&cf_dev<S>,  &cf_dot<S>,    &cf_affine<S>, &cf_grad<S>,   &rows_affine<S>, &cl_sum<S>,
            &cl_dev<S>,  &cl_dot<S>,    &cl_affine<S>, &cl_grad<S>,   &add<S>,         &row_scale<S>,
            &row_wdot<S>, &row_wdot_cols<S>, &row_wgrad<S>, &fence_rows<S>, &cols_dot<S>,  &pb_dev<S>,       &pb_dot<S>,
            &pb_affine<S>, &pb_grad<S>,  &eval_factors<S>, &invstd_in_place, Ops<compute_t<S>>::W};
}
