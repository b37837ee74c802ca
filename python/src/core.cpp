// batchnorm._core: the nanobind module. It checks every argument (types, dtypes, shapes,
// writability, overlaps) before anything is written, resolves layouts, releases the GIL and
// calls the C++ entry points. The contract is docs/core-module.md.
#include "arrays.hpp"
#include "instantiations.hpp"
#include "numbers.hpp"

#include <cmath>

#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

namespace nb = nanobind;
using namespace nb::literals;

namespace batchnorm::python {
namespace {

struct Input {
    ArrayRef array;
    Layout layout;
};

// The main input: a float32/float64/float16/bfloat16 array of rank >= 2, with the layout its
// channel axis gives.
Input take_main_input(nb::handle h, const char* name, int axis) {
    Input in{take_array(h, name), {}};
    const ArrayRef& x = in.array;
    if (x.type != NPY_FLOAT32 && x.type != NPY_FLOAT64 && x.type != NPY_HALF && x.type != kNpyBfloat16)
        type_error(std::string(name) + " must have dtype float32, float64, float16 or bfloat16, got " +
                   x.dtype_name());
    if (x.rank < 2)
        value_error(std::string(name) + " must have at least 2 dimensions (N, C, ...), got shape " +
                    shape_string(x.shape_vector()));
    if (axis < -x.rank || axis >= x.rank)
        value_error("axis " + std::to_string(axis) + " is out of range for " + name + " of rank " +
                    std::to_string(x.rank));
    in.layout = layout_of(x, axis < 0 ? axis + x.rank : axis);
    return in;
}

// f(S{}) with S the storage type of the input a.
template <class F>
nb::object with_element_type(const ArrayRef& a, F&& f) {
    switch (a.type) {
        case NPY_FLOAT32: return f(float{});
        case NPY_HALF: return f(float16{});
        case kNpyBfloat16: return f(bfloat16{});
        default: return f(double{});
    }
}

template <class F>
nb::object with_element_type(const Input& in, F&& f) {
    return with_element_type(in.array, f);
}

// A same-shaped array argument (residual, grad_y) of dtype T, or nothing for None.
template <class T>
std::optional<ArrayRef> take_like_input(nb::handle h, const char* name, const Layout& L) {
    if (h.is_none()) return std::nullopt;
    ArrayRef a = take_array(h, name);
    check_dtype<T>(a, name);
    if (!L.same_shape(a))
        value_error(std::string(name) + " must have the input's shape " + shape_string(L.shape_vector()) + ", got " +
                    shape_string(a.shape_vector()));
    return a;
}

// grad_y of a backward: required, with the input's shape and dtype.
template <class T>
ArrayRef take_grad_y(nb::handle h, const Layout& L) {
    if (h.is_none()) type_error("grad_y must be an array, got None");
    return *take_like_input<T>(h, "grad_y", L);
}

// An output (`out`, or `sum_out`: out_name) must not share memory with a per-channel array (of
// compute_t<T>) the call reads or writes.
void check_apart(const ArrayRef* written, const char* written_name,
                 std::initializer_list<std::pair<const ArrayRef*, const char*>> arrays, const char* advice) {
    if (!written) return;
    for (const auto& [array, name] : arrays)
        if (array && overlaps(*written, *array))
            value_error(std::string(written_name) + " overlaps " + name + "; " + advice);
}

template <class T>
void check_apart(const WriteAs<T>& out, std::initializer_list<std::pair<const ArrayRef*, const char*>> arrays,
                 const char* out_name = "out") {
    check_apart(out.out(), out_name, arrays, "pass a separate array");
}

// Training writes a channel's running statistics while it still reads the input, weight and bias
// of the channels after it, so none of those may share their memory (torch's batch norm reads
// the overwritten values instead).
template <class T>
void check_running_apart(const ChannelArray<T>& running_mean, const ChannelArray<T>& running_var,
                         std::initializer_list<std::pair<const ArrayRef*, const char*>> arrays) {
    check_apart(running_mean.array(), "running_mean", arrays, "pass separate arrays");
    check_apart(running_var.array(), "running_var", arrays, "pass separate arrays");
}

// What batch norm's two input-gradient entry points (backward, batch_norm_backward_apply) read
// besides x, checked in this order: grad_y, the saved mean and invstd (required), weight.
// The caller takes `out` after its own checks, then has gradient_output() check it.
template <class T>
struct GradientOperands {
    GradientOperands(const Input& in, nb::handle grad_obj, nb::handle mean_obj, nb::handle invstd_obj,
                     nb::handle weight_obj)
        : grad_y(take_grad_y<T>(grad_obj, in.layout)),
          mean(required_statistics(mean_obj, invstd_obj), "mean", in.layout.view.channels),
          invstd(invstd_obj, "invstd", in.layout.view.channels),
          weight(weight_obj, "weight", in.layout.view.channels) {}

    // grad_x: a new array, or `out`, apart from every array the call reads
    WriteAs<T> gradient_output(nb::handle out, const Input& in) const {
        WriteAs<T> grad_x(out, in.layout, "out", {&in.array, &grad_y});
        check_apart(grad_x, {{mean.array(), "mean"}, {invstd.array(), "invstd"}, {weight.array(), "weight"}});
        return grad_x;
    }

