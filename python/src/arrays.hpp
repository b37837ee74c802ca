// Array plumbing for the bindings: taking NumPy / DLPack arguments with clear errors, reading
// any layout as the kernels' (outer, C, inner) view (zero-copy whenever the memory is dense in
// some axis order, else one copy), and making outputs in the input's memory layout.
//
// NumPy arrays are read through the NumPy C API: a few field reads per array, which keeps a
// small call at about a microsecond. Other DLPack producers (torch tensors, JAX arrays) go
// through nanobind's ndarray import.
#pragma once

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>

#define NPY_NO_DEPRECATED_API NPY_2_0_API_VERSION
#include <numpy/arrayobject.h>

#include <batchnorm/dtype.hpp>
#include <batchnorm/shape.hpp>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace batchnorm::python {

namespace nb = nanobind;

[[noreturn]] inline void type_error(const std::string& message) { throw nb::type_error(message.c_str()); }
[[noreturn]] inline void value_error(const std::string& message) { throw nb::value_error(message.c_str()); }

// bfloat16 is no NumPy type: ml_dtypes registers it at run time, under a type number that
// varies. ArrayRef::type uses this code for it (NumPy's own numbers for builtin types stay
// below NPY_USERDEF, so it cannot collide).
constexpr int kNpyBfloat16 = NPY_USERDEF - 1;

// NumPy's type number for a storage type of the registry (batchnorm/dtype.hpp).
template <class T>
constexpr int numpy_type() {
    using S = StorageType<T>;
    static_assert(S::code == DLPackCode::float_ || S::code == DLPackCode::bfloat, "a float type");
    if (S::code == DLPackCode::bfloat) return kNpyBfloat16;
    return S::bits == 16 ? NPY_HALF : S::bits == 32 ? NPY_FLOAT32 : NPY_FLOAT64;
}

// Whether a NumPy dtype is ml_dtypes' bfloat16, known by what it is (a 2-byte user type
// named bfloat16), so that ml_dtypes need not be imported here.
inline bool is_bfloat16_descr(PyArray_Descr* d) {
    if (d->type_num < NPY_USERDEF || PyDataType_ELSIZE(d) != 2) return false;
    const char* name = d->typeobj->tp_name;
    if (const char* dot = std::strrchr(name, '.')) name = dot + 1;
    return std::strcmp(name, "bfloat16") == 0;
}

// The NumPy dtype of new arrays of T; `like` (the input) supplies bfloat16's, which exists only
// once ml_dtypes is loaded. New reference.
template <class T>
PyArray_Descr* new_descr(PyArray_Descr* like) {
    if constexpr (numpy_type<T>() != kNpyBfloat16) {
        return PyArray_DescrFromType(numpy_type<T>());
    } else {
        if (like && is_bfloat16_descr(like)) {
            Py_INCREF(like);
            return like;
        }
        // A DLPack bfloat16 input (a torch tensor): NumPy's bfloat16 is ml_dtypes', if loaded;
        // else the result holds the bits as uint16, which the Python layer hands back as a
        // bfloat16 tensor (functional._like).
        PyObject* ml_dtypes = PyDict_GetItemString(PyImport_GetModuleDict(), "ml_dtypes");
        PyObject* type = ml_dtypes ? PyObject_GetAttrString(ml_dtypes, "bfloat16") : nullptr;
        PyArray_Descr* d = nullptr;
        if (type) {
            PyArray_DescrConverter(type, &d);
            Py_DECREF(type);
        }
        if (!d) {
            PyErr_Clear();
            d = PyArray_DescrFromType(NPY_UINT16);
        }
        return d;
    }
}

template <class T>
const char* dtype_name() {
    return StorageType<T>::name;
}

constexpr int kMaxRank = 32;

// A borrowed view of an array argument: data pointer, shape, strides in elements.
struct ArrayRef {
    char* data = nullptr;
    int rank = 0;
    // Entries [0, rank) only; the rest are never read. Not zeroed: zeroing both arrays of every
    // argument (and of each Layout) took about 15 % of a small eval call (perf: rep stos).
    std::int64_t shape[kMaxRank];
    std::int64_t strides[kMaxRank];  // in elements
    int type = NPY_NOTYPE;                // NPY_FLOAT32/64, NPY_HALF, kNpyBfloat16; NPY_NOTYPE for any other
    bool writable = false;
    PyObject* descr = nullptr;            // NumPy dtype, named in messages (borrowed)
    nb::dlpack::dtype dl_dtype{};         // DLPack dtype, when not NumPy
    nb::object keep_alive;                // a DLPack import stays valid while this lives
    nb::object misaligned;                // the caller's array when `data` is an aligned copy of it
    // The caller's memory, for overlap checks: the bytes [begin, end) from the lowest element to
    // the end of the highest (begin == end when empty), the element size, and, for an aligned
    // copy, the gcd of the caller's strides in bytes (caller_step; -1 otherwise: see
    // byte_step). An aligned copy keeps its caller's: its outputs are copied back there. Found
    // once per array: a call checks one array against up to seven others, and recomputing both
    // extents per pair took 7 % of a small eval call.
    const char* begin = nullptr;
    const char* end = nullptr;
    std::int64_t itemsize = 0;
    std::int64_t caller_step = -1;

