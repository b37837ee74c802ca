// Number arguments of batchnorm._core that refuse bool and NumPy's bool. nanobind converts
// True to 1 (or 1.0); the package's Python layer refuses a flag passed in a number's place,
// so the core does too, at no cost to the calls that pass numbers. The refused call raises
// nanobind's TypeError, which the Python layer turns into one that names the argument.
#pragma once

#include <cstdint>
#include <cstring>

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

    // numpy.bool (NumPy 2) or numpy.bool_ (NumPy 1), by name: the core imports no NumPy here
    static bool is_numpy_bool(PyObject* o) noexcept {
        const char* name = Py_TYPE(o)->tp_name;
        return std::strcmp(name, "numpy.bool") == 0 || std::strcmp(name, "numpy.bool_") == 0;
    }

    bool from_python(handle src, uint8_t flags, cleanup_list* cleanup) noexcept {
        PyObject* o = src.ptr();
        if (!PyFloat_CheckExact(o) && !PyLong_CheckExact(o) && (PyBool_Check(o) || is_numpy_bool(o))) return false;
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
