// Number arguments of batchnorm._core that refuse bool. nanobind converts True to 1 (or 1.0);
// torch and the package's Python layer refuse a flag passed in a number's place, so the core
// does too, at no cost to the calls that pass numbers. The refused call raises nanobind's
// TypeError, which the Python layer turns into one that names the argument.
#pragma once

#include <cstdint>

#include <nanobind/nanobind.h>

namespace batchnorm::python {

template <class T>
struct NotBool {
    T value;
    operator T() const { return value; }
};

using Int = NotBool<int>;
using Int64 = NotBool<std::int64_t>;
using Real = NotBool<double>;

}  // namespace batchnorm::python

namespace nanobind::detail {

template <class T>
struct type_caster<batchnorm::python::NotBool<T>> {
    NB_TYPE_CASTER(batchnorm::python::NotBool<T>, make_caster<T>::Name)

    bool from_python(handle src, uint8_t flags, cleanup_list* cleanup) noexcept {
        if (PyBool_Check(src.ptr())) return false;
        make_caster<T> number;
        if (!number.from_python(src, flags, cleanup)) return false;
        value.value = number.value;
        return true;
    }

    static handle from_cpp(const batchnorm::python::NotBool<T>& v, rv_policy policy, cleanup_list* cleanup) noexcept {
        return make_caster<T>::from_cpp(v.value, policy, cleanup);
    }
};

}  // namespace nanobind::detail