    std::string dtype_name() const;
    // begin and end from the strides in bytes (byte_strides[d]) and the element size
    template <class Stride>
    void find_extent(const Stride* byte_strides, std::int64_t item) {
        itemsize = item;
        std::int64_t lowest = 0, highest = 0;
        for (int d = 0; d < rank; ++d) {
            if (shape[d] == 0) {
                begin = end = data;
                return;
            }
            const std::int64_t span = (shape[d] - 1) * std::int64_t(byte_strides[d]);
            (span < 0 ? lowest : highest) += span;
        }
        begin = data + lowest;
        end = data + highest + item;
    }

    std::int64_t size() const {
        std::int64_t n = 1;
        for (int d = 0; d < rank; ++d) n *= shape[d];
        return n;
    }
    std::vector<std::int64_t> shape_vector() const { return {shape, shape + rank}; }
};

inline std::string shape_string(const std::vector<std::int64_t>& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + (shape.size() == 1 ? ",)" : ")");
}

inline std::string kind_of(nb::handle h) { return nb::type_name(h.type()).c_str(); }

inline std::string dlpack_dtype_name(nb::dlpack::dtype dt) {
    switch (nb::dlpack::dtype_code(dt.code)) {
        case nb::dlpack::dtype_code::Int: return "int" + std::to_string(dt.bits);
        case nb::dlpack::dtype_code::UInt: return "uint" + std::to_string(dt.bits);
        case nb::dlpack::dtype_code::Float: return "float" + std::to_string(dt.bits);
        case nb::dlpack::dtype_code::Bfloat: return "bfloat" + std::to_string(dt.bits);  // bfloat16
        case nb::dlpack::dtype_code::Complex: return "complex" + std::to_string(dt.bits);
        case nb::dlpack::dtype_code::Bool: return "bool";
    }
    return "unknown";
}

inline std::string ArrayRef::dtype_name() const {
    if (descr) return nb::str(nb::handle(descr)).c_str();
    return dlpack_dtype_name(dl_dtype);
}

inline void take_aligned_copy(nb::handle view, ArrayRef& a);

inline bool fill_from_numpy(nb::handle h, ArrayRef& a) {
    if (!PyArray_Check(h.ptr())) return false;
    auto* array = reinterpret_cast<PyArrayObject*>(h.ptr());
    a.rank = PyArray_NDIM(array);
    if (a.rank > kMaxRank) value_error("arrays of more than " + std::to_string(kMaxRank) + " dimensions are not supported");
    a.data = static_cast<char*>(PyArray_DATA(array));
    a.type = PyArray_TYPE(array);
    const bool native = PyArray_ISNOTSWAPPED(array);
    if (is_bfloat16_descr(PyArray_DESCR(array))) a.type = kNpyBfloat16;
    else if ((a.type != NPY_FLOAT32 && a.type != NPY_FLOAT64 && a.type != NPY_HALF) || !native) a.type = NPY_NOTYPE;
    a.descr = reinterpret_cast<PyObject*>(PyArray_DESCR(array));
    a.writable = PyArray_ISWRITEABLE(array);
    const npy_intp item = PyArray_ITEMSIZE(array);
    bool aligned = PyArray_ISALIGNED(array);
    for (int d = 0; d < a.rank; ++d) {
        a.shape[d] = PyArray_DIM(array, d);
        const npy_intp stride = PyArray_STRIDE(array, d);
        aligned = aligned && stride % item == 0;
        a.strides[d] = stride / item;
    }
    a.find_extent(PyArray_STRIDES(array), item);
    if (!aligned && a.type != NPY_NOTYPE) take_aligned_copy(h, a);
    return true;
}

// A float array at a misaligned address or stride (a slice of a byte buffer): the kernels'
// scalar code reads it through T*, which must be aligned, so `a` becomes one aligned copy of
// `view` in the same memory order, and outputs are copied back to the caller's memory
// (copy_back). `view`: a NumPy array of the caller's memory, of a's dtype or, for a DLPack
// bfloat16 without ml_dtypes, of its bits as uint16; a's dtype and writability stay.
inline void take_aligned_copy(nb::handle view, ArrayRef& a) {
    auto* caller = reinterpret_cast<PyArrayObject*>(view.ptr());
    nb::object copy = nb::steal(PyArray_NewCopy(caller, NPY_KEEPORDER));
    if (!copy.is_valid()) throw nb::python_error();
    // what the copy does not change: dtype, writability, the caller's memory
    const int type = a.type;
    const bool writable = a.writable;
    PyObject* const descr = a.descr;
    const nb::dlpack::dtype dl_dtype = a.dl_dtype;
    const char *const begin = a.begin, *const end = a.end;
    fill_from_numpy(copy, a);
    a.type = type;
    a.writable = writable;
    a.descr = descr;
    a.dl_dtype = dl_dtype;
    a.begin = begin;
    a.end = end;
    a.caller_step = 0;
    for (int d = 0; d < a.rank; ++d)
        if (a.shape[d] > 1) a.caller_step = std::gcd(a.caller_step, std::int64_t(std::abs(PyArray_STRIDE(caller, d))));
    a.keep_alive = copy;
    a.misaligned = nb::borrow(view);
}

