// Kernel bodies shared by every ISA backend. Each backend file includes this file inside its
// own namespace and target region, after defining `Ops<T>`, its vector operations:
//   V, W (lanes); zero, set1, load, load_partial(p, n, fill), store, store_partial(p, v, n),
//   add, sub, mul, fma(a, b, c) = a*b + c, max, sum_lanes(v) -> double,
//   add_lanes_to(double* dst, v), add_lanes_to_partial(double* dst, v, n).
// So the algorithms exist once, and each ISA is compiled with its own instructions enabled.
// No include guard: it is meant to be included once per backend namespace. No lambdas either:
// Clang does not carry a target attribute into a lambda's body.

using i64 = std::int64_t;
using ::batchnorm::detail::KernelTable;
using ::batchnorm::detail::Sums;

// Lanes of T are flushed to float64 after this many vectors (or rows) per accumulator, so a
// float32 partial sum spans at most a few dozen values.
constexpr i64 kFlushVectors = 16;

template <class T>
inline typename Ops<T>::V load_n(const T* p, i64 n, typename Ops<T>::V fill) {
    return n >= Ops<T>::W ? Ops<T>::load(p) : Ops<T>::load_partial(p, n, fill);
}

template <class T>
inline void store_n(T* p, typename Ops<T>::V v, i64 n) {
    if (n >= Ops<T>::W) Ops<T>::store(p, v);
    else Ops<T>::store_partial(p, v, n);
}

template <class T>
inline void add_lanes_n(double* dst, typename Ops<T>::V v, i64 n) {
    if (n >= Ops<T>::W) Ops<T>::add_lanes_to(dst, v);
    else Ops<T>::add_lanes_to_partial(dst, v, n);
}

// ---- channels-first: one contiguous run ----------------------------------------------------

template <class T>
double run_sum(const T* x, i64 n) {
    using O = Ops<T>;
    using V = typename O::V;
    constexpr i64 W = O::W;
    double total = 0;
    i64 i = 0;
    while (n - i >= 2 * W) {
        const i64 end = i + 2 * W * std::min<i64>((n - i) / (2 * W), kFlushVectors);
        V a0 = O::zero(), a1 = O::zero();
        for (; i < end; i += 2 * W) {
            a0 = O::add(a0, O::load(x + i));
            a1 = O::add(a1, O::load(x + i + W));
        }
        total += O::sum_lanes(O::add(a0, a1));
    }
    if (i < n) {
        V a = O::zero();
        for (; i < n; i += W) a = O::add(a, load_n(x + i, n - i, O::zero()));
        total += O::sum_lanes(a);
    }
    return total;
}

template <class T>
Sums run_dev(const T* x, i64 n, T shift) {
    using O = Ops<T>;
    using V = typename O::V;
    constexpr i64 W = O::W;
    const V s = O::set1(shift);
    Sums total;
    i64 i = 0;
    while (i < n) {
        const i64 end = std::min(n, i + W * kFlushVectors);
        V d1 = O::zero(), d2 = O::zero();
        for (; i < end; i += W) {
            // Tail lanes load `shift`, so they add zero to both sums.
            const V d = O::sub(load_n(x + i, end - i, s), s);
            d1 = O::add(d1, d);
            d2 = O::fma(d, d, d2);
        }
        total += Sums{O::sum_lanes(d1), O::sum_lanes(d2)};
    }
    return total;
}

template <class T>
Sums run_dot(const T* dy, const T* x, i64 n, T shift) {
    using O = Ops<T>;
    using V = typename O::V;
    constexpr i64 W = O::W;
    const V s = O::set1(shift);
    Sums total;
    i64 i = 0;
    while (i < n) {
        const i64 end = std::min(n, i + W * kFlushVectors);
        V g = O::zero(), gd = O::zero();
        for (; i < end; i += W) {
            const V gy = load_n(dy + i, end - i, O::zero());
            g = O::add(g, gy);
            gd = O::fma(gy, O::sub(load_n(x + i, end - i, s), s), gd);
        }
        total += Sums{O::sum_lanes(g), O::sum_lanes(gd)};
    }
    return total;
}

template <class T, bool kResidual, bool kRelu>
void run_affine(const T* x, const T* residual, T* y, i64 n, typename Ops<T>::V shift,
                typename Ops<T>::V alpha, typename Ops<T>::V beta) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 i = 0; i < n; i += O::W) {
        V v = O::fma(O::sub(load_n(x + i, n - i, shift), shift), alpha, beta);
        if constexpr (kResidual) v = O::add(v, load_n(residual + i, n - i, O::zero()));
        if constexpr (kRelu) v = O::max(v, O::zero());
        store_n(y + i, v, n - i);
    }
}

