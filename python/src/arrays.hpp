// Array plumbing for the bindings: taking NumPy / DLPack arguments with clear errors, reading
// any layout as the kernels' (outer, C, inner) view (zero-copy whenever the memory is dense in
// some axis order, else one copy), and making outputs in the input's memory layout.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#include <batchnorm/shape.hpp>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <vector>

namespace batchnorm::python {

namespace nb = nanobind;

using InArray = nb::ndarray<nb::ro, nb::device::cpu>;
using OutArray = nb::ndarray<nb::device::cpu>;

inline std::string dtype_name(nb::dlpack::dtype dt) {
    const char* kind = "unknown";
    switch (nb::dlpack::dtype_code(dt.code)) {
        case nb::dlpack::dtype_code::Int: kind = "int"; break;
        case nb::dlpack::dtype_code::UInt: kind = "uint"; break;
        case nb::dlpack::dtype_code::Float: kind = "float"; break;
        case nb::dlpack::dtype_code::Bfloat: kind = "bfloat"; break;
        case nb::dlpack::dtype_code::Complex: kind = "complex"; break;
        case nb::dlpack::dtype_code::Bool: return "bool";
    }
    return kind + std::to_string(dt.bits);
}

template <class T>
const char* dtype_name() {
    return sizeof(T) == 4 ? "float32" : "float64";
}

inline std::string shape_string(const std::vector<std::size_t>& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

template <class Array>
std::vector<std::size_t> shape_of(const Array& a) {
    std::vector<std::size_t> shape(a.ndim());
    for (std::size_t d = 0; d < a.ndim(); ++d) shape[d] = a.shape(d);
    return shape;
}

[[noreturn]] inline void type_error(const std::string& message) { throw nb::type_error(message.c_str()); }
[[noreturn]] inline void value_error(const std::string& message) { throw nb::value_error(message.c_str()); }

inline std::string kind_of(nb::handle h) { return nb::type_name(h.type()).c_str(); }

// Takes a read-only array argument; anything else is a TypeError naming the argument.
inline InArray take_input(nb::handle h, const char* name) {
    InArray a;
    if (h.is_none() || !nb::try_cast(h, a, false))
        type_error(std::string(name) + " must be a NumPy array or a CPU tensor supporting DLPack, got " +
                   kind_of(h));
    return a;
}

// Takes an array that will be written; a read-only one is a ValueError naming the argument.
inline OutArray take_output(nb::handle h, const char* name) {
    OutArray a;
    if (nb::try_cast(h, a, false)) return a;
    take_input(h, name);  // raises TypeError if it is not an array at all
    value_error(std::string(name) + " is read-only; pass a writable array");
}

template <class T, class Array>
void check_dtype(const Array& a, const char* name) {
    if (a.dtype() != nb::dtype<T>())
        type_error(std::string(name) + " must have dtype " + dtype_name<T>() + " like the input, got " +
                   dtype_name(a.dtype()) + " (batchnorm never casts silently)");
}

// Memory extent [first, last) in bytes of an array, for overlap checks.
template <class Array>
std::pair<const char*, const char*> extent(const Array& a) {
    const char* base = static_cast<const char*>(a.data_handle()) + a.byte_offset();
    std::int64_t lo = 0, hi = 0;
    for (std::size_t d = 0; d < a.ndim(); ++d) {
        if (a.shape(d) == 0) return {base, base};
        const std::int64_t span = (std::int64_t(a.shape(d)) - 1) * a.stride(d);
        (span < 0 ? lo : hi) += span;
    }
    const std::int64_t item = std::int64_t(a.itemsize());
    return {base + lo * item, base + (hi + 1) * item};
}

template <class A, class B>
bool overlaps(const A& a, const B& b) {
    const auto [a0, a1] = extent(a);
    const auto [b0, b1] = extent(b);
    return a0 < b1 && b0 < a1;
}

// 64-byte aligned storage, released by a capsule when the NumPy array that owns it dies.
template <class T>
T* allocate(std::size_t count) {
    return static_cast<T*>(::operator new(std::max<std::size_t>(count, 1) * sizeof(T), std::align_val_t(64)));
}

template <class T>
nb::capsule owner_of(T* data) {
    return nb::capsule(data, [](void* p) noexcept { ::operator delete(p, std::align_val_t(64)); });
}

template <class T>
using NumpyArray = nb::ndarray<nb::numpy, T>;

template <class T>
NumpyArray<T> new_array(const std::vector<std::size_t>& shape, const std::vector<std::int64_t>& strides) {
    const std::size_t count = std::accumulate(shape.begin(), shape.end(), std::size_t(1), std::multiplies<>());
    T* data = allocate<T>(count);
    return NumpyArray<T>(data, shape.size(), shape.data(), owner_of(data), strides.data());
}

template <class T>
NumpyArray<T> new_vector(std::size_t n) {
    return new_array<T>({n}, {1});
}

// Element-wise copy between two strided views of the same shape (strides in elements).
template <class T>
void copy_strided(const T* src, const std::int64_t* src_strides, T* dst, const std::int64_t* dst_strides,
                  const std::size_t* shape, std::size_t ndim) {
    if (ndim == 0) {
        *dst = *src;
        return;
    }
    for (std::size_t i = 0; i < shape[0]; ++i)
        copy_strided(src + std::int64_t(i) * src_strides[0], src_strides + 1, dst + std::int64_t(i) * dst_strides[0],
                     dst_strides + 1, shape + 1, ndim - 1);
}

template <class Array>
std::vector<std::int64_t> strides_of(const Array& a) {
    std::vector<std::int64_t> strides(a.ndim());
    for (std::size_t d = 0; d < a.ndim(); ++d) strides[d] = a.stride(d);
    return strides;
}

inline std::vector<std::int64_t> c_order_strides(const std::vector<std::size_t>& shape) {
    std::vector<std::int64_t> strides(shape.size());
    std::int64_t step = 1;
    for (std::size_t d = shape.size(); d-- > 0;) {
        strides[d] = step;
        step *= std::int64_t(shape[d]);
    }
    return strides;
}

// The memory the kernels see for one call: the shape and element strides of the input's
// buffer (its own memory when dense, else a C-ordered copy) and the (outer, C, inner) view.
struct Layout {
    std::vector<std::size_t> shape;
    std::vector<std::int64_t> strides;
    Shape view;

    // Same element positions, ignoring axes of length 1 (their stride is arbitrary).
    bool matches(const std::vector<std::int64_t>& other) const {
        for (std::size_t d = 0; d < shape.size(); ++d)
            if (shape[d] > 1 && strides[d] != other[d]) return false;
        return true;
    }
    std::size_t size() const { return std::size_t(view.size()); }
};

// If the elements are dense in some order of the axes (C order, channels-last, any
// permutation), the (outer, C, inner) view of that memory; else nothing.
inline std::optional<Shape> dense_view(const std::vector<std::size_t>& shape,
                                       const std::vector<std::int64_t>& strides, std::size_t axis) {
    std::vector<std::size_t> axes;
    for (std::size_t d = 0; d < shape.size(); ++d)
        if (shape[d] != 1) axes.push_back(d);
    std::stable_sort(axes.begin(), axes.end(), [&](std::size_t a, std::size_t b) { return strides[a] > strides[b]; });
    std::int64_t expected = 1;
    for (std::size_t i = axes.size(); i-- > 0;) {
        if (strides[axes[i]] != expected) return std::nullopt;
        expected *= std::int64_t(shape[axes[i]]);
    }
    const std::int64_t total = expected, channels = std::int64_t(shape[axis]);
    if (channels == 1) return Shape{1, 1, total};
    std::int64_t inner = 1;
    for (std::size_t d : axes)
        if (strides[d] < strides[axis]) inner *= std::int64_t(shape[d]);
    return Shape{total / (channels * inner), channels, inner};
}

inline Layout layout_of(const InArray& x, std::size_t axis) {
    Layout L{shape_of(x), strides_of(x), {}};
    const std::size_t count = x.size();
    if (count != 0) {
        if (const auto view = dense_view(L.shape, L.strides, axis)) {
            L.view = *view;
            return L;
        }
    }
    L.strides = c_order_strides(L.shape);
    std::int64_t outer = 1, inner = 1;
    for (std::size_t d = 0; d < axis; ++d) outer *= std::int64_t(L.shape[d]);
    for (std::size_t d = axis + 1; d < L.shape.size(); ++d) inner *= std::int64_t(L.shape[d]);
    L.view = Shape{outer, std::int64_t(L.shape[axis]), inner};
    return L;
}

// An array argument read in the layout L: its own memory when it already has that layout,
// else a copy arranged like L.
template <class T>
class ReadAs {
public:
    ReadAs(const InArray& a, const Layout& L) {
        const T* src = static_cast<const T*>(a.data());
        const std::vector<std::int64_t> strides = strides_of(a);
        if (L.size() == 0 || L.matches(strides)) {
            data_ = src;
            return;
        }
        // The buffer spans exactly L.size() elements: L's strides are dense.
        copy_.reset(allocate<T>(L.size()));
        copy_strided(src, strides.data(), copy_.get(), L.strides.data(), L.shape.data(), L.shape.size());
        data_ = copy_.get();
    }
    const T* data() const { return data_; }

private:
    struct Release {
        void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
    };
    std::unique_ptr<T, Release> copy_;
    const T* data_ = nullptr;
};

}  // namespace batchnorm::python

namespace batchnorm::python {

// Where a same-shaped result goes: a new array in layout L, or the caller's `out`. `out` is
// written directly when it has layout L and does not partly overlap an input; otherwise
// through a buffer in layout L that finish() copies into it.
template <class T>
class WriteAs {
public:
    WriteAs(nb::handle out, const Layout& L, const char* name, const std::vector<const InArray*>& inputs)
        : layout_(L) {
        if (out.is_none()) {
            fresh_ = new_array<T>(L.shape, L.strides);
            data_ = fresh_.data();
            return;
        }
        out_ = take_output(out, name);
        check_dtype<T>(out_, name);
        if (shape_of(out_) != L.shape)
            value_error(std::string(name) + " must have the input's shape " + shape_string(L.shape) + ", got " +
                        shape_string(shape_of(out_)));
        out_object_ = nb::borrow(out);
        bool direct = layout_.matches(strides_of(out_));
        for (const InArray* input : inputs)
            if (input && overlaps(*input, out_) && input->data() != out_.data()) direct = false;
        if (direct) {
            data_ = out_.data() ? static_cast<T*>(out_.data()) : nullptr;
        } else {
            buffer_.reset(allocate<T>(L.size()));
            data_ = buffer_.get();
        }
    }