// Writes an output that was computed in an aligned copy back to the caller's misaligned array.
inline void copy_back(const ArrayRef& a) {
    if (a.misaligned.is_valid() &&
        PyArray_CopyInto(reinterpret_cast<PyArrayObject*>(a.misaligned.ptr()),
                         reinterpret_cast<PyArrayObject*>(a.keep_alive.ptr())) < 0)
        throw nb::python_error();
}

inline bool fill_from_dlpack(nb::handle h, ArrayRef& a) {
    using ReadOnly = nb::ndarray<nb::ro, nb::device::cpu>;
    using Writable = nb::ndarray<nb::device::cpu>;
    ReadOnly ro;
    if (!nb::try_cast(h, ro, false)) return false;
    Writable rw;
    a.writable = nb::try_cast(h, rw, false);
    a.rank = int(ro.ndim());
    if (a.rank > kMaxRank) value_error("arrays of more than " + std::to_string(kMaxRank) + " dimensions are not supported");
    a.data = static_cast<char*>(const_cast<void*>(ro.data()));
    const nb::dlpack::dtype dt = ro.dtype();
    const bool float_code = dt.code == std::uint8_t(nb::dlpack::dtype_code::Float) && dt.lanes == 1;
    const bool bfloat_code = dt.code == std::uint8_t(nb::dlpack::dtype_code::Bfloat) && dt.lanes == 1;
    a.type = float_code && dt.bits == 32   ? NPY_FLOAT32
             : float_code && dt.bits == 64 ? NPY_FLOAT64
             : float_code && dt.bits == 16 ? NPY_HALF
             : bfloat_code && dt.bits == 16 ? kNpyBfloat16
                                            : NPY_NOTYPE;
    a.dl_dtype = ro.dtype();
    for (int d = 0; d < a.rank; ++d) {
        a.shape[d] = std::int64_t(ro.shape(std::size_t(d)));
        a.strides[d] = ro.stride(std::size_t(d));
    }
    const std::int64_t item = dt.bits / 8;
    std::int64_t byte_strides[kMaxRank];
    for (int d = 0; d < a.rank; ++d) byte_strides[d] = a.strides[d] * item;
    a.find_extent(byte_strides, item);
    a.keep_alive = nb::cast(ro);
    if (a.type != NPY_NOTYPE && reinterpret_cast<std::uintptr_t>(a.data) % std::uintptr_t(item) != 0) {
        // Misaligned (torch.frombuffer with an offset): an aligned copy, made through a NumPy
        // view of the memory; bfloat16 has a NumPy dtype only with ml_dtypes, so its view
        // carries the bits as uint16.
        npy_intp dims[kMaxRank], steps[kMaxRank];
        for (int d = 0; d < a.rank; ++d) {
            dims[d] = npy_intp(a.shape[d]);
            steps[d] = npy_intp(a.strides[d] * item);
        }
        const int carrier = a.type == kNpyBfloat16 ? NPY_UINT16 : a.type;
        PyObject* view = PyArray_NewFromDescr(&PyArray_Type, PyArray_DescrFromType(carrier), a.rank, dims, steps,
                                              a.data, a.writable ? NPY_ARRAY_WRITEABLE : 0, nullptr);
        if (!view) throw nb::python_error();
        nb::object owner = nb::steal(view);
        if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(view), a.keep_alive.release().ptr()) < 0)
            throw nb::python_error();
        take_aligned_copy(owner, a);
    }
    return true;
}

// Takes an array argument into `a` (a fresh ArrayRef); anything else is a TypeError naming
// the argument. Filled in place: moving an ArrayRef copies its two kMaxRank arrays, which
// took about a tenth of a small eval call (perf: ArrayRef::operator=).
inline void take_array(nb::handle h, const char* name, ArrayRef& a) {
    if (!h.is_none() && fill_from_numpy(h, a)) return;
    // A tensor that requires grad would be read (or written) outside autograd, cutting its graph.
    if (nb::hasattr(h, "requires_grad") && nb::bool_(h.attr("requires_grad")))
        type_error(std::string(name) + " is a tensor that requires grad; batchnorm's NumPy API would cut its " +
                   "autograd graph: pass tensor.detach(), or use batchnorm.torch for autograd");
    // A lazily negated view (torch's negative bit): DLPack hands over the memory without the sign.
    if (nb::hasattr(h, "is_neg") && nb::bool_(h.attr("is_neg")()))
        type_error(std::string(name) + " is a tensor with its negative bit set (a lazy negation, e.g. the " +
                   "imaginary part of a conjugate); pass tensor.resolve_neg()");
    if (!h.is_none() && fill_from_dlpack(h, a)) return;
    type_error(std::string(name) + " must be a NumPy array or a CPU tensor supporting DLPack, got " + kind_of(h));
}