template <class T>
void run_grad(const T* dy, const T* x, T* gx, i64 n, typename Ops<T>::V shift,
              typename Ops<T>::V k, typename Ops<T>::V m, typename Ops<T>::V q) {
    using O = Ops<T>;
    for (i64 i = 0; i < n; i += O::W) {
        const auto d = O::sub(load_n(x + i, n - i, shift), shift);
        const auto g = O::fma(load_n(dy + i, n - i, O::zero()), k, O::fma(d, m, q));
        store_n(gx + i, g, n - i);
    }
}

// ---- channels-first: runs of one channel -----------------------------------------------------

template <class T>
double cf_sum(const T* x, i64 count, i64 len, i64 stride) {
    double total = 0;
    for (i64 r = 0; r < count; ++r) total += run_sum(x + r * stride, len);
    return total;
}

template <class T>
Sums cf_dev(const T* x, i64 count, i64 len, i64 stride, T shift) {
    Sums total;
    for (i64 r = 0; r < count; ++r) total += run_dev(x + r * stride, len, shift);
    return total;
}

template <class T>
Sums cf_dot(const T* dy, const T* x, i64 count, i64 len, i64 stride, T shift) {
    Sums total;
    for (i64 r = 0; r < count; ++r) total += run_dot(dy + r * stride, x + r * stride, len, shift);
    return total;
}

template <class T>
void cf_affine(const T* x, T* y, i64 count, i64 len, i64 stride, T shift, T alpha, T beta) {
    using O = Ops<T>;
    for (i64 r = 0; r < count; ++r)
        run_affine<T, false, false>(x + r * stride, nullptr, y + r * stride, len, O::set1(shift),
                                    O::set1(alpha), O::set1(beta));
}

template <class T>
void cf_grad(const T* dy, const T* x, T* gx, i64 count, i64 len, i64 stride, T shift, T k, T m,
             T q) {
    using O = Ops<T>;
    for (i64 r = 0; r < count; ++r)
        run_grad(dy + r * stride, x + r * stride, gx + r * stride, len, O::set1(shift),
                 O::set1(k), O::set1(m), O::set1(q));
}

template <class T, bool kResidual, bool kRelu>
void rows_affine_as(const T* x, const T* residual, T* y, i64 planes, i64 len, i64 first_channel,
                    i64 channels, const T* shift, const T* alpha, const T* beta) {
    using O = Ops<T>;
    i64 c = first_channel;
    for (i64 r = 0; r < planes; ++r) {
        const i64 at = r * len;
        run_affine<T, kResidual, kRelu>(x + at, kResidual ? residual + at : nullptr, y + at, len,
                                        O::set1(shift[c]), O::set1(alpha[c]), O::set1(beta[c]));
        if (++c == channels) c = 0;
    }
}

template <class T>
void rows_affine(const T* x, const T* residual, T* y, i64 planes, i64 len, i64 first_channel,
                 i64 channels, const T* shift, const T* alpha, const T* beta, bool relu) {
    if (residual) {
        if (relu) rows_affine_as<T, true, true>(x, residual, y, planes, len, first_channel, channels, shift, alpha, beta);
        else rows_affine_as<T, true, false>(x, residual, y, planes, len, first_channel, channels, shift, alpha, beta);
    } else {
        if (relu) rows_affine_as<T, false, true>(x, residual, y, planes, len, first_channel, channels, shift, alpha, beta);
        else rows_affine_as<T, false, false>(x, residual, y, planes, len, first_channel, channels, shift, alpha, beta);
    }
}

// ---- channels-last: row-major tiles, one column per channel ----------------------------------
// Reductions walk one column vector down the rows (two rows at a time, two accumulators) and
// flush into the float64 column sums every kFlushVectors rows.

template <class T>
void cl_sum(const T* x, i64 rows, i64 cols, double* sum) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 j = 0; j < cols; j += O::W) {
        const i64 n = cols - j;
        for (i64 r = 0; r < rows;) {
            const i64 end = std::min(rows, r + 2 * kFlushVectors);
            V a0 = O::zero(), a1 = O::zero();
            for (; r + 1 < end; r += 2) {
                a0 = O::add(a0, load_n(x + r * cols + j, n, O::zero()));
                a1 = O::add(a1, load_n(x + (r + 1) * cols + j, n, O::zero()));
            }
            if (r < end) a0 = O::add(a0, load_n(x + (r++) * cols + j, n, O::zero()));
            add_lanes_n<T>(sum + j, O::add(a0, a1), n);
        }
    }
}