    const ArrayRef grad_y;
    const ChannelArray<T> mean, invstd, weight;

private:
    static nb::handle required_statistics(nb::handle mean_obj, nb::handle invstd_obj) {
        if (mean_obj.is_none() || invstd_obj.is_none()) type_error("mean and invstd must be arrays, got None");
        return mean_obj;
    }
};

nb::object stats(nb::handle x_obj, Int axis) {
    const Input in = take_main_input(x_obj, "x", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        using P = compute_t<T>;
        const ReadAs<T> x(in.array, in.layout);
        const std::int64_t channels = in.layout.view.channels;
        nb::object mean = new_vector<P>(channels), var = new_vector<P>(channels);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::batch_stats<T>(x.data(), in.layout.view, data_of<P>(mean), data_of<P>(var));
        }
        return nb::make_tuple(mean, var);
    });
}

nb::object forward_train(nb::handle x_obj, nb::handle weight_obj, nb::handle bias_obj, nb::handle rmean_obj,
                         nb::handle rvar_obj, Real momentum, Real eps, Int axis, nb::handle out, bool relu) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        const ChannelArray<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        const ChannelArray<T> running_mean(rmean_obj, "running_mean", view.channels, true);
        const ChannelArray<T> running_var(rvar_obj, "running_var", view.channels, true);
        if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
            value_error("running_mean and running_var must both be arrays or both be None");
        if (running_mean.data() && overlaps(*running_mean.array(), *running_var.array()))
            value_error("running_mean overlaps running_var; pass separate arrays");
        check_running_apart(running_mean, running_var, {{&in.array, "input"}, {weight.array(), "weight"},
                                                        {bias.array(), "bias"}});
        if (view.per_channel() == 1)
            value_error("Expected more than 1 value per channel when training, got input size " +
                        shape_string(in.layout.shape_vector()));
        WriteAs<T> y(out, in.layout, "out", {&in.array});
        check_apart(y, {{weight.array(), "weight"}, {bias.array(), "bias"}, {running_mean.array(), "running_mean"},
                        {running_var.array(), "running_var"}});
        const ReadAs<T> x(in.array, in.layout);
        using P = compute_t<T>;
        nb::object save_mean = new_vector<P>(view.channels), save_invstd = new_vector<P>(view.channels);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::forward_train<T>(x.data(), y.data(), view, weight.data(), bias.data(), running_mean.data(),
                                        running_var.data(), momentum, eps, data_of<P>(save_mean),
                                        data_of<P>(save_invstd), relu ? Activation::relu : Activation::none);
        }
        running_mean.commit();
        running_var.commit();
        return nb::make_tuple(y.finish(), save_mean, save_invstd);
    });
}

// The statistics an eval forward normalized with, for its backward: a dense (2, C) array of the
// per-channel dtype, rows mean and 1/sqrt(var + eps) (as backward's mean and invstd), apart from
// every other array of the call. Filled by write() after the forward; null for None.
template <class T>
class SavedStatistics {
    using P = compute_t<T>;

public:
    SavedStatistics(nb::handle h, std::int64_t channels) : channels_(channels) {
        if (h.is_none()) return;
        take_array(h, "saved", array_);
        check_channel_dtype<T>(array_, "saved");
        if (array_.rank != 2 || array_.shape[0] != 2 || array_.shape[1] != channels ||
            (channels > 1 && array_.strides[1] != 1) || array_.strides[0] != channels)
            value_error("saved must be a C-contiguous array of shape (2, " + std::to_string(channels) + "), got shape " +
                        shape_string(array_.shape_vector()));
        check_writable(array_, "saved");
        data_ = reinterpret_cast<P*>(array_.data);
    }

    void check_apart(std::initializer_list<const ArrayRef*> arrays) const {
        if (!data_) return;
        for (const ArrayRef* array : arrays)
            if (array && overlaps(array_, *array))
                value_error("saved overlaps another argument; pass a separate array");
    }

    void write(const P* mean, const P* var, double eps) const {
        if (!data_) return;
        std::copy_n(mean, channels_, data_);
        batchnorm::eval_invstd(var, data_ + channels_, channels_, eps);
    }

private:
    ArrayRef array_;
    std::int64_t channels_;
    P* data_ = nullptr;
};

nb::object forward_eval(nb::handle x_obj, nb::handle mean_obj, nb::handle var_obj, nb::handle weight_obj,
                        nb::handle bias_obj, Real eps, Int axis, nb::handle out, nb::handle residual_obj,
                        bool relu, nb::handle saved_obj) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        if (mean_obj.is_none() || var_obj.is_none())
            value_error("running_mean and running_var are required in eval mode");
        const ChannelArray<T> mean(mean_obj, "running_mean", view.channels);
        const ChannelArray<T> var(var_obj, "running_var", view.channels);
        const ChannelArray<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        const std::optional<ArrayRef> residual_array = take_like_input<T>(residual_obj, "residual", in.layout);
        WriteAs<T> y(out, in.layout, "out", {&in.array, residual_array ? &*residual_array : nullptr});
        check_apart(y, {{mean.array(), "running_mean"}, {var.array(), "running_var"}, {weight.array(), "weight"},
                        {bias.array(), "bias"}});
        const SavedStatistics<T> saved(saved_obj, view.channels);
        saved.check_apart({&in.array, y.out(), residual_array ? &*residual_array : nullptr, mean.array(), var.array(),
                           weight.array(), bias.array()});
        const ReadAs<T> x(in.array, in.layout);
        std::optional<ReadAs<T>> residual;
        if (residual_array) residual.emplace(*residual_array, in.layout);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::forward_eval<T>(x.data(), y.data(), view, mean.data(), var.data(), weight.data(), bias.data(),
                                       eps, residual ? residual->data() : nullptr,
                                       relu ? Activation::relu : Activation::none);
        }
        saved.write(mean.data(), var.data(), eps);
        return y.finish();
    });
}