inline ArrayRef take_array(nb::handle h, const char* name) {
    ArrayRef a;
    take_array(h, name, a);
    return a;
}

template <class T>
void check_dtype(const ArrayRef& a, const char* name) {
    if (a.type != numpy_type<T>())
        type_error(std::string(name) + " has dtype " + a.dtype_name() + " but the input has dtype " +
                   dtype_name<T>() + ": pass arrays of one dtype (batchnorm never casts silently)");
}

// A per-channel array (weight, bias, statistics) for an input of storage type S: of dtype
// compute_t<S>, which is S itself except for the half types, whose per-channel arrays are float32.
template <class S>
void check_channel_dtype(const ArrayRef& a, const char* name) {
    using P = compute_t<S>;
    if constexpr (std::is_same_v<S, P>) {
        check_dtype<S>(a, name);
    } else if (a.type != numpy_type<P>()) {
        type_error(std::string(name) + " has dtype " + a.dtype_name() + " but must be " + dtype_name<P>() +
                   " for an input of dtype " + dtype_name<S>() +
                   " (weight, bias and statistics stay float32; batchnorm never casts silently)");
    }
}

// An array the call writes: not read-only, and no two of its elements at one address (a zero
// stride over more than one element, as broadcast_to or as_strided make; torch refuses the same
// for out= tensors), where every write but the last would be lost. An empty array has no
// elements to share one (NumPy 2 gives np.zeros((0, 3, 4)) all-zero strides).
inline void check_writable(const ArrayRef& a, const char* name) {
    if (!a.writable) value_error(std::string(name) + " is read-only; pass a writable array");
    for (int d = 0; d < a.rank; ++d)
        if (a.shape[d] == 0) return;
    for (int d = 0; d < a.rank; ++d)
        if (a.strides[d] == 0 && a.shape[d] > 1)
            value_error(std::string(name) + " has more than one element at one memory location (a zero stride "
                        "in dimension " + std::to_string(d) + "); pass an array whose elements are separate");
}

// The gcd of an array's strides in bytes, over the dimensions longer than one (0 for at most one
// element): every element starts at `begin` plus a multiple of it.
inline std::int64_t byte_step(const ArrayRef& a) {
    if (a.caller_step >= 0) return a.caller_step;
    std::int64_t step = 0;
    for (int d = 0; d < a.rank; ++d)
        if (a.shape[d] > 1) step = std::gcd(step, std::abs(a.strides[d]) * a.itemsize);
    return step;
}

// Whether two arrays share a byte of memory: their extents meet, and their elements are not
// interleaved apart (x[0::2] and x[1::2], which torch also takes as separate arrays). The
// elements of each start at its begin plus multiples of g, the gcd of both arrays' steps, so
// where a's elements end before b's start modulo g and b's end before the next of a's, none
// meet. Exact for the usual cases; for other arrays whose extents meet it may say they overlap
// when they do not (the caller then refuses, or copies, as for overlapping arrays).
inline bool overlaps(const ArrayRef& a, const ArrayRef& b) {
    if (!(a.begin < b.end && b.begin < a.end)) return false;
    const std::int64_t g = std::gcd(byte_step(a), byte_step(b));
    if (g == 0) return true;
    const std::int64_t gap = ((b.begin - a.begin) % g + g) % g;  // b's first byte past a's element, mod g
    return !(a.itemsize <= gap && gap + b.itemsize <= g);
}

// Outputs of this many bytes or more start on a cache line, as torch's allocator places every
// tensor: glibc's malloc (NumPy's) returns addresses 16 bytes past one (its chunk header), so
// every 64-byte vector the kernels store, and every one the next call reads back, straddled two
// lines (8x128x8x8 float32: 3-6 % per call). The memory is still NumPy's, a byte array a line
// longer that the output lies in (its base): NumPy's allocator gives huge pages to large
// arrays, without which a fresh 64 MiB output took 16,000 page faults (4.4x its call's time).
// Smaller arrays stay NumPy's own (a second object costs more than the lines they would save).
// From kPageMatchedFrom on, an output written from an input (`near`) starts at the input's
// offset within a page, rounded down to a line, not at the next line: NumPy's large arrays
// start 16 bytes past a page, the next line 48 bytes further on, and an output that many bytes
// ahead of its input in the low address bits makes the loads wait on the stores. AMD EPYC Zen
// 3, 1 thread, float32 64x64x56x56 from a NumPy array into a new output: eval 9.3 -> 7.6 ms,
// training 11.5 -> 9.9, backward 15.9 -> 13.1; an out= so placed cost 33-38 % there, 10-20 %
// on 1-2 MiB arrays.
constexpr std::int64_t kAlignedFrom = 1024, kPageMatchedFrom = 256 << 10;
constexpr std::uintptr_t kCacheLine = 64, kPage = 4096;