template <class T>
void cl_dev(const T* x, i64 rows, i64 cols, const T* shift, double* s1, double* s2) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 j = 0; j < cols; j += O::W) {
        const i64 n = cols - j;
        const V s = load_n(shift + j, n, O::zero());
        for (i64 r = 0; r < rows;) {
            const i64 end = std::min(rows, r + kFlushVectors);
            V d1 = O::zero(), d2 = O::zero();
            for (; r < end; ++r) {
                const V d = O::sub(load_n(x + r * cols + j, n, s), s);
                d1 = O::add(d1, d);
                d2 = O::fma(d, d, d2);
            }
            add_lanes_n<T>(s1 + j, d1, n);
            add_lanes_n<T>(s2 + j, d2, n);
        }
    }
}

template <class T>
void cl_dot(const T* dy, const T* x, i64 rows, i64 cols, const T* shift, double* sdy,
            double* sdyx) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 j = 0; j < cols; j += O::W) {
        const i64 n = cols - j;
        const V s = load_n(shift + j, n, O::zero());
        for (i64 r = 0; r < rows;) {
            const i64 end = std::min(rows, r + kFlushVectors);
            V g = O::zero(), gd = O::zero();
            for (; r < end; ++r) {
                const V gy = load_n(dy + r * cols + j, n, O::zero());
                g = O::add(g, gy);
                gd = O::fma(gy, O::sub(load_n(x + r * cols + j, n, s), s), gd);
            }
            add_lanes_n<T>(sdy + j, g, n);
            add_lanes_n<T>(sdyx + j, gd, n);
        }
    }
}

template <class T, bool kResidual, bool kRelu>
void cl_affine_as(const T* x, const T* residual, T* y, i64 rows, i64 cols, const T* shift,
                  const T* alpha, const T* beta) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 r = 0; r < rows; ++r) {
        const i64 at = r * cols;
        for (i64 j = 0; j < cols; j += O::W) {
            const i64 n = cols - j;
            const V s = load_n(shift + j, n, O::zero());
            V v = O::fma(O::sub(load_n(x + at + j, n, s), s), load_n(alpha + j, n, O::zero()),
                         load_n(beta + j, n, O::zero()));
            if constexpr (kResidual) v = O::add(v, load_n(residual + at + j, n, O::zero()));
            if constexpr (kRelu) v = O::max(v, O::zero());
            store_n(y + at + j, v, n);
        }
    }
}

template <class T>
void cl_affine(const T* x, const T* residual, T* y, i64 rows, i64 cols, const T* shift,
               const T* alpha, const T* beta, bool relu) {
    if (residual) {
        if (relu) cl_affine_as<T, true, true>(x, residual, y, rows, cols, shift, alpha, beta);
        else cl_affine_as<T, true, false>(x, residual, y, rows, cols, shift, alpha, beta);
    } else {
        if (relu) cl_affine_as<T, false, true>(x, residual, y, rows, cols, shift, alpha, beta);
        else cl_affine_as<T, false, false>(x, residual, y, rows, cols, shift, alpha, beta);
    }
}

template <class T>
void cl_grad(const T* dy, const T* x, T* gx, i64 rows, i64 cols, const T* shift, const T* k,
             const T* m, const T* q) {
    using O = Ops<T>;
    using V = typename O::V;
    for (i64 r = 0; r < rows; ++r) {
        const i64 at = r * cols;
        for (i64 j = 0; j < cols; j += O::W) {
            const i64 n = cols - j;
            const V s = load_n(shift + j, n, O::zero());
            const V d = O::sub(load_n(x + at + j, n, s), s);
            const V g = O::fma(load_n(dy + at + j, n, O::zero()), load_n(k + j, n, O::zero()),
                               O::fma(d, load_n(m + j, n, O::zero()), load_n(q + j, n, O::zero())));
            store_n(gx + at + j, g, n);
        }
    }
}

template <class T>
KernelTable<T> make_table() {
    return {&cf_sum<T>, &cf_dev<T>, &cf_dot<T>,  &cf_affine<T>, &cf_grad<T>, &rows_affine<T>,
            &cl_sum<T>, &cl_dev<T>, &cl_dot<T>,  &cl_affine<T>, &cl_grad<T>};
}