// BatchNorm1d/2d/3d.__call__ (modules.py) for the per-call case of inference: eval mode with
// running statistics, an input of exactly numpy.ndarray of a rank and channel count the module
// takes, no fusion. Reads the module's own attributes, runs forward_eval with its saved-statistics
// array and stores the saved context as the Python method does. Its Python took 0.8 of the 2.6 us
// of a (1, 64, 7, 7) call (AMD EPYC Zen 3), most of a small module call. Returns None, having
// changed nothing, wherever the case differs or forward_eval refuses an argument: the Python
// method then runs, with its checks and words.
nb::object module_eval(nb::handle module, nb::handle x, nb::handle out) {
    if (!PyArray_CheckExact(x.ptr())) return nb::none();
    static PyObject *const training_key = PyUnicode_InternFromString("training"),
                           *const mean_key = PyUnicode_InternFromString("_running_mean"),
                           *const var_key = PyUnicode_InternFromString("_running_var"),
                           *const weight_key = PyUnicode_InternFromString("_weight"),
                           *const bias_key = PyUnicode_InternFromString("_bias"),
                           *const eps_key = PyUnicode_InternFromString("eps"),
                           *const axis_key = PyUnicode_InternFromString("axis"),
                           *const features_key = PyUnicode_InternFromString("num_features"),
                           *const saved_key = PyUnicode_InternFromString("_eval_stats"),
                           *const context_key = PyUnicode_InternFromString("_saved"),
                           *const ranks_key = PyUnicode_InternFromString("_ranks");
    const nb::object state = nb::steal(PyObject_GenericGetDict(module.ptr(), nullptr));
    if (!state.is_valid()) throw nb::python_error();
    // Owned: with the GIL released around the kernel, another thread may rebind the attributes.
    const auto item = [&](PyObject* key) { return nb::borrow(PyDict_GetItemWithError(state.ptr(), key)); };
    const nb::object mean = item(mean_key), var = item(var_key), saved = item(saved_key);
    const nb::object eps = item(eps_key), axis = item(axis_key), features = item(features_key);
    const nb::object weight = item(weight_key), bias = item(bias_key);
    if (PyErr_Occurred()) throw nb::python_error();
    if (item(training_key).ptr() != Py_False || !mean || mean.is_none() || !var || var.is_none() || !saved ||
        saved.is_none() || !weight || !bias || !eps || !PyFloat_CheckExact(eps.ptr()) || !axis ||
        !PyLong_CheckExact(axis.ptr()) || !features || !PyLong_CheckExact(features.ptr()))
        return nb::none();
    auto* array = reinterpret_cast<PyArrayObject*>(x.ptr());
    const int rank = PyArray_NDIM(array);
    const nb::object ranks = nb::steal(PyObject_GetAttr(module.ptr(), ranks_key));
    const int takes_rank = ranks.is_valid() ? PySequence_Contains(ranks.ptr(), nb::int_(rank).ptr()) : -1;
    const long long channel_axis = PyLong_AsLongLong(axis.ptr()), channels = PyLong_AsLongLong(features.ptr());
    if (takes_rank < 0 || PyErr_Occurred()) {  // e.g. an axis past a C long: the Python method says what is wrong
        PyErr_Clear();
        return nb::none();
    }
    if (takes_rank == 0 || channel_axis < -rank || channel_axis >= rank ||
        PyArray_DIM(array, int(channel_axis < 0 ? channel_axis + rank : channel_axis)) != channels)
        return nb::none();
    nb::object y;
    try {
        y = forward_eval(x, mean, var, weight, bias, Real{PyFloat_AS_DOUBLE(eps.ptr())}, Int{int(channel_axis)}, out,
                         nb::none(), false, saved);
    } catch (const nb::builtin_exception&) {  // an argument refused: the Python method raises it, in its words
        return nb::none();
    }
    const nb::object context = nb::make_tuple(x, out, nb::none(), weight, saved);
    if (PyDict_SetItem(state.ptr(), context_key, context.ptr()) < 0) throw nb::python_error();
    return y;
}

// parameters false: grad_weight and grad_bias are None, not computed (in eval, grad_x alone reads
// only grad_y: a frozen batch norm's backward).
nb::object backward(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj, nb::handle invstd_obj,
                    nb::handle weight_obj, Int axis, bool training, nb::handle out, bool parameters) {
    const Input in = take_main_input(x_obj, "x", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        const GradientOperands<T> g(in, grad_obj, mean_obj, invstd_obj, weight_obj);
        WriteAs<T> grad_x = g.gradient_output(out, in);
        const ReadAs<T> x(in.array, in.layout), grad_y(g.grad_y, in.layout);
        using P = compute_t<T>;
        nb::object grad_weight = parameters ? new_vector<P>(view.channels) : nb::none();
        nb::object grad_bias = parameters ? new_vector<P>(view.channels) : nb::none();
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::backward<T>(grad_y.data(), x.data(), grad_x.data(), view, g.mean.data(), g.invstd.data(),
                                   g.weight.data(), parameters ? data_of<P>(grad_weight) : nullptr,
                                   parameters ? data_of<P>(grad_bias) : nullptr, training);
        }
        return nb::make_tuple(grad_x.finish(), grad_weight, grad_bias);
    });
}

// ---- the normalization family ---------------------------------------------------------------

