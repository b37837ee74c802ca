// batchnorm._core: the nanobind module. It checks every argument (types, dtypes, shapes,
// writability, overlaps) before anything is written, resolves layouts, releases the GIL and
// calls the C++ entry points. The contract is docs/core-module.md.
#include "arrays.hpp"
#include "instantiations.hpp"

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

// f(S{}) with S the input's storage type.
template <class F>
nb::object with_element_type(const Input& in, F&& f) {
    switch (in.array.type) {
        case NPY_FLOAT32: return f(float{});
        case NPY_HALF: return f(float16{});
        case kNpyBfloat16: return f(bfloat16{});
        default: return f(double{});
    }
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

// `out` must not share memory with a per-channel array (of compute_t<T>) the call reads or writes.
template <class T>
void check_apart(const WriteAs<T>& out, std::initializer_list<std::pair<const ArrayRef*, const char*>> arrays) {
    if (!out.out()) return;
    for (const auto& [array, name] : arrays)
        if (array && overlaps(*out.out(), sizeof(T), *array, sizeof(compute_t<T>)))
            value_error(std::string("out overlaps ") + name + "; pass a separate array");
}

nb::object stats(nb::handle x_obj, int axis) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        using P = compute_t<T>;
        const ReadAs<T> x(in.array, in.layout);
        const std::int64_t channels = in.layout.view.channels;
        nb::object mean = new_vector<P>(channels), var = new_vector<P>(channels);
        {
            nb::gil_scoped_release unlocked;
            batchnorm::batch_stats<T>(x.data(), in.layout.view, data_of<P>(mean), data_of<P>(var));
        }
        return nb::make_tuple(mean, var);
    });
}

nb::object forward_train(nb::handle x_obj, nb::handle weight_obj, nb::handle bias_obj, nb::handle rmean_obj,
                         nb::handle rvar_obj, double momentum, double eps, int axis, nb::handle out) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        const ChannelArray<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        const ChannelArray<T> running_mean(rmean_obj, "running_mean", view.channels, true);
        const ChannelArray<T> running_var(rvar_obj, "running_var", view.channels, true);
        if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
            value_error("running_mean and running_var must both be arrays or both be None");
        if (running_mean.data() && overlaps(*running_mean.array(), *running_var.array(), sizeof(compute_t<T>)))
            value_error("running_mean overlaps running_var; pass separate arrays");
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
            nb::gil_scoped_release unlocked;
            batchnorm::forward_train<T>(x.data(), y.data(), view, weight.data(), bias.data(), running_mean.data(),
                                        running_var.data(), momentum, eps, data_of<P>(save_mean),
                                        data_of<P>(save_invstd));
        }
        running_mean.commit();
        running_var.commit();
        return nb::make_tuple(y.finish(), save_mean, save_invstd);
    });
}

nb::object forward_eval(nb::handle x_obj, nb::handle mean_obj, nb::handle var_obj, nb::handle weight_obj,
                        nb::handle bias_obj, double eps, int axis, nb::handle out, nb::handle residual_obj,
                        bool relu) {
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
        const ReadAs<T> x(in.array, in.layout);
        std::optional<ReadAs<T>> residual;
        if (residual_array) residual.emplace(*residual_array, in.layout);
        {
            nb::gil_scoped_release unlocked;
            batchnorm::forward_eval<T>(x.data(), y.data(), view, mean.data(), var.data(), weight.data(), bias.data(),
                                       eps, residual ? residual->data() : nullptr,
                                       relu ? Activation::relu : Activation::none);
        }
        return y.finish();
    });
}

