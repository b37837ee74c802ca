// batchnorm._core: the nanobind module. It checks every argument (types, dtypes, shapes,
// writability, overlaps) before anything is written, resolves layouts, releases the GIL and
// calls the C++ entry points. The contract is docs/core-module.md.
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "arrays.hpp"
#include "instantiations.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace batchnorm::python {
namespace {

struct Input {
    InArray array;
    std::size_t axis;
    Layout layout;
};

// The main input: a float32/float64 array of rank >= 2, with its channel axis and layout.
Input take_main_input(nb::handle h, const char* name, int axis) {
    InArray x = take_input(h, name);
    if (x.dtype() != nb::dtype<float>() && x.dtype() != nb::dtype<double>())
        type_error(std::string(name) + " must have dtype float32 or float64, got " + dtype_name(x.dtype()));
    const int rank = int(x.ndim());
    if (rank < 2)
        value_error(std::string(name) + " must have at least 2 dimensions (N, C, ...), got shape " +
                    shape_string(shape_of(x)));
    if (axis < -rank || axis >= rank)
        value_error("axis " + std::to_string(axis) + " is out of range for " + name + " of rank " +
                    std::to_string(rank));
    const std::size_t channel_axis = std::size_t(axis < 0 ? axis + rank : axis);
    Layout layout = layout_of(x, channel_axis);
    return {std::move(x), channel_axis, std::move(layout)};
}

template <class F>
nb::object with_element_type(const Input& in, F&& f) {
    if (in.array.dtype() == nb::dtype<float>()) return f(float{});
    return f(double{});
}

template <class Array>
void check_no_overlap(const OutArray* out, const Array* other, const char* out_name, const char* other_name) {
    if (out && other && overlaps(*out, *other))
        value_error(std::string(out_name) + " overlaps " + other_name + "; pass a separate array");
}

// `out` must not share memory with a per-channel array that the call reads or writes.
template <class T>
void check_out_apart(nb::handle out, const char* out_name,
                     const std::vector<std::pair<const InArray*, const char*>>& per_channel) {
    if (out.is_none()) return;
    OutArray o;
    if (!nb::try_cast(out, o, false)) return;  // WriteAs reports what is wrong with it
    for (const auto& [array, name] : per_channel) check_no_overlap(&o, array, out_name, name);
}

nb::object stats(nb::handle x_obj, int axis) {
    const Input in = take_main_input(x_obj, "input", axis);
    return with_element_type(in, [&](auto tag) -> nb::object {
        using T = decltype(tag);
        const ReadAs<T> x(in.array, in.layout);
        const std::int64_t C = in.layout.view.channels;
        NumpyArray<T> mean = new_vector<T>(std::size_t(C)), var = new_vector<T>(std::size_t(C));
        {
            nb::gil_scoped_release unlocked;
            batchnorm::batch_stats<T>(x.data(), in.layout.view, mean.data(), var.data());
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
        const ChannelValues<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        const ChannelUpdate<T> running_mean(rmean_obj, "running_mean", view.channels);
        const ChannelUpdate<T> running_var(rvar_obj, "running_var", view.channels);
        if ((running_mean.data() == nullptr) != (running_var.data() == nullptr))
            value_error("running_mean and running_var must both be arrays or both be None");
        check_no_overlap(running_mean.array(), running_var.array(), "running_mean", "running_var");
        if (view.per_channel() == 1)
            value_error("Expected more than 1 value per channel when training, got input size " +
                        shape_string(in.layout.shape));
        check_out_apart<T>(out, "out", {{weight.array(), "weight"}, {bias.array(), "bias"}});
        if (!out.is_none()) {
            OutArray o;
            if (nb::try_cast(out, o, false)) {
                check_no_overlap(&o, running_mean.array(), "out", "running_mean");
                check_no_overlap(&o, running_var.array(), "out", "running_var");
            }
        }
        const ReadAs<T> x(in.array, in.layout);
        WriteAs<T> y(out, in.layout, "out", {&in.array});
        NumpyArray<T> save_mean = new_vector<T>(std::size_t(view.channels));
        NumpyArray<T> save_invstd = new_vector<T>(std::size_t(view.channels));
        {
            nb::gil_scoped_release unlocked;
            batchnorm::forward_train<T>(x.data(), y.data(), view, weight.data(), bias.data(), running_mean.data(),
                                        running_var.data(), momentum, eps, save_mean.data(), save_invstd.data());
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
        const ChannelValues<T> mean(mean_obj, "running_mean", view.channels, false);
        const ChannelValues<T> var(var_obj, "running_var", view.channels, false);
        const ChannelValues<T> weight(weight_obj, "weight", view.channels), bias(bias_obj, "bias", view.channels);
        std::optional<InArray> residual_array;
        if (!residual_obj.is_none()) {
            residual_array = take_input(residual_obj, "residual");
            check_dtype<T>(*residual_array, "residual");
            if (shape_of(*residual_array) != in.layout.shape)
                value_error("residual must have the input's shape " + shape_string(in.layout.shape) + ", got " +
                            shape_string(shape_of(*residual_array)));
        }
        check_out_apart<T>(out, "out", {{mean.array(), "running_mean"}, {var.array(), "running_var"},
                                        {weight.array(), "weight"}, {bias.array(), "bias"}});
        const ReadAs<T> x(in.array, in.layout);
        std::optional<ReadAs<T>> residual;
        if (residual_array) residual.emplace(*residual_array, in.layout);
        WriteAs<T> y(out, in.layout, "out", {&in.array, residual_array ? &*residual_array : nullptr});
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
        const InArray grad_array = take_input(grad_obj, "grad_y");
        check_dtype<T>(grad_array, "grad_y");
        if (shape_of(grad_array) != in.layout.shape)
            value_error("grad_y must have the shape of x " + shape_string(in.layout.shape) + ", got " +
                        shape_string(shape_of(grad_array)));
        const ChannelValues<T> mean(mean_obj, "mean", view.channels, false);
        const ChannelValues<T> invstd(invstd_obj, "invstd", view.channels, false);
        const ChannelValues<T> weight(weight_obj, "weight", view.channels);
        check_out_apart<T>(out, "out", {{mean.array(), "mean"}, {invstd.array(), "invstd"}, {weight.array(), "weight"}});
        const ReadAs<T> x(in.array, in.layout), grad_y(grad_array, in.layout);
        WriteAs<T> grad_x(out, in.layout, "out", {&in.array, &grad_array});
        NumpyArray<T> grad_weight = new_vector<T>(std::size_t(view.channels));
        NumpyArray<T> grad_bias = new_vector<T>(std::size_t(view.channels));
        {
            nb::gil_scoped_release unlocked;
            batchnorm::backward<T>(grad_y.data(), x.data(), grad_x.data(), view, mean.data(), invstd.data(),
                                   weight.data(), grad_weight.data(), grad_bias.data(), training);
        }
        return nb::make_tuple(grad_x.finish(), grad_weight, grad_bias);
    });
}

std::vector<std::string> available_isas() {
    std::vector<std::string> names;
    for (Isa isa : batchnorm::supported_isas()) names.emplace_back(isa_name(isa));
    return names;
}

}  // namespace
}  // namespace batchnorm::python

NB_MODULE(_core, m) {
    namespace py = batchnorm::python;
    m.doc() = "batchnorm's C++ kernels. Internal: use the batchnorm package.";
    // Resolve BATCHNORM_ISA now, so a backend this machine cannot run fails the import.
    batchnorm::active_isa();

    m.def("isa", [] { return std::string(batchnorm::isa_name(batchnorm::active_isa())); },
          "The SIMD backend in use: 'avx512', 'avx2', 'neon' or 'scalar'.");
    m.def("available_isas", &py::available_isas,
          "Every backend this CPU and build can run, best first (values for BATCHNORM_ISA).");
    m.def("get_num_threads", &batchnorm::get_num_threads, "Threads a large call may use.");
    m.def("set_num_threads", &batchnorm::set_num_threads, "n"_a, "Sets the threads for later calls (n >= 1).");
    m.def("stats", &py::stats, "input"_a, nb::kw_only(), "axis"_a = 1,
          "Per-channel mean and biased variance.");
    m.def("forward_train", &py::forward_train, "input"_a, "weight"_a.none(), "bias"_a.none(),
          "running_mean"_a.none(), "running_var"_a.none(), "momentum"_a, "eps"_a, nb::kw_only(), "axis"_a = 1,
          "out"_a.none() = nb::none(), "Training forward; returns (y, save_mean, save_invstd).");
    m.def("forward_eval", &py::forward_eval, "input"_a, "running_mean"_a.none(), "running_var"_a.none(),
          "weight"_a.none(), "bias"_a.none(), "eps"_a, nb::kw_only(), "axis"_a = 1, "out"_a.none() = nb::none(),
          "residual"_a.none() = nb::none(), "relu"_a = false, "Eval forward: act(bn(x) + residual).");
    m.def("backward", &py::backward, "grad_y"_a, "x"_a, "mean"_a.none(), "invstd"_a.none(), "weight"_a.none(),
          nb::kw_only(), "axis"_a = 1, "training"_a = true, "out"_a.none() = nb::none(),
          "Backward; returns (grad_x, grad_weight, grad_bias).");
}