// A float32/float64/float16/bfloat16 array argument of any rank.
ArrayRef take_float_array(nb::handle h, const char* name) {
    ArrayRef a = take_array(h, name);
    if (a.type != NPY_FLOAT32 && a.type != NPY_FLOAT64 && a.type != NPY_HALF && a.type != kNpyBfloat16)
        type_error(std::string(name) + " must have dtype float32, float64, float16 or bfloat16, got " +
                   a.dtype_name());
    return a;
}

template <class T>
nb::object new_c_array(const std::vector<std::int64_t>& shape) {
    std::int64_t strides[kMaxRank], step = 1;
    for (std::size_t d = shape.size(); d-- > 0;) {
        strides[d] = step;
        step *= shape[d];
    }
    return new_array<T>(int(shape.size()), shape.data(), strides);
}

std::int64_t product(const std::vector<std::int64_t>& v) {
    std::int64_t n = 1;
    for (std::int64_t d : v) n *= d;
    return n;
}

// Layer norm's split of the input's shape into rows (leading dims) and normalized (trailing).
struct RowSplit {
    std::vector<std::int64_t> batch, normalized;
};

RowSplit split_rows(const ArrayRef& x, int normalized_ndim) {
    if (normalized_ndim < 1 || normalized_ndim > x.rank)
        value_error("normalized_ndim must be in [1, " + std::to_string(x.rank) + "] for input of shape " +
                    shape_string(x.shape_vector()) + ", got " + std::to_string(normalized_ndim));
    const std::vector<std::int64_t> shape = x.shape_vector();
    const auto cut = shape.end() - normalized_ndim;
    return {{shape.begin(), cut}, {cut, shape.end()}};
}

// `out` and `sum_out` must be separate memory: one receives LN(x + r), the other x + r.
template <class T>
void check_outputs_apart(const WriteAs<T>& y, const std::optional<WriteAs<T>>& sum) {
    if (sum && y.out() && overlaps(*y.out(), *sum->out()))
        value_error("out overlaps sum_out; pass separate arrays");
}

nb::object layer_norm(nb::handle x_obj, int normalized_ndim, nb::handle weight_obj, nb::handle bias_obj, Real eps,
                      bool rms, nb::handle out, nb::handle residual_obj, nb::handle sum_obj) {
    const ArrayRef xa = take_float_array(x_obj, "input");
    const RowSplit split = split_rows(xa, normalized_ndim);
    const Layout L = c_order_layout(xa);
    return with_element_type(xa, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const ParamArray<T> weight(weight_obj, "weight", split.normalized), bias(bias_obj, "bias", split.normalized);
        if (rms && bias.data()) value_error("bias must be None for RMS norm (rms=True)");
        const std::optional<ArrayRef> residual_array = take_like_input<T>(residual_obj, "residual", L);
        if (!sum_obj.is_none() && !residual_array) value_error("sum_out needs a residual");
        const ArrayRef* residual_ptr = residual_array ? &*residual_array : nullptr;
        WriteAs<T> y(out, L, "out", {&xa, residual_ptr});
        std::optional<WriteAs<T>> sum;
        if (!sum_obj.is_none()) sum.emplace(sum_obj, L, "sum_out", std::initializer_list<const ArrayRef*>{&xa, residual_ptr});
        check_outputs_apart(y, sum);
        check_apart(y, {{weight.array(), "weight"}, {bias.array(), "bias"}});
        if (sum) check_apart(*sum, {{weight.array(), "weight"}, {bias.array(), "bias"}}, "sum_out");
        const ReadAs<T> x(xa, L);
        std::optional<ReadAs<T>> residual;
        if (residual_array) residual.emplace(*residual_array, L);
        const std::int64_t rows = product(split.batch), cols = product(split.normalized);
        using P = compute_t<T>;
        nb::object mean = rms ? nb::none() : new_c_array<P>(split.batch), invstd = new_c_array<P>(split.batch);
        {
            const KernelSection unlocked(rows * cols);
            const T* r = residual ? residual->data() : nullptr;
            T* s = sum ? sum->data() : nullptr;
            if (rms)
                batchnorm::rms_norm<T>(x.data(), y.data(), rows, cols, weight.data(), eps, data_of<P>(invstd), r, s);
            else
                batchnorm::layer_norm<T>(x.data(), y.data(), rows, cols, weight.data(), bias.data(), eps,
                                         data_of<P>(mean), data_of<P>(invstd), r, s);
        }
        if (sum) sum->finish();
        return nb::make_tuple(y.finish(), mean, invstd);
    });
}