nb::object backward(nb::handle grad_obj, nb::handle x_obj, nb::handle mean_obj, nb::handle invstd_obj,
                    nb::handle weight_obj, int axis, bool training, nb::handle out) {
    const Input in = take_main_input(x_obj, "x", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const Shape& view = in.layout.view;
        if (grad_obj.is_none()) type_error("grad_y must be an array, got None");
        const ArrayRef grad_array = *take_like_input<T>(grad_obj, "grad_y", in.layout);
        if (mean_obj.is_none() || invstd_obj.is_none()) type_error("mean and invstd must be arrays, got None");
        const ChannelArray<T> mean(mean_obj, "mean", view.channels), invstd(invstd_obj, "invstd", view.channels);
        const ChannelArray<T> weight(weight_obj, "weight", view.channels);
        WriteAs<T> grad_x(out, in.layout, "out", {&in.array, &grad_array});
        check_apart(grad_x, {{mean.array(), "mean"}, {invstd.array(), "invstd"}, {weight.array(), "weight"}});
        const ReadAs<T> x(in.array, in.layout), grad_y(grad_array, in.layout);
        using P = compute_t<T>;
        nb::object grad_weight = new_vector<P>(view.channels), grad_bias = new_vector<P>(view.channels);
        {
            nb::gil_scoped_release unlocked;
            batchnorm::backward<T>(grad_y.data(), x.data(), grad_x.data(), view, mean.data(), invstd.data(),
                                   weight.data(), data_of<P>(grad_weight), data_of<P>(grad_bias), training);
        }
        return nb::make_tuple(grad_x.finish(), grad_weight, grad_bias);
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

NB_MODULE(_core, m) {
    namespace py = batchnorm::python;
    if (!py::import_numpy()) throw nb::python_error();
    m.doc() = "batchnorm's C++ kernels. Internal: use the batchnorm package.";
    // Resolve BATCHNORM_ISA now, so a backend this machine cannot run fails the import.
    batchnorm::active_isa();

    m.def("isa", [] { return std::string(batchnorm::isa_name(batchnorm::active_isa())); },
          "The SIMD backend in use: 'avx512', 'avx2', 'neon' or 'scalar'.");
    m.def("available_isas", &py::available_isas,
          "Every backend this CPU and build can run, best first (values for BATCHNORM_ISA).");
    m.def("get_num_threads", &batchnorm::get_num_threads, "Threads a large call may use.");
    m.def("openmp_enabled", &batchnorm::openmp_enabled,
          "Whether this build runs in parallel (OpenMP); without it get_num_threads() is always 1.");
    m.def("set_num_threads", &batchnorm::set_num_threads, "n"_a, "Sets the threads for later calls (n >= 1).");
    m.def("stats", &py::stats, "input"_a.none(), "axis"_a = 1,
          nb::sig("def stats(input: object, axis: int = 1) "
                  "-> tuple[numpy.typing.NDArray[numpy.floating[typing.Any]], "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]]]"),
          "Per-channel mean and biased variance.");
    m.def("forward_train", &py::forward_train, "input"_a.none(), "weight"_a.none(), "bias"_a.none(),
          "running_mean"_a.none(), "running_var"_a.none(), "momentum"_a, "eps"_a, "axis"_a = 1,
          "out"_a.none() = nb::none(),
          nb::sig("def forward_train(input: object, weight: object | None, bias: object | None, "
                  "running_mean: object | None, running_var: object | None, momentum: float, eps: float, "
                  "axis: int = 1, out: object | None = None) "
                  "-> tuple[typing.Any, numpy.typing.NDArray[numpy.floating[typing.Any]], "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]]]"),
          "Training forward; returns (y, save_mean, save_invstd).");
    m.def("forward_eval", &py::forward_eval, "input"_a.none(), "running_mean"_a.none(), "running_var"_a.none(),
          "weight"_a.none(), "bias"_a.none(), "eps"_a, "axis"_a = 1, "out"_a.none() = nb::none(),
          "residual"_a.none() = nb::none(), "relu"_a = false,
          nb::sig("def forward_eval(input: object, running_mean: object | None, running_var: object | None, "
                  "weight: object | None, bias: object | None, eps: float, axis: int = 1, "
                  "out: object | None = None, residual: object | None = None, relu: bool = False) -> typing.Any"),
          "Eval forward: act(bn(x) + residual).");
    m.def("backward", &py::backward, "grad_y"_a.none(), "x"_a.none(), "mean"_a.none(), "invstd"_a.none(),
          "weight"_a.none(), "axis"_a = 1, "training"_a = true, "out"_a.none() = nb::none(),
          nb::sig("def backward(grad_y: object, x: object, mean: object, invstd: object, weight: object | None, "
                  "axis: int = 1, training: bool = True, out: object | None = None) "
                  "-> tuple[typing.Any, numpy.typing.NDArray[numpy.floating[typing.Any]], "
                  "numpy.typing.NDArray[numpy.floating[typing.Any]]]"),
          "Backward; returns (grad_x, grad_weight, grad_bias).");
}