// Where an output in a byte array from `memory` starts: the first cache line, or with `near`,
// the first address at near's offset within a page rounded down to a line (`memory` then has
// a page to spare).
inline char* output_start(char* memory, const void* near) {
    const auto at = reinterpret_cast<std::uintptr_t>(memory);
    if (!near) return memory + (kCacheLine - at % kCacheLine) % kCacheLine;
    const std::uintptr_t target = reinterpret_cast<std::uintptr_t>(near) % kPage / kCacheLine * kCacheLine;
    return memory + (target + kPage - at % kPage) % kPage;
}

// A new NumPy array of T with the given shape and element strides (a dense permutation).
// `like`: the NumPy dtype of the input, for bfloat16 (see new_descr); `near`: the data of the
// input it is computed from, or null (see kPageMatchedFrom).
template <class T>
nb::object new_array(int rank, const std::int64_t* shape, const std::int64_t* strides, PyObject* like = nullptr,
                     const void* near = nullptr) {
    npy_intp dims[kMaxRank], steps[kMaxRank];
    for (int d = 0; d < rank; ++d) {
        dims[d] = npy_intp(shape[d]);
        steps[d] = npy_intp(strides[d] * std::int64_t(sizeof(T)));
    }
    PyArray_Descr* descr = new_descr<T>(reinterpret_cast<PyArray_Descr*>(like));
    std::int64_t bytes = std::int64_t(sizeof(T));
    for (int d = 0; d < rank; ++d) bytes *= shape[d];
    if (bytes < kAlignedFrom) {
        PyObject* array = PyArray_NewFromDescr(&PyArray_Type, descr, rank, dims, steps, nullptr, 0, nullptr);
        if (!array) throw nb::python_error();
        return nb::steal(array);
    }
    if (bytes < kPageMatchedFrom) near = nullptr;
    npy_intp padded = npy_intp(bytes + std::int64_t(near ? kPage : kCacheLine) - 1);
    nb::object memory = nb::steal(PyArray_SimpleNew(1, &padded, NPY_UINT8));
    if (!memory.is_valid()) {
        Py_DECREF(descr);
        throw nb::python_error();
    }
    char* start = output_start(static_cast<char*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(memory.ptr()))), near);
    PyObject* array =
        PyArray_NewFromDescr(&PyArray_Type, descr, rank, dims, steps, start, NPY_ARRAY_WRITEABLE, nullptr);
    if (!array) throw nb::python_error();
    nb::object result = nb::steal(array);
    if (PyArray_SetBaseObject(reinterpret_cast<PyArrayObject*>(array), memory.release().ptr()) < 0)
        throw nb::python_error();
    return result;
}

template <class T>
T* data_of(const nb::object& array) {
    return static_cast<T*>(PyArray_DATA(reinterpret_cast<PyArrayObject*>(array.ptr())));
}

template <class T>
nb::object new_vector(std::int64_t n) {
    const std::int64_t one = 1;
    return new_array<T>(1, &n, &one);
}

// A 2-D copy that transposes: one view steps by one element along one axis, the other along
// the other (NCHW <-> NHWC, [C, H*W] <-> [H*W, C] per image). Element by element, every
// store (or load) of the strided side touched a new cache line, about 2 ns a value: a
// channels-last input with an NCHW residual took 8x the call's time (8x64x16x16 float32,
// Intel Xeon). In square tiles of a cache line per side, each line a tile touches is used
// whole while it is in L1.
template <class T>
void copy_tiles(const T* src, const std::int64_t* src_strides, T* dst, const std::int64_t* dst_strides,
                const std::int64_t* shape) {
    constexpr std::int64_t tile = std::max<std::int64_t>(8, 64 / std::int64_t(sizeof(T)));
    const std::int64_t s0 = src_strides[0], s1 = src_strides[1], t0 = dst_strides[0], t1 = dst_strides[1];
    for (std::int64_t i0 = 0; i0 < shape[0]; i0 += tile)
        for (std::int64_t j0 = 0; j0 < shape[1]; j0 += tile) {
            const std::int64_t i1 = std::min(shape[0], i0 + tile), j1 = std::min(shape[1], j0 + tile);
            for (std::int64_t i = i0; i < i1; ++i)
                for (std::int64_t j = j0; j < j1; ++j) dst[i * t0 + j * t1] = src[i * s0 + j * s1];
        }
}