nb::object layer_norm_backward(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj, nb::handle invstd_obj,
                               nb::handle weight_obj, int normalized_ndim, bool rms, nb::handle out) {
    const ArrayRef xa = take_float_array(x_obj, "x");
    const RowSplit split = split_rows(xa, normalized_ndim);
    const Layout L = c_order_layout(xa);
    return with_element_type(xa, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const ArrayRef grad_array = take_grad_y<T>(grad_obj, L);
        if ((!rms && mean_obj.is_none()) || invstd_obj.is_none())
            type_error(rms ? "invstd must be an array, got None" : "mean and invstd must be arrays, got None");
        std::optional<ParamArray<T>> mean;
        if (!rms) mean.emplace(mean_obj, "mean", split.batch);
        const ParamArray<T> invstd(invstd_obj, "invstd", split.batch);
        const ParamArray<T> weight(weight_obj, "weight", split.normalized);
        WriteAs<T> grad_x(out, L, "out", {&xa, &grad_array});
        check_apart(grad_x, {{mean ? mean->array() : nullptr, "mean"}, {invstd.array(), "invstd"},
                             {weight.array(), "weight"}});
        const ReadAs<T> x(xa, L), grad_y(grad_array, L);
        const bool affine = weight.data() != nullptr;
        using P = compute_t<T>;
        nb::object grad_weight = affine ? new_c_array<P>(split.normalized) : nb::none();
        nb::object grad_bias = affine && !rms ? new_c_array<P>(split.normalized) : nb::none();
        const std::int64_t rows = product(split.batch), cols = product(split.normalized);
        {
            const KernelSection unlocked(rows * cols);
            P* gw = affine ? data_of<P>(grad_weight) : nullptr;
            if (rms)
                batchnorm::rms_norm_backward<T>(grad_y.data(), x.data(), grad_x.data(), rows, cols, invstd.data(),
                                                weight.data(), gw);
            else
                batchnorm::layer_norm_backward<T>(grad_y.data(), x.data(), grad_x.data(), rows, cols, mean->data(),
                                                  invstd.data(), weight.data(), gw,
                                                  affine ? data_of<P>(grad_bias) : nullptr);
        }
        return nb::make_tuple(grad_x.finish(), grad_weight, grad_bias);
    });
}

// Group and instance norm read memory channels-first (N, C, spatial...) or channels-last
// (N, spatial..., C): a dense input in either order is read in place, others are copied
// channels-first. The batch axis is axis 0.
struct GroupInput {
    ArrayRef array;
    Layout layout;
    GroupShape shape;
};

GroupInput take_group_input(nb::handle h, int axis, const char* name = "input") {
    const Input in = take_main_input(h, name, axis);
    const ArrayRef& x = in.array;
    const int a = axis < 0 ? axis + x.rank : axis;
    if (a == 0) value_error("axis must name the channel axis, not the batch axis 0, got " + std::to_string(axis));
    int first[kMaxRank], last[kMaxRank], n = 0;
    first[0] = last[0] = 0;
    first[1] = a;
    for (int d = 1; d < x.rank; ++d) {
        if (d == a) continue;
        first[2 + n] = d;
        last[1 + n] = d;
        ++n;
    }
    last[x.rank - 1] = a;
    GroupInput g{x, ordered_layout(x, first), {}};
    const Layout channels_last = ordered_layout(x, last);
    g.shape.batch = x.shape[0];
    g.shape.channels = x.shape[a];
    g.shape.spatial = 1;  // the product of the spatial sizes, an empty batch's too (torch's checks read it)
    for (int d = 1; d < x.rank; ++d)
        if (d != a) g.shape.spatial *= x.shape[d];
    if (x.size() != 0 && !g.layout.matches(x) && channels_last.matches(x)) {
        g.layout = channels_last;
        g.shape.channels_last = true;
    }
    return g;
}

void check_groups(const GroupInput& in, std::int64_t num_groups) {
    if (num_groups <= 0) value_error("num_groups must be positive, got " + std::to_string(num_groups));
    if (in.shape.channels % num_groups != 0)
        value_error("Expected number of channels in input to be divisible by num_groups, but got input of shape " +
                    shape_string(in.array.shape_vector()) + " and num_groups=" + std::to_string(num_groups));
}

nb::object group_norm(nb::handle x_obj, Int64 num_groups, nb::handle weight_obj, nb::handle bias_obj,
                      Real eps, Int axis, nb::handle out, bool relu) {
    const GroupInput in = take_group_input(x_obj, axis);
    check_groups(in, num_groups);
    return with_element_type(in.array, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const std::int64_t C = in.shape.channels;
        const ChannelArray<T> weight(weight_obj, "weight", C), bias(bias_obj, "bias", C);
        WriteAs<T> y(out, in.layout, "out", {&in.array});
        check_apart(y, {{weight.array(), "weight"}, {bias.array(), "bias"}});
        const ReadAs<T> x(in.array, in.layout);
        const std::vector<std::int64_t> stats_shape{in.shape.batch, num_groups};
        using P = compute_t<T>;
        nb::object mean = new_c_array<P>(stats_shape), invstd = new_c_array<P>(stats_shape);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::group_norm<T>(x.data(), y.data(), in.shape, num_groups, weight.data(), bias.data(), eps,
                                     data_of<P>(mean), data_of<P>(invstd), relu ? Activation::relu : Activation::none);
        }
        return nb::make_tuple(y.finish(), mean, invstd);
    });
}

nb::object group_norm_backward(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj, nb::handle invstd_obj,
                               nb::handle weight_obj, Int64 num_groups, Int axis, nb::handle out) {
    const GroupInput in = take_group_input(x_obj, axis, "x");
    check_groups(in, num_groups);
    return with_element_type(in.array, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const std::int64_t C = in.shape.channels;
        const ArrayRef grad_array = take_grad_y<T>(grad_obj, in.layout);
        if (mean_obj.is_none() || invstd_obj.is_none()) type_error("mean and invstd must be arrays, got None");
        const std::vector<std::int64_t> stats_shape{in.shape.batch, num_groups};
        const ParamArray<T> mean(mean_obj, "mean", stats_shape), invstd(invstd_obj, "invstd", stats_shape);
        const ChannelArray<T> weight(weight_obj, "weight", C);
        WriteAs<T> grad_x(out, in.layout, "out", {&in.array, &grad_array});
        check_apart(grad_x, {{mean.array(), "mean"}, {invstd.array(), "invstd"}, {weight.array(), "weight"}});
        const ReadAs<T> x(in.array, in.layout), grad_y(grad_array, in.layout);
        const bool affine = weight.data() != nullptr;
        using P = compute_t<T>;
        nb::object grad_weight = affine ? new_vector<P>(C) : nb::none(), grad_bias = affine ? new_vector<P>(C) : nb::none();
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::group_norm_backward<T>(grad_y.data(), x.data(), grad_x.data(), in.shape, num_groups,
                                              mean.data(), invstd.data(), weight.data(),
                                              affine ? data_of<P>(grad_weight) : nullptr,
                                              affine ? data_of<P>(grad_bias) : nullptr);
        }
        return nb::make_tuple(grad_x.finish(), grad_weight, grad_bias);
    });
}