    T* data() const { return data_; }

    nb::object finish() {
        if (!out_object_.is_valid()) return nb::cast(fresh_);
        if (buffer_) {
            const std::vector<std::int64_t> strides = strides_of(out_);
            copy_strided<T>(buffer_.get(), layout_.strides.data(), static_cast<T*>(out_.data()), strides.data(),
                            layout_.shape.data(), layout_.shape.size());
        }
        return out_object_;
    }

private:
    struct Release {
        void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
    };
    Layout layout_;
    NumpyArray<T> fresh_;
    OutArray out_;
    nb::object out_object_;
    std::unique_ptr<T, Release> buffer_;
    T* data_ = nullptr;
};

// A per-channel argument (1-D, C values, dtype T), or null for None. Strided ones are copied.
template <class T>
class ChannelValues {
public:
    ChannelValues(nb::handle h, const char* name, std::int64_t channels, bool optional = true) {
        if (h.is_none()) {
            if (!optional) type_error(std::string(name) + " must be an array of " + std::to_string(channels) +
                                      " values, got None");
            return;
        }
        array_ = take_input(h, name);
        check_channels<T>(array_, name, channels);
        const T* src = static_cast<const T*>(array_.data());
        if (channels <= 1 || array_.stride(0) == 1) {
            data_ = src;
        } else {
            copy_.resize(std::size_t(channels));
            for (std::int64_t c = 0; c < channels; ++c) copy_[std::size_t(c)] = src[c * array_.stride(0)];
            data_ = copy_.data();
        }
    }
    const T* data() const { return data_; }
    const InArray* array() const { return data_ ? &array_ : nullptr; }