// Whether a 2-D copy transposes (see copy_tiles): neither axis is unit-stride in both views,
// and each view is unit-stride in one of them.
inline bool transposes(const std::int64_t* src_strides, const std::int64_t* dst_strides) {
    const bool src_unit = src_strides[0] == 1 || src_strides[1] == 1;
    const bool dst_unit = dst_strides[0] == 1 || dst_strides[1] == 1;
    return src_unit && dst_unit && !(src_strides[1] == 1 && dst_strides[1] == 1) &&
           !(src_strides[0] == 1 && dst_strides[0] == 1);
}

// copy_strided over axes already merged: the innermost axis is a tight loop (a memcpy when
// both views are dense there, a fill when the source repeats one value); the innermost two in
// tiles when the copy transposes them.
template <class T>
void copy_runs(const T* src, const std::int64_t* src_strides, T* dst, const std::int64_t* dst_strides,
               const std::int64_t* shape, int rank) {
    if (rank == 0) {
        *dst = *src;
        return;
    }
    if (rank == 1) {
        const std::int64_t n = shape[0], s = src_strides[0], t = dst_strides[0];
        if (s == 1 && t == 1) {
            std::memcpy(dst, src, std::size_t(n) * sizeof(T));
        } else if (s == 0 && t == 1) {
            std::fill_n(dst, n, *src);
        } else {
            for (std::int64_t i = 0; i < n; ++i) dst[i * t] = src[i * s];
        }
        return;
    }
    if (rank == 2 && transposes(src_strides, dst_strides)) return copy_tiles(src, src_strides, dst, dst_strides, shape);
    for (std::int64_t i = 0; i < shape[0]; ++i)
        copy_runs(src + i * src_strides[0], src_strides + 1, dst + i * dst_strides[0], dst_strides + 1, shape + 1,
                  rank - 1);
}

// Element-wise copy between two strided views of the same shape (strides in elements). Axes
// that step as one run in both views merge first, so a dense or broadcast (stride 0) source,
// such as the gradient of y.sum(), copies as a few long runs: element by element it cost
// 3 ns a value, ten times the kernel it fed.
template <class T>
void copy_strided(const T* src, const std::int64_t* src_strides, T* dst, const std::int64_t* dst_strides,
                  const std::int64_t* shape, int rank) {
    std::int64_t n[kMaxRank], s[kMaxRank], t[kMaxRank];
    int merged = 0;
    for (int d = 0; d < rank; ++d) {
        if (shape[d] == 0) return;
        if (shape[d] == 1) continue;  // moves no address
        const int last = merged - 1;
        if (merged > 0 && s[last] == src_strides[d] * shape[d] && t[last] == dst_strides[d] * shape[d]) {
            n[last] *= shape[d];
            s[last] = src_strides[d];
            t[last] = dst_strides[d];
        } else {
            n[merged] = shape[d];
            s[merged] = src_strides[d];
            t[merged] = dst_strides[d];
            ++merged;
        }
    }
    copy_runs(src, s, dst, t, n, merged);
}

// The memory the kernels see for one call: the shape and element strides of the input's
// buffer (its own memory when dense in some axis order, else a C-ordered copy) and the
// (outer, C, inner) view of it.
struct Layout {
    int rank = 0;
    std::int64_t shape[kMaxRank];  // entries [0, rank), as in ArrayRef
    std::int64_t strides[kMaxRank];
    Shape view;

    // Same element positions, ignoring axes of length 1 (their stride is arbitrary).
    bool matches(const ArrayRef& a) const {
        for (int d = 0; d < rank; ++d)
            if (shape[d] > 1 && strides[d] != a.strides[d]) return false;
        return true;
    }
    bool same_shape(const ArrayRef& a) const {
        return a.rank == rank && std::equal(shape, shape + rank, a.shape);
    }
    std::vector<std::int64_t> shape_vector() const { return {shape, shape + rank}; }
};

// If the elements are dense in some order of the axes (C order, channels-last, any
// permutation), the (outer, C, inner) view of that memory; else nothing.
inline std::optional<Shape> dense_view(const ArrayRef& a, int axis) {
    // The axes by decreasing stride, ties in axis order. An insertion sort: the axes mostly come
    // sorted already, and std::stable_sort takes a heap buffer (5 % of a small eval call, perf).
    int axes[kMaxRank], n = 0;
    for (int d = 0; d < a.rank; ++d) {
        if (a.shape[d] == 1) continue;
        int i = n++;
        for (; i > 0 && a.strides[axes[i - 1]] < a.strides[d]; --i) axes[i] = axes[i - 1];
        axes[i] = d;
    }
    std::int64_t expected = 1;
    for (int i = n; i-- > 0;) {
        if (a.strides[axes[i]] != expected) return std::nullopt;
        expected *= a.shape[axes[i]];
    }
    const std::int64_t total = expected, channels = a.shape[axis];
    if (channels == 1) return Shape{1, 1, total};
    std::int64_t inner = 1;
    for (int i = 0; i < n; ++i)
        if (a.strides[axes[i]] < a.strides[axis]) inner *= a.shape[axes[i]];
    return Shape{total / (channels * inner), channels, inner};
}