nb::object instance_norm(nb::handle x_obj, nb::handle weight_obj, nb::handle bias_obj, nb::handle rmean_obj,
                         nb::handle rvar_obj, Real momentum, Real eps, Int axis, nb::handle out, bool relu) {
    const GroupInput in = take_group_input(x_obj, axis);
    return with_element_type(in.array, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const std::int64_t C = in.shape.channels;
        const ChannelArray<T> weight(weight_obj, "weight", C), bias(bias_obj, "bias", C);
        const ChannelArray<T> running_mean(rmean_obj, "running_mean", C, true);
        const ChannelArray<T> running_var(rvar_obj, "running_var", C, true);
        if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
            value_error("running_mean and running_var must both be arrays or both be None");
        if (running_mean.data() && overlaps(*running_mean.array(), *running_var.array()))
            value_error("running_mean overlaps running_var; pass separate arrays");
        if (in.shape.spatial == 1)
            value_error("Expected more than 1 spatial element when training, got input size " +
                        shape_string(in.array.shape_vector()));
        if (!(momentum >= 0 && momentum <= 1)) value_error("momentum must be in [0, 1], got " + std::to_string(momentum));
        WriteAs<T> y(out, in.layout, "out", {&in.array});
        check_apart(y, {{weight.array(), "weight"}, {bias.array(), "bias"}, {running_mean.array(), "running_mean"},
                        {running_var.array(), "running_var"}});
        const ReadAs<T> x(in.array, in.layout);
        const std::vector<std::int64_t> stats_shape{in.shape.batch, C};
        using P = compute_t<T>;
        nb::object mean = new_c_array<P>(stats_shape), invstd = new_c_array<P>(stats_shape);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::instance_norm<T>(x.data(), y.data(), in.shape, weight.data(), bias.data(), running_mean.data(),
                                        running_var.data(), momentum, eps, data_of<P>(mean), data_of<P>(invstd),
                                        relu ? Activation::relu : Activation::none);
        }
        running_mean.commit();
        running_var.commit();
        return nb::make_tuple(y.finish(), mean, invstd);
    });
}

// ---- batch norm's phases (statistics out, normalize from given statistics) ------------------

nb::object batch_moments(nb::handle x_obj, Int axis) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const ReadAs<T> x(in.array, in.layout);
        const Shape& view = in.layout.view;
        std::vector<GroupStats> stats(static_cast<std::size_t>(view.channels));
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::batch_moments<T>(x.data(), view, stats.data());
        }
        nb::object mean = new_vector<double>(view.channels), m2 = new_vector<double>(view.channels);
        for (std::size_t c = 0; c < stats.size(); ++c) {
            data_of<double>(mean)[c] = stats[c].mean;
            data_of<double>(m2)[c] = stats[c].m2;
        }
        return nb::make_tuple(double(view.per_channel()), mean, m2);
    });
}

nb::object batch_norm_apply(nb::handle x_obj, nb::handle mean_obj, nb::handle invstd_obj, nb::handle weight_obj,
                            nb::handle bias_obj, Int axis, nb::handle out) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        if (mean_obj.is_none() || invstd_obj.is_none()) type_error("mean and invstd must be arrays, got None");
        const ChannelArray<T> mean(mean_obj, "mean", view.channels), invstd(invstd_obj, "invstd", view.channels);
        const ChannelArray<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        WriteAs<T> y(out, in.layout, "out", {&in.array});
        check_apart(y, {{mean.array(), "mean"}, {invstd.array(), "invstd"}, {weight.array(), "weight"},
                        {bias.array(), "bias"}});
        const ReadAs<T> x(in.array, in.layout);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::batch_norm_apply<T>(x.data(), y.data(), view, mean.data(), invstd.data(), weight.data(),
                                           bias.data());
        }
        return y.finish();
    });
}

nb::object batch_norm_backward_reduce(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj, Int axis) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        const ArrayRef grad_array = take_grad_y<T>(grad_obj, in.layout);
        if (mean_obj.is_none()) type_error("mean must be an array, got None");
        const ChannelArray<T> mean(mean_obj, "mean", view.channels);
        const ReadAs<T> x(in.array, in.layout), grad_y(grad_array, in.layout);
        nb::object sum_dy = new_vector<double>(view.channels), sum_dy_xmu = new_vector<double>(view.channels);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::batch_norm_backward_reduce<T>(grad_y.data(), x.data(), view, mean.data(),
                                                     data_of<double>(sum_dy), data_of<double>(sum_dy_xmu));
        }
        return nb::make_tuple(sum_dy, sum_dy_xmu);
    });
}