    template <class U, class Array>
    static void check_channels(const Array& a, const char* name, std::int64_t channels) {
        check_dtype<U>(a, name);
        if (a.ndim() != 1 || std::int64_t(a.shape(0)) != channels)
            value_error(std::string(name) + " must have shape (" + std::to_string(channels) +
                        ",), one value per channel of the input, got " + shape_string(shape_of(a)));
    }

private:
    InArray array_;
    std::vector<T> copy_;
    const T* data_ = nullptr;
};

// A per-channel array updated in place (running statistics). Strided ones go through a copy
// that commit() writes back.
template <class T>
class ChannelUpdate {
public:
    ChannelUpdate(nb::handle h, const char* name, std::int64_t channels) {
        if (h.is_none()) return;
        array_ = take_output(h, name);
        ChannelValues<T>::template check_channels<T>(array_, name, channels);
        target_ = static_cast<T*>(array_.data());
        stride_ = channels > 1 ? array_.stride(0) : 1;
        if (stride_ == 1) {
            data_ = target_;
        } else {
            copy_.resize(std::size_t(channels));
            for (std::int64_t c = 0; c < channels; ++c) copy_[std::size_t(c)] = target_[c * stride_];
            data_ = copy_.data();
        }
    }
    T* data() const { return data_; }
    const OutArray* array() const { return data_ ? &array_ : nullptr; }
    void commit() const {
        for (std::size_t c = 0; c < copy_.size(); ++c) target_[std::int64_t(c) * stride_] = copy_[c];
    }

private:
    OutArray array_;
    std::vector<T> copy_;
    T* target_ = nullptr;
    T* data_ = nullptr;
    std::int64_t stride_ = 1;
};

}  // namespace batchnorm::python