inline Layout layout_of(const ArrayRef& x, int axis) {
    Layout L;
    L.rank = x.rank;
    std::copy(x.shape, x.shape + x.rank, L.shape);
    if (x.size() != 0) {
        if (const auto view = dense_view(x, axis)) {
            std::copy(x.strides, x.strides + x.rank, L.strides);
            L.view = *view;
            return L;
        }
    }
    std::int64_t step = 1, outer = 1, inner = 1;
    for (int d = x.rank; d-- > 0;) {
        L.strides[d] = step;
        step *= x.shape[d];
        if (d < axis) outer *= x.shape[d];
        if (d > axis) inner *= x.shape[d];
    }
    L.view = Shape{outer, x.shape[axis], inner};
    return L;
}

// Releases the GIL around a call's kernel, unless the call is too small for that to pay:
// releasing and taking it back costs about 0.06 us, a twentieth of a (1, 64, 7, 7) eval call,
// while no other Python thread would get much done in the microsecond it waits (NumPy keeps
// the GIL for its small loops the same way: NPY_BEGIN_THREADS_THRESHOLDED).
class KernelSection {
public:
    explicit KernelSection(std::int64_t values) {
        if (values >= kReleaseFrom) state_ = PyEval_SaveThread();
    }
    ~KernelSection() {
        if (state_) PyEval_RestoreThread(state_);
    }
    KernelSection(const KernelSection&) = delete;
    KernelSection& operator=(const KernelSection&) = delete;

private:
    static constexpr std::int64_t kReleaseFrom = 4096;  // values; a kernel of about half a microsecond
    PyThreadState* state_ = nullptr;
};

template <class T>
struct AlignedRelease {
    void operator()(T* p) const { ::operator delete(p, std::align_val_t(64)); }
};

template <class T>
using Buffer = std::unique_ptr<T, AlignedRelease<T>>;

template <class T>
Buffer<T> new_buffer(std::int64_t count) {
    return Buffer<T>(static_cast<T*>(::operator new(std::size_t(std::max<std::int64_t>(count, 1)) * sizeof(T),
                                                      std::align_val_t(64))));
}

// An array argument read in layout L: its own memory when it has that layout, else a copy.
template <class T>
class ReadAs {
public:
    ReadAs(const ArrayRef& a, const Layout& L) {
        const T* src = reinterpret_cast<const T*>(a.data);
        if (L.view.size() == 0 || L.matches(a)) {
            data_ = src;
            return;
        }
        copy_ = new_buffer<T>(L.view.size());  // L's strides are dense: exactly size() elements
        copy_strided(src, a.strides, copy_.get(), L.strides, L.shape, L.rank);
        data_ = copy_.get();
    }
    const T* data() const { return data_; }

private:
    Buffer<T> copy_;
    const T* data_ = nullptr;
};

// Where a same-shaped result goes: a new array in layout L, or the caller's `out`, written
// directly when it has layout L and does not partly overlap an input, else through a buffer
// in layout L that finish() copies into it.
template <class T>
class WriteAs {
public:
    WriteAs(nb::handle out, const Layout& L, const char* name, std::initializer_list<const ArrayRef*> inputs)
        : layout_(L) {
        if (out.is_none()) {
            // the first input is the main one, whose NumPy dtype a new result takes (bfloat16)
            const ArrayRef* main = inputs.size() ? *inputs.begin() : nullptr;
            result_ = new_array<T>(L.rank, L.shape, L.strides, main ? main->descr : nullptr, main ? main->data : nullptr);
            data_ = data_of<T>(result_);
            return;
        }
        take_array(out, name, out_);
        check_dtype<T>(out_, name);
        if (!L.same_shape(out_))
            value_error(std::string(name) + " must have the input's shape " + shape_string(L.shape_vector()) +
                        ", got " + shape_string(out_.shape_vector()));
        check_writable(out_, name);
        result_ = nb::borrow(out);
        bool direct = L.matches(out_);
        for (const ArrayRef* input : inputs)
            if (input && input->data != out_.data && overlaps(*input, out_)) direct = false;
        if (direct) {
            data_ = reinterpret_cast<T*>(out_.data);
        } else {
            buffer_ = new_buffer<T>(L.view.size());
            data_ = buffer_.get();
        }
    }

    T* data() const { return data_; }
    const ArrayRef* out() const { return out_.data ? &out_ : nullptr; }