nb::object batch_norm_backward_apply(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj,
                                     nb::handle invstd_obj, nb::handle weight_obj, nb::handle sum_dy_obj,
                                     nb::handle sum_dy_xmu_obj, Real count, Int axis, nb::handle out) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        const GradientOperands<T> g(in, grad_obj, mean_obj, invstd_obj, weight_obj);
        const Float64Vector sum_dy(sum_dy_obj, "sum_dy", view.channels);
        const Float64Vector sum_dy_xmu(sum_dy_xmu_obj, "sum_dy_xmu", view.channels);
        if (!(count > 0)) value_error("count must be positive, got " + std::to_string(count));
        WriteAs<T> grad_x = g.gradient_output(out, in);
        const ReadAs<T> x(in.array, in.layout), grad_y(g.grad_y, in.layout);
        {
            const KernelSection unlocked(in.layout.view.size());
            batchnorm::batch_norm_backward_apply<T>(grad_y.data(), x.data(), grad_x.data(), view, g.mean.data(),
                                                    g.invstd.data(), g.weight.data(), sum_dy.data(),
                                                    sum_dy_xmu.data(), count);
        }
        return grad_x.finish();
    });
}

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (Isa isa : batchnorm::supported_isas()) names.emplace_back(isa_name(isa));
    return names;
}

// import_array() is a macro that returns a value on failure; wrap it to report a Python error.
bool import_numpy() {
    import_array1(false);
    return true;
}

}  // namespace
}  // namespace batchnorm::python

// batchnorm's thread count for threadpoolctl, which finds a pool by the exported symbols of a
// loaded library and calls them through ctypes (python/batchnorm/_threadpool.py).
extern "C" NB_EXPORT int batchnorm_get_num_threads() { return batchnorm::get_num_threads(); }
extern "C" NB_EXPORT void batchnorm_set_num_threads(int n) {
    if (n >= 1) batchnorm::set_num_threads(n);
}

