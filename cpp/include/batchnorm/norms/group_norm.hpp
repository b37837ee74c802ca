// Group normalization (PyTorch's GroupNorm): per sample, the channels split into `groups`
// consecutive groups, each normalized over its channels and spatial values together, then a
// per-channel affine map. InstanceNorm (norms/instance_norm.hpp) is the case groups = channels.
//
// Channels-first memory (N, C, spatial): a group is one contiguous segment of C/G*spatial
// values, so the engine sees Shape{1, N*G, C/G*spatial} and each segment is normalized right
// after its statistics, while it is in cache. Channels-last memory (N, spatial, C): per sample,
// rows of C columns whose groups are C/G adjacent columns: the rows engine on
// Shape{spatial, G, C/G}.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../engine/engine.hpp"
#include "../engine/short_segments.hpp"
#include "common.hpp"

namespace batchnorm {

// N samples of `channels` channels with `spatial` values each, in memory (N, C, spatial) or,
// with channels_last, (N, spatial, C).
struct GroupShape {
    std::int64_t batch = 0;
    std::int64_t channels = 0;
    std::int64_t spatial = 1;
    bool channels_last = false;

    std::int64_t size() const { return batch * channels * spatial; }
};

namespace detail {

inline void check_group_shape(const GroupShape& s, std::int64_t groups) {
    require(s.batch >= 0 && s.channels >= 0 && s.spatial >= 0, "shape: batch, channels and spatial must be non-negative, got (",
            s.batch, ", ", s.channels, ", ", s.spatial, ")");
    require(s.channels <= kMaxElements && product_within(s.batch, s.spatial, kMaxElements) &&
                product_within(s.batch * s.spatial, s.channels, kMaxElements),
            "shape: (", s.batch, ", ", s.channels, ", ", s.spatial, ") has more than ", kMaxElements, " elements");
    require(groups > 0, "num_groups must be positive, got ", groups);
    require(s.channels % groups == 0, "num_groups (", groups, ") must divide the number of channels (", s.channels, ")");
}

// The per-sample rows view of channels-last memory: rows of C columns, a group's C/G
// channels as the inner columns of one "channel" of the engine.
inline Shape group_rows(const GroupShape& s, std::int64_t groups) {
    return Shape{s.spatial, groups, s.channels / groups};
}

// Whether (sample, group) segments go as scalar loops (short_segments.hpp). Channels-last
// samples only when their rows are narrow too: wide rows vectorize across channels in the rows
// engine, whose fixed cost per sample (about 0.25 us) then matters little. C++, 1 thread,
// Intel Xeon, float32 forward / backward ms, rows engine against scalar loops: (400000, 2, 2)
// one group 50 / 32 against 7.6 / 10.8; (8, 512, 16) instance norm 0.07 / 0.05 against
// 0.14 / 0.19.
inline bool short_groups(const GroupShape& s, std::int64_t groups) {
    return is_short_segment(s.channels / groups * s.spatial) &&
           (!s.channels_last || s.channels <= kShortSegmentValues);
}

// Runs body(offset, start) with the layout of (sample, group) segments made compile-time:
// offset(p, i) of value i of the segment's plane (channel) p, start(sg) of segment sg.
template <class Body>
void with_segment_layout(const GroupShape& s, std::int64_t groups, Body&& body) {
    const std::int64_t C = s.channels, per_group = C / groups, hw = s.spatial;
    if (s.channels_last)
        body([C](std::int64_t p, std::int64_t i) { return i * C + p; },
             [=](std::int64_t sg) { return (sg / groups) * hw * C + (sg % groups) * per_group; });
    else
        body([hw](std::int64_t p, std::int64_t i) { return p * hw + i; },
             [=](std::int64_t sg) { return sg * per_group * hw; });
}

// Statistics of every (sample, group) segment, finish(segment, Moments) -> invstd, and
// y = act((x - mean)*invstd*w[c] + b[c]).
template <class T, class Finish>
void normalize_groups(const T* x, T* y, const GroupShape& s, std::int64_t groups, const compute_t<T>* weight,
                      const compute_t<T>* bias, bool relu, Finish&& finish) {
    using P = compute_t<T>;
    const auto& k = kernels<T>();
    const std::int64_t C = s.channels, per_group = C / groups, hw = s.spatial;
    const auto factors = [&](std::int64_t g, const Moments& m, double invstd, P* shift, P* alpha, P* beta) {
        for (std::int64_t i = 0; i < per_group; ++i) {
            const std::int64_t c = g * per_group + i;
            const ChannelAffine<P> a = affine_for<P>(m, invstd, value_or(weight, c, 1.0), value_or(bias, c, 0.0));
            shift[i] = a.shift;
            alpha[i] = a.alpha;
            beta[i] = a.beta;
        }
    };
    if (short_groups(s, groups)) {
        with_segment_layout(s, groups, [&](auto offset, auto start) {
            for_each_short_segment(s.batch * groups, parallel_bytes<T>(kNormalizeArrays, s.size()),
                                   [&](std::int64_t sg) {
                const T* xs = x + start(sg);
                T* ys = y + start(sg);
                const Moments m = short_moments(xs, per_group, hw, offset);
                const double invstd = finish(sg, m);
                for (std::int64_t p = 0; p < per_group; ++p) {
                    const std::int64_t c = (sg % groups) * per_group + p;
                    const ChannelAffine<P> a =
                        affine_for<P>(m, invstd, value_or(weight, c, 1.0), value_or(bias, c, 0.0));
                    for (std::int64_t i = 0; i < hw; ++i) {
                        const P v = (P(xs[offset(p, i)]) - a.shift) * a.alpha + a.beta;
                        ys[offset(p, i)] = T(relu ? std::max(v, P(0)) : v);  // as the scalar kernels
                    }
                }
            });
        });
        return;
    }
    if (!s.channels_last) {
        // Per segment its moments and invstd; each plane's factors are derived as it is applied,
        // so the scratch is per group, not per (sample, channel).
        const Shape seg{1, s.batch * groups, per_group * hw};
        const Writes writes = output_writes<T>(seg, 2, hw);
        std::vector<std::pair<Moments, double>> stats(static_cast<std::size_t>(seg.channels));
        for_each_channel<Moments>(
            seg, parallel_bytes<T>(kNormalizeArrays, s.size()),
            [&](std::int64_t sg, std::int64_t b, std::int64_t e) { return range_moments(k, x, seg, sg, b, e, false); },
            [&](std::int64_t sg, const Moments& m) { stats[std::size_t(sg)] = {m, finish(sg, m)}; },
            [&](std::int64_t sg, std::int64_t b, std::int64_t e) {
                const auto& [m, invstd] = stats[std::size_t(sg)];
                for (std::int64_t v = b; v < e;) {
                    const std::int64_t p = v / hw, end = std::min(e, (p + 1) * hw), c = (sg % groups) * per_group + p;
                    const ChannelAffine<P> a = affine_for<P>(m, invstd, value_or(weight, c, 1.0), value_or(bias, c, 0.0));
                    const std::int64_t at = sg * seg.inner + v;
                    k.cf_affine(x + at, y + at, 1, end - v, 0, a.shift, a.alpha, a.beta, relu, writes);
                    v = end;
                }
            });
        return;
    }
    const Shape rows = group_rows(s, groups);
    PerColumn<P> shift(rows), alpha(rows), beta(rows);
    const Writes writes = output_writes<T>(Shape{1, 1, s.size()}, 2, s.size());
    const BlockReads reads = block_reads<T>(Shape{1, 1, s.size()}, 1, 2);
    for (std::int64_t n = 0; n < s.batch; ++n) {
        const T* xn = x + n * hw * C;
        T* yn = y + n * hw * C;
        for_each_row_block<T>(
            rows, parallel_bytes<T>(kNormalizeArrays, hw * C),
            [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk, ColumnScratch<T>& w) {
                block_moments(k, xn, b, e, blk, w, reads);
            },
            each_channel([&](std::int64_t g, const ColumnBlock& blk, const auto& scratch) {
                const Moments m = channel_moments(rows, g, blk, scratch);
                const std::int64_t at = (g - blk.first) * per_group;
                factors(g, m, finish(n * groups + g, m), shift.data() + at,
                        alpha.data() + at, beta.data() + at);
            }),
            [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk) {
                affine_block_rows(k, xn, yn, b, e, blk, writes, shift.data(), alpha.data(), beta.data(), relu);
            });
    }
}

// Sums of one segment's planes (channels-first backward), merged plane by plane.
struct PlaneSums {
    std::vector<Sums> planes;
};

inline PlaneSums merge(const PlaneSums& a, const PlaneSums& b) {
    if (a.planes.empty()) return b;
    PlaneSums total = a;
    for (std::size_t p = 0; p < b.planes.size(); ++p) total.planes[p] += b.planes[p];
    return total;
}

// Backward of normalize_groups given the saved mean and invstd per (sample, group):
// per channel and sample {sum(dy), sum(dy*(x - mean))}, then
// grad_x = invstd*w[c]*dy - invstd*A/M - (x - mean)*invstd^3*B/M with A = sum over the group of
// w[c]*sum(dy), B = sum of w[c]*sum(dy*(x - mean)), M the group's values;
// grad_weight[c] = sum over samples of sum(dy*(x - mean))*invstd, grad_bias[c] = sum(dy).
template <class T>
void group_backward(const T* dy, const T* x, T* gx, const GroupShape& s, std::int64_t groups,
                    const compute_t<T>* mean, const compute_t<T>* invstd, const compute_t<T>* weight,
                    compute_t<T>* grad_weight, compute_t<T>* grad_bias) {
    using P = compute_t<T>;
    const auto& k = kernels<T>();
    const std::int64_t C = s.channels, per_group = C / groups, hw = s.spatial;
    const double inv_count = 1.0 / double(per_group * hw);
    std::vector<double> sdy(std::size_t(s.batch * C)), sdyx(sdy.size());
    // Coefficients of one group from its per-channel sums; kc[i] = w[c]*invstd.
    const auto coefficients = [&](std::int64_t sg, const double* s1, const double* s2, P* kc, P& m, P& q) {
        const std::int64_t g = sg % groups;
        const double is = double(invstd[sg]);
        double a = 0, b = 0;
        for (std::int64_t i = 0; i < per_group; ++i) {
            const double w = value_or(weight, g * per_group + i, 1.0);
            a += w * s1[i];
            b += w * s2[i];
            if (kc) kc[i] = P(w * is);
        }
        const auto [mm, qq] = through_statistics(is, a, b, inv_count);
        m = P(mm);
        q = P(qq);
    };
    if (short_groups(s, groups)) {
        with_segment_layout(s, groups, [&](auto offset, auto start) {
            for_each_short_segment(s.batch * groups, parallel_bytes<T>(kBackwardArrays, s.size()),
                                   [&](std::int64_t sg) {
                const std::int64_t at = start(sg);
                const std::size_t first = std::size_t(sg * per_group);  // (sample, channel) of its first plane
                for (std::int64_t p = 0; p < per_group; ++p) {
                    const Sums r = short_dot(dy + at, x + at, p, hw, mean[sg], offset);
                    sdy[first + std::size_t(p)] = r.first;
                    sdyx[first + std::size_t(p)] = r.second;
                }
                if (!gx) return;
                P m, q;
                coefficients(sg, sdy.data() + first, sdyx.data() + first, nullptr, m, q);
                for (std::int64_t p = 0; p < per_group; ++p) {
                    const P kc = P(value_or(weight, (sg % groups) * per_group + p, 1.0) * double(invstd[sg]));
                    for (std::int64_t i = 0; i < hw; ++i) {
                        const std::int64_t e = at + offset(p, i);
                        gx[e] = T(kc * P(dy[e]) + (P(x[e]) - mean[sg]) * m + q);
                    }
                }
            });
        });
    } else if (!s.channels_last) {
        const Shape seg{1, s.batch * groups, per_group * hw};
        const Writes writes = output_writes<T>(seg, 3, hw);
        std::vector<P> mc(static_cast<std::size_t>(seg.channels)), qc(mc.size());
        for_each_channel<PlaneSums>(
            seg, parallel_bytes<T>(kBackwardArrays, s.size()),
            [&](std::int64_t sg, std::int64_t b, std::int64_t e) {
                PlaneSums r{std::vector<Sums>(std::size_t(per_group))};
                for (std::int64_t v = b; v < e;) {
                    const std::int64_t p = v / hw, end = std::min(e, (p + 1) * hw), at = sg * seg.inner + v;
                    r.planes[std::size_t(p)] += checked_dot(k, dy + at, x + at, 1, end - v, 0, mean[sg], false);
                    v = end;
                }
                return r;
            },
            [&](std::int64_t sg, const PlaneSums& r) {
                const std::size_t at = std::size_t(sg * per_group);
                for (std::int64_t i = 0; i < per_group; ++i) {
                    sdy[at + std::size_t(i)] = r.planes[std::size_t(i)].first;
                    sdyx[at + std::size_t(i)] = r.planes[std::size_t(i)].second;
                }
                coefficients(sg, sdy.data() + at, sdyx.data() + at, nullptr, mc[std::size_t(sg)], qc[std::size_t(sg)]);
            },
            [&](std::int64_t sg, std::int64_t b, std::int64_t e) {
                if (!gx) return;
                for (std::int64_t v = b; v < e;) {
                    const std::int64_t p = v / hw, end = std::min(e, (p + 1) * hw), at = sg * seg.inner + v;
                    const P kc = P(value_or(weight, (sg % groups) * per_group + p, 1.0) * double(invstd[sg]));
                    k.cf_grad(dy + at, x + at, gx + at, 1, end - v, 0, mean[sg], kc, mc[std::size_t(sg)],
                              qc[std::size_t(sg)], writes);
                    v = end;
                }
            });
    } else {
        const Shape rows = group_rows(s, groups);
        PerColumn<P> shift(rows), kcol(rows), mcol(rows), qcol(rows);
        const Writes writes = output_writes<T>(Shape{1, 1, s.size()}, 3, s.size());
        const BlockReads reads = block_reads<T>(Shape{1, 1, s.size()}, 2, 3);
        for (std::int64_t n = 0; n < s.batch; ++n) {
            const std::int64_t base = n * hw * C;
            for_each_row_block<T>(
                rows, parallel_bytes<T>(kBackwardArrays, hw * C),
                [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk, ColumnScratch<T>& w) {
                    for (std::int64_t g = blk.first; g < blk.first + blk.count; ++g)
                        std::fill_n(w.shift.begin() + (g - blk.first) * per_group, per_group, mean[n * groups + g]);
                    std::fill_n(w.s1.begin(), blk.cols, 0.0);
                    std::fill_n(w.s2.begin(), blk.cols, 0.0);
                    const std::int64_t at = base + b * blk.ld + blk.col;
                    checked_cl_dot(k, dy + at, x + at, e - b, blk.cols, blk.ld, w.shift.data(), w.s1.data(), w.s2.data(),
                                   reads);
                },
                each_channel([&](std::int64_t g, const ColumnBlock& blk, const auto& scratch) {
                    const std::int64_t j0 = (g - blk.first) * per_group, c0 = n * C + g * per_group;
                    for (std::int64_t i = 0; i < per_group; ++i) {
                        double a = 0, b = 0;
                        for (const auto& w : scratch) {
                            a += w.s1[std::size_t(j0 + i)];
                            b += w.s2[std::size_t(j0 + i)];
                        }
                        sdy[std::size_t(c0 + i)] = a;
                        sdyx[std::size_t(c0 + i)] = b;
                    }
                    P m, q;
                    coefficients(n * groups + g, sdy.data() + c0, sdyx.data() + c0, kcol.data() + j0, m, q);
                    std::fill_n(shift.data() + j0, per_group, mean[n * groups + g]);
                    std::fill_n(mcol.data() + j0, per_group, m);
                    std::fill_n(qcol.data() + j0, per_group, q);
                }),
                [&](std::int64_t b, std::int64_t e, const ColumnBlock& blk) {
                    if (gx)
                        grad_block_rows(k, dy + base, x + base, gx + base, b, e, blk, writes, shift.data(),
                                        kcol.data(), mcol.data(), qcol.data());
                });
        }
    }
    for (std::int64_t c = 0; c < C; ++c) {
        double gw = 0, gb = 0;
        for (std::int64_t n = 0; n < s.batch; ++n) {
            const std::size_t at = std::size_t(n * C + c);
            gw += sdyx[at] * double(invstd[n * groups + c / per_group]);
            gb += sdy[at];
        }
        if (grad_weight) grad_weight[c] = P(gw);
        if (grad_bias) grad_bias[c] = P(gb);
    }
}

}  // namespace detail

// GroupNorm forward: y = act((x - mean)/sqrt(var + eps)*weight[c] + bias[c]) with the mean and
// biased variance of each (sample, group). weight/bias (C values) may be null (1 and 0).
// save_mean and save_invstd (optional, N*G values, sample-major) receive the statistics.
// T is the storage type of x and y; weight, bias and the statistics are compute_t<T>.
template <class T>
void group_norm(const T* x, T* y, const GroupShape& shape, std::int64_t groups, const compute_t<T>* weight,
                const compute_t<T>* bias, double eps, compute_t<T>* save_mean = nullptr,
                compute_t<T>* save_invstd = nullptr, Activation act = Activation::none) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_group_shape(shape, groups);
    detail::check_eps(eps);
    if (shape.size() == 0) {
        const std::int64_t n = shape.batch * groups;
        if (save_mean) std::fill_n(save_mean, n, std::numeric_limits<P>::quiet_NaN());
        if (save_invstd) std::fill_n(save_invstd, n, std::numeric_limits<P>::quiet_NaN());
        return;
    }
    detail::check_pointer(x, "x");
    detail::check_pointer(y, "y");
    detail::normalize_groups(x, y, shape, groups, weight, bias, act == Activation::relu,
                             [&](std::int64_t sg, const detail::Moments& m) {
                                 const double invstd = detail::invstd_of(m.biased_var(), eps);
                                 if (save_mean) save_mean[sg] = P(m.mean());
                                 if (save_invstd) save_invstd[sg] = P(invstd);
                                 return invstd;
                             });
}

// GroupNorm backward from the forward's saved mean and invstd (N*G values each). grad_x,
// grad_weight and grad_bias may each be null (not wanted); weight null means 1.
template <class T>
void group_norm_backward(const T* grad_y, const T* x, detail::identity_t<T>* grad_x, const GroupShape& shape,
                         std::int64_t groups, const compute_t<T>* mean, const compute_t<T>* invstd,
                         const compute_t<T>* weight, compute_t<T>* grad_weight, compute_t<T>* grad_bias) {
    using P = compute_t<T>;
    detail::check_element_type<T>();
    detail::check_group_shape(shape, groups);
    if (shape.size() == 0) {
        if (grad_weight) std::fill_n(grad_weight, shape.channels, P(0));
        if (grad_bias) std::fill_n(grad_bias, shape.channels, P(0));
        return;
    }
    detail::check_pointer(mean, "mean");
    detail::check_pointer(invstd, "invstd");
    detail::check_pointer(grad_y, "grad_y");
    detail::check_pointer(x, "x");
    detail::group_backward(grad_y, x, grad_x, shape, groups, mean, invstd, weight, grad_weight, grad_bias);
}

}  // namespace batchnorm