    nb::object finish() {
        if (buffer_)
            copy_strided<T>(buffer_.get(), layout_.strides, reinterpret_cast<T*>(out_.data), out_.strides,
                            layout_.shape, layout_.rank);
        copy_back(out_);
        // out= a torch tensor is an in-place write: bump its version counter as torch's in-place
        // ops do, so that a backward recorded earlier with it saved raises instead of using new values.
        if (out_.data && !PyArray_Check(result_.ptr()) && nb::hasattr(result_, "_version"))
            nb::module_::import_("torch.autograd.graph").attr("increment_version")(result_);
        return result_;
    }

private:
    const Layout& layout_;
    ArrayRef out_;
    nb::object result_;
    Buffer<T> buffer_;
    T* data_ = nullptr;
};

// A per-channel argument for an input of storage type S: 1-D with C values of dtype
// compute_t<S> (T), or null for None. Strided ones are copied; `writable` ones (running
// statistics) are written back by commit().
template <class S, class T = compute_t<S>>
class ChannelArray {
public:
    ChannelArray(nb::handle h, const char* name, std::int64_t channels, bool writable = false) {
        if (h.is_none()) return;
        take_array(h, name, array_);
        check_channel_dtype<S>(array_, name);
        if (array_.rank != 1 || array_.shape[0] != channels)
            value_error(std::string(name) + " must have shape (" + std::to_string(channels) +
                        ",), one value per channel of the input, got " + shape_string(array_.shape_vector()));
        if (writable) check_writable(array_, name);
        target_ = reinterpret_cast<T*>(array_.data);
        stride_ = channels > 1 ? array_.strides[0] : 1;
        if (stride_ == 1) {
            data_ = target_;
            return;
        }
        copy_.resize(std::size_t(channels));
        for (std::int64_t c = 0; c < channels; ++c) copy_[std::size_t(c)] = target_[c * stride_];
        data_ = copy_.data();
    }

    T* data() const { return data_; }
    const ArrayRef* array() const { return data_ ? &array_ : nullptr; }
    void commit() const {
        for (std::size_t c = 0; c < copy_.size(); ++c) target_[std::int64_t(c) * stride_] = copy_[c];
        copy_back(array_);
    }

private:
    ArrayRef array_;
    std::vector<T> copy_;
    T* target_ = nullptr;
    T* data_ = nullptr;
    std::int64_t stride_ = 1;
};

// A layout whose buffer holds the axes in `order` (outermost first), densely: the input's own
// memory when it is dense in that order, else what ReadAs copies into. view: all values as one
// run (callers that need another view set it).
inline Layout ordered_layout(const ArrayRef& x, const int* order) {
    Layout L;
    L.rank = x.rank;
    std::copy(x.shape, x.shape + x.rank, L.shape);
    std::int64_t step = 1;
    for (int i = x.rank; i-- > 0;) {
        L.strides[order[i]] = step;
        step *= x.shape[order[i]];
    }
    L.view = Shape{1, 1, step};  // ReadAs copies view.size() values
    return L;
}

inline Layout c_order_layout(const ArrayRef& x) {
    int order[kMaxRank];
    for (int d = 0; d < x.rank; ++d) order[d] = d;
    return ordered_layout(x, order);
}

// A parameter argument of any shape (weight, bias of layer norm: the normalized shape; saved
// statistics) for an input of storage type S: dtype compute_t<S> (T), read densely in C order
// (copied when strided), or null for None.
template <class S, class T = compute_t<S>>
class ParamArray {
public:
    ParamArray(nb::handle h, const char* name, const std::vector<std::int64_t>& shape) {
        if (h.is_none()) return;
        take_array(h, name, array_);
        check_channel_dtype<S>(array_, name);
        if (array_.shape_vector() != shape)
            value_error(std::string(name) + " must have shape " + shape_string(shape) + ", got " +
                        shape_string(array_.shape_vector()));
        const Layout L = c_order_layout(array_);
        read_.emplace(array_, L);
    }
    const T* data() const { return read_ ? read_->data() : nullptr; }
    const ArrayRef* array() const { return read_ ? &array_ : nullptr; }

private:
    ArrayRef array_;
    std::optional<ReadAs<T>> read_;
};

// A float64 vector argument of n values (exchanged statistics and sums), read densely.
class Float64Vector {
public:
    Float64Vector(nb::handle h, const char* name, std::int64_t n) {
        take_array(h, name, array_);
        if (array_.type != NPY_FLOAT64)
            type_error(std::string(name) + " must have dtype float64, got " + array_.dtype_name());
        if (array_.rank != 1 || array_.shape[0] != n)
            value_error(std::string(name) + " must have shape (" + std::to_string(n) +
                        ",), one value per channel of the input, got " + shape_string(array_.shape_vector()));
        read_.emplace(array_, c_order_layout(array_));
    }
    const double* data() const { return read_->data(); }

private:
    ArrayRef array_;
    std::optional<ReadAs<double>> read_;
};

}  // namespace batchnorm::python