NB_MODULE(_core, m) {
    namespace py = batchnorm::python;
    if (!py::import_numpy()) throw nb::python_error();
    m.doc() = "batchnorm's C++ kernels. Internal: use the batchnorm package.";
    // Resolve BATCHNORM_ISA now, so a backend this machine cannot run fails the import.
    batchnorm::active_isa();

    m.def("isa", [] { return std::string(batchnorm::isa_name(batchnorm::active_isa())); },
          "The SIMD backend in use: 'avx512_bf16', 'avx512', 'avx2', 'neon' or 'scalar'.");
    m.def("available_isas", &py::available_isas,
          "Every backend this CPU and build can run, best first (values for BATCHNORM_ISA).");
    m.def("get_num_threads", &batchnorm::get_num_threads, "Threads a large call may use.");
    m.def("openmp_enabled", &batchnorm::openmp_enabled,
          "Whether this build runs in parallel (OpenMP); without it get_num_threads() is always 1.");
    m.def("set_num_threads", &batchnorm::set_num_threads, "n"_a, "Sets the threads for later calls (n >= 1).");
    m.def("stats", &py::stats, "x"_a.none(), "axis"_a = 1,
          nb::sig("def stats(x: object, axis: int = 1) "
                  "-> tuple[numpy.typing.NDArray[numpy.floating[typing.Any]], "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]]]"),
          "Per-channel mean and biased variance.");
    m.def("forward_train", &py::forward_train, "input"_a.none(), "weight"_a.none(), "bias"_a.none(),
          "running_mean"_a.none(), "running_var"_a.none(), "momentum"_a, "eps"_a, "axis"_a = 1,
          "out"_a.none() = nb::none(), "relu"_a = false,
          nb::sig("def forward_train(input: object, weight: object | None, bias: object | None, "
                  "running_mean: object | None, running_var: object | None, momentum: float, eps: float, "
                  "axis: int = 1, out: object | None = None, relu: bool = False) "
                  "-> tuple[typing.Any, numpy.typing.NDArray[numpy.floating[typing.Any]], "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]]]"),
          "Training forward, y = act(bn(x)); returns (y, save_mean, save_invstd).");
    m.def("forward_eval", &py::forward_eval, "input"_a.none(), "running_mean"_a.none(), "running_var"_a.none(),
          "weight"_a.none(), "bias"_a.none(), "eps"_a, "axis"_a = 1, "out"_a.none() = nb::none(),
          "residual"_a.none() = nb::none(), "relu"_a = false, "saved"_a.none() = nb::none(),
          nb::sig("def forward_eval(input: object, running_mean: object | None, running_var: object | None, "
                  "weight: object | None, bias: object | None, eps: float, axis: int = 1, "
                  "out: object | None = None, residual: object | None = None, relu: bool = False, "
                  "saved: object | None = None) -> typing.Any"),
          "Eval forward: act(bn(x) + residual); saved (2, C) receives the mean and invstd used.");
    m.def("module_eval", &py::module_eval, "module"_a, "x"_a.none(), "out"_a.none(),
          nb::sig("def module_eval(module: object, x: object, out: object | None) -> typing.Any"),
          "BatchNorm*d.__call__ in eval mode on a NumPy input, or None where the Python method must run.");
    m.def("backward", &py::backward, "grad_y"_a.none(), "x"_a.none(), "mean"_a.none(), "invstd"_a.none(),
          "weight"_a.none(), "axis"_a = 1, "training"_a = true, "out"_a.none() = nb::none(), "parameters"_a = true,
          nb::sig("def backward(grad_y: object, x: object, mean: object, invstd: object, weight: object | None, "
                  "axis: int = 1, training: bool = True, out: object | None = None, parameters: bool = True) "
                  "-> tuple[typing.Any, numpy.typing.NDArray[numpy.floating[typing.Any]] | None, "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]] | None]"),
          "Backward; returns (grad_x, grad_weight, grad_bias), the last two None without parameters.");

    m.def("layer_norm", &py::layer_norm, "input"_a.none(), "normalized_ndim"_a, "weight"_a.none(), "bias"_a.none(),
          "eps"_a, "rms"_a = false, "out"_a.none() = nb::none(), "residual"_a.none() = nb::none(),
          "sum_out"_a.none() = nb::none(),
          nb::sig("def layer_norm(input: object, normalized_ndim: int, weight: object | None, bias: object | None, "
                  "eps: float, rms: bool = False, out: object | None = None, residual: object | None = None, "
                  "sum_out: object | None = None) -> tuple[typing.Any, typing.Any, typing.Any]"),
          "Layer norm (or RMS norm) over the last normalized_ndim dims; returns (y, mean, invstd).");
    m.def("layer_norm_backward", &py::layer_norm_backward, "grad_y"_a.none(), "x"_a.none(), "mean"_a.none(),
          "invstd"_a.none(), "weight"_a.none(), "normalized_ndim"_a, "rms"_a = false, "out"_a.none() = nb::none(),
          nb::sig("def layer_norm_backward(grad_y: object, x: object, mean: object | None, invstd: object, "
                  "weight: object | None, normalized_ndim: int, rms: bool = False, out: object | None = None) "
                  "-> tuple[typing.Any, typing.Any, typing.Any]"),
          "Layer norm backward; returns (grad_x, grad_weight, grad_bias).");
    m.def("group_norm", &py::group_norm, "input"_a.none(), "num_groups"_a, "weight"_a.none(), "bias"_a.none(),
          "eps"_a, "axis"_a = 1, "out"_a.none() = nb::none(), "relu"_a = false,
          nb::sig("def group_norm(input: object, num_groups: int, weight: object | None, bias: object | None, "
                  "eps: float, axis: int = 1, out: object | None = None, relu: bool = False) "
                  "-> tuple[typing.Any, typing.Any, typing.Any]"),
          "Group norm; returns (y, mean, invstd), statistics of shape (N, num_groups).");
    m.def("group_norm_backward", &py::group_norm_backward, "grad_y"_a.none(), "x"_a.none(), "mean"_a.none(),
          "invstd"_a.none(), "weight"_a.none(), "num_groups"_a, "axis"_a = 1, "out"_a.none() = nb::none(),
          nb::sig("def group_norm_backward(grad_y: object, x: object, mean: object, invstd: object, "
                  "weight: object | None, num_groups: int, axis: int = 1, out: object | None = None) "
                  "-> tuple[typing.Any, typing.Any, typing.Any]"),
          "Group norm backward; returns (grad_x, grad_weight, grad_bias).");
    m.def("instance_norm", &py::instance_norm, "input"_a.none(), "weight"_a.none(), "bias"_a.none(),
          "running_mean"_a.none(), "running_var"_a.none(), "momentum"_a, "eps"_a, "axis"_a = 1,
          "out"_a.none() = nb::none(), "relu"_a = false,
          nb::sig("def instance_norm(input: object, weight: object | None, bias: object | None, "
                  "running_mean: object | None, running_var: object | None, momentum: float, eps: float, "
                  "axis: int = 1, out: object | None = None, relu: bool = False) "
                  "-> tuple[typing.Any, typing.Any, typing.Any]"),
          "Instance norm with instance statistics; returns (y, mean, invstd) of shape (N, C).");
    m.def("batch_moments", &py::batch_moments, "input"_a.none(), "axis"_a = 1,
          nb::sig("def batch_moments(input: object, axis: int = 1) -> tuple[float, "
                  "numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]"),
          "Per-channel (count, mean, m2) in float64, for merging across processes.");
    m.def("batch_norm_apply", &py::batch_norm_apply, "input"_a.none(), "mean"_a.none(), "invstd"_a.none(),
          "weight"_a.none(), "bias"_a.none(), "axis"_a = 1, "out"_a.none() = nb::none(),
          nb::sig("def batch_norm_apply(input: object, mean: object, invstd: object, weight: object | None, "
                  "bias: object | None, axis: int = 1, out: object | None = None) -> typing.Any"),
          "y = (x - mean)*invstd*weight + bias from given statistics.");
    m.def("batch_norm_backward_reduce", &py::batch_norm_backward_reduce, "grad_y"_a.none(), "input"_a.none(),
          "mean"_a.none(), "axis"_a = 1,
          nb::sig("def batch_norm_backward_reduce(grad_y: object, input: object, mean: object, axis: int = 1) "
                  "-> tuple[numpy.typing.NDArray[numpy.float64], numpy.typing.NDArray[numpy.float64]]"),
          "Per-channel (sum_dy, sum_dy_xmu) in float64.");
    m.def("batch_norm_backward_apply", &py::batch_norm_backward_apply, "grad_y"_a.none(), "input"_a.none(),
          "mean"_a.none(), "invstd"_a.none(), "weight"_a.none(), "sum_dy"_a.none(), "sum_dy_xmu"_a.none(),
          "count"_a, "axis"_a = 1, "out"_a.none() = nb::none(),
          nb::sig("def batch_norm_backward_apply(grad_y: object, input: object, mean: object, invstd: object, "
                  "weight: object | None, sum_dy: object, sum_dy_xmu: object, count: float, axis: int = 1, "
                  "out: object | None = None) -> typing.Any"),
          "grad_x from sums gathered over every participant.");
}
